"""Benchmark of the drop-in integrations against the losses they replace, on CPU, same run.

* open_clip: ``open_clip.loss.ClipLoss`` (loaded from the installed open_clip_torch by file
  path) vs ``solar_kernels.integrations.open_clip.ClipLoss``: forward + backward of the
  single-process loss (fp32, D = 512) at N = 8192 and N = 32768 -- peak memory, and time.
* sentence-transformers: ``MultipleNegativesRankingLoss`` vs ``SolarRankingLoss`` on
  precomputed embeddings (anchor, positive, H hard-negative columns, --st-negs H, default 1;
  fp32, D = 512) at N = 8192 anchors (--st-n): peak memory and time of forward + backward
  (``compute_loss_from_embeddings``).

Every (implementation, N) runs in its own child process (peak RSS is per process) under an
address-space cap (--cap-gb): a peer that needs more than the cap is reported as out of
memory, with its peak extrapolated from the smaller N (it grows as N^2).  Timing is one
warm-up and --reps timed calls; N = 32768 is timed only with --time-large (minutes on 2 cores).

    python bench/bench_integrations.py [--cap-gb 6] [--reps 2] [--out bench/out/cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "integrations"))
from harness import Recorder, bench, peak_memory  # noqa: E402

D = 512


def _inputs(n: int, cols: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1) for _ in range(cols)]


def _clip_step(impl: str, n: int):
    if impl == "open_clip":
        from integration_peers import open_clip_loss_module
        cls = open_clip_loss_module().ClipLoss
    else:
        from solar_kernels.integrations.open_clip import ClipLoss as cls
    img, txt = _inputs(n)
    loss_fn = cls()

    def run():
        i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
        ls = torch.tensor(2.659, requires_grad=True)
        loss = loss_fn(i, t, ls.exp())
        loss.backward()
        return float(loss)
    return run


def _st_step(impl: str, n: int, negs: int = 1):
    if impl == "mnrl":
        from sentence_transformers.losses import MultipleNegativesRankingLoss as cls
    else:
        from solar_kernels.integrations.sentence_transformers import SolarRankingLoss as cls
    embs = _inputs(n, 2 + negs)
    loss_fn = cls(torch.nn.Identity(), scale=20.0)

    def run():
        leaves = [e.clone().requires_grad_() for e in embs]
        loss = loss_fn.compute_loss_from_embeddings(leaves, None)
        loss.backward()
        return float(loss)
    return run


def child(which: str, impl: str, n: int, reps: int, time_it: bool, cap_gb: float, negs: int = 1) -> dict:
    """Measure one case in this process (called in a child)."""
    import resource
    cap = int(cap_gb * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    step = _clip_step(impl, n) if which == "clip" else _st_step(impl, n, negs)
    out = {}
    try:
        out["peak"] = peak_memory(step, "cpu")
        if time_it:
            out["median_ms"] = bench(step, warmup=0, reps=reps, device="cpu").median_ms
    except (RuntimeError, MemoryError) as e:
        out["oom"] = str(e).splitlines()[0][:160]
    return out


def _run_child(which, impl, n, args, time_it) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {HERE!r}); import bench_integrations as b; "
            f"import torch; torch.set_num_threads({torch.get_num_threads()}); "
            f"print(json.dumps(b.child({which!r}, {impl!r}, {n}, {args.reps}, {time_it}, {args.cap_gb}, "
            f"{args.st_negs})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    for line in r.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    return {"oom": f"child failed (rc {r.returncode}): {r.stderr.strip().splitlines()[-1:]}"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "out", "cpu"))
    ap.add_argument("--cap-gb", type=float, default=6.0, help="address-space cap of each child process")
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions per case")
    ap.add_argument("--sizes", default="8192,32768", help="N of the open_clip cases")
    ap.add_argument("--st-n", type=int, default=8192, help="anchors of the sentence-transformers case")
    ap.add_argument("--st-negs", type=int, default=1,
                    help="hard-negative columns of the sentence-transformers case")
    ap.add_argument("--time-large", action="store_true", help="also time N > 8192")
    args = ap.parse_args(argv)
    rec = Recorder("integrations", device="cpu")
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]   # "" : only the sentence-transformers case
    cases = [("clip", "open_clip", "solar", n) for n in sizes] + [("st", "mnrl", "solar", args.st_n)]
    for which, peer, ours, n in cases:
        time_it = n <= 8192 or args.time_large
        res = {impl: _run_child(which, impl, n, args, time_it) for impl in (peer, ours)}
        label = "ClipLoss" if which == "clip" else f"MNRL ({args.st_negs} negative column(s))"
        case = {"loss": label, "N": n, "D": D}
        for impl in (peer, ours):
            r = res[impl]
            extra = {"peak_mib": r["peak"] / 2 ** 20} if "peak" in r else {"note": f"OOM under {args.cap_gb} GiB"}
            if "median_ms" in r:
                extra["median_ms"] = r["median_ms"]
            if impl == ours and "peak" in r:
                if "peak" in res[peer]:
                    extra["mem_vs_peer"] = r["peak"] / res[peer]["peak"]
                if "median_ms" in r and "median_ms" in res[peer]:
                    extra["speed_vs_peer"] = res[peer]["median_ms"] / r["median_ms"]
            rec.add(impl=impl, case=case, **extra)
            print(case, impl, r, flush=True)
    rec.print_table()
    rec.write_csv(os.path.join(args.out, "integrations.csv"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
