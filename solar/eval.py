"""`python -m solar.eval --ckpt DIR [--ckpt NAME=DIR ...] --bench BENCH_DIR`

Evaluates one or more trained models (folders written by `solar.train`: */model,
stage1/stage1_model) on a sym-MM2MM benchmark folder (format: `solar.benchmark`), prints
the paper-style table (fp32 and int8 index by default) and writes it as json (--out).
A bad flag (e.g. --device gpu) or a missing or corrupt checkpoint or benchmark is a clear
one-line error with exit status 2.

The benchmark is checked against its manifest (shard sizes and sha256) before any model
is loaded, and after embedding every pair it lists must have been read; a damaged
benchmark is refused unless --allow-partial, which scores what could be read and prints
how many pairs were searched.  A model folder without solar_embedding.json (e.g. a
training checkpoint) is refused unless --kind says which embedding rule it was trained for.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .config import INDEX_DTYPES

__all__ = ["main"]


def main(argv=None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m solar.eval", description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", action="append", required=True,
                    help="model folder, or NAME=folder; repeat for several models")
    ap.add_argument("--bench", required=True, help="benchmark folder (triplets.json + shards)")
    ap.add_argument("--out", default="", help="json file for the results (default: print only)")
    ap.add_argument("--index-dtypes", default="fp32,int8", metavar="A,B,...",
                    help=f"comma-separated solar_kernels.Index dtypes, each reported; from: {', '.join(INDEX_DTYPES)} "
                         f"(default: fp32,int8)")
    ap.add_argument("--batch-size", type=int, default=128, metavar="INT",
                    help="pairs per embedding batch (default: 128)")
    ap.add_argument("--tokenizer", default=None,
                    help="'shapesworld', 'clip' or a local tokenizer folder (default: each model's own, saved in its "
                         "folder's tokenizer/)")
    ap.add_argument("--device", default="auto",
                    help="'auto' (cuda when available, else cpu), 'cpu', 'cuda' or 'cuda:N' (default: auto)")
    ap.add_argument("--threads", type=int, default=0, metavar="INT",
                    help="torch CPU threads; 0 = leave torch's default (default: 0)")
    ap.add_argument("--kind", default=None, choices=("solar", "clip_sf", "clip_zs"),
                    help="embedding rule of --ckpt folders without solar_embedding.json (e.g. training "
                         "checkpoints); a folder whose file names another kind is an error (default: required "
                         "only when a folder has no such file)")
    ap.add_argument("--allow-partial", action="store_true",
                    help="score a damaged benchmark on the pairs that can be read (the table says how many pairs "
                         "were searched) instead of refusing it")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    dtypes = tuple(s.strip() for s in a.index_dtypes.split(",") if s.strip())
    bad = [d for d in dtypes if d not in INDEX_DTYPES]
    if bad or not dtypes:
        ap.error(f"--index-dtypes: expected a comma-separated list from {', '.join(INDEX_DTYPES)}, "
                 f"got {a.index_dtypes!r}")
    if a.batch_size < 1:
        ap.error(f"--batch-size: expected an int >= 1, got {a.batch_size}")
    if a.threads < 0:
        ap.error(f"--threads: expected an int >= 0 (0: torch's default), got {a.threads}")
    from .distributed import resolve_device
    try:
        device = resolve_device(a.device, name="--device")
    except ValueError as e:
        ap.error(str(e))
    from .benchmark import BenchmarkError, load_benchmark, verify_benchmark
    from .checkpoint import CheckpointError
    from .data.tokenizer import load_tokenizer
    from .evaluate import evaluate_models, format_table, load_for_eval
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    try:
        bench = load_benchmark(a.bench)
        try:
            verify_benchmark(bench)
        except BenchmarkError as e:
            if not a.allow_partial:
                raise BenchmarkError(f"{e} (or pass --allow-partial to score what can be read)") from None
            print(f"solar.eval: warning: {e}; --allow-partial: scoring the pairs that can be read", file=sys.stderr)
        models = {}
        for spec in a.ckpt:
            name, path = spec.split("=", 1) if "=" in spec else (os.path.basename(os.path.normpath(spec)), spec)
            models[name] = load_for_eval(path, device, kind=a.kind)
        cfgs = {n: m.cfg for n, (m, _) in models.items()}
        first = next(iter(cfgs.values()))
        for n, c in cfgs.items():
            if (c.image_size, c.patch_size) != (first.image_size, first.patch_size):
                raise ValueError(f"--ckpt {n}: image/patch size {c.image_size}/{c.patch_size} differs from "
                                 f"{first.image_size}/{first.patch_size}; evaluate them separately")
        tok = load_tokenizer(a.tokenizer, model_max_length=first.max_text_len) if a.tokenizer else None
        res = evaluate_models(models, bench, tokenizer=tok, image_size=first.image_size,
                              patch_size=first.patch_size, max_length=first.max_text_len,
                              batch_size=a.batch_size, index_dtypes=dtypes,
                              device=device, progress=not a.no_progress, allow_partial=a.allow_partial)
    except (CheckpointError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"solar.eval: error: {e}", file=sys.stderr)
        return 2
    print(format_table(res))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
