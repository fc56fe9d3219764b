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
      "item_id_range": [lo, hi],           # optional; item ids used (ShapesWorld)
      "seed": 1234, "generator_version": 1, "pool_items": 3000   # optional provenance
    }

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
import tarfile
from dataclasses import dataclass, field

import torch

from .data.shapesworld import (BENCHMARK_ITEM_BASE, GENERATOR_VERSION, _rng, item_signature, make_item, make_pair,
                               perturb_item, render_view, sample_key, sample_split, write_samples)

__all__ = ["FORMAT", "FORMAT_VERSION", "Benchmark", "build_benchmark", "load_benchmark", "benchmark_exists", "check_no_overlap",
           "OverlapReport", "recall_at_k", "hard_negative_precision", "summarize", "metrics_from_search",
           "metrics_from_scores", "metrics_from_embeddings", "format_table", "METRIC_NAMES"]

FORMAT = "solar-mm2mm-benchmark"
FORMAT_VERSION = 1
METRIC_NAMES = ("R@1", "R@5", "R@10", "mR", "Prec", "Avg")


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


def build_benchmark(out: str, seed: int = 1234, triplets: int = 200, pool: int = 3000, image_size: int = 64,
                    shard_size: int = 1000, item_base: int = BENCHMARK_ITEM_BASE, progress: bool = True) -> dict:
    """Build the ShapesWorld sym-MM2MM benchmark in folder ``out`` (format in the module docstring).

    ``triplets``: number of triplets; ``pool``: number of distractor items (one view each).
    Deterministic for ``seed``.  Defaults (200 triplets, 3000 distractors, 64 px) embed in
    seconds on a CPU.  Returns the triplets.json content.
    """
    n_triplets, pool_size = triplets, pool
    for name, v, lo in (("triplets", n_triplets, 1), ("pool", pool_size, 0), ("shard_size", shard_size, 1)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    if item_base < BENCHMARK_ITEM_BASE:
        raise ValueError(f"item_base: expected >= BENCHMARK_ITEM_BASE={BENCHMARK_ITEM_BASE} (ids below are "
                         f"training ids), got {item_base}")
    os.makedirs(out, exist_ok=True)
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
    shards = []
    for s in range(0, len(samples), shard_size):
        name = f"pool-{s // shard_size:06d}.tar"
        write_samples(os.path.join(out, name), samples[s:s + shard_size])
        shards.append(name)
    spec = {"format": FORMAT, "version": FORMAT_VERSION, "name": "shapesworld", "shards": shards,
            "num_pairs": len(samples), "triplets": records, "item_id_range": [item_base, pool_base + pool_size],
            "seed": seed, "generator_version": GENERATOR_VERSION, "pool_items": pool_size, "image_size": image_size}
    tmp = os.path.join(out, "triplets.json.tmp")
    with open(tmp, "w") as f:
        json.dump(spec, f, indent=1)
    os.replace(tmp, os.path.join(out, "triplets.json"))
    return spec


def benchmark_exists(path: str) -> bool:
    """True when ``path`` holds a loadable benchmark (triplets.json valid, shards present)."""
    try:
        load_benchmark(path)
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

    def indices(self, keys) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query, positive, negative) int64 indices of the triplets into ``keys``.

        ``keys`` is the list of ``__key__`` in the order the collection was embedded; every
        key of every triplet must be in it exactly once.
        """
        pos = {}
        for i, k in enumerate(keys):
            if k in pos:
                raise ValueError(f"keys: duplicate key {k!r} at positions {pos[k]} and {i}")
            pos[k] = i
        out = []
        for role in ("query", "positive", "negative"):
            missing = [t[role] for t in self.triplets if t[role] not in pos]
            if missing:
                raise KeyError(f"keys: {len(missing)} {role} key(s) of the benchmark were not embedded, "
                               f"e.g. {missing[:3]}")
            out.append(torch.tensor([pos[t[role]] for t in self.triplets], dtype=torch.int64))
        return tuple(out)


def load_benchmark(path: str) -> Benchmark:
    """Load a benchmark folder (or its triplets.json) and validate it; clear errors when malformed."""
    spec_path = path if path.endswith(".json") else os.path.join(path, "triplets.json")
    if not os.path.isfile(spec_path):
        raise FileNotFoundError(f"path: no benchmark at {path!r} (expected {spec_path})")
    try:
        with open(spec_path) as f:
            spec = json.load(f)
    except ValueError as e:
        raise ValueError(f"path: {spec_path} is not valid json ({e})") from None
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
        if s.startswith(("pipe:", "http://", "https://", "s3://", "gs://")) or os.path.isabs(s):
            shards.append(s)
        else:
            shards.append(os.path.join(root, s))
        if not shards[-1].startswith(("pipe:", "http")) and "://" not in shards[-1] and not os.path.isfile(shards[-1]):
            raise FileNotFoundError(f"{spec_path}: shard {s!r} is missing")
    for i, t in enumerate(spec["triplets"]):
        if not all(isinstance(t.get(r), str) for r in ("query", "positive", "negative")):
            raise ValueError(f"{spec_path}: triplets[{i}]: expected string keys query/positive/negative, got {t}")
        if len({t["query"], t["positive"], t["negative"]}) != 3:
            raise ValueError(f"{spec_path}: triplets[{i}]: query, positive and negative must be distinct, got {t}")
    return Benchmark(root, shards, spec["triplets"], spec["num_pairs"], spec)


# ----------------------------------------------------------------------------------------
# no-overlap check
# ----------------------------------------------------------------------------------------
def _iter_json(urls):
    from .data.reader import expand_urls

    for u in expand_urls(urls):
        if u.startswith("pipe:") or "://" in u:
            import webdataset as wds
            for s in wds.tarfile_to_samples()(iter([{"url": u}])):
                if "json" in s:
                    yield s["__key__"], json.loads(s["json"])
            continue
        with tarfile.open(u, "r") as tar:
            for m in tar:
                if m.isfile() and m.name.endswith(".json"):
                    yield m.name[:-5], json.loads(tar.extractfile(m).read())


@dataclass
class OverlapReport:
    """Result of :func:`check_no_overlap`."""
    train_samples: int
    benchmark_items: int
    shared_item_ids: list
    shared_contents: int
    range_check: str

    @property
    def ok(self) -> bool:
        return not self.shared_item_ids and not self.shared_contents


def _train_urls(train):
    if isinstance(train, str) and os.path.isdir(train):
        man = os.path.join(train, "shapesworld.json")
        if os.path.isfile(man):
            with open(man) as f:
                m = json.load(f)
            return [os.path.join(train, s) for s in m["shards"]], m
        names = sorted(n for n in os.listdir(train) if n.endswith(".tar"))
        if not names:
            raise FileNotFoundError(f"train: no .tar shards in folder {train!r}")
        return [os.path.join(train, n) for n in names], None
    return train, None


def check_no_overlap(train, benchmark, content: bool = True, raise_on_overlap: bool = True) -> OverlapReport:
    """Verify that no benchmark item appears in the training data.

    ``train``: a ShapesWorld folder (its manifest and shards), shard urls or a brace pattern.
    ``benchmark``: a folder / triplets.json path or a :class:`Benchmark`.  Checks the
    declared item-id ranges when both sides have them, then scans every training json:
    item ids must be disjoint and, with ``content=True``, no training item may have the same
    objects and text attributes as a benchmark item.  Raises ValueError on overlap unless
    ``raise_on_overlap=False``.
    """
    bench = benchmark if isinstance(benchmark, Benchmark) else load_benchmark(benchmark)
    urls, manifest = _train_urls(train)
    range_check = "not declared"
    br = bench.spec.get("item_id_range")
    if manifest is not None and br is not None:
        tr = manifest["item_id_range"]
        disjoint = tr[1] <= br[0] or br[1] <= tr[0]
        range_check = f"train ids [{tr[0]}, {tr[1]}) vs benchmark [{br[0]}, {br[1]}): " + \
            ("disjoint" if disjoint else "OVERLAP")
    bench_ids, bench_sigs = set(), set()
    for _, meta in _iter_json(bench.shards):
        if "item_id" in meta:
            bench_ids.add(int(meta["item_id"]))
        if content and "objects" in meta and "text_attrs" in meta:
            bench_sigs.add(item_signature(meta["objects"], meta["text_attrs"]))
    shared_ids, shared_sig, n = set(), set(), 0
    for _, meta in _iter_json(urls):
        n += 1
        if int(meta.get("item_id", -1)) in bench_ids:
            shared_ids.add(int(meta["item_id"]))
        if content and "objects" in meta and "text_attrs" in meta:
            sig = item_signature(meta["objects"], meta["text_attrs"])
            if sig in bench_sigs:
                shared_sig.add(sig)
    rep = OverlapReport(n, len(bench_ids), sorted(shared_ids), len(shared_sig), range_check)
    if raise_on_overlap and (not rep.ok or range_check.endswith("OVERLAP")):
        raise ValueError(f"benchmark items appear in training data: {len(shared_ids)} shared item id(s) "
                         f"{sorted(shared_ids)[:5]}, {len(shared_sig)} shared item content(s); {range_check}")
    return rep


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


def main(argv=None) -> None:
    """``python -m solar.benchmark --out DIR [--seed S --triplets N --pool M]``: build a benchmark."""
    ap = argparse.ArgumentParser(prog="python -m solar.benchmark", description="Build the ShapesWorld benchmark.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--triplets", type=int, default=200)
    ap.add_argument("--pool", type=int, default=3000)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--check-train", default=None, help="training data folder/pattern to check for item overlap")
    a = ap.parse_args(argv)
    spec = build_benchmark(a.out, a.seed, a.triplets, a.pool, a.image_size, a.shard_size)
    print(f"wrote {len(spec['triplets'])} triplets and {spec['num_pairs']} pairs in {len(spec['shards'])} shards "
          f"to {a.out}")
    if a.check_train:
        rep = check_no_overlap(a.check_train, a.out)
        print(f"no overlap with {a.check_train}: {rep.train_samples} training samples checked; {rep.range_check}")


if __name__ == "__main__":
    main()
