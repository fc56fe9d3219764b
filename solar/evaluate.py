"""Evaluate pair-embedding models on a sym-MM2MM benchmark (format: `solar.benchmark`).

For each model: embed every pair of the benchmark's shards (pool + triplet pairs) in one
pass, add them to a `solar_kernels.Index` (one per index dtype, "fp32" and "int8" by
default), search each triplet's query against the whole collection (k = 11, the query
itself is then excluded), and compute R@1, R@5, R@10, mR, Prec and Avg with
`solar.benchmark`'s metric functions (SOLAR.md definitions, percent).  The benchmark's
shards are checked against its manifest before embedding and the pairs read are counted
after (see `evaluate_models`): a damaged benchmark is refused, or with `allow_partial`
scored on what could be read and reported as partial.

Prec compares score(query, positive) with score(query, hard negative) under the same
precision as the index: exact fp32 inner products for "fp32"; for "fp16" the fp32 query
against the row rounded to fp16; for "int8" the scores of
the int8 codes (per-vector symmetric scale max|x|/127, integer dot product times the two
scales), i.e. what the int8 index ranks by.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

import solar_kernels as sk
from solar_kernels.search import quantize_int8

from . import benchmark as bm
from .baselines import EMBEDDING_KINDS, pair_embedding
from .towers import resolve_tokenizer

__all__ = ["embed_collection", "evaluate_embeddings", "evaluate_models", "format_table", "load_for_eval",
           "read_kind", "quantized_scores", "SEARCH_K"]

SEARCH_K = 11   # R@10 with the query itself excluded needs 11 results
EMBED_FILE = "solar_embedding.json"


def read_kind(path: str) -> Optional[str]:
    """The embedding kind named by model folder `path`'s solar_embedding.json, or None when the
    folder has no such file.  CheckpointError for an unreadable file or an unknown kind."""
    from .checkpoint import CheckpointError
    f = os.path.join(path, EMBED_FILE)
    if not os.path.isfile(f):
        return None
    try:
        with open(f) as fh:
            kind = json.load(fh).get("embedding")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"ckpt: {f} is not a json object naming the embedding ({e})") from None
    if kind not in EMBEDDING_KINDS:
        raise CheckpointError(f"ckpt: {f} names an unknown embedding {kind!r}; expected one of {EMBEDDING_KINDS}")
    return kind


def load_for_eval(path: str, device="cpu", kind: Optional[str] = None):
    """(model, embedding kind) from a model folder written by `solar.train`.

    The kind ("solar" or "clip_sf": which pair-embedding rule the weights were trained for)
    is read from the folder's solar_embedding.json.  A folder without that file (a training
    checkpoint, a stage-1 model saved by `run_stage1` itself, a copied model) is refused with
    a CheckpointError unless `kind` says it: scoring a CLIP-SF model with SOLAR's rule (or the
    reverse) gives plausible but wrong numbers.  A `kind` that contradicts the file is an
    error too."""
    from .checkpoint import CheckpointError
    from .model import SolarModel
    if kind is not None and kind not in EMBEDDING_KINDS:
        raise ValueError(f"kind: expected None or one of {EMBEDDING_KINDS}, got {kind!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"ckpt: {path!r} does not exist")
    if not os.path.isdir(path):
        raise CheckpointError(f"ckpt: {path!r} is not a model folder (expected config.json + model.safetensors)")
    found = read_kind(path)
    if found is None and kind is None:
        raise CheckpointError(f"ckpt: {path!r} has no {EMBED_FILE}, so its embedding kind is unknown; say it "
                              f"explicitly as one of {EMBEDDING_KINDS} (python -m solar.eval: --kind; "
                              f"solar.encode, solar.load, solar.Retriever: kind=)")
    if found is not None and kind is not None and found != kind:
        raise CheckpointError(f"ckpt: {path!r} is a {found!r} model (its {EMBED_FILE}), but kind={kind!r} "
                              f"was given")
    return SolarModel.from_pretrained(path, map_location=device), found or kind


@torch.no_grad()
def embed_collection(model, kind: str, urls, tokenizer, *, image_size: int, patch_size: int, max_length: int,
                     batch_size: int = 128, device="cpu", progress: bool = True, desc: str = "embed", stats=None):
    """Embed every readable pair of the shards `urls` in order: (emb [N, E] float32, keys list).

    Unreadable samples are skipped by the reader and counted in `stats` (a
    `solar.data.ReaderStats`, or None for a private one): compare N with the expected count."""
    from .logging import progress_bar

    from .data.reader import make_loader
    from .trainer import batch_to
    norm = {k: tuple(v) for k, v in (("mean", getattr(model.cfg, "image_mean", None)),
                                     ("std", getattr(model.cfg, "image_std", None))) if v}   # the model's own
    loader = make_loader(urls, tokenizer, image_size=image_size, patch_size=patch_size, max_length=max_length,
                         batch_size=batch_size, rank=0, world_size=1, stats=stats, ground_truth="none", **norm)
    was = model.training
    model.eval()
    embs, keys = [], []
    bar = progress_bar(desc=desc, unit="pair", disable=not progress)
    try:
        for b in loader:
            keys += list(b["key"])
            embs.append(pair_embedding(model, batch_to(b, device), kind).float().cpu())
            bar.update(len(b["key"]))
    finally:
        bar.close()
        model.train(was)
    if not embs:
        raise ValueError(f"benchmark: no readable pairs in {len(urls)} shard(s)")
    return torch.cat(embs), keys


def _int8_codes(x: torch.Tensor):
    """The int8 index's own quantiser (codes [n, d] and scales [n, 1], as float64)."""
    codes, scale = quantize_int8(x.float().reshape(-1, x.shape[-1]))
    return codes.double().reshape(x.shape), scale.double().reshape(*x.shape[:-1], 1)


def quantized_scores(a: torch.Tensor, b: torch.Tensor, dtype: str) -> torch.Tensor:
    """Row-wise scores <a_i, b_i> as an index of `dtype` computes them ([n] float64).

    `a` holds the queries and `b` the stored rows (the sides are not interchangeable): "fp16"
    rounds only the rows to float16 and keeps the queries in float32, as the fp16 index does;
    "int8" quantises both sides (the index quantises its queries the same way)."""
    if dtype == "fp32":
        return (a.float() * b.float()).sum(-1).double()
    if dtype == "fp16":
        return (a.float().double() * b.float().half().double()).sum(-1)
    if dtype == "int8":
        ca, sa = _int8_codes(a)
        cb, sb = _int8_codes(b)
        return (ca * cb).sum(-1) * sa[:, 0] * sb[:, 0]
    raise ValueError(f"dtype: expected 'fp32', 'fp16' or 'int8', got {dtype!r}")


def evaluate_embeddings(emb: torch.Tensor, keys, bench, index_dtypes=("fp32", "int8"),
                        skip_missing: bool = False) -> dict:
    """{dtype: {R@1, R@5, R@10, mR, Prec, Avg}} for collection embeddings `emb` [N, E].

    Every triplet's keys must be in `keys` (KeyError otherwise) unless `skip_missing`:
    then triplets with a key that was not embedded are not scored."""
    if isinstance(bench, str):
        bench = bm.load_benchmark(bench)
    q, p, n = bench.indices(keys, skip_missing=skip_missing)
    if q.numel() == 0:
        raise bm.BenchmarkError(f"benchmark {bench.root}: none of the {len(bench.triplets)} triplets has all "
                                f"three pairs among the {len(keys)} pairs that were read")
    out = {}
    for dt in index_dtypes:
        index = sk.Index(emb.shape[1], dtype=dt)
        index.add(emb.contiguous())
        k = min(SEARCH_K, len(index))
        _, ids = index.search(emb[q].contiguous(), k)
        if k < SEARCH_K:    # tiny collections: pad with "no result"
            ids = torch.cat([ids, torch.full((len(q), SEARCH_K - k), -1, dtype=ids.dtype)], 1)
        pos = quantized_scores(emb[q], emb[p], dt)
        neg = quantized_scores(emb[q], emb[n], dt)
        out[dt] = bm.metrics_from_search(ids, q, p, pos, neg)
    return out


def evaluate_models(models: dict, bench_dir, *, tokenizer, image_size: int, patch_size: int, max_length: int,
                    batch_size: int = 128, index_dtypes=("fp32", "int8"), device="cpu", progress: bool = True,
                    allow_partial: bool = False) -> dict:
    """Evaluate {name: (model, kind)} on the benchmark in `bench_dir` (a folder or a loaded
    `solar.benchmark.Benchmark`).

    Before anything is embedded, the benchmark is checked against its manifest (sizes and
    sha256 of the local shards); after embedding, exactly its num_pairs pairs must have
    been read.  Either failure is a `solar.benchmark.BenchmarkError` naming the problem,
    unless `allow_partial`: then a damaged benchmark is scored on the pairs that could be
    read (triplets with a lost pair are left out) and the result says how many pairs were
    searched and triplets scored ("pairs_searched", "triplets_scored", "partial").

    `tokenizer`: one tokenizer for every model, or None: each model's own (`solar.towers.resolve_tokenizer`).

    Returns {"benchmark": {...}, "models": {name: {dtype: metrics, ...}}}."""
    bench = bench_dir if isinstance(bench_dir, bm.Benchmark) else bm.load_benchmark(bench_dir)
    problem = ""
    if not bench.verified:
        try:
            bm.verify_benchmark(bench)
        except bm.BenchmarkError as e:
            if not allow_partial:
                raise
            problem = str(e)
    res = {"benchmark": {"path": bench.root, "triplets": len(bench.triplets), "pairs": bench.num_pairs,
                         "name": bench.spec.get("name", ""), "pairs_searched": None, "triplets_scored": None,
                         "partial": bool(problem), "problem": problem},
           "models": {}}
    from .data.reader import ReaderStats
    for name, (model, kind) in models.items():
        if model is None:
            continue
        stats = ReaderStats()
        tok = tokenizer if tokenizer is not None else resolve_tokenizer(model)
        emb, keys = embed_collection(model, kind, bench.shards, tok, image_size=image_size,
                                     patch_size=patch_size, max_length=max_length, batch_size=batch_size,
                                     device=device, progress=progress, desc=f"embed [{name}]", stats=stats)
        if len(keys) > bench.num_pairs:
            raise bm.BenchmarkError(f"benchmark {bench.root}: read {len(keys)} pairs, more than the {bench.num_pairs} "
                                    f"its triplets.json lists: the shards are not this benchmark's")
        if len(keys) < bench.num_pairs:
            lost = (f"benchmark {bench.root}: only {len(keys)} of its {bench.num_pairs} pairs could be read "
                    f"({stats.report()})")
            if not allow_partial:
                raise bm.BenchmarkError(lost + "; the shards are damaged: rebuild the benchmark, or pass "
                                               "--allow-partial (allow_partial=True) to score on what was read")
            res["benchmark"]["partial"] = True
            res["benchmark"]["problem"] = res["benchmark"]["problem"] or lost
        r = evaluate_embeddings(emb, keys, bench, index_dtypes, skip_missing=allow_partial)
        q = bench.indices(keys, skip_missing=True)[0] if allow_partial else None
        r["embedding"] = kind
        r["dim"] = int(emb.shape[1])
        r["pairs_searched"] = len(keys)
        r["triplets_scored"] = len(bench.triplets) if q is None else int(q.numel())
        res["models"][name] = r
        b = res["benchmark"]
        b["pairs_searched"] = len(keys) if b["pairs_searched"] is None else min(b["pairs_searched"], len(keys))
        b["triplets_scored"] = r["triplets_scored"] if b["triplets_scored"] is None \
            else min(b["triplets_scored"], r["triplets_scored"])
    return res


def format_table(results: dict) -> str:
    """The paper-style table (one block per index dtype) from `evaluate_models`' result."""
    models = results["models"]
    dtypes = []
    for r in models.values():
        for k in r:
            if isinstance(r[k], dict) and k not in dtypes:
                dtypes.append(k)
    b = results.get("benchmark", {})
    searched = b.get("pairs_searched")
    if b.get("partial"):
        head = (f"PARTIAL sym-MM2MM benchmark {b.get('name', '')}: {b.get('triplets_scored')} of {b.get('triplets')} "
                f"triplets scored, {searched} of {b.get('pairs')} pairs searched ({b.get('problem', '')})")
    else:
        head = (f"sym-MM2MM benchmark {b.get('name', '')}: {b.get('triplets', '?')} triplets, "
                f"{searched if searched is not None else b.get('pairs', '?')} pairs searched")
    blocks = [head]
    for dt in dtypes:
        rows = {name: r[dt] for name, r in models.items() if dt in r}
        blocks.append(f"[{dt} index]\n" + bm.format_table(rows))
    return "\n".join(blocks)
