"""Benchmark of solar_kernels.masked_pool against the plain PyTorch formulations.

    python bench/bench_pool.py [--device cpu|cuda] [--out DIR] [--quick] [--thp] [--threads N]

Shapes (issue 2): B=64, L in {77, 196, 257}, D=768, V in {1, 3}; float32 on CPU,
bfloat16 on CUDA.  Masks are bool: "dense" (every token kept: no padding to skip, the
worst case for the fused kernel) and "padded" (each row keeps a random length in
[L/2, L], then each of the V views drops 30% of those tokens at random).
Peers, measured in the same run and process:
  eager  the plain expression (x * m[..., None]).sum(1) / m.sum(1, keepdim=True)
         (with a V axis: (x[None] * m[..., None]).sum(2) / m.sum(2, keepdim=True))
  bmm    torch.bmm(m [B, V, L], x [B, L, D]) / m.sum(-1)   (the fastest torch form found)
  einsum torch.einsum("vbl,bld->vbd", m, x) / m.sum(-1)
  copy   dst.copy_(x): a same-size tensor copy, the bandwidth reference.
Modes: fwd (no autograd) and fwd+bwd (forward, then torch.autograd.grad for x).
GB/s counts the minimal traffic: fwd reads x and the mask and writes out; fwd+bwd also
reads grad_out and the mask and writes grad_x (x's size); copy reads and writes x's size.
`speedup` is the fastest torch peer's time over ours for the same case and mode.
solar_nocache (CPU): ours with the recycling of freed grad_x buffers switched off
(grad_buffer_cache_mb(0)), i.e. every backward gets fresh pages as the peers do.

--thp sets THP_MEM_ALLOC_ENABLE=1 for the whole process (torch then asks for huge pages
on every large CPU tensor, as our kernel does for grad_x): use it to see the peers with
the same page-fault savings.
"""
from __future__ import annotations

import argparse
import os
import sys

if "--thp" in sys.argv:  # before torch's allocator reads it
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harness import Recorder, bench  # noqa: E402

from solar_kernels import _ext, masked_pool  # noqa: E402
from solar_kernels.ops.masked_pool import grad_buffer_cache_mb  # noqa: E402
from solar_kernels.reference import masked_pool_reference  # noqa: E402

PEERS = ("eager", "bmm", "einsum")


def make_case(B, L, D, V, dtype, device, mask_kind, seed=0):
    """The inputs of one case: x [B, L, D], bool mask [V, B, L], grad_out [V, B, D]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=g).to(device=device, dtype=dtype)
    if mask_kind == "dense":
        mask = torch.ones(V, B, L, dtype=torch.bool)
    else:
        lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
        valid = torch.arange(L)[None, :] < lengths[:, None]
        mask = valid[None] & (torch.rand(V, B, L, generator=g) > 0.3)
    grad_out = torch.randn(V, B, D, generator=g).to(device=device, dtype=dtype)
    return x, mask.to(device), grad_out


def impls(x, mask):
    """name -> function(x) computing [V, B, D] pooled rows from the bool mask."""
    def ours(a):
        return masked_pool(a, mask)

    def eager(a):
        m = mask.to(a.dtype)
        return (a[None] * m[..., None]).sum(2) / m.sum(2, keepdim=True)

    def bmm(a):
        m = mask.to(a.dtype).transpose(0, 1)  # [B, V, L]
        return (torch.bmm(m, a) / m.sum(-1, keepdim=True)).transpose(0, 1)

    def einsum(a):
        m = mask.to(a.dtype)
        return torch.einsum("vbl,bld->vbd", m, a) / m.sum(-1, keepdim=True)

    fns = {"solar": ours, "eager": eager, "bmm": bmm, "einsum": einsum}
    if x.device.type == "cpu" and _ext.available("masked_pool_grad_cache_mb"):
        fns["solar_nocache"] = ours  # timed with the grad_x buffer recycling switched off
    return fns


def check_peers_agree(x, mask, fns):
    """Guard against benchmarking something wrong: every impl matches the fp32 reference."""
    ref = masked_pool_reference(x.float(), mask)
    tol = 1e-4 if x.dtype == torch.float32 else 3e-2
    for name, fn in fns.items():
        with torch.no_grad():
            got = fn(x).float()
        err = float((got - ref).abs().max())
        if err > tol:
            raise RuntimeError(f"{name} disagrees with the reference: max error {err:.3g}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="folder for masked_pool.csv / .png (default bench/out/<device>)")
    ap.add_argument("--quick", action="store_true", help="dense masks only, fewer repetitions")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--thp", action="store_true", help="THP_MEM_ALLOC_ENABLE=1 for torch's allocator too")
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP CPU threads (default: torch's)")
    ap.add_argument("--L", type=int, nargs="*", default=[77, 196, 257])
    ap.add_argument("--V", type=int, nargs="*", default=[1, 3])
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)  # also sets the OpenMP pool our kernels use
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    B, D = 64, 768
    reps = args.reps or (5 if args.quick else (10 if device.type == "cpu" else 50))
    warmup = 2 if device.type == "cpu" else 10
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", device.type)
    masks = ["dense"] if args.quick else ["dense", "padded"]
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "0")

    rec = Recorder("masked_pool", device=device)
    cases = [(mk, L, V) for mk in masks for L in args.L for V in args.V]
    for mask_kind, L, V in tqdm(cases, desc="masked_pool cases", disable=not sys.stderr.isatty()):
        x, mask, grad_out = make_case(B, L, D, V, dtype, device, mask_kind)
        fns = impls(x, mask)
        check_peers_agree(x, mask, fns)
        case = {"mask": mask_kind, "B": B, "L": L, "D": D, "V": V, "dtype": str(dtype).replace("torch.", ""),
                "threads": torch.get_num_threads() if device.type == "cpu" else "", "thp_alloc": thp}
        elt = x.element_size()
        x_bytes = x.numel() * elt
        mask_bytes = mask.numel() * mask.element_size()
        out_bytes = V * B * D * elt
        nbytes = {"fwd": x_bytes + mask_bytes + out_bytes,
                  "fwd+bwd": 2 * x_bytes + 2 * mask_bytes + 2 * out_bytes}

        dst = torch.empty_like(x)
        st = bench(lambda: dst.copy_(x), warmup=warmup, reps=reps, device=device)
        copy_gbps = 2 * x_bytes / st.median_s / 1e9
        rec.add(impl="copy", case=case, stats=st, mode="copy", gbps=copy_gbps)

        xg = x.detach().clone().requires_grad_()
        results = {}
        for mode in ("fwd", "fwd+bwd"):
            for name, fn in fns.items():
                if mode == "fwd":
                    def run(fn=fn):
                        with torch.no_grad():
                            return fn(x)
                else:
                    def run(fn=fn):
                        return torch.autograd.grad(fn(xg), xg, grad_out)
                prev_cap = grad_buffer_cache_mb(0) if name == "solar_nocache" else None
                try:
                    st = bench(run, warmup=warmup, reps=reps, device=device)
                finally:
                    if prev_cap is not None:
                        grad_buffer_cache_mb(prev_cap)
                results[(mode, name)] = st
                rec.add(impl=name, case=case, stats=st, mode=mode, gbps=nbytes[mode] / st.median_s / 1e9)
        for mode in ("fwd", "fwd+bwd"):
            best = min(results[(mode, p)].median_ms for p in PEERS)
            for row in rec.rows:
                if row["impl"].startswith("solar") and row.get("mode") == mode and row["L"] == L and row["V"] == V \
                        and row["mask"] == mask_kind:
                    row["speedup"] = round(best / row["median_ms"], 3)
                    row["pct_copy"] = round(100 * row["gbps"] / copy_gbps, 1)
        x = xg = dst = fns = None  # free before the next case (not del: the timed closures use them)

    rec.print_table()
    csv_path = rec.write_csv(os.path.join(out_dir, "masked_pool.csv"))
    png = rec.plot(os.path.join(out_dir, "masked_pool.png"), x="L", y="gbps",
                   where={"mode": "fwd+bwd", "V": args.V[0], "mask": masks[0]},
                   title=f"masked_pool fwd+bwd, V={args.V[0]}, {masks[0]} mask ({device.type})")
    print(f"wrote {csv_path}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
