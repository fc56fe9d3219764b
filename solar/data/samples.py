"""The batch a pair reader yields, built from decoded samples: image transform, ground-truth
masks, tokenisation and the skip counters.

:func:`collate_pairs` is the one place that turns PIL images, caption strings and (optional)
ShapesWorld json metadata into the batch format documented in :mod:`solar.data.reader`; the
shard reader (:class:`solar.data.reader.PairDataset`) and in-memory callers both use it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

__all__ = ["CLIP_MEAN", "CLIP_STD", "ReaderStats", "ImageTransform", "has_ground_truth", "has_patch_ground_truth", "gt_patch_mask",
           "collate_pairs"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ReaderStats:
    """Counters shared by the main process and its DataLoader workers.

    One row of a shared-memory int64 tensor per process (row 0 = main, row w+1 = worker w),
    so increments need no lock; :meth:`totals` sums the rows.  :meth:`add` counts in a plain
    per-process dict (cheap) that :meth:`flush` moves into the shared row; the reader flushes
    after every batch and at the end of every pass.
    """

    FIELDS = ("seen", "yielded", "batches", "read_error", "missing_image", "missing_caption", "corrupt_image",
              "empty_caption", "non_utf8_caption", "bad_json", "missing_ground_truth", "gt_mismatch")
    SKIPS = ("read_error", "missing_image", "missing_caption", "corrupt_image", "empty_caption", "non_utf8_caption",
             "bad_json", "missing_ground_truth")
    MAX_WORKERS = 256

    def __init__(self):
        self.counts = torch.zeros(self.MAX_WORKERS + 1, len(self.FIELDS), dtype=torch.int64).share_memory_()
        self._index = {f: i for i, f in enumerate(self.FIELDS)}
        self._pending = [0] * len(self.FIELDS)

    def __getstate__(self):
        return {"counts": self.counts, "_index": self._index}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pending = [0] * len(self.FIELDS)

    def add(self, field: str, n: int = 1) -> None:
        """Add ``n`` to counter ``field`` (pending in this process until :meth:`flush`)."""
        self._pending[self._index[field]] += n

    def flush(self) -> None:
        """Move this process's pending counts into its row of the shared tensor."""
        if not any(self._pending):
            return
        info = torch.utils.data.get_worker_info()
        row = 0 if info is None else info.id + 1
        if row > self.MAX_WORKERS:
            raise RuntimeError(f"ReaderStats supports at most {self.MAX_WORKERS} DataLoader workers")
        self.counts[row] += torch.tensor(self._pending, dtype=torch.int64)
        self._pending = [0] * len(self.FIELDS)

    def totals(self) -> dict:
        """All counters summed over processes, plus ``skipped`` (sum of the skip reasons)."""
        self.flush()
        tot = self.counts.sum(0).tolist()
        d = dict(zip(self.FIELDS, tot))
        d["skipped"] = sum(d[k] for k in self.SKIPS)
        return d

    def as_metrics(self, prefix: str = "reader/") -> dict:
        """Flat {prefix + name: count} for a metrics log: ``yielded``, ``skipped`` and every
        skip reason and ``gt_mismatch`` that is non-zero (cumulative since the last reset)."""
        t = self.totals()
        keep = ("yielded", "skipped") + tuple(k for k in self.SKIPS + ("gt_mismatch",) if t[k])
        return {prefix + k: int(t[k]) for k in keep}

    def reset(self) -> None:
        """Zero every counter."""
        self.counts.zero_()
        self._pending = [0] * len(self.FIELDS)

    def report(self) -> str:
        """One log line: yielded samples, and each non-zero skip reason."""
        t = self.totals()
        reasons = ", ".join(f"{k.replace('_', ' ')} {t[k]}" for k in self.SKIPS if t[k])
        line = f"reader: {t['yielded']} samples in {t['batches']} batches, skipped {t['skipped']}"
        line += f" ({reasons})" if reasons else ""
        if t["gt_mismatch"]:
            line += f"; token ground truth unaligned (zeroed) for {t['gt_mismatch']}"
        return line


@dataclass
class ImageTransform:
    """Resize the shorter side to ``image_size`` (bicubic), crop a square, to tensor, normalise.

    ``crop``: "center" (evaluation) or "random" (training).  The same geometry is applied to
    the ground-truth masks (nearest neighbour) by :func:`gt_patch_mask`.
    """
    image_size: int = 64
    crop: str = "center"
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    def __post_init__(self):
        if not isinstance(self.image_size, int) or self.image_size <= 0:
            raise ValueError(f"image_size: expected a positive int, got {self.image_size!r}")
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop: expected 'center' or 'random', got {self.crop!r}")
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)

    def geometry(self, w: int, h: int, rng: random.Random | None = None) -> tuple[int, int, int, int]:
        """(resized w, resized h, crop left, crop top) for a w x h image."""
        s = self.image_size
        scale = s / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        if self.crop == "random" and rng is not None:
            left, top = rng.randint(0, nw - s), rng.randint(0, nh - s)
        else:
            left, top = (nw - s) // 2, (nh - s) // 2
        return nw, nh, left, top

    def apply_geometry(self, img: Image.Image, geom, resample) -> Image.Image:
        """Resize + crop a PIL image with a geometry from :meth:`geometry`."""
        nw, nh, left, top = geom
        s = self.image_size
        if img.size != (nw, nh):
            img = img.resize((nw, nh), resample)
        if (nw, nh) != (s, s):
            img = img.crop((left, top, left + s, top + s))
        return img

    def to_uint8(self, img: Image.Image, rng: random.Random | None = None):
        """(uint8 [S, S, 3] array, geometry) for a PIL image (converted to RGB, resized, cropped)."""
        img = img.convert("RGB")
        geom = self.geometry(*img.size, rng)
        img = self.apply_geometry(img, geom, Image.BICUBIC)
        return np.asarray(img, dtype=np.uint8), geom

    def normalize(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 [B, S, S, 3] -> normalised float32 [B, 3, S, S]."""
        u8 = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2)
        out = torch.empty(u8.shape, dtype=torch.float32)
        out.copy_(u8)  # dtype and layout in one pass
        # (x / 255 - mean) / std as one fused multiply-add per element
        return torch.addcmul(-self._mean / self._std, out, 1.0 / (255.0 * self._std), out=out)

    def __call__(self, img: Image.Image, rng: random.Random | None = None):
        """(float32 [3, S, S] tensor, geometry) for a PIL image (converted to RGB)."""
        arr, geom = self.to_uint8(img, rng)
        return self.normalize(arr[None])[0], geom


def has_patch_ground_truth(meta) -> bool:
    """True when a sample's json carries the patch ground truth (``objects``, ``mask_grid``,
    ``intersection``): enough for :func:`gt_patch_mask`."""
    return isinstance(meta, dict) and "objects" in meta and "mask_grid" in meta and "intersection" in meta


def has_ground_truth(meta) -> bool:
    """True when a sample's json carries ShapesWorld's ground truth: ``item_id``, the patch
    ground truth (``objects``, ``mask_grid``, ``intersection``) and ``words`` / ``word_flags``."""
    return has_patch_ground_truth(meta) and "item_id" in meta and "words" in meta and "word_flags" in meta


def gt_patch_mask(meta: dict, native_size: tuple[int, int], transform: ImageTransform, geom,
                  patch_size: int) -> torch.Tensor:
    """bool [P] patch mask of the objects both shown and described, after the image's geometry.

    The union of the intersection objects' occupancy grids (``mask_grid`` cells over the
    native image) is upsampled to the native size, resized/cropped like the image (nearest)
    and max-pooled over ``patch_size`` patches: a patch is True when it holds any pixel of
    an intersection object.  Exact when no resize happens and patch_size is a multiple of
    the cell size (ShapesWorld's 4 px).
    """
    g = int(meta["mask_grid"])
    occ = np.zeros(g * g, dtype=bool)
    for i in meta["intersection"]:
        hexs = meta["objects"][i]["occupancy"]
        occ |= np.unpackbits(np.frombuffer(bytes.fromhex(hexs), dtype=np.uint8))[: g * g].astype(bool)
    occ = occ.reshape(g, g)
    w, h = native_size
    s = transform.image_size
    if (w, h) == (s, s) and s % g == 0 and patch_size % (s // g) == 0:  # no resize, patches = whole cells
        n, c = s // patch_size, patch_size // (s // g)
        return torch.from_numpy(occ.reshape(n, c, n, c).any(axis=(1, 3)).ravel().copy())
    pix = occ[(np.arange(h) * g) // h][:, (np.arange(w) * g) // w]
    if (w, h) != (s, s):
        pix = np.asarray(transform.apply_geometry(Image.fromarray(pix.astype(np.uint8) * 255, "L"), geom,
                                                  Image.NEAREST)) > 127
    n = s // patch_size
    return torch.from_numpy(pix.reshape(n, patch_size, n, patch_size).any(axis=(1, 3)).ravel().copy())


def _word_counts(tokenizer, words, cache: dict) -> list[int]:
    out = []
    for w in words:
        c = cache.get(w)
        if c is None:
            c = cache[w] = len(tokenizer(w, add_special_tokens=False)["input_ids"])
        out.append(c)
    return out


def collate_pairs(images, captions, tokenizer, image_size: int = 64, patch_size: int = 8, max_length: int = 77,
                  metas=None, keys=None, transform: ImageTransform | None = None, pad_to_max_length: bool = False,
                  stats: ReaderStats | None = None, _pixel_values=None, _patch_masks=None) -> dict:
    """Build a batch (format in the module docstring) from PIL images and caption strings.

    ``metas``: optional per-sample json dicts; ``item_id`` / ``gt_patch_mask`` /
    ``gt_token_mask`` are added when every sample has them (the reader's "require" mode
    makes sure every sample of every batch does).  ``keys`` default to "0", "1", ...
    ``transform`` defaults to a center-crop :class:`ImageTransform` at ``image_size``.
    """
    n = len(captions)
    if _pixel_values is None and len(images) != n:
        raise ValueError(f"images/captions: expected equal lengths, got {len(images)} and {n}")
    if n == 0:
        raise ValueError("captions: expected at least one pair, got an empty list")
    if image_size % patch_size:
        raise ValueError(f"patch_size: expected a divisor of image_size={image_size}, got {patch_size}")
    if isinstance(tokenizer, str):
        from .tokenizer import load_tokenizer
        tokenizer = load_tokenizer(tokenizer)
    transform = transform or ImageTransform(image_size)
    if transform.image_size != image_size:
        raise ValueError(f"transform.image_size={transform.image_size} differs from image_size={image_size}")
    metas = list(metas) if metas is not None else [None] * n
    if _pixel_values is None:
        pix, patch_masks = [], []
        for img, meta in zip(images, metas):
            arr, geom = transform.to_uint8(img)
            pix.append(arr)
            patch_masks.append(gt_patch_mask(meta, img.size, transform, geom, patch_size)
                               if has_patch_ground_truth(meta) else None)
        _pixel_values, _patch_masks = transform.normalize(np.stack(pix)), patch_masks
    enc = tokenizer(list(captions), padding="max_length" if pad_to_max_length else "longest", truncation=True,
                    max_length=max_length, return_tensors="pt", return_special_tokens_mask=True)
    batch = {
        "pixel_values": _pixel_values,
        "input_ids": enc["input_ids"].to(torch.int64),
        "attention_mask": enc["attention_mask"].bool(),
        "key": list(keys) if keys is not None else [str(i) for i in range(n)],
    }
    if all(isinstance(m, dict) and "item_id" in m for m in metas):
        batch["item_id"] = torch.tensor([int(m["item_id"]) for m in metas], dtype=torch.int64)
    if _patch_masks is not None and all(m is not None for m in _patch_masks):
        batch["gt_patch_mask"] = torch.stack(_patch_masks)
    if all(isinstance(m, dict) and "words" in m and "word_flags" in m for m in metas):
        cache = getattr(tokenizer, "_solar_word_counts", None)
        if cache is None:
            cache = {}
            try:
                tokenizer._solar_word_counts = cache
            except AttributeError:  # pragma: no cover
                pass
        content = ~(enc["special_tokens_mask"].bool() | ~batch["attention_mask"]).numpy()
        full = batch["attention_mask"].numpy().all(1) & (content.shape[1] >= max_length)
        gt = np.zeros(content.shape, dtype=bool)
        for b, (meta, cap) in enumerate(zip(metas, captions)):
            words, flags = meta["words"], meta["word_flags"]
            pos = np.flatnonzero(content[b])
            try:
                flat = [bool(f) for f, c in zip(flags, _word_counts(tokenizer, words, cache)) for _ in range(c)]
                ok = (len(words) == len(flags) and " ".join(words).lower() == " ".join(cap.split()).lower()
                      and (len(flat) == len(pos) or (full[b] and len(flat) > len(pos))))
            except (TypeError, ValueError, AttributeError):  # malformed words/flags in the json
                ok = False
            if not ok:
                if stats is not None:
                    stats.add("gt_mismatch")
                continue
            gt[b, pos] = np.asarray(flat[: len(pos)], dtype=bool)
        batch["gt_token_mask"] = torch.from_numpy(gt)
    return batch
