"""The symmetric multimodal-to-multimodal (sym-MM2MM) benchmark: build, load, check, metrics.

On-disk format (any benchmark in this format can be evaluated, e.g. the paper's once
released, converted to it)::

    DIR/triplets.json
    DIR/pool-000000.tar, pool-000001.tar, ...   webdataset shards, one sample per pair:
                                                 KEY.jpg|png|webp + KEY.txt [+ KEY.json]

``triplets.json``::

    {
      "format": "solar-mm2mm-benchmark",   # required
      "version": 1,                        # required
      "name": "shapesworld",
      "shards": ["pool-000000.tar", ...],  # required; relative to DIR, or absolute / pipe: urls
      "num_pairs": 3600,                   # required; pairs in the shards (pool + triplet pairs)
      "triplets": [                        # required; keys are webdataset __key__ values
        {"query": "1000000000_000", "positive": "1000000000_001", "negative": "1000000001_000",
         ... optional fields (ShapesWorld: item_id, negative_item_id, change)},
        ...
      ],
      "manifest": {                        # required; what the shards must hold
        "shards": [{"name": "pool-000000.tar", "samples": 1000, "bytes": 2949120,
                    "sha256": "9f86d0..."}, ...]  # one entry per shard, in "shards" order
      },
      "item_id_range": [lo, hi],           # optional; item ids used (ShapesWorld)
      "seed": 1234, "generator_version": 1, "pool_items": 3000   # optional provenance
    }

Integrity: the manifest's sample counts must add up to ``num_pairs``.  Evaluation
(`solar.evaluate`, `python -m solar.eval`, the evaluation at the end of `solar.train`)
checks every local shard's size and sha256 against it before embedding, and after
embedding that exactly ``num_pairs`` pairs were read; anything else is a
:class:`BenchmarkError` (``--allow-partial`` scores what could be read and says how many
pairs were searched).  A benchmark without a manifest (built before manifests existed) is
refused with the command that rebuilds it; :func:`write_manifest` (``python -m
solar.benchmark --write-manifest DIR``) adds one to a converted benchmark whose shards
you trust.

Every pair of every triplet is also stored in the shards, so the whole collection is
embedded once; each query is searched against all pairs in the shards, itself excluded
(the hard negative and the other triplets' pairs are distractors too).

ShapesWorld build (:func:`build_benchmark`): for triplet t, item X = ``base + 2t`` and its
one-attribute twin X' = ``base + 2t + 1``; query = a view of X, positive = another view of X
with a different information split (shown/described objects differ), hard negative = a view
of X' (X with one attribute -- shape, colour, size or position -- of one object the query
observes changed; the negative view observes that object too); pool = one view each of
``pool`` further items.  All ids are >= ``BENCHMARK_ITEM_BASE``, which training data
refuses; :func:`check_no_overlap` verifies ids (and optionally item content) against a
training set.

Metrics (exactly SOLAR.md's, in percent): R@k = the positive is among the top k results of
the query with the query itself excluded; mR = mean(R@1, R@5, R@10); Prec = share of
triplets with score(query, positive) > score(query, negative) (ties fail); Avg = (mR + Prec)/2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
from dataclasses import dataclass, field

import torch

from .benchmark_spec import (FORMAT, FORMAT_VERSION, OverlapReport, _ids_and_sigs, _iter_json, _overlap, _train_urls,
                             check_samples_no_overlap)
from .checkpoint import sha256_file
from .data.shapesworld import (BENCHMARK_ITEM_BASE, GENERATOR_VERSION, GRID, _rng, make_item,
                               make_pair, perturb_item, render_view, sample_key, sample_split, write_samples)

__all__ = ["FORMAT", "FORMAT_VERSION", "Benchmark", "BenchmarkError", "build_benchmark", "load_benchmark",
           "benchmark_exists", "verify_benchmark", "write_manifest", "check_no_overlap", "check_samples_no_overlap",
           "OverlapReport", "recall_at_k", "hard_negative_precision", "summarize", "metrics_from_search",
           "metrics_from_scores", "metrics_from_embeddings", "format_table", "METRIC_NAMES"]

METRIC_NAMES = ("R@1", "R@5", "R@10", "mR", "Prec", "Avg")
_REMOTE = ("pipe:", "http://", "https://", "s3://", "gs://")


class BenchmarkError(ValueError):
    """A benchmark folder that does not match its manifest (or has none): damaged, partial or stale."""


# ----------------------------------------------------------------------------------------
# build / load
# ----------------------------------------------------------------------------------------
def _triplet(seed: int, t: int, base: int, image_size: int):
    x_id, neg_id = base + 2 * t, base + 2 * t + 1
    item = make_item(seed, x_id)
    rq, rp, rn, rc = (_rng(seed, x_id, s) for s in (1, 2, 3, 1000))
    q_split = sample_split(item, rq)
    observed = sorted(q_split.observed)
    obj = rc.choice(observed)
    twin, change = perturb_item(item, rc, neg_id, object_index=obj)
    for _ in range(1000):
        p_split = sample_split(item, rp)
        if (p_split.shown, p_split.described) != (q_split.shown, q_split.described):
            break
    else:  # pragma: no cover - every item has >= 2 distinct splits
        raise RuntimeError(f"item {x_id}: no second information split found")
    n_split = sample_split(twin, rn, must_observe=obj)
    out = []
    for it, split, rng, view in ((item, q_split, rq, 0), (item, p_split, rp, 1), (twin, n_split, rn, 0)):
        png, cap, meta = render_view(it, split, rng, image_size, view)
        out.append((sample_key(it.item_id, view), png, cap, meta))
    record = {"query": out[0][0], "positive": out[1][0], "negative": out[2][0], "item_id": x_id,
              "negative_item_id": neg_id, "change": change}
    return out, record


def _check_build_args(triplets, pool, image_size, shard_size, item_base) -> None:
    for name, v, lo in (("triplets", triplets, 1), ("pool", pool, 0), ("shard_size", shard_size, 1),
                        ("image_size", image_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    if image_size % (4 * GRID):
        raise ValueError(f"image_size: expected a positive multiple of {4 * GRID} (ShapesWorld's mask grid), "
                         f"got {image_size}")
    if item_base < BENCHMARK_ITEM_BASE:
        raise ValueError(f"item_base: expected >= BENCHMARK_ITEM_BASE={BENCHMARK_ITEM_BASE} (ids below are "
                         f"training ids), got {item_base}")


def _generate(seed: int, n_triplets: int, pool_size: int, image_size: int, item_base: int, progress: bool):
    """(samples, triplet records) of a benchmark, in memory (nothing written)."""
    samples, records = [], []
    it = range(n_triplets)
    if progress:
        from .logging import progress_bar
        it = progress_bar(it, desc="benchmark triplets", unit="triplet")
    for t in it:
        s, rec = _triplet(seed, t, item_base, image_size)
        samples += s
        records.append(rec)
    pool_base = item_base + 2 * n_triplets
    pool_ids = range(pool_base, pool_base + pool_size)
    if progress:
        from .logging import progress_bar
        pool_ids = progress_bar(pool_ids, desc="benchmark pool", unit="pair")
    samples += [make_pair(seed, i, 0, image_size) for i in pool_ids]
    return samples, records


def _shard_entry(path: str, name: str, samples: int) -> dict:
    return {"name": name, "samples": int(samples), "bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def _write_spec(out: str, spec: dict) -> None:
    tmp = os.path.join(out, "triplets.json.tmp")
    with open(tmp, "w") as f:
        json.dump(spec, f, indent=1)
    os.replace(tmp, os.path.join(out, "triplets.json"))


def build_benchmark(out: str, seed: int = 1234, triplets: int = 200, pool: int = 3000, image_size: int = 64,
                    shard_size: int = 1000, item_base: int = BENCHMARK_ITEM_BASE, progress: bool = True,
                    check_train=None) -> dict:
    """Build the ShapesWorld sym-MM2MM benchmark in folder ``out`` (format in the module docstring).

    ``triplets``: number of triplets; ``pool``: number of distractor items (one view each).
    Deterministic for ``seed``.  Defaults (200 triplets, 3000 distractors, 64 px) embed in
    seconds on a CPU.  ``check_train``: training data (as for :func:`check_no_overlap`) that
    the generated items are checked against before anything is written (ValueError on
    overlap).  The arguments are checked before anything is generated or written.  The
    shards are written first and triplets.json (with the manifest) last, so an interrupted
    build leaves no loadable benchmark.  Returns the triplets.json content.
    """
    n_triplets, pool_size = triplets, pool
    _check_build_args(n_triplets, pool_size, image_size, shard_size, item_base)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out: {out!r} exists and is not a folder")
    train_urls = _train_urls(check_train) if check_train is not None else None
    samples, records = _generate(seed, n_triplets, pool_size, image_size, item_base, progress)
    pool_base = item_base + 2 * n_triplets
    item_range = [item_base, pool_base + pool_size]
    if check_train is not None:
        metas = [m for _, _, _, m in samples]
        _overlap(train_urls, _ids_and_sigs(metas, True), item_range, True, True)
    os.makedirs(out, exist_ok=True)
    spec_path = os.path.join(out, "triplets.json")
    if os.path.exists(spec_path):  # a rebuild: the old spec must not describe half-rewritten shards
        os.remove(spec_path)
    shards, entries = [], []
    for s in range(0, len(samples), shard_size):
        name = f"pool-{s // shard_size:06d}.tar"
        path = os.path.join(out, name)
        n = write_samples(path, samples[s:s + shard_size])
        shards.append(name)
        entries.append(_shard_entry(path, name, n))
    spec = {"format": FORMAT, "version": FORMAT_VERSION, "name": "shapesworld", "shards": shards,
            "num_pairs": len(samples), "triplets": records, "item_id_range": item_range,
            "seed": seed, "generator_version": GENERATOR_VERSION, "pool_items": pool_size, "image_size": image_size,
            "manifest": {"shards": entries}}
    _write_spec(out, spec)
    return spec


def _count_samples(path: str) -> int:
    """Distinct webdataset keys in a local tar shard."""
    keys = set()
    with tarfile.open(path, "r") as tar:
        for m in tar:
            if m.isfile():
                d, base = os.path.split(m.name)
                keys.add(os.path.join(d, base.split(".", 1)[0]))
    return len(keys)


def write_manifest(path: str) -> dict:
    """Add (or replace) the manifest of a benchmark folder from its shards as they are now.

    For a benchmark converted from elsewhere, whose shards you trust: counts each local
    shard's samples, records its size and sha256, and checks the counts add up to
    ``num_pairs`` (ValueError otherwise).  Remote shards (``pipe:`` and urls) are refused.
    Returns the new spec."""
    spec_path = path if path.endswith(".json") else os.path.join(path, "triplets.json")
    bench = load_benchmark(path, require_manifest=False)
    entries = []
    for name, url in zip(bench.spec["shards"], bench.shards):
        if url.startswith(_REMOTE) or "://" in url:
            raise ValueError(f"{spec_path}: shard {name!r} is remote; a manifest can only be written for local shards")
        try:
            n = _count_samples(url)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise BenchmarkError(f"{spec_path}: shard {name!r} is not a readable tar ({e})") from None
        entries.append(_shard_entry(url, name, n))
    total = sum(e["samples"] for e in entries)
    if total != bench.num_pairs:
        raise BenchmarkError(f"{spec_path}: num_pairs is {bench.num_pairs} but the shards hold {total} samples")
    spec = dict(bench.spec, manifest={"shards": entries})
    _write_spec(os.path.dirname(os.path.abspath(spec_path)), spec)
    return spec


def benchmark_exists(path: str) -> bool:
    """True when ``path`` holds a benchmark that matches its manifest (sizes and sha256 checked)."""
    try:
        load_benchmark(path, verify=True)
    except (OSError, ValueError, KeyError):
        return False
    return True


@dataclass
class Benchmark:
    """A loaded benchmark: shard urls to embed, the triplets (by key) and the raw spec."""
    root: str
    shards: list
    triplets: list
    num_pairs: int
    spec: dict = field(repr=False)
    verified: bool = False      # the shards' sha256 were checked against the manifest

    @property
    def manifest(self) -> list:
        """The manifest's per-shard entries ({name, samples, bytes, sha256}); [] when it has none."""
        return (self.spec.get("manifest") or {}).get("shards", [])

    def indices(self, keys, skip_missing: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query, positive, negative) int64 indices of the triplets into ``keys``.

        ``keys`` is the list of ``__key__`` in the order the collection was embedded; every
        key of every triplet must be in it exactly once (KeyError otherwise), unless
        ``skip_missing``: then triplets with a key that was not embedded are left out.
        """
        pos = {}
        for i, k in enumerate(keys):
            if k in pos:
                raise ValueError(f"keys: duplicate key {k!r} at positions {pos[k]} and {i}")
            pos[k] = i
        roles = ("query", "positive", "negative")
        triplets = self.triplets
        if skip_missing:
            triplets = [t for t in triplets if all(t[r] in pos for r in roles)]
        out = []
        for role in roles:
            missing = [t[role] for t in triplets if t[role] not in pos]
            if missing:
                raise KeyError(f"keys: {len(missing)} {role} key(s) of the benchmark were not embedded, "
                               f"e.g. {missing[:3]}")
            out.append(torch.tensor([pos[t[role]] for t in triplets], dtype=torch.int64))
        return tuple(out)


def _rebuild_hint(spec: dict, root: str) -> str:
    if spec.get("name") == "shapesworld" and all(k in spec for k in ("seed", "pool_items", "image_size")):
        return (f"rebuild it: python -m solar.benchmark --out {root} --seed {spec['seed']} "
                f"--triplets {len(spec.get('triplets', []))} --pool {spec['pool_items']} "
                f"--image-size {spec['image_size']} (a benchmark in solar.train's cache is rebuilt by the next run)")
    return ("rebuild it, or if its shards are known to be good, add a manifest with "
            f"python -m solar.benchmark --write-manifest {root}")


def load_benchmark(path: str, verify: bool = False, require_manifest: bool = True) -> Benchmark:
    """Load a benchmark folder (or its triplets.json) and validate it; clear errors when malformed.

    Checks the spec, that every shard exists and that the manifest agrees with the spec
    (BenchmarkError otherwise, also for a benchmark without a manifest); ``verify=True`` also
    checks every local shard's size and sha256 against the manifest (reads all shards; see
    :func:`verify_benchmark`).  ``require_manifest=False`` skips the manifest checks.
    """
    spec_path = path if path.endswith(".json") else os.path.join(path, "triplets.json")
    if not os.path.isfile(spec_path):
        raise FileNotFoundError(f"path: no benchmark at {path!r} (expected {spec_path})")
    try:
        with open(spec_path) as f:
            spec = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"path: {spec_path} is not valid json ({e})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"path: {spec_path}: expected a json object, got {type(spec).__name__}")
    root = os.path.dirname(os.path.abspath(spec_path))
    if spec.get("format") != FORMAT:
        raise ValueError(f"{spec_path}: format: expected {FORMAT!r}, got {spec.get('format')!r}")
    if spec.get("version") != FORMAT_VERSION:
        raise ValueError(f"{spec_path}: version: expected {FORMAT_VERSION}, got {spec.get('version')!r}")
    for k, typ in (("shards", list), ("triplets", list), ("num_pairs", int)):
        if not isinstance(spec.get(k), typ):
            raise ValueError(f"{spec_path}: {k}: expected a {typ.__name__}, got {type(spec.get(k)).__name__}")
    shards = []
    for s in spec["shards"]:
        if not isinstance(s, str):
            raise ValueError(f"{spec_path}: shards: expected strings, got {s!r}")
        if s.startswith(_REMOTE) or os.path.isabs(s):
            shards.append(s)
        else:
            shards.append(os.path.join(root, s))
        if not shards[-1].startswith(("pipe:", "http")) and "://" not in shards[-1] and not os.path.isfile(shards[-1]):
            raise FileNotFoundError(f"{spec_path}: shard {s!r} is missing")
    for i, t in enumerate(spec["triplets"]):
        if not isinstance(t, dict) or not all(isinstance(t.get(r), str) for r in ("query", "positive", "negative")):
            raise ValueError(f"{spec_path}: triplets[{i}]: expected string keys query/positive/negative, got {t}")
        if len({t["query"], t["positive"], t["negative"]}) != 3:
            raise ValueError(f"{spec_path}: triplets[{i}]: query, positive and negative must be distinct, got {t}")
    bench = Benchmark(root, shards, spec["triplets"], spec["num_pairs"], spec)
    if require_manifest:
        _check_manifest(bench, spec_path)
        if verify:
            verify_benchmark(bench)
    return bench


def _check_manifest(bench: Benchmark, spec_path: str) -> None:
    """The manifest's presence, form and agreement with the spec (no shard is read)."""
    spec = bench.spec
    man = spec.get("manifest")
    if man is None:
        raise BenchmarkError(f"{spec_path}: no manifest (per-shard sample counts and sha256), so its shards cannot "
                             f"be verified; it was built before manifests existed or converted by hand: "
                             f"{_rebuild_hint(spec, bench.root)}")
    entries = man.get("shards") if isinstance(man, dict) else None
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("samples"), int)
            and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str) for e in entries):
        raise BenchmarkError(f"{spec_path}: manifest: expected {{'shards': [{{name, samples, bytes, sha256}}, ...]}}, "
                             f"got {str(man)[:200]}")
    names = [e["name"] for e in entries]
    if names != spec["shards"]:
        raise BenchmarkError(f"{spec_path}: manifest: lists shards {names[:4]}{'...' if len(names) > 4 else ''}, "
                             f"expected the spec's {spec['shards'][:4]}{'...' if len(spec['shards']) > 4 else ''}")
    total = sum(e["samples"] for e in entries)
    if total != bench.num_pairs:
        raise BenchmarkError(f"{spec_path}: manifest: the shards hold {total} samples, num_pairs says "
                             f"{bench.num_pairs}")


def verify_benchmark(bench) -> Benchmark:
    """Check every local shard's size, then its sha256, against the manifest (reads all
    shards); returns the benchmark marked ``verified``.  BenchmarkError naming the first shard that differs.
    Remote shards cannot be hashed here: their sample count is checked after embedding."""
    if not isinstance(bench, Benchmark):
        bench = load_benchmark(bench)
    spec_path = os.path.join(bench.root, "triplets.json")
    _check_manifest(bench, spec_path)
    for e, url in zip(bench.manifest, bench.shards):
        if url.startswith(_REMOTE) or "://" in url:
            continue
        size = os.path.getsize(url)
        if size != e["bytes"]:
            raise BenchmarkError(f"{spec_path}: shard {e['name']!r} has {size} bytes, the manifest says "
                                 f"{e['bytes']} (truncated or replaced); {_rebuild_hint(bench.spec, bench.root)}")
    for e, url in zip(bench.manifest, bench.shards):
        if url.startswith(_REMOTE) or "://" in url:
            continue
        got = sha256_file(url)
        if got != e["sha256"]:
            raise BenchmarkError(f"{spec_path}: shard {e['name']!r} does not match the manifest (sha256 {got[:16]}..., "
                                 f"expected {e['sha256'][:16]}...): it is corrupt or was replaced; "
                                 f"{_rebuild_hint(bench.spec, bench.root)}")
    bench.verified = True
    return bench


# ----------------------------------------------------------------------------------------
# no-overlap check
# ----------------------------------------------------------------------------------------
def check_no_overlap(train, benchmark, content: bool = True, raise_on_overlap: bool = True) -> OverlapReport:
    """Verify that no benchmark item appears in the training data.

    ``train``: a ShapesWorld folder (its manifest and shards), shard urls or a brace pattern.
    ``benchmark``: a folder / triplets.json path or a :class:`Benchmark`.  Checks the
    declared item-id ranges when both sides have them, then scans every training json:
    item ids must be disjoint and, with ``content=True``, no training item may have the same
    objects and text attributes as a benchmark item.  Raises ValueError on overlap unless
    ``raise_on_overlap=False``.
    """
    bench = benchmark if isinstance(benchmark, Benchmark) else load_benchmark(benchmark, require_manifest=False)
    train_urls = _train_urls(train)
    metas = (meta for _, meta in _iter_json(bench.shards))
    return _overlap(train_urls, _ids_and_sigs(metas, content), bench.spec.get("item_id_range"), content,
                    raise_on_overlap)


# ----------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------
def _as_index(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected a 1-D integer tensor, got shape {tuple(t.shape)} dtype {t.dtype}")
    return t.long()


def _check_ks(ks) -> tuple:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks: expected positive ints, got {ks}")
    return ks


def recall_at_k(ranked, query_idx, positive_idx, ks=(1, 5, 10)) -> dict:
    """R@k in percent from search results, the query itself excluded.

    ``ranked``: int [Q, K] collection indices, best first (-1 = no result), as returned by
    a search of each query against the whole collection (which contains the query).  K must
    be at least max(ks) + 1 so that dropping the query leaves max(ks) results.
    """
    ks = _check_ks(ks)
    ranked = torch.as_tensor(ranked).long()
    q, p = _as_index(query_idx, "query_idx"), _as_index(positive_idx, "positive_idx")
    if ranked.dim() != 2 or ranked.shape[0] != q.shape[0] or p.shape != q.shape:
        raise ValueError(f"ranked/query_idx/positive_idx: expected [Q, K], [Q], [Q]; got {tuple(ranked.shape)}, "
                         f"{tuple(q.shape)}, {tuple(p.shape)}")
    if ranked.shape[1] < max(ks) + 1:
        raise ValueError(f"ranked: expected at least max(ks) + 1 = {max(ks) + 1} results per query (the query "
                         f"itself is excluded), got {ranked.shape[1]}")
    if bool((q == p).any()):
        raise ValueError("query_idx/positive_idx: a positive equals its query")
    valid = (ranked >= 0) & (ranked != q[:, None])
    position = valid.long().cumsum(1) - 1  # rank among the kept results
    hit = valid & (ranked == p[:, None])
    big = torch.iinfo(torch.int64).max
    pos_rank = torch.where(hit, position, torch.full_like(position, big)).min(1).values
    return {f"R@{k}": 100.0 * (pos_rank < k).double().mean().item() for k in ks}


def hard_negative_precision(pos_scores, neg_scores) -> float:
    """Prec in percent: share of triplets with score(q, pos) > score(q, neg) (ties count as failures)."""
    a, b = torch.as_tensor(pos_scores).double(), torch.as_tensor(neg_scores).double()
    if a.shape != b.shape or a.dim() != 1 or a.numel() == 0:
        raise ValueError(f"pos_scores/neg_scores: expected equal non-empty 1-D shapes, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    return 100.0 * (a > b).double().mean().item()


def summarize(recalls: dict, prec: float) -> dict:
    """{R@1, R@5, R@10, mR, Prec, Avg} from R@k values (percent) and Prec; mR = mean of R@1/5/10."""
    for k in ("R@1", "R@5", "R@10"):
        if k not in recalls:
            raise ValueError(f"recalls: expected R@1, R@5 and R@10, missing {k}")
    out = {k: float(recalls[k]) for k in ("R@1", "R@5", "R@10")}
    out["mR"] = (out["R@1"] + out["R@5"] + out["R@10"]) / 3.0
    out["Prec"] = float(prec)
    out["Avg"] = (out["mR"] + out["Prec"]) / 2.0
    return out


def metrics_from_search(ranked, query_idx, positive_idx, pos_scores, neg_scores) -> dict:
    """All metrics from search results (``ranked`` [Q, >= 11]) and the triplets' pos/neg scores."""
    return summarize(recall_at_k(ranked, query_idx, positive_idx, (1, 5, 10)),
                     hard_negative_precision(pos_scores, neg_scores))


def metrics_from_scores(score_fn, num_items: int, query_idx, positive_idx, negative_idx, chunk: int = 256) -> dict:
    """All metrics from a score function, exhaustively (the reference for any index).

    ``score_fn(q)`` for an int64 [b] tensor of collection indices returns float [b, num_items]
    scores against the whole collection.  Ranks exclude the query; ties with the positive
    count against it (a constant scorer gets R@k = 0, never 100).
    """
    q = _as_index(query_idx, "query_idx")
    p, n = _as_index(positive_idx, "positive_idx"), _as_index(negative_idx, "negative_idx")
    if not (q.shape == p.shape == n.shape) or q.numel() == 0:
        raise ValueError(f"query_idx/positive_idx/negative_idx: expected equal non-empty shapes, got "
                         f"{tuple(q.shape)}, {tuple(p.shape)}, {tuple(n.shape)}")
    for name, t in (("query_idx", q), ("positive_idx", p), ("negative_idx", n)):
        if int(t.min()) < 0 or int(t.max()) >= num_items:
            raise ValueError(f"{name}: expected indices in [0, {num_items}), got range [{int(t.min())}, {int(t.max())}]")
    if bool((q == p).any()) or bool((q == n).any()):
        raise ValueError("query_idx: a positive or negative equals its query")
    ranks, sp, sn = [], [], []
    for s in range(0, q.numel(), chunk):
        qb, pb, nb = q[s:s + chunk], p[s:s + chunk], n[s:s + chunk]
        sc = torch.as_tensor(score_fn(qb)).double()
        if sc.shape != (qb.numel(), num_items):
            raise ValueError(f"score_fn: expected scores of shape {(qb.numel(), num_items)}, got {tuple(sc.shape)}")
        rows = torch.arange(qb.numel())
        pos = sc[rows, pb]
        sp.append(pos)
        sn.append(sc[rows, nb])
        sc[rows, qb] = float("-inf")
        above = sc >= pos[:, None]  # ties count against the positive
        above[rows, pb] = False
        ranks.append(above.sum(1))
    rank = torch.cat(ranks)
    rec = {f"R@{k}": 100.0 * (rank < k).double().mean().item() for k in (1, 5, 10)}
    return summarize(rec, hard_negative_precision(torch.cat(sp), torch.cat(sn)))


def metrics_from_embeddings(emb: torch.Tensor, query_idx, positive_idx, negative_idx, chunk: int = 256) -> dict:
    """All metrics by exact inner-product search over ``emb`` [N, D] (the collection's embeddings)."""
    if emb.dim() != 2:
        raise ValueError(f"emb: expected [N, D], got shape {tuple(emb.shape)}")
    e = emb.double()
    return metrics_from_scores(lambda qb: e[qb] @ e.T, e.shape[0], query_idx, positive_idx, negative_idx, chunk)


def format_table(rows: dict) -> str:
    """A paper-style table: one line per method, columns R@1 R@5 R@10 mR Prec Avg (percent)."""
    w = max([6] + [len(k) for k in rows])
    lines = [f"{'method':<{w}} " + " ".join(f"{m:>6}" for m in METRIC_NAMES)]
    for name, m in rows.items():
        lines.append(f"{name:<{w}} " + " ".join(f"{m[k]:6.2f}" for k in METRIC_NAMES))
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m solar.benchmark --out DIR [--seed S --triplets N --pool M]``: build a benchmark.

    Every argument (and the --check-train data, whose overlap with the new benchmark is
    checked on the generated items) is checked before anything is written: a bad one is a
    one-line error with exit status 2.  ``--write-manifest DIR`` adds a manifest to an
    existing benchmark (see :func:`write_manifest`).  ``propose``, ``review`` and ``export``
    as the first argument run the pipeline that makes a benchmark of real data
    (:mod:`solar.curation.cli`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("propose", "review", "export"):
        # Loaded by name when the command runs: the pipeline embeds with solar.api, which
        # evaluates through solar.evaluate, which imports this module.
        import importlib
        return importlib.import_module("solar.curation.cli").main(argv)
    ap = argparse.ArgumentParser(prog="python -m solar.benchmark", description="Build the ShapesWorld benchmark "
                                 "(or: python -m solar.benchmark {propose,review,export} --help, the pipeline for "
                                 "real data).")
    ap.add_argument("--out", default=None, help="folder to build the benchmark in")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--triplets", type=int, default=200)
    ap.add_argument("--pool", type=int, default=3000)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--check-train", default=None, help="training data folder/pattern to check for item overlap")
    ap.add_argument("--write-manifest", default=None, metavar="DIR",
                    help="add a manifest (sample counts, sha256) to the existing benchmark DIR from its shards as "
                         "they are, and exit; only for a converted benchmark whose shards you trust")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    if a.write_manifest is not None:
        if a.out is not None:
            ap.error("--write-manifest: expected alone, without --out")
        try:
            spec = write_manifest(a.write_manifest)
        except (OSError, ValueError) as e:
            ap.error(f"--write-manifest: {e}")
        print(f"wrote the manifest of {len(spec['shards'])} shard(s), {spec['num_pairs']} pairs, to {a.write_manifest}")
        return 0
    if a.out is None:
        ap.error("--out: required (the folder to build the benchmark in)")
    try:
        _check_build_args(a.triplets, a.pool, a.image_size, a.shard_size, BENCHMARK_ITEM_BASE)
    except ValueError as e:
        name, _, rest = str(e).partition(": ")
        ap.error(f"--{name.replace('_', '-')}: {rest}")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        ap.error(f"--out: {a.out!r} exists and is not a folder")
    if a.check_train is not None:
        try:
            _train_urls(a.check_train)
        except (OSError, ValueError) as e:
            ap.error(f"--check-train: {e}")
    try:
        spec = build_benchmark(a.out, a.seed, a.triplets, a.pool, a.image_size, a.shard_size,
                               progress=not a.no_progress, check_train=a.check_train)
    except ValueError as e:   # overlap with --check-train: found before anything was written
        print(f"solar.benchmark: error: --check-train: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(spec['triplets'])} triplets and {spec['num_pairs']} pairs in {len(spec['shards'])} shards "
          f"to {a.out}")
    if a.check_train:
        print(f"no overlap with {a.check_train}: checked before writing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
