"""Step 1 of the benchmark pipeline: propose candidate triplets from a catalogue.

For ``triplets`` items drawn (seeded) among those with two or more distinct views, the
query and the positive are the two views of the item whose captions share the fewest
words (Jaccard overlap of their word sets; a pair with different images is preferred at
equal overlap): they carry different information about the same thing, which is what a
sym-MM2MM query must bridge.  A model (a SOLAR or CLIP-SF model folder, via
:func:`solar.api.load`) embeds every view; each query's hard-negative candidates are the
nearest views of *other* items outside the triplets (at most one view per item, best
first, with their scores), for a person to choose from in ``review``.  The distractor pool
is one view (seeded) of each of ``pool`` further items outside the triplets (all by
default).  Views of triplet items are never candidates or distractors: a second view of
the query's item in the collection would be a second right answer.

Output folder (the proposal)::

    proposal.json   the triplets, candidates, pool, parameters, model and source; written last
    samples.tar     every view the proposal names (webdataset: image, txt, json), copied as read
    items.txt       the item ids of the proposal, one per line: exclude them from training

The proposal's identity is the sha256 of ``proposal.json`` (:func:`proposal_hash`); verdict
files record it, so a verdict file is never applied to another proposal.  Deterministic for
a seed: the same shards, model and arguments give a byte-identical ``proposal.json``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
from dataclasses import dataclass

import torch

from .catalogue import CatalogueError, SampleStore, caption_words, iter_samples, read_catalogue, write_tar

__all__ = ["PROPOSAL_FORMAT", "Proposal", "propose", "load_proposal", "proposal_hash", "choose_pair"]

PROPOSAL_FORMAT = "solar-mm2mm-proposal"
PROPOSAL_VERSION = 1


def _check_int(name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")


def _jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def choose_pair(views, rng: random.Random):
    """(query, positive, caption overlap) among an item's ``views``, or None when all are duplicates.

    The pair with the least caption overlap (Jaccard of word sets); at equal overlap one
    with different images; remaining ties and the query/positive order drawn from ``rng``.
    Views with the same caption and the same image are duplicates and never paired."""
    words = [caption_words(v.caption) for v in views]
    scored = []
    for i in range(len(views)):
        for j in range(i + 1, len(views)):
            same_image = views[i].image_sha256 == views[j].image_sha256
            if same_image and views[i].caption == views[j].caption:
                continue
            scored.append((round(_jaccard(words[i], words[j]), 9), same_image, i, j))
    if not scored:
        return None
    best = min(s[:2] for s in scored)
    ties = [s for s in scored if s[:2] == best]
    _, _, i, j = ties[rng.randrange(len(ties))]
    if rng.random() < 0.5:
        i, j = j, i
    return views[i], views[j], best[0]


def _load_image(data: bytes):
    from PIL import Image
    return Image.open(io.BytesIO(data)).convert("RGB")


@torch.no_grad()
def _embed(catalogue, model, tokenizer, batch_size: int, progress: bool) -> tuple[torch.Tensor, dict]:
    """(embeddings [N, E] float32, {key: row}) of every catalogue view, read again from the shards."""
    from ..api import encode
    from ..logging import progress_bar
    want = {v.key: v for v in catalogue.views}
    rows, embs, ims, caps = {}, [], [], []
    bar = progress_bar(total=len(want), desc="embed catalogue", unit="view", disable=not progress)

    def flush():
        embs.append(encode(ims, caps, model, tokenizer=tokenizer, batch_size=batch_size))
        bar.update(len(ims))
        ims.clear()
        caps.clear()

    for _, key, parts in iter_samples(catalogue.urls):
        v = want.get(key)
        if v is None or key in rows:
            continue
        rows[key] = len(rows)
        ims.append(_load_image(parts[v.image_ext]))
        caps.append(v.caption)
        if len(ims) == batch_size:
            flush()
    if ims:
        flush()
    bar.close()
    if len(rows) != len(want):
        raise CatalogueError(f"shards: {len(want) - len(rows)} view(s) could not be read again for embedding "
                             f"(the shards changed while proposing?)")
    return torch.cat(embs), rows


def _mine(emb: torch.Tensor, rows: dict, queries, candidates, negatives: int, chunk: int = 256):
    """For each query view: [(view, score)] of its ``negatives`` nearest candidate views, one per item."""
    cand_rows = torch.tensor([rows[v.key] for v in candidates], dtype=torch.int64)
    cand_emb = emb[cand_rows]
    per_item = {}
    for v in candidates:
        per_item[v.item_id] = per_item.get(v.item_id, 0) + 1
    k = min(len(candidates), negatives * max(per_item.values()))   # always holds `negatives` distinct items
    out = []
    for s in range(0, len(queries), chunk):
        qs = queries[s:s + chunk]
        q = emb[torch.tensor([rows[v.key] for v in qs], dtype=torch.int64)]
        scores, idx = (q @ cand_emb.T).topk(k, dim=1)
        for srow, irow in zip(scores.tolist(), idx.tolist()):
            picked, items = [], set()
            for sc, j in zip(srow, irow):
                c = candidates[j]
                if c.item_id in items:
                    continue
                items.add(c.item_id)
                picked.append((c, sc))
                if len(picked) == negatives:
                    break
            out.append(picked)
    return out


def _model_record(model, kind: str) -> dict:
    rec = {"kind": kind}
    if isinstance(model, (str, os.PathLike)):
        rec["path"] = os.fspath(model)
        weights = os.path.join(model, "model.safetensors")
        if os.path.isfile(weights):
            from ..checkpoint import sha256_file
            rec["weights_sha256"] = sha256_file(weights)
    return rec


def _view_record(v, score=None) -> dict:
    d = {"key": v.key, "item_id": v.item_id}
    if score is not None:
        d["score"] = round(float(score), 6)
    return d


def propose(shards, model, out: str, *, triplets: int = 50, negatives: int = 5, pool: int = -1, seed: int = 0,
            id_field: str = "item_id", kind=None, tokenizer="shapesworld", batch_size: int = 64, device=None,
            check_train=None, progress: bool = False) -> dict:
    """Propose ``triplets`` candidate triplets from the catalogue ``shards`` into folder ``out``.

    ``model``: a model folder written by `solar.train` (SOLAR or CLIP-SF; ``kind`` for a folder
    without solar_embedding.json) or a loaded model, used to mine ``negatives`` hard-negative
    candidates per query.  ``pool``: distractor items (-1: every item outside the triplets).
    ``check_train``: training data (a ShapesWorld folder, shards or a pattern) that must share
    no item with the catalogue (ValueError before the model is loaded).  Arguments and shards
    are checked before the model is loaded; ``proposal.json`` is written last.  Returns its
    content (see the module docstring)."""
    from ..api import load
    from ..benchmark_spec import check_samples_no_overlap
    for name, v, lo in (("triplets", triplets, 1), ("negatives", negatives, 1), ("pool", pool, -1),
                        ("seed", seed, 0), ("batch_size", batch_size, 1)):
        _check_int(name, v, lo)
    if not isinstance(id_field, str) or not id_field:
        raise ValueError(f"id_field: expected a json field name, got {id_field!r}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out: {out!r} exists and is not a folder")
    cat = read_catalogue(shards, id_field)
    rng = random.Random(f"solar-propose:{seed}")
    multi = cat.multi_view_items()
    pairs = {}
    for item in multi:
        p = choose_pair(cat.by_item[item], random.Random(f"solar-propose:{seed}:pair:{item!r}"))
        if p is not None:
            pairs[item] = p
    single = len(cat.by_item) - len(multi)
    if len(pairs) < triplets:
        raise CatalogueError(
            f"triplets: {triplets} triplets need {triplets} items with two or more distinct views; the catalogue "
            f"has {len(pairs)} ({single} item(s) with one view, {len(multi) - len(pairs)} whose views are all "
            f"duplicates; they can only be distractors)")
    chosen = rng.sample(sorted(pairs, key=lambda i: (type(i).__name__, i)), triplets)
    chosen_set = set(chosen)
    others = [i for i in sorted(cat.by_item, key=lambda i: (type(i).__name__, i)) if i not in chosen_set]
    if len(others) < negatives:
        raise CatalogueError(f"negatives: {negatives} candidates per query need {negatives} items outside the "
                             f"triplets; the catalogue has {len(others)} (lower --negatives or --triplets)")
    if pool > len(others):
        raise CatalogueError(f"pool: expected at most {len(others)} (the items outside the triplets), got {pool}")
    pool_items = others if pool == -1 else sorted(rng.sample(others, pool), key=lambda i: (type(i).__name__, i))
    pool_views = [rng.choice(cat.by_item[i]) for i in pool_items]
    candidates = [v for i in others for v in cat.by_item[i]]
    if check_train is not None:   # the whole catalogue: negatives and distractors come from all of it
        check_samples_no_overlap(check_train, ({**v.meta, "item_id": v.item_id} for v in cat.views))

    model_obj = load(model, device, kind)
    emb, rows = _embed(cat, model_obj, tokenizer, batch_size, progress)
    queries = [pairs[i][0] for i in chosen]
    mined = _mine(emb, rows, queries, candidates, negatives)
    records = []
    for t, item in enumerate(chosen):
        q, p, overlap = pairs[item]
        pos_score = float(emb[rows[q.key]] @ emb[rows[p.key]])
        records.append({"id": f"t{t:05d}", "item_id": item, "query": q.key, "positive": p.key,
                        "positive_score": round(pos_score, 6), "caption_overlap": round(overlap, 4),
                        "candidates": [_view_record(c, s) for c, s in mined[t]]})
    needed = {}
    for r in records:
        for key in (r["query"], r["positive"], *(c["key"] for c in r["candidates"])):
            needed[key] = True
    for v in pool_views:
        needed[v.key] = True
    by_key = {v.key: v for v in cat.views}
    items = sorted({by_key[k].item_id for k in needed}, key=lambda i: (type(i).__name__, i))

    os.makedirs(out, exist_ok=True)
    spec_path = os.path.join(out, "proposal.json")
    if os.path.exists(spec_path):   # a re-run: the old spec must not describe the new samples
        os.remove(spec_path)
    samples_path = os.path.join(out, "samples.tar")
    n = write_tar(samples_path, ((key, parts) for _, key, parts in iter_samples(cat.urls) if key in needed))
    from ..checkpoint import sha256_file
    with open(os.path.join(out, "items.txt"), "w") as f:
        f.write("".join(f"{i}\n" for i in items))
    spec = {"format": PROPOSAL_FORMAT, "version": PROPOSAL_VERSION, "seed": seed, "id_field": id_field,
            "negatives": negatives, "model": _model_record(model, model_obj[1]),
            "source": {"shards": cat.urls, "views": len(cat.views), "items": len(cat.by_item),
                       "single_view_items": single, "skipped": cat.skipped},
            "samples": {"file": "samples.tar", "count": n, "sha256": sha256_file(samples_path)},
            "triplets": records, "pool": [v.key for v in pool_views], "items": items}
    tmp = spec_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(spec, f, indent=1)
    os.replace(tmp, spec_path)
    return spec


def proposal_hash(path: str) -> str:
    """The sha256 of a proposal's ``proposal.json`` (folder or file path): its identity in verdict files."""
    spec_path = path if path.endswith(".json") else os.path.join(path, "proposal.json")
    with open(spec_path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@dataclass
class Proposal:
    """A loaded proposal: its folder, spec, identity (sha256 of proposal.json) and samples."""
    root: str
    spec: dict
    sha256: str
    store: SampleStore

    @property
    def triplets(self) -> list:
        return self.spec["triplets"]


def load_proposal(path: str) -> Proposal:
    """Load and check a proposal folder (or its proposal.json): format, fields, and that
    ``samples.tar`` matches the spec (its sha256) and holds every view the spec names."""
    from ..checkpoint import sha256_file
    spec_path = path if path.endswith(".json") else os.path.join(path, "proposal.json")
    if not os.path.isfile(spec_path):
        raise FileNotFoundError(f"proposal: no proposal at {path!r} (expected {spec_path}; "
                                f"write one with python -m solar.benchmark propose)")
    with open(spec_path, "rb") as f:
        raw = f.read()
    try:
        spec = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"proposal: {spec_path} is not valid json ({e})") from None
    if not isinstance(spec, dict) or spec.get("format") != PROPOSAL_FORMAT:
        got = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise ValueError(f"proposal: {spec_path}: format: expected {PROPOSAL_FORMAT!r}, got {got!r}")
    if spec.get("version") != PROPOSAL_VERSION:
        raise ValueError(f"proposal: {spec_path}: version: expected {PROPOSAL_VERSION}, got {spec.get('version')!r}")
    for k in ("triplets", "pool"):
        if not isinstance(spec.get(k), list):
            raise ValueError(f"proposal: {spec_path}: {k}: expected a list, got {type(spec.get(k)).__name__}")
    root = os.path.dirname(os.path.abspath(spec_path))
    samples = os.path.join(root, spec.get("samples", {}).get("file", "samples.tar"))
    if not os.path.isfile(samples):
        raise FileNotFoundError(f"proposal: {samples} is missing")
    if sha256_file(samples) != spec["samples"].get("sha256"):
        raise ValueError(f"proposal: {samples} does not match {spec_path} (sha256 differs): it was replaced or "
                         f"damaged; propose again")
    store = SampleStore(samples)
    for i, t in enumerate(spec["triplets"]):
        keys = [t.get("query"), t.get("positive")] + [c.get("key") for c in t.get("candidates", [])]
        missing = [k for k in keys if k not in store]
        if missing or not t.get("candidates"):
            raise ValueError(f"proposal: {spec_path}: triplets[{i}]: expected query, positive and candidates "
                             f"present in {samples}, missing {missing or 'candidates'}")
    return Proposal(root, spec, hashlib.sha256(raw).hexdigest(), store)
