"""Benchmark of exact top-k search (solar_kernels.Index) against the peers users would pick.

    python bench/bench_search.py                     # CPU: d=768, k=10, N=100k, m in {1, 16, 1024}
    python bench/bench_search.py --full              # also N=1M (about 3 GB of fp32 rows)
    python bench/bench_search.py --quick             # N=20k, small m (smoke run)
    python bench/bench_search.py --device cuda       # CUDA kernel vs torch.mm + torch.topk, N=1M

Peers measured in the same run (CPU): faiss IndexFlatIP, faiss IndexScalarQuantizer
QT_fp16 and QT_8bit, torch.mm + torch.topk.  Rows report queries/s, the ratio of our
queries/s to each peer's (ratio_<peer>), recall@k against exact fp32 search, whether the
ids equal IndexFlatIP's (fp32), and the index size in bytes.  At m = 1 a read_floor_int8 row
times one plain read of the int8 codes: the memory floor of any one-query int8 scan here.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import Recorder, bench  # noqa: E402

from solar_kernels import Index  # noqa: E402


def _normalized(n, d, seed, device="cpu", chunk=100_000):
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, d)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        out[s:e] = torch.nn.functional.normalize(torch.randn(e - s, d, generator=g), dim=1)
    return out.to(device)


def _recall(ids, exact):
    ids, exact = np.asarray(ids), np.asarray(exact)
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids.tolist(), exact.tolist())]))


def _torch_mm_topk(q, x, k, chunk=256):
    """Plain torch: scores = q @ x.T, then topk (queries in chunks to bound memory)."""
    outs = [torch.topk(q[s : s + chunk] @ x.T, k, dim=1) for s in range(0, q.shape[0], chunk)]
    return torch.cat([o.values for o in outs]), torch.cat([o.indices for o in outs])


def _reps(m, n):
    work = m * n
    if work >= 1024 * 1_000_000:
        return dict(warmup=0, reps=1)
    if work >= 1024 * 100_000:
        return dict(warmup=1, reps=2)
    if work <= 16 * 20_000:  # sub-millisecond calls: repeat for 0.3 s so the median is stable
        return dict(warmup=10, reps=7, min_time_s=0.3)
    return dict(warmup=2, reps=7)


def _read_floor(idx, case, qps, rec):
    """The m = 1 memory floor: one plain read of the int8 index's code bytes (torch amax over
    them as int64 words, the fastest plain read we found here).  A one-query scan must read
    every code once, so no exact int8 scan on this machine gets faster than this row; its
    ratio_faiss_sq_8bit is the best ratio to QT_8bit that an m = 1 scan can reach here."""
    codes = idx._rows_view()[0]
    words = codes.reshape(-1)[: codes.numel() // 8 * 8].view(torch.int64)
    st = bench(lambda: words.amax(), device="cpu", warmup=2, reps=7)
    floor = 1.0 / st.median_s
    rec.add(impl="read_floor_int8", case=case, stats=st, qps=floor, index_bytes=codes.numel(),
            **{f"ratio_{p}": floor / v for p, v in qps.items()})
    gbps = codes.numel() / st.median_s / 1e9
    print(f"  N={case['N']} m=1 read_floor_int8 {st}  {floor:10.1f} q/s  ({gbps:.1f} GB/s; "
          f"best possible ratio_faiss_sq_8bit={floor / qps['faiss_sq_8bit']:.2f}x)", flush=True)


def run_cpu(args, rec):
    import faiss

    d, k = args.dim, args.k
    for n in args.n:
        print(f"[bench_search] building N={n} d={d} ...", flush=True)
        x = _normalized(n, d, seed=0)
        xn = x.numpy()
        peers = {}
        flat = faiss.IndexFlatIP(d)
        flat.add(xn)
        peers["faiss_flatip"] = (flat, 4 * d * n)
        for name, qt in (("faiss_sq_fp16", faiss.ScalarQuantizer.QT_fp16), ("faiss_sq_8bit", faiss.ScalarQuantizer.QT_8bit)):
            sq = faiss.IndexScalarQuantizer(d, qt, faiss.METRIC_INNER_PRODUCT)
            sq.train(xn[: min(n, 100_000)])
            sq.add(xn)
            peers[name] = (sq, sq.sa_code_size() * n)
        ours = {}
        for dt in ("fp32", "fp16", "int8"):
            idx = Index(d, dtype=dt)
            idx.add(x)
            ours[f"solar_{dt}"] = idx
        for m in args.m:
            q = _normalized(m, d, seed=1 + m)
            qn = q.numpy()
            reps = _reps(m, n)
            case = dict(N=n, m=m, d=d, k=k)
            _, exact = flat.search(qn, k)
            qps = {}
            for name, (pidx, size) in peers.items():
                st = bench(lambda: pidx.search(qn, k), device="cpu", **reps)
                _, ids = pidx.search(qn, k)
                qps[name] = m / st.median_s
                rec.add(impl=name, case=case, stats=st, qps=qps[name], recall=_recall(ids, exact), index_bytes=size)
                print(f"  N={n} m={m} {name:<14} {st}  {qps[name]:10.1f} q/s", flush=True)
            st = bench(lambda: _torch_mm_topk(q, x, k), device="cpu", **reps)
            qps["torch_mm_topk"] = m / st.median_s
            rec.add(impl="torch_mm_topk", case=case, stats=st, qps=qps["torch_mm_topk"],
                    recall=_recall(_torch_mm_topk(q, x, k)[1], exact), index_bytes=4 * d * n)
            print(f"  N={n} m={m} torch_mm_topk  {st}  {qps['torch_mm_topk']:10.1f} q/s", flush=True)
            for name, idx in ours.items():
                st = bench(lambda: idx.search(q, k), device="cpu", **reps)
                _, ids = idx.search(q, k)
                our = m / st.median_s
                ratios = {f"ratio_{p}": our / v for p, v in qps.items()}
                rec.add(impl=name, case=case, stats=st, qps=our, recall=_recall(ids, exact), index_bytes=idx.nbytes,
                        same_ids_as_flatip=bool(np.array_equal(ids.numpy(), exact)), **ratios)
                print(f"  N={n} m={m} {name:<14} {st}  {our:10.1f} q/s  "
                      + " ".join(f"{p}={r:.2f}x" for p, r in ratios.items()), flush=True)
            if m == 1:
                _read_floor(ours["solar_int8"], case, qps, rec)
        peers = ours = x = xn = flat = None  # free before the next N (not del: the timed lambdas use x)


def run_cuda(args, rec):
    d, k = args.dim, args.k
    dev = torch.device("cuda")
    for n in args.n:
        x = _normalized(n, d, seed=0, device=dev)
        ours = {}
        for dt in ("fp32", "fp16", "int8"):
            idx = Index(d, dtype=dt, device=dev)
            idx.add(x)
            ours[f"solar_{dt}"] = idx
        for m in args.m:
            q = _normalized(m, d, seed=1 + m, device=dev)
            case = dict(N=n, m=m, d=d, k=k)
            _, exact = torch.topk(q @ x.T, k, dim=1)
            st = bench(lambda: torch.topk(q @ x.T, k, dim=1), device=dev, warmup=3, reps=20)
            base = m / st.median_s
            rec.add(impl="torch_mm_topk", case=case, stats=st, qps=base, recall=1.0, index_bytes=4 * d * n)
            print(f"  N={n} m={m} torch_mm_topk  {st}  {base:10.1f} q/s", flush=True)
            for name, idx in ours.items():
                st = bench(lambda: idx.search(q, k), device=dev, warmup=3, reps=20)
                _, ids = idx.search(q, k)
                our = m / st.median_s
                rec.add(impl=name, case=case, stats=st, qps=our, recall=_recall(ids.cpu(), exact.cpu()),
                        index_bytes=idx.nbytes, ratio_torch_mm_topk=our / base)
                print(f"  N={n} m={m} {name:<14} {st}  {our:10.1f} q/s  {our / base:.2f}x torch", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "cpu"))
    ap.add_argument("--n", type=int, nargs="+", default=None, help="database sizes (default 100000; --full adds 1M)")
    ap.add_argument("--m", type=int, nargs="+", default=None, help="query batch sizes (default 1 16 1024)")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--full", action="store_true", help="also N=1M")
    ap.add_argument("--quick", action="store_true", help="smoke run: N=20k, m in {1, 16, 128}")
    args = ap.parse_args(argv)
    if args.n is None:
        args.n = [20_000] if args.quick else ([1_000_000] if args.device == "cuda" else [100_000])
        if args.full and not args.quick and args.device == "cpu":
            args.n.append(1_000_000)
    if args.m is None:
        args.m = [1, 16, 128] if args.quick else ([1, 16, 256, 1024] if args.device == "cuda" else [1, 16, 1024])
    rec = Recorder("search", device=args.device)
    (run_cuda if args.device == "cuda" else run_cpu)(args, rec)
    rec.print_table()
    os.makedirs(args.out, exist_ok=True)
    rec.write_csv(os.path.join(args.out, "search.csv"))
    try:
        rec.plot(os.path.join(args.out, "search.png"), x="m", y="qps", group="impl")
    except Exception as e:  # plotting is optional (matplotlib missing, one x value, ...)
        print(f"[bench_search] no plot: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
