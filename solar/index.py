"""`python -m solar.index build|search`: an exact index over a collection of (image, text) pairs.

    python -m solar.index build --model DIR --data SHARDS --out POOL.idx [--dtype int8]
    python -m solar.index search --model DIR --index POOL.idx --image IMG --text TEXT -k 10

``build`` embeds every pair of the webdataset shards (``--data``: a benchmark folder in
`solar.benchmark`'s format, a folder of ``.tar`` shards, a shard file or a brace pattern such as
``pool-{000000..000009}.tar``) with the model folder's pair embedding (`solar.api`), shows
progress and prints the throughput, and writes the `solar_kernels.Index` to ``--out`` with the
pairs' webdataset keys beside it in ``--out`` + ``.ids.json``.

Under torchrun with W processes, rank r embeds the shards r, r + W, ... and writes its own
index shard ``POOL.idx-0000r-of-0000W`` (+ ``.ids.json``); no rank holds the whole collection.
``search`` reads either form: an unsharded index; the shards one per rank under torchrun with
the same W (``Index.search(process_group=...)`` merges the global top-k, ids in rank order); or
all shards in one process, searched one by one and merged.

``search`` embeds the query pair (``--image``, ``--text``; repeat both for several queries) and
prints the k best pairs of the collection by key with their scores (``--json`` for json lines).
Errors (missing files, a model and index of different widths, shards missing or of another
world size) are one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import time

import torch

__all__ = ["main", "build", "search", "load_ids", "shard_paths"]

IDS_FORMAT = "solar-index-ids"
IDS_VERSION = 1
_SHARD_RE = re.compile(r"-(\d{5})-of-(\d{5})$")


def shard_path(out: str, rank: int, world: int) -> str:
    """The file of index shard `rank` of `world` for the index path `out`."""
    return f"{out}-{rank:05d}-of-{world:05d}"


def shard_paths(index: str) -> list:
    """The index files `index` names, in rank order: [index] when it exists, else its shards
    (``index-0000r-of-0000W``, all W of them, FileNotFoundError when some are missing)."""
    if os.path.isfile(index):
        return [index]
    found = sorted(p for p in glob.glob(glob.escape(index) + "-*-of-*") if _SHARD_RE.search(p)
                   and not p.endswith(".ids.json") and p[len(index):].count("-") == 3)
    if not found:
        raise FileNotFoundError(f"--index: neither {index!r} nor its shards {index}-NNNNN-of-NNNNN exist")
    world = int(_SHARD_RE.search(found[0]).group(2))
    want = [shard_path(index, r, world) for r in range(world)]
    missing = [p for p in want if not os.path.isfile(p)]
    if missing or len(found) != world:
        raise FileNotFoundError(f"--index: {len(want) - len(missing)} of the {world} shards of {index!r} exist; "
                                f"missing: {', '.join(os.path.basename(p) for p in missing) or 'none'} "
                                f"(extra files: {sorted(set(found) - set(want))})")
    return want


def load_ids(path: str, count: int) -> list:
    """The pair keys stored beside index file `path` (``path + '.ids.json'``); ValueError when
    they are not the index's `count` rows."""
    f = path + ".ids.json"
    if not os.path.isfile(f):
        raise FileNotFoundError(f"--index: {f!r} (the pair keys stored beside the index) does not exist")
    with open(f) as fh:
        meta = json.load(fh)
    if not isinstance(meta, dict) or meta.get("format") != IDS_FORMAT:
        raise ValueError(f"--index: {f!r} is not a {IDS_FORMAT} file")
    ids = meta.get("ids")
    if not isinstance(ids, list) or len(ids) != count:
        raise ValueError(f"--index: {f!r} holds {len(ids) if isinstance(ids, list) else 'no'} ids for an index "
                         f"of {count} rows")
    return ids


def _data_urls(data: str) -> list:
    """Shard urls of --data: a benchmark folder, a folder of .tar files, or a shard / pattern."""
    from .data.reader import expand_urls
    if os.path.isdir(data):
        if os.path.isfile(os.path.join(data, "triplets.json")):
            from .benchmark import load_benchmark
            return list(load_benchmark(data, require_manifest=False).shards)
        tars = sorted(glob.glob(os.path.join(glob.escape(data), "*.tar")))
        if not tars:
            raise FileNotFoundError(f"--data: folder {data!r} holds no .tar shards")
        return tars
    return expand_urls(data)


def _write_ids(path: str, ids: list, **meta) -> None:
    tmp = f"{path}.ids.json.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"format": IDS_FORMAT, "version": IDS_VERSION, **meta, "count": len(ids), "ids": ids}, fh)
    os.replace(tmp, path + ".ids.json")


def build(model: str, data: str, out: str, *, dtype: str = "fp32", batch_size: int = 128, tokenizer="shapesworld",
          device="cpu", kind=None, progress: bool = True, rank: int = 0, world: int = 1) -> dict:
    """Embed the pairs of `data` (rank `rank` of `world`: shards rank, rank + world, ...) and write
    the index (`out`, or shard `out-0000r-of-0000W` when world > 1) and its ids.  Returns
    {"path", "count", "seconds", "pairs_per_s"}."""
    import solar_kernels as sk

    from .api import load
    from .data.tokenizer import load_tokenizer
    from .evaluate import embed_collection
    urls = _data_urls(data)
    if world > len(urls):
        raise ValueError(f"--data: {len(urls)} shard(s) cannot be split over {world} processes (each process embeds "
                         f"whole shards); use at most {len(urls)} processes")
    mine = urls[rank::world]
    m, kind = load(model, device, kind)
    tok = load_tokenizer(tokenizer, model_max_length=m.cfg.max_text_len) if isinstance(tokenizer, str) else tokenizer
    t0 = time.perf_counter()
    emb, keys = embed_collection(m, kind, mine, tok, image_size=m.cfg.image_size, patch_size=m.cfg.patch_size,
                                 max_length=m.cfg.max_text_len, batch_size=batch_size, device=m.device,
                                 progress=progress, desc=f"embed (rank {rank}/{world})" if world > 1 else "embed")
    secs = time.perf_counter() - t0
    index = sk.Index(emb.shape[1], dtype=dtype)
    index.add(emb)
    path = shard_path(out, rank, world) if world > 1 else out
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    index.save(path)
    _write_ids(path, list(keys), model=os.path.abspath(model) if isinstance(model, str) else None, kind=kind,
               dtype=dtype, shard=rank, num_shards=world, data=mine)
    return {"path": path, "count": len(keys), "seconds": secs, "pairs_per_s": len(keys) / max(secs, 1e-9)}


def _merge(scores: torch.Tensor, ids: torch.Tensor, k: int):
    """Top-k of candidate lists [m, c] by (score descending, id ascending)."""
    o = torch.argsort(ids, dim=1, stable=True)
    s, i = scores.gather(1, o), ids.gather(1, o)
    o = torch.argsort(s, dim=1, descending=True, stable=True)[:, :k]
    return s.gather(1, o), i.gather(1, o)


def search(model: str, index: str, images: list, texts: list, k: int = 10, *, tokenizer="shapesworld",
           device="cpu", kind=None, group=None):
    """(scores [Q, k], keys: Q lists of k pair keys) of the query pairs (images[i], texts[i]).

    `index` is read as described in the module doc; with `group` (torchrun), each rank loads its
    own shard and the global top-k is merged across ranks."""
    import solar_kernels as sk

    from .api import encode, load
    paths = shard_paths(index)
    m = load(model, device, kind)
    q = encode(images, texts, m, tokenizer=tokenizer)
    if group is not None:
        import torch.distributed as dist
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if len(paths) != world:
            raise ValueError(f"--index: {index!r} has {len(paths)} shard(s) but {world} processes search it; run "
                             f"as many processes as shards (or one process)")
        idx = sk.Index.load(paths[rank], mmap=True)
        all_ids = []
        for p in paths:     # every rank maps global ids to keys
            all_ids += load_ids(p, len(idx) if p == paths[rank] else _count(p))
        _check_dim(idx, q, model)
        scores, ids = idx.search(q, k, process_group=group)
        return scores, [[all_ids[int(j)] for j in row] for row in ids]
    cand_s, cand_i, all_ids, base = [], [], [], 0
    total = sum(_count(p) for p in paths)
    if not 1 <= k <= total:
        raise ValueError(f"-k: expected 1 <= k <= {total} (the indexed pairs), got {k}")
    for p in paths:
        idx = sk.Index.load(p, mmap=True)
        _check_dim(idx, q, model)
        all_ids += load_ids(p, len(idx))
        if len(idx):
            s, i = idx.search(q, min(k, len(idx)))
            cand_s.append(s)
            cand_i.append(i + base)
        base += len(idx)
    scores, ids = _merge(torch.cat(cand_s, 1), torch.cat(cand_i, 1), k)
    return scores, [[all_ids[int(j)] for j in row] for row in ids]


def _count(path: str) -> int:
    with open(path + ".ids.json") as fh:
        return int(json.load(fh)["count"])


def _check_dim(idx, q, model) -> None:
    if idx.dim != q.shape[1]:
        raise ValueError(f"--index: the index holds {idx.dim}-d vectors but --model {model!r} embeds "
                         f"{q.shape[1]}-d pairs (built with another model?)")


def main(argv=None) -> int:
    """Command-line entry point (see the module doc)."""
    ap = argparse.ArgumentParser(prog="python -m solar.index", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="model folder written by solar.train (e.g. runs/solar/stage2/model)")
    common.add_argument("--kind", default=None, choices=("solar", "clip_sf"),
                        help="embedding rule of a model folder without solar_embedding.json")
    common.add_argument("--tokenizer", default="shapesworld", help="'shapesworld' or a local tokenizer folder")
    common.add_argument("--device", default="cpu", help="'auto', 'cpu', 'cuda' or 'cuda:N' (default: cpu)")
    b = sub.add_parser("build", parents=[common], help="embed a collection of pairs and write the index")
    b.add_argument("--data", required=True, help="benchmark folder, folder of .tar shards, shard or brace pattern")
    b.add_argument("--out", required=True, help="index file to write (its keys go to OUT.ids.json)")
    b.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "int8"), help="index storage (default fp32)")
    b.add_argument("--batch-size", type=int, default=128, help="pairs per forward pass (default 128)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = sub.add_parser("search", parents=[common], help="the k best pairs of an index for query pairs")
    s.add_argument("--index", required=True, help="index file (or the common prefix of its shards)")
    s.add_argument("--image", action="append", required=True, help="query image file (repeat with --text)")
    s.add_argument("--text", action="append", required=True, help="query caption (one per --image)")
    s.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    s.add_argument("--json", action="store_true", help="print one json object per query")
    a = ap.parse_args(argv)
    if a.cmd == "build" and a.batch_size < 1:
        ap.error(f"--batch-size: expected an int >= 1, got {a.batch_size}")
    if a.cmd == "search" and len(a.image) != len(a.text):
        ap.error(f"--image / --text: expected one --text per --image, got {len(a.image)} and {len(a.text)}")
    from .checkpoint import CheckpointError
    from .distributed import init_distributed, resolve_device
    from solar_kernels.search import IndexFileError
    try:
        device = resolve_device(a.device, name="--device")
    except (ValueError, TypeError) as e:
        ap.error(str(e))
    import torch.distributed as dist
    joined = dist.is_available() and dist.is_initialized()     # a caller's group is left as it is
    di = init_distributed(str(device))
    try:
        if a.cmd == "build":
            res = build(a.model, a.data, a.out, dtype=a.dtype, batch_size=a.batch_size, tokenizer=a.tokenizer,
                        device=di.device, kind=a.kind, progress=not a.no_progress, rank=di.rank, world=di.world)
            print(f"rank {di.rank}/{di.world}: " if di.enabled else "", end="")
            print(f"embedded {res['count']} pairs in {res['seconds']:.1f} s ({res['pairs_per_s']:.1f} pairs/s); "
                  f"wrote {res['path']} and {res['path']}.ids.json", flush=True)
        else:
            scores, keys = search(a.model, a.index, a.image, a.text, a.k, tokenizer=a.tokenizer, device=di.device,
                                  kind=a.kind, group=di.group)
            if di.is_main:
                for qi, (srow, krow) in enumerate(zip(scores.tolist(), keys)):
                    if a.json:
                        print(json.dumps({"query": qi, "image": a.image[qi], "text": a.text[qi], "keys": krow,
                                          "scores": srow}))
                    else:
                        print(f"query {qi}: {a.image[qi]} | {a.text[qi]}")
                        for rnk, (key, sc) in enumerate(zip(krow, srow), 1):
                            print(f"  {rnk:3d}  {sc:+.4f}  {key}")
    except (CheckpointError, IndexFileError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"solar.index: error: {e}", file=sys.stderr)
        return 2
    finally:
        if di.enabled and not joined:
            dist.barrier()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
