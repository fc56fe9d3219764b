"""Peak memory and throughput of stage 2 on streamed shards at several mining-pool sizes.

Each pool size runs in its own process (so its peak RSS is its own): a short streamed
stage-2 run (`solar.stage2.run_stage2` with a `solar.mining.PoolSource`), whose pool holds
embeddings only.  The script predicts the pool's bytes first, N x (D x b + 8) per rank
(b = 2 for fp16, 8 for the key hash), then measures the peak RSS; the difference between
two pool sizes should be the difference of their banks.  It also reports pairs/s of each
phase: the caption pass (document frequencies), the pool refresh (decode + embed) and the
training steps (without the refreshes).  With --ckpt the run writes a stage-2 checkpoint at its
last step and reports the bytes of the pool shares in it (``ckpt/ranks/<r>/``: the index file
and the key hashes), against the same formula.

    python bench/bench_mining_memory.py                        # pools of 10k and 100k pairs, 32 px, D = 768
    python bench/bench_mining_memory.py --pools 10000 --steps 2 --out bench/out/mining.json
    python bench/bench_mining_memory.py --pools 10000 --steps 2 --ckpt     # + the checkpoint's pool bytes

Shards are ShapesWorld pairs written once into --shards (default .solar_cache/bench-mining-...).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _model(args, tokenizer):
    import torch

    from solar.model import ModelConfig, SolarModel
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=args.image_size, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2,
                      vision_mlp=64, max_text_len=40, text_hidden=32, text_layers=1, text_heads=2, text_mlp=64,
                      width=32, adapter_hidden=64, fusion_layers=1, fusion_heads=2, fusion_mlp=64,
                      embed_dim=args.embed_dim)
    return SolarModel(cfg.with_tokenizer(tokenizer))


def child(args) -> dict:
    """One streamed stage-2 run with a pool of args.pool pairs; returns its measurements."""
    import torch

    import solar.stage2 as s2
    from solar.config import Stage2Config
    from solar.data.batches import ShardStreams
    from solar.data.tokenizer import load_tokenizer
    from solar.mining import EmbeddingPool, PoolSource

    torch.set_num_threads(args.threads)
    urls = json.loads(args.urls)
    tok = load_tokenizer("shapesworld", model_max_length=40)
    model = _model(args, tok)
    teacher = copy.deepcopy(model)
    source = PoolSource(urls, tok, size=args.pool, image_size=args.image_size, patch_size=8, max_length=40)
    streams = ShardStreams(urls, tok, image_size=args.image_size, patch_size=8, max_length=40, num_workers=0,
                           seed=0)
    made, df_s = [], []
    df_fn = s2.pool_frequent_token_ids

    class Recorded(EmbeddingPool):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    def timed_df(*a, **kw):
        t = time.perf_counter()
        out = df_fn(*a, **kw)
        df_s.append(time.perf_counter() - t)
        return out

    s2.EmbeddingPool, s2.pool_frequent_token_ids = Recorded, timed_df
    cfg = Stage2Config(steps=args.steps, batch_size=args.batch, warmup_steps=1, mine_k=8, refresh_every=args.refresh_every,
                       mine_pool_size=args.pool, mine_dtype="fp16", n_segments=3, kmeans_iters=2)
    rss_before = _current_rss_mib()
    t0 = time.perf_counter()
    s2.run_stage2(model, streams.phase(args.batch, 2), cfg, out_dir=args.tmp, seed=0, teacher=teacher,
                  ckpt_every=args.steps if args.ckpt else 0,
                  log_every=args.steps, progress=False, pool=source, log=lambda *a, **k: None)
    total = time.perf_counter() - t0
    (pool,) = made
    train_s = total - sum(pool.refresh_seconds) - sum(df_s)
    ckpt = {}
    if args.ckpt:
        def size(folder):
            return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
        ranks = os.path.join(args.tmp, "ckpt", "ranks")
        ckpt = {"ckpt_pool_bytes": size(ranks), "ckpt_pool_files": {f: os.path.getsize(os.path.join(ranks, "0", f))
                                                                    for f in sorted(os.listdir(os.path.join(ranks, "0")))},
                "ckpt_bytes": size(os.path.join(args.tmp, "ckpt"))}
    return {**ckpt, "pool": args.pool, "embed_dim": args.embed_dim, "image_size": args.image_size,
            "pool_bytes": pool.nbytes, "predicted_pool_bytes": args.pool * (args.embed_dim * 2 + 8),
            "rss_before_mib": round(rss_before, 1), "peak_rss_mib": round(_rss_mib(), 1),
            "refreshes": pool.refreshes, "decoded": pool.decoded,
            "df_pairs_per_s": round(args.pool / df_s[0], 1),
            "refresh_pairs_per_s": round(args.pool * len(pool.refresh_seconds) / sum(pool.refresh_seconds), 1),
            "train_pairs_per_s": round(args.steps * args.batch / train_s, 1),
            "refresh_s": [round(s, 2) for s in pool.refresh_seconds], "df_s": round(df_s[0], 2),
            "train_s": round(train_s, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pools", type=int, nargs="+", default=[10_000, 100_000], help="mining pool sizes (pairs)")
    p.add_argument("--embed-dim", type=int, default=768, help="D, the embedding width (the paper's 768)")
    p.add_argument("--image-size", type=int, default=32, help="pixels per image side")
    p.add_argument("--steps", type=int, default=4, help="stage-2 steps per run")
    p.add_argument("--refresh-every", type=int, default=3, help="R: pool refreshes at steps 0, R, ...")
    p.add_argument("--batch", type=int, default=32, help="global batch")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--shards", default=os.path.join(ROOT, ".solar_cache", "bench-mining"),
                   help="ShapesWorld shards folder (written when absent)")
    p.add_argument("--ckpt", action="store_true", help="write a checkpoint at the last step; report its pool bytes")
    p.add_argument("--out", default="", help="write the rows as JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pool", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--urls", default="", help=argparse.SUPPRESS)
    p.add_argument("--tmp", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return 0
    import tempfile

    from solar.data.shapesworld import write_shards
    need = max(args.pools)
    folder = f"{args.shards}-n{need}-i{args.image_size}"
    manifest = os.path.join(folder, "shapesworld.json")
    if not os.path.isfile(manifest):
        print(f"writing {need} ShapesWorld pairs into {folder}", flush=True)
        write_shards(folder, need, seed=0, shard_size=10_000, image_size=args.image_size, progress=True)
    urls = [os.path.join(folder, s) for s in json.load(open(manifest))["shards"]]
    rows = []
    for n in args.pools:
        pred = n * (args.embed_dim * 2 + 8)
        print(f"pool {n}: predicted bank {pred / 2 ** 20:.1f} MiB (N x (D x 2 + 8) bytes)", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--pool", str(n), "--urls", json.dumps(urls),
                   "--tmp", tmp, "--embed-dim", str(args.embed_dim), "--image-size", str(args.image_size),
                   "--steps", str(args.steps), "--refresh-every", str(args.refresh_every), "--batch", str(args.batch),
                   "--threads", str(args.threads)] + (["--ckpt"] if args.ckpt else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        pred = (b["predicted_pool_bytes"] - a["predicted_pool_bytes"]) / 2 ** 20
        got = b["peak_rss_mib"] - a["peak_rss_mib"]
        print(f"peak RSS {b['pool']} - {a['pool']} pairs: {got:.1f} MiB measured, {pred:.1f} MiB predicted "
              f"(the embedding banks)", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
