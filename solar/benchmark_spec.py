"""What every sym-MM2MM benchmark folder shares: its format identifiers, and the check that its
items do not appear in training data.

Kept apart from :mod:`solar.benchmark` (which builds, loads and scores benchmarks and re-exports
these names) so that the pipeline that makes benchmarks of real data (:mod:`solar.curation`)
uses them without importing the module whose command line dispatches to it.

Overlap: item ids (ints, or strings for real catalogues; digit strings compare as ints) must
be disjoint between the two data sets and, for ShapesWorld samples, no item content (objects
and text attributes) may be shared; declared id ranges are compared when both sides have them.
"""
from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass

from .data.shapesworld import item_signature

__all__ = ["FORMAT", "FORMAT_VERSION", "OverlapReport", "check_samples_no_overlap"]

FORMAT = "solar-mm2mm-benchmark"
FORMAT_VERSION = 1


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
    """(shard urls, ShapesWorld manifest or None) of training data; FileNotFoundError when absent."""
    if isinstance(train, (str, os.PathLike)) and os.path.isdir(train):
        train = os.fspath(train)
        man = os.path.join(train, "shapesworld.json")
        if os.path.isfile(man):
            try:
                with open(man) as f:
                    m = json.load(f)
                urls = [os.path.join(train, s) for s in m["shards"]]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"train: {man} is not a ShapesWorld manifest ({type(e).__name__}: {e})") from None
            missing = [u for u in urls if not os.path.isfile(u)]
            if missing:
                raise FileNotFoundError(f"train: {len(missing)} shard(s) listed in {man} are missing "
                                        f"(first: {missing[0]!r})")
            return urls, m
        names = sorted(n for n in os.listdir(train) if n.endswith(".tar"))
        if not names:
            raise FileNotFoundError(f"train: no .tar shards in folder {train!r}")
        return [os.path.join(train, n) for n in names], None
    from .data.reader import expand_urls
    try:
        return expand_urls(train), None
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise FileNotFoundError(f"train: {e}") from None


def _norm_id(v):
    """An item id as compared across data sets: ints (and digit strings) as int, other ids as str."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    s = str(v).strip()
    return int(s) if s.lstrip("-").isdigit() else s


def _ids_and_sigs(metas, content: bool):
    ids, sigs = set(), set()
    for meta in metas:
        if "item_id" in meta:
            ids.add(_norm_id(meta["item_id"]))
        if content and "objects" in meta and "text_attrs" in meta:
            sigs.add(item_signature(meta["objects"], meta["text_attrs"]))
    return ids, sigs


def _overlap(train_urls, bench_ids_sigs, bench_range, content: bool, raise_on_overlap: bool) -> OverlapReport:
    urls, manifest = train_urls
    bench_ids, bench_sigs = bench_ids_sigs
    range_check = "not declared"
    if manifest is not None and bench_range is not None:
        tr = manifest["item_id_range"]
        br = bench_range
        disjoint = tr[1] <= br[0] or br[1] <= tr[0]
        range_check = f"train ids [{tr[0]}, {tr[1]}) vs benchmark [{br[0]}, {br[1]}): " + \
            ("disjoint" if disjoint else "OVERLAP")
    shared_ids, shared_sig, n = set(), set(), 0
    for _, meta in _iter_json(urls):
        n += 1
        if "item_id" in meta and _norm_id(meta["item_id"]) in bench_ids:
            shared_ids.add(_norm_id(meta["item_id"]))
        if content and "objects" in meta and "text_attrs" in meta:
            sig = item_signature(meta["objects"], meta["text_attrs"])
            if sig in bench_sigs:
                shared_sig.add(sig)
    rep = OverlapReport(n, len(bench_ids), sorted(shared_ids, key=lambda i: (type(i).__name__, i)), len(shared_sig),
                        range_check)
    if raise_on_overlap and (not rep.ok or range_check.endswith("OVERLAP")):
        raise ValueError(f"benchmark items appear in training data: {len(shared_ids)} shared item id(s) "
                         f"{rep.shared_item_ids[:5]}, {len(shared_sig)} shared item content(s); {range_check}")
    return rep


def check_samples_no_overlap(train, metas, content: bool = True, raise_on_overlap: bool = True) -> OverlapReport:
    """Verify that no item of the sample jsons ``metas`` appears in the training data ``train``.

    The check of :func:`check_no_overlap` for samples not (yet) in a benchmark folder, e.g. a
    catalogue a benchmark is being curated from (``python -m solar.benchmark propose
    --check-train``): item ids (ints or strings) must be disjoint and, with ``content=True``,
    no ShapesWorld item content shared.  Raises ValueError on overlap unless ``raise_on_overlap=False``.
    """
    return _overlap(_train_urls(train), _ids_and_sigs(metas, content), None, content, raise_on_overlap)
