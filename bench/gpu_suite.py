"""The GPU benchmarks of bench/gpu_check.sh, most informative first, one CSV row at a time.

    python bench/gpu_suite.py --out DIR [--deadline UNIX_TIME] [--dry-run]

Sections, in order (each skipped once the deadline is near, each failure recorded as a row
and the next section run):

1. loss:    symmetric contrastive loss, bf16, D = 768, N = 16384 and 65536: forward and
            forward + backward timed separately (backward = the difference), peak memory,
            against Inf-CL (``inf_cl.cal_inf_loss`` both directions) and the eager reference
            (open_clip-style full logits), and torch.compile of the eager reference at one N;
            the overhead of mine_k = 8 with hardness 0.5; TFLOP/s against the 4 N^2 D-GEMM
            floor (FLOOR_TFLOPS).
2. pooled:  pooled_contrastive_loss at N = 16384, L = 77, D = 768, bf16, against the unfused
            masked_pool + contrastive_loss.
3. sweep:   each config of the loss kernels' autotuning sets forced in turn, then autotuned (N = 16384, fwd + bwd).
4. pool:    masked_pool forward and forward + backward on x of about 1.9 GB (beyond L2),
            bool masks V = 1 and 3, GB/s against a device-to-device copy of the same bytes.
5. search:  Index.search at N = 1M, d = 768, m in {1, 16, 1024}, k in {10, 1024}, fp32 / fp16 /
            int8, against torch mm + topk in the same dtype (int8: torch._int_mm where it
            applies, else fp16 of the same codes); every result is checked against torch's
            exact top-k on the card (a "FAILED" row when it differs).
6. kernels: registers and spills of every Triton kernel compiled in this process, as the real
            driver reports them.

--dry-run runs the same control flow on CPU at tiny sizes (Triton interpreted, no Inf-CL, no
torch.compile): CI runs it so that the script cannot rot.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

DRY = "--dry-run" in sys.argv
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harness import Recorder, bench, copy_bandwidth, peak_memory  # noqa: E402

import solar_kernels as sk  # noqa: E402
from solar_kernels.reference import contrastive_loss_reference  # noqa: E402
from solar_kernels.search import quantize_int8  # noqa: E402

FLOOR_TFLOPS = 790.0   # measured bf16 matmul on the H200 lent here (tool library, KINDS.md)
FLOOR_GBPS = 4300.0    # measured device-to-device copy, read + write
TEMPERATURE = 0.05


class Suite:
    def __init__(self, args):
        self.args = args
        self.dev = torch.device("cpu" if args.dry_run else "cuda")
        self.rec = Recorder("gpu_suite", device=self.dev)
        self.csv = os.path.join(args.out, "gpu_suite.csv")

    def time_left(self) -> float:
        return (self.args.deadline - time.time()) if self.args.deadline else float("inf")

    def add(self, **row):
        self.rec.add(**row)
        self.rec.write_csv(self.csv)

    def section(self, name, fn, need_s):
        if self.time_left() < need_s:
            self.add(impl="skipped", case={"section": name}, note=f"{self.time_left():.0f} s left < {need_s} s")
            return
        t0 = time.time()
        try:
            fn(self)
        except Exception as e:  # one section failing must not cost the others
            traceback.print_exc()
            self.add(impl="FAILED", case={"section": name}, note=f"{type(e).__name__}: {e}"[:300])
        print(f"[gpu_suite] {name}: {time.time() - t0:.1f} s", flush=True)

    def timed(self, fn, reps):
        return bench(fn, warmup=1, reps=reps, device=self.dev)


def _qk(n, d, dtype, dev, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(dev, dtype).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(dev, dtype).requires_grad_()
    return q, k


def _fwd_bwd(loss_fn, q, k):
    def fwd():
        with torch.no_grad():
            return loss_fn(q, k)

    def both():
        q.grad = k.grad = None
        loss = loss_fn(q, k)
        loss.backward()
        return loss.detach()
    return fwd, both


def _solar(**kw):
    def f(q, k):
        out = sk.contrastive_loss(q, k, temperature=TEMPERATURE, **kw)
        return out[0] if isinstance(out, tuple) else out
    return f


def _eager(q, k):
    return contrastive_loss_reference(q, k, temperature=TEMPERATURE)


def _infcl():
    from inf_cl import cal_inf_loss

    def f(q, k):
        scale = torch.tensor(1.0 / TEMPERATURE, device=q.device)
        return 0.5 * (cal_inf_loss(q, k, scale=scale) + cal_inf_loss(k, q, scale=scale))
    return f


def section_loss(s: Suite):
    dry = s.args.dry_run
    sizes = [64, 128] if dry else [16384, 65536]
    d = 32 if dry else 768
    dtype = torch.float32 if dry else torch.bfloat16
    peers = {"solar": _solar(), "solar+mine8+hardness": _solar(mine_k=8, hardness=0.5)}
    try:
        peers["inf_cl"] = _infcl()  # raises when inf_cl is not importable
    except Exception as e:
        peers.pop("inf_cl", None)
        s.add(impl="inf_cl", case={"section": "loss"}, note=f"not importable: {type(e).__name__}: {e}"[:200])
    peers["eager"] = _eager
    if not dry:
        peers["eager+torch.compile"] = torch.compile(_eager)
    for n in sizes:
        q, k = _qk(n, d, dtype, s.dev)
        case = {"section": "loss", "N": n, "D": d, "dtype": str(dtype)[6:]}
        floor_ms = 4 * 2 * n * n * d / (FLOOR_TFLOPS * 1e12) * 1e3
        base = None
        for name, fn in peers.items():
            if name == "eager+torch.compile" and n != sizes[0]:
                continue
            if s.time_left() < 30:
                s.add(impl=name, case=case, note="skipped: deadline")
                continue
            try:
                fwd, both = _fwd_bwd(fn, q, k)
                reps = 3 if n >= 65536 else 5
                st_f = s.timed(fwd, reps)
                st_b = s.timed(both, reps)
                peak = peak_memory(both, s.dev)
                row = dict(fwd_ms=st_f.median_ms, bwd_ms=st_b.median_ms - st_f.median_ms,
                           peak_mib=peak / 2 ** 20, floor_ms=floor_ms, x_floor=st_b.median_ms / floor_ms)
                if name == "solar":
                    base = st_b.median_ms
                elif base is not None:
                    row["solar_time_fraction"] = base / st_b.median_ms
                s.add(impl=name, case=case, stats=st_b, **row)
            except Exception as e:  # out of memory, a peer's own failure
                s.add(impl=name, case=case, note=f"failed: {type(e).__name__}: {str(e)[:160]}")
            if not dry:
                torch.cuda.empty_cache()
        del q, k


def section_pooled(s: Suite):
    dry = s.args.dry_run
    n, L, d = (32, 9, 16) if dry else (16384, 77, 768)
    dtype = torch.float32 if dry else torch.bfloat16
    g = torch.Generator().manual_seed(1)
    xq = torch.randn(n, L, d, generator=g).to(s.dev, dtype).requires_grad_()
    xk = torch.randn(n, L, d, generator=g).to(s.dev, dtype).requires_grad_()
    mq = (torch.rand(n, L, generator=g) > 0.3).to(s.dev)
    mk = (torch.rand(n, L, generator=g) > 0.3).to(s.dev)

    def fused():
        xq.grad = xk.grad = None
        loss = sk.pooled_contrastive_loss(xq, mq, xk, mk, temperature=TEMPERATURE)
        loss.backward()
        return loss.detach()

    def unfused():
        xq.grad = xk.grad = None
        fq = sk.masked_pool(xq, mq, normalize=True)
        fk = sk.masked_pool(xk, mk, normalize=True)
        loss = sk.contrastive_loss(fq, fk, temperature=TEMPERATURE)
        loss.backward()
        return loss.detach()

    case = {"section": "pooled", "N": n, "L": L, "D": d, "dtype": str(dtype)[6:]}
    base = None
    for name, fn in (("solar fused", fused), ("masked_pool + contrastive_loss", unfused)):
        st = s.timed(fn, 5)
        peak = peak_memory(fn, s.dev)
        base = base or st.median_ms
        s.add(impl=name, case=case, stats=st, peak_mib=peak / 2 ** 20, fused_time_fraction=base / st.median_ms)


def section_sweep(s: Suite):
    """fwd+bwd of the symmetric loss with each config of each kernel's autotuning set forced
    (the other kernels at their default), then autotuned: what the autotuner chose between."""
    from solar_kernels import _dispatch
    from solar_kernels.ops import contrastive_triton as ct

    dry = s.args.dry_run
    n, d = (128, 32) if dry else (16384, 768)
    dtype = torch.float32 if dry else torch.bfloat16
    q, k = _qk(n, d, dtype, s.dev)
    real = ct.kernel_configs
    variants = [(kernel, i) for kernel in ("stats", "grad", "gemm_dq", "gemm_dk")
                for i in range(len(real(kernel, dtype, n, n, d, "cuda")))]
    if dry:
        variants = variants[:2]
    try:
        for kernel, index in variants + [("autotuned", 0)]:
            if s.time_left() < 20:
                break

            def forced(name, *args, _kernel=kernel, _index=index, **kwargs):
                configs = real(name, *args, **kwargs)
                if _kernel == "autotuned":
                    return configs
                return [configs[_index if name == _kernel and _index < len(configs) else 0]]
            ct.kernel_configs = forced
            label = "autotuned" if kernel == "autotuned" else str(real(kernel, dtype, n, n, d, "cuda")[index])
            case = {"section": "sweep", "N": n, "D": d, "kernel": kernel, "config": label}
            try:
                _, both = _fwd_bwd(_solar(), q, k)
                with _dispatch.kernel_target("cuda"):  # the dry run interprets the CUDA settings too
                    s.add(impl="solar", case=case, stats=s.timed(both, 3))
            except Exception as e:  # e.g. out of shared memory / registers
                s.add(impl="solar", case=case, note=f"failed: {type(e).__name__}: {str(e)[:160]}")
    finally:
        ct.kernel_configs = real


def section_pool(s: Suite):
    dry = s.args.dry_run
    B, L, D = (4, 9, 16) if dry else (16384, 77, 768)   # bf16 x: 1.94 GB, beyond the 60 MB L2
    dtype = torch.float32 if dry else torch.bfloat16
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, L, D, generator=g).to(s.dev, dtype).requires_grad_()
    nbytes = x.numel() * x.element_size()
    copy = copy_bandwidth(nbytes, s.dev, dtype, reps=3 if dry else 10)
    s.add(impl="device copy", case={"section": "pool", "B": B, "L": L, "D": D}, gbps=copy)
    for V in (1, 3):
        m = (torch.rand(V, B, L, generator=g) > 0.3).to(s.dev)
        case = {"section": "pool", "B": B, "L": L, "D": D, "V": V, "dtype": str(dtype)[6:]}
        fwd = lambda: sk.masked_pool(x.detach(), m)  # noqa: E731

        def both():
            x.grad = None
            out = sk.masked_pool(x, m)
            out.backward(torch.ones_like(out))
            return out.detach()
        st_f = s.timed(fwd, 5)
        st_b = s.timed(both, 5)
        # fewest bytes: fwd reads x and the masks; bwd writes grad_x (x is not re-read without mask grad)
        mbytes = m.numel()
        gb_f = (nbytes + mbytes) / st_f.median_s / 1e9
        gb_b = (2 * nbytes + 2 * mbytes) / st_b.median_s / 1e9
        s.add(impl="solar fwd", case=case, stats=st_f, gbps=gb_f, of_copy=gb_f / copy)
        s.add(impl="solar fwd+bwd", case=case, stats=st_b, gbps=gb_b, of_copy=gb_b / copy)


def section_search(s: Suite):
    dry = s.args.dry_run
    n, d = (2000, 64) if dry else (1_000_000, 768)
    g = torch.Generator().manual_seed(3)
    base = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    for dtype in ("fp32", "fp16", "int8"):
        index = sk.Index(d, dtype=dtype, device=s.dev)
        index.add(base.to(s.dev))
        for m in (1, 16, 1024):
            if s.time_left() < 15:
                return
            qs = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1).to(s.dev)
            for k in (10, 1024):
                if k > n:
                    continue
                case = {"section": "search", "N": n, "D": d, "dtype": dtype, "m": m, "k": k}
                st = s.timed(lambda: index.search(qs, k=k), 5)
                read = n * d * {"fp32": 4, "fp16": 2, "int8": 1}[dtype]
                gbps = read / st.median_s / 1e9
                s.add(impl="solar", case=case, stats=st, gbps=gbps, of_floor=gbps / (FLOOR_GBPS / 2))
                bad = _search_check(index, base, dtype, qs, k, s.dev)
                s.add(impl="solar check" if not bad else "FAILED", case=case, note=bad or "ids / scores match torch")
                peer = _search_peer(base, dtype, qs, k, s.dev)
                if peer is not None:
                    st_p = s.timed(peer, 5)
                    s.add(impl="torch mm+topk", case=case, stats=st_p, solar_speedup=st_p.median_ms / st.median_ms)
        index = None  # free the index before the next dtype's (not del: the timed lambdas close over it)
        if not dry:
            torch.cuda.empty_cache()


def _search_check(index, base, dtype, qs, k, dev) -> str:
    """Index.search against torch on the same device: "" when its top-k is the exact top-k.

    The reference scores every row in fp32 as the kernels define the dtype (fp16 rows widened,
    fp32 queries; int8: integer dots times the two scales).  Checked: the returned scores are
    the reference's k best (to fp32 accumulation error), each returned id has the reported
    score, ids are distinct, and equal scores come in increasing id order."""
    scores, ids = index.search(qs, k=k)
    x = base.to(dev)
    if dtype == "int8":
        xc, xs = quantize_int8(x)
        qc, qsc = quantize_int8(qs)
        full = (qc.float() @ xc.float().t()) * (xs[None, :] * qsc[:, None])
    else:
        full = qs.float() @ (x.half().float() if dtype == "fp16" else x).t()
    want = torch.topk(full, k, dim=1).values
    tol = 1e-5 * float(qs.abs().amax()) * float(x.abs().sum(1).amax()) + 1e-6
    problems = []
    err = float((scores - want).abs().amax())
    if err > tol:
        problems.append(f"scores differ from the exact top-k by {err:.3g} > {tol:.3g}")
    err_id = float((full.gather(1, ids) - scores).abs().amax())
    if err_id > tol:
        problems.append(f"an id's score differs from the reported one by {err_id:.3g}")
    if bool((ids.sort(dim=1).values.diff(dim=1) == 0).any()):
        problems.append("duplicate ids")
    same = scores[:, 1:] == scores[:, :-1]
    if not bool((ids[:, 1:] > ids[:, :-1])[same].all()):
        problems.append("tied scores not in increasing id order")
    return "; ".join(problems)


def _search_peer(base, dtype, qs, k, dev):
    if dtype == "fp32":
        x = base.to(dev)
        return lambda: torch.topk(qs @ x.t(), k, dim=1)
    if dtype == "fp16":
        x = base.to(dev, torch.float16)
        qh = qs.half()
        return lambda: torch.topk(qh @ x.t(), k, dim=1)
    xi = (base * 127).round().clamp(-127, 127).to(torch.int8).to(dev)
    qi = (qs * 127).round().clamp(-127, 127).to(torch.int8)
    if dev.type == "cuda" and qs.shape[0] > 16:
        return lambda: torch.topk(torch._int_mm(qi, xi.t()), k, dim=1)
    ft = torch.float16 if dev.type == "cuda" else torch.float32
    xh, qh = xi.to(ft), qi.to(ft)
    return lambda: torch.topk(qh @ xh.t(), k, dim=1)


def section_kernels(s: Suite):
    """Registers and spills of every compiled Triton kernel, from the real driver."""
    if s.args.dry_run:
        s.add(impl="kernels", case={"section": "kernels"}, note="dry run: no compiled kernels (interpreter)")
        return
    from solar_kernels.ops import contrastive as cl, masked_pool as mp

    for mod in (cl, mp):
        for name in dir(mod):
            fn = getattr(mod, name)
            caches = getattr(fn, "device_caches", None)
            if not caches:
                continue
            for dev_caches in caches.values():
                for kern in dev_caches[0].values():
                    kern = kern.result() if hasattr(kern, "result") else kern
                    kern._init_handles()
                    s.add(impl=name, case={"section": "kernels"}, regs=kern.n_regs, spills=kern.n_spills,
                          shared=kern.metadata.shared, warps=kern.metadata.num_warps)


SECTIONS = [("loss", section_loss, 60), ("pooled", section_pooled, 30), ("sweep", section_sweep, 40),
            ("pool", section_pool, 20), ("search", section_search, 30), ("kernels", section_kernels, 5)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--deadline", type=float, default=0.0, help="unix time by which to stop starting sections")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, same control flow")
    ap.add_argument("--only", nargs="*", default=None, help="run only these sections")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device (use --dry-run on CPU)", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    s = Suite(args)
    for name, fn, need in SECTIONS:
        if args.only is None or name in args.only:
            s.section(name, fn, need)
    s.rec.print_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
