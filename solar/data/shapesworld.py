"""ShapesWorld: a procedural image-text world whose ground truth is known.

An *item* is a scene of 2-5 objects on a 4x4 grid (shape, colour, size, grid cell) plus
text-only attributes that no image shows (material, price band, brand, finish).  A *view*
of an item is an (image, caption) pair: the image renders a subset of the objects, the
caption describes a partly overlapping subset plus some text-only attributes, so every
pair has a true intersection (objects both shown and described, at least one) and true
differences on both sides (at least one shown-only object; the text side always carries
text-only attributes and often described-only objects).

Ground truth stored with each pair (json, see ``SAMPLE_SCHEMA`` below):

* ``item_id`` (for the benchmark; never used in training),
* the full object list of the item and, per object, whether the view shows / describes it,
  and for shown objects a pixel-exact occupancy grid at ``mask_grid`` x ``mask_grid``
  (cells of ``image_size / mask_grid`` pixels; a cell is 1 when any pixel of the object is
  in it).  The reader turns the union over intersection objects into a patch mask for any
  patch size that is a multiple of the cell size (exact) or any other (conservative).
* the caption's words (``caption == " ".join(words)``), a 0/1 flag per word (1 = the word
  is a content word -- size, colour, shape, row, column -- of an object that is both shown
  and described), and the object index each word belongs to (-1 for attribute phrases).
  Every word of the closed vocabulary is one token of :mod:`solar.data.tokenizer`, so the
  token-level ground truth is exact.

Determinism: an item is a pure function of ``(seed, item_id)`` and a view of
``(seed, item_id, view)``; shards are byte-identical for a seed whatever the number of
worker processes.

Command line::

    python -m solar.data.shapesworld --out DIR --pairs N --seed S [--shard-size 10000]
        [--workers K] [--image-size 64] [--views-per-item 1] [--item-offset 0]

Item ids at or above :data:`BENCHMARK_ITEM_BASE` are reserved for the benchmark
(:mod:`solar.benchmark`); training data refuses them.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import sys
import tarfile
import time
from dataclasses import dataclass, replace
from multiprocessing import get_context

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPES", "COLORS", "SIZES", "ROWS", "COLS", "TEXT_ATTRIBUTES", "FUNCTION_WORDS", "VOCABULARY",
    "GRID", "BENCHMARK_ITEM_BASE", "ShapeObject", "Item", "Split", "make_item", "perturb_item",
    "sample_split", "render_view", "make_pair", "write_shards", "write_samples", "item_signature",
    "sample_key", "main",
]

GENERATOR_VERSION = 1
GRID = 4  # objects live on a GRID x GRID board, one object per cell
BENCHMARK_ITEM_BASE = 1_000_000_000  # item ids >= this are reserved for the benchmark

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "ring", "bar")
COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "cyan": (40, 210, 220), "white": (240, 240, 240),
}
SIZES = {"small": 0.45, "medium": 0.65, "large": 0.9}  # radius as a fraction of half a cell
ROWS = ("top", "upper", "lower", "bottom")
COLS = ("leftmost", "left", "right", "rightmost")
TEXT_ATTRIBUTES = {
    "material": ("wood", "metal", "glass", "plastic", "paper", "stone", "leather", "cotton"),
    "price": ("cheap", "budget", "midrange", "premium", "luxury"),
    "brand": ("zorka", "velto", "quimby", "larix", "onda", "brisk", "tamsin", "norvik",
              "pellam", "ciro", "duvessa", "hexley"),
    "finish": ("matte", "glossy", "satin", "rough"),
}
# phrase templates: the attribute value replaces "{}"
_ATTR_PHRASES = {"material": ("made", "of", "{}"), "price": ("priced", "{}"),
                 "brand": ("by", "{}"), "finish": ("with", "{}", "finish")}
FUNCTION_WORDS = ("a", "at", "and", "made", "of", "priced", "by", "with", "finish")
VOCABULARY = tuple(sorted(set(SHAPES) | set(COLORS) | set(SIZES) | set(ROWS) | set(COLS)
                          | {v for vals in TEXT_ATTRIBUTES.values() for v in vals} | set(FUNCTION_WORDS)))
OBJECT_ATTRIBUTES = ("shape", "color", "size", "position")

SAMPLE_SCHEMA = """json per sample (all lists in object order of the item):
  item_id: int, view: int, generator_version: int, image_size: int, mask_grid: int,
  objects: [{shape, color, size, row, col, shown: bool, described: bool,
             occupancy: hex string of mask_grid*mask_grid bits (row-major, np.packbits) or null}],
  text_attrs: {material, price, brand, finish}, described_attrs: [names],
  shown: [object indices], described: [object indices], intersection: [object indices],
  words: [str] (caption == " ".join(words)), word_flags: [0/1], word_object: [int, -1 = none]
"""


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene: a shape with a colour and a size in grid cell (row, col)."""
    shape: str
    color: str
    size: str
    row: int
    col: int

    def as_dict(self) -> dict:
        """Plain-dict form used in the json metadata."""
        return {"shape": self.shape, "color": self.color, "size": self.size, "row": self.row, "col": self.col}


@dataclass(frozen=True)
class Item:
    """A scene: its id, 2-5 objects in distinct cells and its text-only attributes."""
    item_id: int
    objects: tuple
    attrs: tuple  # ((name, value), ...) in TEXT_ATTRIBUTES order

    @property
    def attr_dict(self) -> dict:
        return dict(self.attrs)


@dataclass(frozen=True)
class Split:
    """Which objects a view shows (image) and describes (caption), and which text attributes."""
    shown: tuple
    described: tuple
    attrs: tuple

    @property
    def intersection(self) -> tuple:
        return tuple(sorted(set(self.shown) & set(self.described)))

    @property
    def observed(self) -> frozenset:
        return frozenset(self.shown) | frozenset(self.described)


def _rng(*key: int) -> random.Random:
    """A private stream for a key: Python's Mersenne Twister seeded (via SHA-512) by the key's text.

    Python's ``random`` is used rather than numpy: a scene needs ~30 scalar draws and numpy's
    per-call overhead would dominate the generation time.  String seeding is stable across
    runs and platforms (independent of PYTHONHASHSEED).
    """
    return random.Random("shapesworld:" + ":".join(str(int(k)) for k in key))


def sample_key(item_id: int, view: int) -> str:
    """The webdataset ``__key__`` of view ``view`` of item ``item_id`` (no dots, sortable)."""
    return f"{int(item_id):010d}_{int(view):03d}"


def make_item(seed: int, item_id: int) -> Item:
    """The item ``item_id`` of the world ``seed`` (a pure function of both)."""
    rng = _rng(seed, item_id, 0)
    n = rng.randrange(2, 6)
    cells = rng.sample(range(GRID * GRID), n)
    color_names, size_names = tuple(COLORS), tuple(SIZES)
    objects = tuple(ShapeObject(rng.choice(SHAPES), rng.choice(color_names), rng.choice(size_names),
                                c // GRID, c % GRID) for c in cells)
    attrs = tuple((name, rng.choice(vals)) for name, vals in TEXT_ATTRIBUTES.items())
    return Item(int(item_id), objects, attrs)


def item_signature(objects, attrs) -> str:
    """A content signature of an item (objects as a set + text attributes), for overlap checks.

    ``objects`` is a list of ShapeObject or of dicts with shape/color/size/row/col keys;
    ``attrs`` a dict or (name, value) pairs.
    """
    objs = sorted((o["row"], o["col"], o["shape"], o["color"], o["size"]) if isinstance(o, dict)
                  else (o.row, o.col, o.shape, o.color, o.size) for o in objects)
    attrs = dict(attrs)
    return json.dumps([objs, [attrs.get(k) for k in TEXT_ATTRIBUTES]], separators=(",", ":"))


def perturb_item(item: Item, rng: random.Random, new_id: int, object_index: int | None = None,
                 attribute: str | None = None) -> tuple[Item, dict]:
    """A copy of ``item`` with id ``new_id`` that differs in exactly one object attribute.

    The changed object is ``object_index`` (random if None) and the attribute one of
    ``shape``, ``color``, ``size``, ``position`` (random if None); position moves the object
    to a free cell.  Returns (new item, change record).
    """
    objs = list(item.objects)
    if object_index is None:
        object_index = rng.randrange(len(objs))
    if not 0 <= object_index < len(objs):
        raise ValueError(f"object_index: expected 0..{len(objs) - 1}, got {object_index}")
    if attribute is None:
        attribute = rng.choice(OBJECT_ATTRIBUTES)
    o = objs[object_index]
    if attribute == "position":
        used = {(p.row, p.col) for p in objs}
        free = [c for c in range(GRID * GRID) if (c // GRID, c % GRID) not in used]
        c = rng.choice(free)
        new = replace(o, row=c // GRID, col=c % GRID)
        old_v, new_v = [o.row, o.col], [new.row, new.col]
    else:
        choices = {"shape": SHAPES, "color": tuple(COLORS), "size": tuple(SIZES)}.get(attribute)
        if choices is None:
            raise ValueError(f"attribute: expected one of {OBJECT_ATTRIBUTES}, got {attribute!r}")
        old_v = getattr(o, attribute)
        others = [v for v in choices if v != old_v]
        new_v = rng.choice(others)
        new = replace(o, **{attribute: new_v})
    objs[object_index] = new
    change = {"object": object_index, "attribute": attribute, "from": old_v, "to": new_v}
    return Item(int(new_id), tuple(objs), item.attrs), change


def sample_split(item: Item, rng: random.Random, must_observe: int | None = None) -> Split:
    """Draw which objects a view shows and describes, and which text attributes it mentions.

    At least one object is shown and described, at least one is shown only; when the item
    has room, usually some are described only.  ``must_observe``: an object index that must
    be shown or described (used for hard negatives).
    """
    n = len(item.objects)
    for _ in range(1000):
        perm = rng.sample(range(n), n)
        k = rng.randrange(1, n)           # both
        a = rng.randrange(1, n - k + 1)   # shown only
        rest = n - k - a
        b = rng.randrange(min(1, rest), rest + 1)  # described only
        shown = tuple(sorted(perm[:k + a]))
        described = tuple(sorted(perm[:k] + perm[k + a:k + a + b]))
        if must_observe is None or must_observe in shown or must_observe in described:
            break
    else:  # pragma: no cover - probability ~0
        raise RuntimeError("could not draw a split that observes the requested object")
    names = tuple(TEXT_ATTRIBUTES)
    attrs = tuple(sorted(rng.sample(names, rng.randrange(1, len(names)))))
    return Split(shown, described, attrs)


def _shape_draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: int) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, int(round(r * 0.4))))
    elif shape == "square":
        h = r * 0.85
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "bar":
        draw.rectangle((cx - r, cy - r * 0.4, cx + r, cy + r * 0.4), fill=fill)
    elif shape == "triangle":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        draw.polygon(pts, fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        draw.polygon(pts, fill=fill)
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"shape: unknown shape {shape!r}; expected one of {SHAPES}")


def _caption(item: Item, split: Split, rng: random.Random):
    inter = set(split.intersection)
    phrases = []
    for i in split.described:
        o = item.objects[i]
        words = ["a", o.size, o.color, o.shape, "at", ROWS[o.row], COLS[o.col]]
        flag = 1 if i in inter else 0
        phrases.append((words, [0, flag, flag, flag, 0, flag, flag], [i] * len(words)))
    attrs = item.attr_dict
    for name in split.attrs:
        words = [w.replace("{}", attrs[name]) for w in _ATTR_PHRASES[name]]
        phrases.append((words, [0] * len(words), [-1] * len(words)))
    order = rng.sample(range(len(phrases)), len(phrases))
    words, flags, owner = [], [], []
    for j, p in enumerate(order):
        if j:
            words.append("and"); flags.append(0); owner.append(-1)
        words += phrases[p][0]; flags += phrases[p][1]; owner += phrases[p][2]
    return words, flags, owner


def render_view(item: Item, split: Split, rng: random.Random, image_size: int = 64,
                view: int = 0) -> tuple[bytes, str, dict]:
    """Render one view: (png bytes, caption, json metadata) -- see ``SAMPLE_SCHEMA``.

    Per view the background shade, the colour tint and each shown object's position inside
    its cell are jittered; objects never leave their cell, so cells never overlap.
    """
    if image_size % (4 * GRID) != 0 or image_size <= 0:
        raise ValueError(f"image_size: expected a positive multiple of {4 * GRID}, got {image_size}")
    cell = image_size / GRID
    mask_grid = image_size // 4
    label = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(label)
    for i in split.shown:
        o = item.objects[i]
        r = SIZES[o.size] * cell / 2
        slack = max(0.0, cell / 2 - r - 0.75)
        cx = (o.col + 0.5) * cell + rng.uniform(-slack, slack) - 0.5
        cy = (o.row + 0.5) * cell + rng.uniform(-slack, slack) - 0.5
        _shape_draw(draw, o.shape, cx, cy, r, i + 1)
    lab = np.asarray(label)
    bg = rng.randrange(15, 70)
    palette = [(bg, bg, bg + rng.randrange(0, 20))]
    for o in item.objects:
        palette.append(tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in COLORS[o.color]))
    # a palette PNG (1 byte per pixel, <= 6 colours) encodes ~3x faster than RGB; decoders
    # return the same RGB pixels after .convert("RGB")
    img = Image.frombytes("P", (image_size, image_size), lab.tobytes())
    img.putpalette([c for rgb in palette for c in rgb])
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    # a 4-px mask cell never straddles two grid cells and objects never leave their grid
    # cell, so the max label of a mask cell is the only object drawn in it
    cell_label = lab.reshape(mask_grid, 4, mask_grid, 4).max(axis=(1, 3)).ravel()
    words, flags, owner = _caption(item, split, rng)
    shown, described = set(split.shown), set(split.described)
    objects = []
    for i, o in enumerate(item.objects):
        d = o.as_dict()
        d["shown"], d["described"] = i in shown, i in described
        d["occupancy"] = (np.packbits(cell_label == i + 1).tobytes().hex()
                          if i in shown else None)
        objects.append(d)
    meta = {
        "item_id": item.item_id, "view": int(view), "generator_version": GENERATOR_VERSION,
        "image_size": image_size, "mask_grid": mask_grid, "objects": objects,
        "text_attrs": item.attr_dict, "described_attrs": list(split.attrs),
        "shown": list(split.shown), "described": list(split.described),
        "intersection": list(split.intersection),
        "words": words, "word_flags": flags, "word_object": owner,
    }
    return buf.getvalue(), " ".join(words), meta


def make_pair(seed: int, item_id: int, view: int, image_size: int = 64) -> tuple[str, bytes, str, dict]:
    """View ``view`` of item ``item_id`` in world ``seed``: (key, png, caption, meta)."""
    item = make_item(seed, item_id)
    rng = _rng(seed, item_id, 1 + view)
    split = sample_split(item, rng)
    png, caption, meta = render_view(item, split, rng, image_size, view)
    return sample_key(item_id, view), png, caption, meta


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_samples(path: str, samples) -> int:
    """Write (key, png bytes, caption, meta dict) tuples to a webdataset tar; returns the count.

    Written to ``path + '.tmp'`` and renamed, so a shard on disk is always complete.
    """
    n = 0
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, png, caption, meta in samples:
            if "." in key:
                raise ValueError(f"key: webdataset keys must not contain '.', got {key!r}")
            _add(tar, key + ".png", png)
            _add(tar, key + ".txt", caption.encode("utf-8"))
            _add(tar, key + ".json", json.dumps(meta, separators=(",", ":")).encode("utf-8"))
            n += 1
    os.replace(tmp, path)
    return n


def _write_shard(args) -> int:
    path, seed, first, last, views_per_item, item_offset, image_size = args
    gen = (make_pair(seed, item_offset + p // views_per_item, p % views_per_item, image_size)
           for p in range(first, last))
    return write_samples(path, gen)


def write_shards(out: str, pairs: int, seed: int = 0, shard_size: int = 10000, workers: int | None = None,
                 image_size: int = 64, views_per_item: int = 1, item_offset: int = 0,
                 progress: bool = True) -> dict:
    """Generate ``pairs`` ShapesWorld pairs into webdataset shards ``out/shard-NNNNNN.tar``.

    Pair p is view ``p % views_per_item`` of item ``item_offset + p // views_per_item``.
    Writes ``out/shapesworld.json`` (the manifest: seed, sizes, item id range, shard names
    and brace pattern) and returns it.  Refuses benchmark-reserved item ids.
    """
    for name, v, lo in (("pairs", pairs, 1), ("shard_size", shard_size, 1), ("views_per_item", views_per_item, 1),
                        ("image_size", image_size, 16)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    if item_offset < 0:
        raise ValueError(f"item_offset: expected >= 0, got {item_offset}")
    n_items = -(-pairs // views_per_item)
    if item_offset + n_items > BENCHMARK_ITEM_BASE:
        raise ValueError(f"item ids {item_offset}..{item_offset + n_items - 1} reach the benchmark-reserved range "
                         f">= {BENCHMARK_ITEM_BASE}; lower item_offset or pairs")
    os.makedirs(out, exist_ok=True)
    n_shards = -(-pairs // shard_size)
    names = [f"shard-{s:06d}.tar" for s in range(n_shards)]
    jobs = [(os.path.join(out, names[s]), seed, s * shard_size, min(pairs, (s + 1) * shard_size),
             views_per_item, item_offset, image_size) for s in range(n_shards)]
    workers = max(1, min(workers or os.cpu_count() or 1, n_shards))
    t0 = time.perf_counter()
    bar = None
    if progress:
        from ..logging import progress_bar
        bar = progress_bar(total=pairs, desc="shapesworld", unit="pair")
    if workers == 1:
        for j in jobs:
            n = _write_shard(j)
            if bar is not None:
                bar.update(n)
    else:
        with get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(workers) as pool:
            for n in pool.imap_unordered(_write_shard, jobs):
                if bar is not None:
                    bar.update(n)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    manifest = {
        "generator": "shapesworld", "generator_version": GENERATOR_VERSION, "seed": seed, "pairs": pairs,
        "views_per_item": views_per_item, "item_id_range": [item_offset, item_offset + n_items],
        "image_size": image_size, "shard_size": shard_size, "shards": names,
        "pattern": f"shard-{{000000..{n_shards - 1:06d}}}.tar", "vocabulary": list(VOCABULARY),
    }
    with open(os.path.join(out, "shapesworld.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    manifest["seconds"] = seconds
    return manifest


def main(argv=None) -> None:
    """Command-line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m solar.data.shapesworld", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder for shard-NNNNNN.tar and shapesworld.json")
    ap.add_argument("--pairs", type=int, required=True, help="number of (image, caption) pairs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--views-per-item", type=int, default=1)
    ap.add_argument("--item-offset", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        m = write_shards(a.out, a.pairs, a.seed, a.shard_size, a.workers, a.image_size, a.views_per_item,
                         a.item_offset, progress=not a.no_progress)
    except ValueError as e:
        ap.error(str(e))
    print(f"wrote {m['pairs']} pairs in {len(m['shards'])} shards to {a.out} in {m['seconds']:.1f} s "
          f"({m['pairs'] / max(m['seconds'], 1e-9):.0f} pairs/s); pattern {m['pattern']}")


if __name__ == "__main__":
    main()
