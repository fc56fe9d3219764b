"""Step 3 of the benchmark pipeline: export the accepted triplets as a benchmark folder.

Reads a proposal and one or more verdict files of it (several are merged first, see
:func:`solar.curation.verdicts.merge_verdicts`: a triplet is kept when every reviewer
accepted it with the same negative) and writes the format of :mod:`solar.benchmark`:
``pool-NNNNNN.tar`` shards holding every accepted triplet's query, positive and chosen
negative plus the proposal's distractor pool (each view once, copied byte for byte from the
proposal's samples.tar, json included), and ``triplets.json`` with the shard manifest
(sample counts, sizes, sha256) written last.  ``python -m solar.eval`` reads it unchanged.

Who verified what is recorded in ``triplets.json`` too: every triplet carries
``verified_by`` (the reviewers), its proposal id and the model's scores, and the
``verification`` section names the proposal (its sha256), each verdict file (reviewer,
sha256, counts) and, for two reviewers, their agreement and Cohen's kappa.  The exported
samples keep their json, so :func:`solar.benchmark.check_no_overlap` checks the benchmark's
items against training data as for a built one (``--check-train``).
"""
from __future__ import annotations

import json
import os

from .catalogue import write_tar
from .propose import Proposal, load_proposal
from .verdicts import merge_verdicts, read_verdicts

__all__ = ["export_benchmark"]


def _decisions(prop: Proposal, verdict_paths) -> tuple[dict, dict]:
    """({triplet id: {verdict, negative, verified_by}}, verification record) from verdict files."""
    from ..checkpoint import sha256_file
    files = []
    for p in verdict_paths:
        head, latest = read_verdicts(p, prop.sha256)
        c = {v: sum(r["verdict"] == v for r in latest.values()) for v in ("accept", "reject", "flag")}
        files.append({"path": os.path.abspath(p), "reviewer": head.get("reviewer"), "sha256": sha256_file(p),
                      "decided": len(latest), **c})
    record = {"proposal_sha256": prop.sha256, "proposal": prop.root, "verdict_files": files,
              "reviewers": [f["reviewer"] for f in files], "rule": "accepted by every reviewer with the same negative"}
    if len(verdict_paths) == 1:
        _, latest = read_verdicts(verdict_paths[0], prop.sha256)
        dec = {t: {"verdict": r["verdict"], "negative": r.get("negative"), "verified_by": [r["reviewer"]],
                   "time": r.get("time")} for t, r in latest.items()}
        return dec, record
    m = merge_verdicts(verdict_paths, prop.sha256)
    record.update(agreement=round(m.agreement, 6), kappa=None if m.kappa is None else round(m.kappa, 6),
                  decided_by_all=m.both_decided, negative_disagreements=m.negative_disagreements)
    return m.decisions, record


def export_benchmark(proposal, verdicts, out: str, *, shard_size: int = 1000, name: str = "curated",
                     min_triplets: int = 1, check_train=None) -> dict:
    """Write the benchmark of the accepted triplets of ``proposal`` (a folder or a loaded
    :class:`~solar.curation.propose.Proposal`) under the verdict file(s) ``verdicts`` to folder ``out``.

    Fewer than ``min_triplets`` accepted triplets is a ValueError (nothing written), as is a
    verdict file of another proposal or a negative that is not one of the triplet's
    candidates.  ``check_train``: training data that must share no item with the exported
    benchmark (checked on the written benchmark; ValueError and triplets.json removed on
    overlap).  Returns the triplets.json content."""
    from ..benchmark_spec import FORMAT, FORMAT_VERSION, check_samples_no_overlap
    from ..checkpoint import sha256_file
    if isinstance(verdicts, (str, os.PathLike)):
        verdicts = [verdicts]
    verdicts = [os.fspath(v) for v in verdicts]
    if not verdicts:
        raise ValueError("verdicts: expected at least one verdict file")
    for n, v, lo in (("shard_size", shard_size, 1), ("min_triplets", min_triplets, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{n}: expected an int >= {lo}, got {v!r}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out: {out!r} exists and is not a folder")
    prop = proposal if isinstance(proposal, Proposal) else load_proposal(proposal)
    dec, record = _decisions(prop, verdicts)
    triplets, keys = [], {}
    for t in prop.triplets:
        d = dec.get(t["id"])
        if d is None or d["verdict"] != "accept":
            continue
        cand = next((c for c in t["candidates"] if c["key"] == d["negative"]), None)
        if cand is None:
            raise ValueError(f"verdicts: triplet {t['id']}: the accepted negative {d['negative']!r} is not one of its "
                             f"candidates")
        triplets.append({"query": t["query"], "positive": t["positive"], "negative": cand["key"],
                         "item_id": t["item_id"], "negative_item_id": cand["item_id"], "proposal_id": t["id"],
                         "positive_score": t["positive_score"], "negative_score": cand["score"],
                         "verified_by": d["verified_by"]})
        for k in (t["query"], t["positive"], cand["key"]):
            keys[k] = True
    if len(triplets) < min_triplets:
        counts = {v: sum(d["verdict"] == v for d in dec.values()) for v in ("accept", "reject", "flag", "disputed")}
        raise ValueError(f"verdicts: {len(triplets)} triplet(s) accepted, expected at least {min_triplets} "
                         f"(decisions: {counts}, of {len(prop.triplets)} proposed)")
    for k in prop.spec["pool"]:
        keys[k] = True
    keys = list(keys)
    os.makedirs(out, exist_ok=True)
    spec_path = os.path.join(out, "triplets.json")
    if os.path.exists(spec_path):
        os.remove(spec_path)
    shards, entries = [], []
    for s in range(0, len(keys), shard_size):
        shard = f"pool-{s // shard_size:06d}.tar"
        path = os.path.join(out, shard)
        n = write_tar(path, ((k, prop.store.parts(k)) for k in keys[s:s + shard_size]))
        shards.append(shard)
        entries.append({"name": shard, "samples": n, "bytes": os.path.getsize(path), "sha256": sha256_file(path)})
    record["triplets_accepted"] = len(triplets)
    record["triplets_proposed"] = len(prop.triplets)
    spec = {"format": FORMAT, "version": FORMAT_VERSION, "name": name, "shards": shards,
            "num_pairs": len(keys), "triplets": triplets, "pool_items": len(prop.spec["pool"]),
            "model": prop.spec.get("model"), "verification": record, "manifest": {"shards": entries}}
    tmp = spec_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(spec, f, indent=1)
    os.replace(tmp, spec_path)
    if check_train is not None:   # the exported samples' own json, as solar.benchmark.check_no_overlap reads it
        id_field = prop.spec.get("id_field", "item_id")
        metas = [{**m, "item_id": m[id_field]} for m in (prop.store.meta(k) for k in keys)]
        try:
            check_samples_no_overlap(check_train, metas)
        except ValueError:
            os.remove(spec_path)
            raise
    return spec
