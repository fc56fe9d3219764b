"""``python -m solar.benchmark propose | review | export``: the benchmark pipeline for real data.

    python -m solar.benchmark propose --shards 'cat/shard-{000000..000009}.tar' \\
        --model runs/solar/clip_sf/model --out proposal/ --triplets 200 --negatives 5 --seed 0
    python -m solar.benchmark review proposal/ --reviewer alice --verdicts alice.jsonl
    python -m solar.benchmark review [proposal/] --merge alice.jsonl bob.jsonl [--out merged.json]
    python -m solar.benchmark export proposal/ --verdicts alice.jsonl [bob.jsonl] --out bench/
    python -m solar.eval --ckpt runs/solar/stage2/model --bench bench/

A bad argument or bad input (shards without item ids, too few items with two views, a
verdict file of another proposal) is a one-line error with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main", "COMMANDS"]

COMMANDS = ("propose", "review", "export")


def _propose(a, ap) -> int:
    from .propose import propose
    spec = propose(a.shards, a.model, a.out, triplets=a.triplets, negatives=a.negatives, pool=a.pool, seed=a.seed,
                   id_field=a.id_field, kind=a.kind, tokenizer=a.tokenizer, batch_size=a.batch_size,
                   device=a.device, check_train=a.check_train, progress=not a.no_progress)
    src = spec["source"]
    beaten = sum(t["positive_score"] > t["candidates"][0]["score"] for t in spec["triplets"])
    print(f"proposed {len(spec['triplets'])} triplets ({spec['negatives']} candidate negatives each) and a pool of "
          f"{len(spec['pool'])} from {src['views']} views of {src['items']} items ({src['single_view_items']} with "
          f"one view; skipped samples: {src['skipped']}) to {a.out}")
    print(f"the model scores the positive above every candidate for {beaten} of {len(spec['triplets'])} queries; "
          f"{len(spec['items'])} item ids listed in {a.out}/items.txt (keep them out of training)")
    return 0


def _review(a, ap) -> int:
    if a.merge:
        from .verdicts import merge_verdicts
        sha = None
        if a.proposal:
            from .propose import proposal_hash
            sha = proposal_hash(a.proposal)
        m = merge_verdicts(a.merge, sha)
        print(m.summary())
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"proposal_sha256": m.proposal_sha256, "reviewers": m.reviewers,
                           "decided_by_all": m.both_decided, "agreement": m.agreement, "kappa": m.kappa,
                           "negative_disagreements": m.negative_disagreements, "decisions": m.decisions}, f, indent=1)
            print(f"wrote {a.out}")
        return 0
    if not a.proposal or not a.verdicts:
        ap.error("review: expected PROPOSAL and --verdicts FILE (or --merge A B)")
    from .review import ReviewApp, serve
    app = ReviewApp(a.proposal, a.verdicts, a.reviewer)
    serve(app, a.port, open_browser=a.open)
    return 0


def _export(a, ap) -> int:
    from .export import export_benchmark
    spec = export_benchmark(a.proposal, a.verdicts, a.out, shard_size=a.shard_size, name=a.name,
                            min_triplets=a.min_triplets, check_train=a.check_train)
    v = spec["verification"]
    print(f"exported {len(spec['triplets'])} of {v['triplets_proposed']} proposed triplets and {spec['num_pairs']} "
          f"pairs in {len(spec['shards'])} shard(s) to {a.out}, verified by {', '.join(v['reviewers'])}"
          + (f" (agreement {100 * v['agreement']:.1f}%, kappa {v['kappa']:.3f})" if v.get("kappa") is not None else ""))
    print(f"evaluate: python -m solar.eval --ckpt MODEL --bench {a.out}")
    return 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m solar.benchmark", description="The benchmark pipeline for real data: "
                                 "propose candidate triplets, review them in a browser, export a benchmark.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("propose", help="mine candidate triplets from webdataset shards with a model")
    p.add_argument("--shards", required=True, help="catalogue shards: path, brace pattern, pipe: url, '::'-separated")
    p.add_argument("--model", required=True, help="model folder (SOLAR stage2/model or CLIP-SF clip_sf/model)")
    p.add_argument("--out", required=True, help="proposal folder to write")
    p.add_argument("--triplets", type=int, default=50, help="items to make triplets of (default: 50)")
    p.add_argument("--negatives", type=int, default=5, help="hard-negative candidates per query (default: 5)")
    p.add_argument("--pool", type=int, default=-1, help="distractor items, one view each (default -1: all others)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--id-field", default="item_id", help="json field naming a sample's item (default: item_id)")
    p.add_argument("--kind", default=None, choices=("solar", "clip_sf"),
                   help="embedding rule of a model folder without solar_embedding.json")
    p.add_argument("--tokenizer", default="shapesworld", help="'shapesworld' or a local tokenizer folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="'cpu', 'cuda', 'cuda:N' or 'auto' (default: cpu)")
    p.add_argument("--check-train", default=None, help="training data that must share no item with the catalogue")
    p.add_argument("--no-progress", action="store_true")
    r = sub.add_parser("review", help="review a proposal in the browser, or merge two reviewers' verdicts")
    r.add_argument("proposal", nargs="?", default=None, help="proposal folder")
    r.add_argument("--verdicts", default=None, help="this reviewer's verdict file (JSON lines; created if absent)")
    r.add_argument("--reviewer", default=None, help="reviewer name (required for a new verdict file)")
    r.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default: 8765; 0 = any free)")
    r.add_argument("--open", action="store_true", help="open the page in the default browser")
    r.add_argument("--merge", nargs="+", default=None, metavar="FILE",
                   help="merge two (or more) reviewers' verdict files and report their agreement (Cohen's kappa)")
    r.add_argument("--out", default=None, help="with --merge: write the merged decisions as json")
    e = sub.add_parser("export", help="write the accepted triplets + pool as a benchmark folder")
    e.add_argument("proposal", help="proposal folder")
    e.add_argument("--verdicts", nargs="+", required=True, help="verdict file(s); several are merged (consensus)")
    e.add_argument("--out", required=True, help="benchmark folder to write")
    e.add_argument("--name", default="curated")
    e.add_argument("--shard-size", type=int, default=1000)
    e.add_argument("--min-triplets", type=int, default=1)
    e.add_argument("--check-train", default=None, help="training data that must share no item with the benchmark")
    return ap


def main(argv) -> int:
    """Run one pipeline command; errors in the input are one line on stderr and exit status 2."""
    ap = _parser()
    a = ap.parse_args(argv)
    from ..checkpoint import CheckpointError
    from .catalogue import CatalogueError
    try:
        return {"propose": _propose, "review": _review, "export": _export}[a.command](a, ap)
    except (CatalogueError, CheckpointError, FileNotFoundError, ValueError, KeyError, OSError) as e:
        print(f"solar.benchmark {a.command}: error: {e}", file=sys.stderr)
        return 2
