"""Evaluate pair-embedding models on a sym-MM2MM benchmark (format: `solar.benchmark`).

For each model: embed every pair of the benchmark's shards (pool + triplet pairs) in one
pass, add them to a `solar_kernels.Index` (one per index dtype, "fp32" and "int8" by
default), search each triplet's query against the whole collection (k = 11, the query
itself is then excluded), and compute R@1, R@5, R@10, mR, Prec and Avg with
`solar.benchmark`'s metric functions (SOLAR.md definitions, percent).

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

__all__ = ["embed_collection", "evaluate_embeddings", "evaluate_models", "format_table", "load_for_eval",
           "quantized_scores", "SEARCH_K"]

SEARCH_K = 11   # R@10 with the query itself excluded needs 11 results
EMBED_FILE = "solar_embedding.json"


def load_for_eval(path: str, device="cpu"):
    """(model, embedding kind) from a model folder written by `solar.train`.

    The kind ("solar" or "clip_sf") is read from the folder's solar_embedding.json
    ("solar" when the file is absent, e.g. a stage-1 model saved by stage 1 itself)."""
    from .checkpoint import CheckpointError
    from .model import SolarModel
    if not os.path.exists(path):
        raise FileNotFoundError(f"ckpt: {path!r} does not exist")
    if not os.path.isdir(path):
        raise CheckpointError(f"ckpt: {path!r} is not a model folder (expected config.json + model.safetensors)")
    kind = "solar"
    f = os.path.join(path, EMBED_FILE)
    if os.path.isfile(f):
        try:
            with open(f) as fh:
                kind = json.load(fh).get("embedding", "solar")
        except json.JSONDecodeError as e:
            raise CheckpointError(f"ckpt: {f} is not valid json ({e})") from e
    if kind not in EMBEDDING_KINDS:
        raise CheckpointError(f"ckpt: {f} names an unknown embedding {kind!r}; expected one of {EMBEDDING_KINDS}")
    return SolarModel.from_pretrained(path, map_location=device), kind


@torch.no_grad()
def embed_collection(model, kind: str, urls, tokenizer, *, image_size: int, patch_size: int, max_length: int,
                     batch_size: int = 128, device="cpu", progress: bool = True, desc: str = "embed"):
    """Embed every pair of the shards `urls` in order: (emb [N, E] float32, keys list)."""
    from .logging import progress_bar

    from .data.reader import make_loader
    from .trainer import batch_to
    loader = make_loader(urls, tokenizer, image_size=image_size, patch_size=patch_size, max_length=max_length,
                         batch_size=batch_size, rank=0, world_size=1)
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


def evaluate_embeddings(emb: torch.Tensor, keys, bench, index_dtypes=("fp32", "int8")) -> dict:
    """{dtype: {R@1, R@5, R@10, mR, Prec, Avg}} for collection embeddings `emb` [N, E]."""
    if isinstance(bench, str):
        bench = bm.load_benchmark(bench)
    q, p, n = bench.indices(keys)
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


def evaluate_models(models: dict, bench_dir: str, *, tokenizer, image_size: int, patch_size: int, max_length: int,
                    batch_size: int = 128, index_dtypes=("fp32", "int8"), device="cpu", progress: bool = True) -> dict:
    """Evaluate {name: (model, kind)} on the benchmark in `bench_dir`.

    Returns {"benchmark": {...}, "models": {name: {dtype: metrics}}}."""
    bench = bm.load_benchmark(bench_dir)
    res = {"benchmark": {"path": os.path.abspath(bench_dir), "triplets": len(bench.triplets),
                         "pairs": bench.num_pairs, "name": bench.spec.get("name", "")},
           "models": {}}
    for name, (model, kind) in models.items():
        if model is None:
            continue
        emb, keys = embed_collection(model, kind, bench.shards, tokenizer, image_size=image_size,
                                     patch_size=patch_size, max_length=max_length, batch_size=batch_size,
                                     device=device, progress=progress, desc=f"embed [{name}]")
        res["models"][name] = evaluate_embeddings(emb, keys, bench, index_dtypes)
        res["models"][name]["embedding"] = kind
        res["models"][name]["dim"] = int(emb.shape[1])
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
    blocks = [f"sym-MM2MM benchmark {b.get('name', '')}: {b.get('triplets', '?')} triplets, "
              f"{b.get('pairs', '?')} pairs searched"]
    for dt in dtypes:
        rows = {name: r[dt] for name, r in models.items() if dt in r}
        blocks.append(f"[{dt} index]\n" + bm.format_table(rows))
    return "\n".join(blocks)
