"""Benchmark of solar_kernels.contrastive_loss against its peers, in the same run.

Peers: the eager reference that materialises the logits (open_clip ClipLoss style:
``solar_kernels.reference.contrastive_loss_reference``), and on CUDA Inf-CL
(``inf_cl.cal_inf_loss``, once per direction) when it is importable.

CPU (fp32, D = 768, symmetric loss, forward + backward):
  * time at N = 4096 (target: at least 0.7x the eager reference's speed);
  * peak memory at N = 32768 (target: at most 1/20 of the eager reference's).  The eager
    peer runs in a child process under an address-space cap (--eager-cap-gb) so that it
    cannot take the machine down; when it runs out of memory the row says so, and the eager
    peak measured at smaller N is extrapolated (it grows as N^2).
CUDA (bf16, D = 768, N = 16k .. 256k): time and peak memory vs Inf-CL and the eager
reference, and the overhead of mine_k = 8 with hardness > 0.

    python bench/bench_loss.py --device cpu [--quick] [--out bench/out/cpu]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Recorder, bench, peak_memory  # noqa: E402

import solar_kernels as sk  # noqa: E402
from solar_kernels.reference import contrastive_loss_reference  # noqa: E402

TEMPERATURE = 0.05


def setup(n: int, d: int, dtype=torch.float32, device="cpu", seed=0):
    """Normalised q, k [n, d] requiring grad (the shared factory of speed and memory runs)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(device, dtype).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(device, dtype).requires_grad_()
    return q, k


def step_solar(q, k, **kw):
    def run():
        q.grad = k.grad = None
        out = sk.contrastive_loss(q, k, temperature=TEMPERATURE, **kw)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        return loss.detach()
    return run


def step_eager(q, k, **kw):
    def run():
        q.grad = k.grad = None
        out = contrastive_loss_reference(q, k, temperature=TEMPERATURE, **kw)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        return loss.detach()
    return run


def step_infcl(q, k):
    from inf_cl import cal_inf_loss

    scale = torch.tensor(1.0 / TEMPERATURE, device=q.device)  # cal_inf_loss(q, k, labels=None, scale=None)

    def run():
        q.grad = k.grad = None
        loss = 0.5 * (cal_inf_loss(q, k, scale=scale) + cal_inf_loss(k, q, scale=scale))
        loss.backward()
        return loss.detach()
    return run


# ---------------------------------------------------------------------------------------- CPU
def _eager_child(n: int, d: int, cap_gb: float) -> dict:
    """Run the eager reference's peak-memory case in a child process under an address-space cap."""
    code = (
        "import sys, json, resource, torch; sys.path.insert(0, %r); "
        "cap = int(%r * 2**30); resource.setrlimit(resource.RLIMIT_AS, (cap, cap)); "
        "import bench_loss as b; from harness import peak_memory; torch.set_num_threads(%d); "
        "q, k = b.setup(%d, %d)\n"
        "try:\n    p = peak_memory(b.step_eager(q, k), 'cpu'); print(json.dumps({'peak': p}))\n"
        "except (RuntimeError, MemoryError) as e:\n    print(json.dumps({'oom': str(e).splitlines()[0][:200]}))\n"
    ) % (os.path.dirname(os.path.abspath(__file__)), cap_gb, torch.get_num_threads(), n, d)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    for line in r.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    return {"oom": f"child failed (rc {r.returncode}): {r.stderr.strip().splitlines()[-1:] or ''}"}


def cpu(rec: Recorder, args) -> None:
    d = 768
    if not args.skip_time:
        cpu_time(rec, args, d)
    if not args.skip_memory:
        cpu_memory(rec, args, d)


def cpu_time(rec: Recorder, args, d: int) -> None:
    n = 1024 if args.quick else 4096
    q, k = setup(n, d)
    reps = 3 if args.quick else 5
    st_e = bench(step_eager(q, k), warmup=1, reps=reps, device="cpu")
    st_s = bench(step_solar(q, k), warmup=1, reps=reps, device="cpu")
    flops = 4 * 2 * n * n * d  # ours: S in forward, S + dq + dk in backward
    rec.add(impl="eager", case={"N": n, "D": d, "dtype": "fp32", "what": "time"}, stats=st_e)
    rec.add(impl="solar", case={"N": n, "D": d, "dtype": "fp32", "what": "time"}, stats=st_s,
            speed_vs_eager=st_e.median_ms / st_s.median_ms, gflops=flops / st_s.median_s / 1e9)
    print(f"CPU N={n}: solar {st_s}  eager {st_e}  speed ratio {st_e.median_ms / st_s.median_ms:.2f}x", flush=True)

    # the full SOLAR stage-2 options: groups, hard negatives, hardness, mining
    g = torch.arange(n) // 4
    hn = torch.nn.functional.normalize(torch.randn(n, 4, d), dim=2).requires_grad_()
    kw = dict(groups=g, hard_negatives=hn, hardness=0.5, mine_k=8)
    st_e2 = bench(step_eager(q, k, **kw), warmup=1, reps=reps, device="cpu")
    st_s2 = bench(step_solar(q, k, **kw), warmup=1, reps=reps, device="cpu")
    rec.add(impl="eager", case={"N": n, "D": d, "dtype": "fp32", "what": "time groups+hn+hardness+mine8"},
            stats=st_e2)
    rec.add(impl="solar", case={"N": n, "D": d, "dtype": "fp32", "what": "time groups+hn+hardness+mine8"},
            stats=st_s2, speed_vs_eager=st_e2.median_ms / st_s2.median_ms,
            overhead_vs_plain=st_s2.median_ms / st_s.median_ms)
    print(f"CPU N={n} groups+hn+hardness+mine_k=8: solar {st_s2}  eager {st_e2}", flush=True)
    del q, k, hn


def cpu_memory(rec: Recorder, args, d: int) -> None:
    nm = args.mem_n or (8192 if args.quick else 32768)
    q, k = setup(nm, d)
    p_s = peak_memory(step_solar(q, k), "cpu")
    del q, k
    rec.add(impl="solar", case={"N": nm, "D": d, "dtype": "fp32", "what": "peak memory"}, peak_mib=p_s / 2 ** 20)
    print(f"CPU N={nm}: solar peak {p_s / 2 ** 20:.1f} MiB", flush=True)
    # eager at half the size (a quarter of the logits), then at nm under the cap
    small = nm // 2
    e_small = _eager_child(small, d, args.eager_cap_gb)
    if "peak" in e_small:
        rec.add(impl="eager", case={"N": small, "D": d, "dtype": "fp32", "what": "peak memory"},
                peak_mib=e_small["peak"] / 2 ** 20)
    e = _eager_child(nm, d, args.eager_cap_gb)
    if "peak" in e:
        rec.add(impl="eager", case={"N": nm, "D": d, "dtype": "fp32", "what": "peak memory"},
                peak_mib=e["peak"] / 2 ** 20, solar_fraction=p_s / e["peak"])
        print(f"CPU N={nm}: eager peak {e['peak'] / 2 ** 20:.1f} MiB; solar / eager = {p_s / e['peak']:.4f}")
    else:
        extrap = e_small.get("peak", 0) * (nm / small) ** 2
        rec.add(impl="eager", case={"N": nm, "D": d, "dtype": "fp32", "what": "peak memory"},
                note=f"out of memory under a {args.eager_cap_gb} GiB cap: {e['oom']}",
                peak_mib_extrapolated=extrap / 2 ** 20,
                solar_fraction_vs_cap=p_s / (args.eager_cap_gb * 2 ** 30),
                solar_fraction_vs_extrapolated=(p_s / extrap) if extrap else float("nan"))
        print(f"CPU N={nm}: eager out of memory under {args.eager_cap_gb} GiB ({e['oom']}); "
              f"extrapolated eager peak {extrap / 2 ** 20:.0f} MiB; "
              f"solar / cap = {p_s / (args.eager_cap_gb * 2 ** 30):.4f}")


# ---------------------------------------------------------------------------------------- CUDA
def gpu(rec: Recorder, args) -> None:
    dev = torch.device("cuda")
    d = 768
    sizes = [16384, 65536] if args.quick else [16384, 32768, 65536, 131072, 262144]
    try:
        importlib.import_module("inf_cl")  # importable? (the peer's own import below)

        have_infcl = True
    except Exception as e:  # pragma: no cover - optional peer
        have_infcl = False
        print(f"Inf-CL not importable ({type(e).__name__}: {e}); skipping that peer")
    for n in sizes:
        q, k = setup(n, d, torch.bfloat16, dev)
        reps = 3 if n >= 131072 else 5
        case = {"N": n, "D": d, "dtype": "bf16"}
        st_s = bench(step_solar(q, k), warmup=1, reps=reps, device=dev)
        p_s = peak_memory(step_solar(q, k), dev)
        flops = 5 * 2 * n * n * d  # 2 stat passes + S, dq, dk in backward
        rec.add(impl="solar", case=case, stats=st_s, peak_mib=p_s / 2 ** 20, tflops=flops / st_s.median_s / 1e12)
        st_m = bench(step_solar(q, k, mine_k=8, hardness=0.5), warmup=1, reps=reps, device=dev)
        rec.add(impl="solar+mine8+hardness", case=case, stats=st_m, overhead=st_m.median_ms / st_s.median_ms)
        if have_infcl:
            try:
                st_i = bench(step_infcl(q, k), warmup=1, reps=reps, device=dev)
                p_i = peak_memory(step_infcl(q, k), dev)
                rec.add(impl="inf_cl", case=case, stats=st_i, peak_mib=p_i / 2 ** 20,
                        solar_time_fraction=st_s.median_ms / st_i.median_ms, solar_mem_fraction=p_s / max(p_i, 1))
            except Exception as e:  # pragma: no cover
                rec.add(impl="inf_cl", case=case, note=f"failed: {type(e).__name__}: {e}"[:200])
        if n <= 32768:
            try:
                st_e = bench(step_eager(q, k), warmup=1, reps=reps, device=dev)
                p_e = peak_memory(step_eager(q, k), dev)
                rec.add(impl="eager", case=case, stats=st_e, peak_mib=p_e / 2 ** 20)
            except torch.cuda.OutOfMemoryError:
                rec.add(impl="eager", case=case, note="out of memory")
        del q, k
        torch.cuda.empty_cache()
        rec.write_csv(os.path.join(args.out, "contrastive_loss.csv"))  # keep what is done if a later N times out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "cpu"))
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--mem-n", type=int, default=0, help="N of the CPU peak-memory case (default 32768)")
    ap.add_argument("--skip-time", action="store_true", help="CPU: only the peak-memory case")
    ap.add_argument("--skip-memory", action="store_true", help="CPU: only the timing cases")
    ap.add_argument("--eager-cap-gb", type=float, default=12.0,
                    help="address-space cap of the eager peer's child process in the memory case")
    args = ap.parse_args(argv)
    rec = Recorder("contrastive_loss", device=args.device)
    os.makedirs(args.out, exist_ok=True)
    if args.device == "cuda":
        gpu(rec, args)
    else:
        cpu(rec, args)
    rec.print_table()
    os.makedirs(args.out, exist_ok=True)
    rec.write_csv(os.path.join(args.out, "contrastive_loss.csv"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
