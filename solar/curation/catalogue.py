"""Read a catalogue of items from webdataset shards, and keep the samples a proposal needs.

A *catalogue* is webdataset shards whose samples are views of items: an image
(``jpg``/``jpeg``/``png``/``webp``), a caption (``txt``) and a ``json`` that names the item
the view belongs to (field ``item_id`` by default; an int or a non-empty string).  Items
are products, listings, artworks...: anything photographed and described several times.
ShapesWorld shards written with ``--views-per-item 2`` or more are such a catalogue.

:func:`read_catalogue` scans the shards once and keeps, per view, its key, item id,
caption, image type and json (not the image: embedding and copying re-read the shards, so
memory grows with the number of views, not with their pixels).  Samples without an image
or a caption are skipped and counted (as the training reader does); a sample without a json
item id is an error, because then nothing can tell a positive from a negative.

:class:`SampleStore` is the proposal's own ``samples.tar``: the views the review page shows
and the export copies, read by key without unpacking.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field

from ..data.reader import IMAGE_EXTENSIONS, expand_urls

__all__ = ["CatalogueError", "View", "Catalogue", "read_catalogue", "iter_samples", "write_tar", "SampleStore",
           "item_id_of", "caption_words"]

_REMOTE = ("pipe:", "http://", "https://", "gs://", "s3://")
IMAGE_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


class CatalogueError(ValueError):
    """Shards that cannot make a benchmark: no item ids, too few items with two views, duplicate keys."""


@dataclass
class View:
    """One (image, caption) view of an item, as read from the shards (image bytes not kept)."""
    key: str
    item_id: object
    caption: str
    image_ext: str
    image_sha256: str
    url: str
    meta: dict = field(repr=False)


@dataclass
class Catalogue:
    """All usable views of the shards ``urls``, grouped by item; ``skipped`` counts unusable samples by cause."""
    urls: list
    views: list
    by_item: dict
    skipped: dict
    id_field: str

    def multi_view_items(self) -> list:
        """Item ids with at least two views, in a stable order (ids sorted by type, then value)."""
        return sorted((i for i, v in self.by_item.items() if len(v) >= 2), key=_id_order)


def _id_order(item_id):
    return (type(item_id).__name__, item_id)


def item_id_of(meta, id_field: str, where: str):
    """The item id in a sample's json (an int or a non-empty string); CatalogueError naming ``where`` otherwise."""
    if not isinstance(meta, dict) or id_field not in meta:
        raise CatalogueError(f"shards: {where} has no {id_field!r} in its json; every sample must name the item "
                             f"it shows (json field {id_field!r}, or choose the field with --id-field)")
    v = meta[id_field]
    if isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, str) and not v.strip()):
        raise CatalogueError(f"shards: {where}: json {id_field!r}: expected an int or a non-empty string, got {v!r}")
    return v


def caption_words(caption: str) -> frozenset:
    """The caption's distinct lower-case words (alphanumeric runs): what caption overlap is measured on."""
    out, cur = set(), []
    for ch in caption.lower():
        if ch.isalnum():
            cur.append(ch)
        elif cur:
            out.add("".join(cur))
            cur = []
    if cur:
        out.add("".join(cur))
    return frozenset(out)


def _split_name(name: str) -> tuple[str, str]:
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(d, stem) if d else stem, ext.lower()


def iter_samples(urls):
    """(url, key, {extension: bytes}) for every sample of the shards, in order.

    Local tars are read with :mod:`tarfile` (members of a sample are consecutive, as
    webdataset writes them); ``pipe:`` and url shards through webdataset."""
    for u in expand_urls(urls):
        if u.startswith(_REMOTE) or "://" in u:
            import webdataset as wds
            for s in wds.tarfile_to_samples()(iter([{"url": u}])):
                yield u, s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")}
            continue
        try:
            tar = tarfile.open(u, "r")
        except (OSError, tarfile.TarError) as e:
            raise CatalogueError(f"shards: cannot read {u!r} as a tar ({e})") from None
        with tar:
            key, parts = None, {}
            for m in tar:
                if not m.isfile():
                    continue
                k, ext = _split_name(m.name)
                if k != key and key is not None:
                    yield u, key, parts
                    parts = {}
                key = k
                parts[ext] = tar.extractfile(m).read()
            if key is not None:
                yield u, key, parts


def _image_ext(parts: dict):
    for ext in IMAGE_EXTENSIONS:
        if ext in parts:
            return ext
    return None


def read_catalogue(urls, id_field: str = "item_id") -> Catalogue:
    """Scan the shards ``urls`` (paths, brace patterns, ``pipe:`` urls, or a list) into a :class:`Catalogue`.

    Every sample must carry its item id in its json (CatalogueError naming the first that
    does not, and how many do not); keys must be unique across the shards.  Samples with no
    image, no caption or an empty / non-UTF-8 caption are skipped and counted by cause."""
    try:
        url_list = expand_urls(urls)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise CatalogueError(f"shards: {e}") from None
    if not url_list:
        raise CatalogueError(f"shards: expected at least one shard, got {urls!r}")
    views, by_item, seen = [], {}, {}
    skipped = {"missing_image": 0, "missing_caption": 0, "bad_caption": 0}
    no_id, first_no_id = 0, None
    for url, key, parts in iter_samples(url_list):
        where = f"sample {key!r} of {url}"
        if key in seen:
            raise CatalogueError(f"shards: key {key!r} occurs twice ({seen[key]} and {url}); webdataset keys must be "
                                 f"unique across the catalogue")
        seen[key] = url
        ext = _image_ext(parts)
        if ext is None:
            skipped["missing_image"] += 1
            continue
        if "txt" not in parts:
            skipped["missing_caption"] += 1
            continue
        try:
            caption = parts["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            caption = ""
        if not caption:
            skipped["bad_caption"] += 1
            continue
        try:
            meta = json.loads(parts["json"]) if "json" in parts else None
        except (ValueError, UnicodeDecodeError) as e:
            raise CatalogueError(f"shards: {where}: its json is not valid ({e})") from None
        try:
            item = item_id_of(meta, id_field, where)
        except CatalogueError as e:
            no_id += 1
            first_no_id = first_no_id or e
            continue
        v = View(key, item, caption, ext, hashlib.sha256(parts[ext]).hexdigest(), url, meta)
        views.append(v)
        by_item.setdefault(item, []).append(v)
    if no_id:
        raise CatalogueError(f"{first_no_id} ({no_id} sample(s) without an item id in {len(url_list)} shard(s))")
    if not views:
        raise CatalogueError(f"shards: no usable (image, caption) sample in {len(url_list)} shard(s) "
                             f"(skipped: {skipped})")
    return Catalogue(url_list, views, by_item, skipped, id_field)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: str, samples) -> int:
    """Write (key, {extension: bytes}) samples to a webdataset tar (to ``path.tmp``, then renamed,
    so a tar on disk is always whole); members in sorted-extension order, mtime 0 (byte-identical
    for the same input).  Returns the number of samples."""
    n, tmp = 0, path + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, parts in samples:
            for ext in sorted(parts):
                _add(tar, f"{key}.{ext}", parts[ext])
            n += 1
    os.replace(tmp, path)
    return n


class SampleStore:
    """Random access by key to the samples of one local tar (the proposal's ``samples.tar``).

    The member offsets are indexed once; :meth:`get` reads one member with a seek, so the
    review server answers an image request without unpacking the tar."""

    def __init__(self, path: str):
        self.path = path
        self.index: dict = {}
        try:
            with tarfile.open(path, "r") as tar:
                for m in tar:
                    if m.isfile():
                        key, ext = _split_name(m.name)
                        self.index.setdefault(key, {})[ext] = (m.offset_data, m.size)
        except (OSError, tarfile.TarError) as e:
            raise CatalogueError(f"samples: cannot read {path!r} as a tar ({e})") from None

    def __contains__(self, key) -> bool:
        return key in self.index

    def keys(self) -> list:
        return list(self.index)

    def get(self, key: str, ext: str) -> bytes:
        """The bytes of member ``key.ext``; KeyError when the sample or the member is absent."""
        off, size = self.index[key][ext]
        with open(self.path, "rb") as f:
            f.seek(off)
            return f.read(size)

    def parts(self, key: str) -> dict:
        """{extension: bytes} of every member of sample ``key``."""
        return {ext: self.get(key, ext) for ext in self.index[key]}

    def image(self, key: str) -> tuple[bytes, str]:
        """(image bytes, mime type) of sample ``key``."""
        ext = _image_ext(self.index[key])
        if ext is None:
            raise KeyError(f"{key}: no image member")
        return self.get(key, ext), IMAGE_TYPES[ext]

    def caption(self, key: str) -> str:
        """The caption of sample ``key`` (UTF-8 text)."""
        return self.get(key, "txt").decode("utf-8").strip()

    def meta(self, key: str):
        """The json of sample ``key`` (None when it has none)."""
        return json.loads(self.get(key, "json")) if "json" in self.index[key] else None
