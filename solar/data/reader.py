"""One reader for every source of (image, caption) pairs in webdataset shards.

Sources: local paths, brace patterns (``data/shard-{000000..000099}.tar``), ``pipe:`` URLs
(``pipe:aws s3 cp s3://b/shard-000001.tar -``) and lists of these; a ``::``-separated string
is split too.  Samples are LAION/CC-style: an image (``jpg``/``jpeg``/``png``/``webp``), a
caption (``txt``) and an optional ``json``.  ShapesWorld's json adds the ground truth.

Pipeline (per epoch): expand urls -> optional shard shuffle (same order on every rank) ->
split over the readers (every DataLoader worker of every rank; see below) -> read tar ->
block shuffle -> decode, resize (shorter side) + crop to ``image_size``, normalise ->
tokenise and batch with padding masks.

Splitting: reader ``slot = rank + world_size * worker`` of ``slots = world_size * workers``.
With at least as many shards as readers, reader ``slot`` reads shards ``slot, slot + slots,
...``; with fewer, the readers of shard ``slot % n`` split its samples by index.  Either way
every sample is read by exactly one reader per epoch, and no reader is left without data (a
reader whose whole epoch gives no full batch stops with a warning instead of looping over
empty epochs forever).

Shuffling is position-addressable, so a stream can resume from a position without decoding
what came before it: the shard order is drawn per epoch, each shard's samples are permuted in
blocks of ``shuffle_buffer`` consecutive samples (seeded by seed, epoch, reader, shard and
block), and a random crop draws from a generator seeded by the sample's position.  With
``positions=True`` every batch carries ``stream_position`` (reader role, epoch, shard number
and sample offset after its last sample); a dataset built with ``start=`` (see
:class:`PairDataset`) continues from such positions: earlier shards are not opened, and the
samples of the current shard before the offset are read from the tar but not decoded.

Never a crash, never a silent hole: an unreadable shard, a corrupt image, a missing image
or caption, an empty or non-UTF-8 caption, a bad json or missing ground truth is skipped
and counted by cause in :class:`ReaderStats` (shared across DataLoader workers; read them
with ``stats.totals()``, ``stats.report()`` or ``stats.as_metrics()``); :class:`PairLoader`
logs the counts at the end of every pass and keeps them in ``last_report``.

Ground truth (``ground_truth=``): "require" gives every batch the ground-truth fields below
and skips (counts as ``missing_ground_truth``) samples without them -- e.g. a json-less or
cut-off sample in ShapesWorld data -- so one damaged shard neither changes the batch format
nor hides the ground truth of the good ones; "none" never emits them; "auto" (default) is
"require" when any of the first 4 samples of any of the first 32 local shards has ground
truth, else "none" (shards that cannot be opened are passed over; remote-only data gets
"none", with a warning).

Batch format (every consumer depends on it)::

    pixel_values    float32 [B, 3, H, W]  normalised with mean/std
    input_ids       int64   [B, T]        BOS ... EOS, padded with the pad token
    attention_mask  bool    [B, T]        True on real tokens (specials included)
    key             list[str]             the webdataset __key__ of each sample
  and, with ground truth (ShapesWorld; see above), on every batch:
    item_id         int64   [B]
    gt_patch_mask   bool    [B, P]        P = (H / patch_size)^2, row-major patches; True when the
                                          patch holds any pixel of an object both shown and described
    gt_token_mask   bool    [B, T]        True on tokens of caption words that describe visible
                                          objects; specials and padding are False

:func:`collate_pairs` builds the same batch from in-memory PIL images and caption strings.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random

import numpy as np
import torch
from PIL import Image

# the batch builders live in .samples; their names stay importable from here (__all__)
from .samples import (CLIP_MEAN, CLIP_STD, ImageTransform, ReaderStats, collate_pairs, gt_patch_mask,
                      has_ground_truth, has_patch_ground_truth)

__all__ = ["CLIP_MEAN", "CLIP_STD", "IMAGE_EXTENSIONS", "GROUND_TRUTH_MODES", "ReaderStats", "ImageTransform",
           "expand_urls", "collate_pairs", "gt_patch_mask", "has_ground_truth", "iter_sample_range", "PairDataset",
           "PairLoader", "make_loader", "advance_state"]

logger = logging.getLogger("solar.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt",)
GROUND_TRUTH_MODES = ("auto", "require", "none")
_REMOTE = ("pipe:", "http://", "https://", "gs://", "s3://")
_PEEK_SHARDS = 32


def _peek_ground_truth(urls) -> tuple[bool, int]:
    """(does any of the first samples of the first local shards carry ground truth, shards read).

    Reads only the first tar members of each shard (at most 4 json files); a shard that
    cannot be opened or parsed is passed over, so one damaged shard or sample cannot decide
    the answer."""
    import tarfile

    read = 0
    for u in [u for u in urls if not u.startswith(_REMOTE)][:_PEEK_SHARDS]:
        try:
            with tarfile.open(u, "r") as tar:
                jsons = 0
                for i, m in enumerate(tar):
                    if i >= 32 or jsons >= 4:
                        break
                    if m.isfile() and m.name.endswith(".json"):
                        jsons += 1
                        try:
                            if has_ground_truth(json.loads(tar.extractfile(m).read())):
                                return True, read + 1
                        except (ValueError, UnicodeDecodeError):
                            continue
            read += 1
        except Exception:  # noqa: BLE001 - a damaged shard says nothing about the others
            continue
    return False, read


def expand_urls(urls) -> list[str]:
    """A list of shard urls from a string (brace pattern, ``::``-separated) or a list of them."""
    import braceexpand

    if isinstance(urls, (str, os.PathLike)):
        urls = [urls]
    out = []
    for u in urls:
        if not isinstance(u, (str, os.PathLike)):
            raise TypeError(f"urls: expected str, PathLike or a list of them, got {type(u).__name__}")
        for part in str(u).split("::"):
            out.extend(braceexpand.braceexpand(part))
    if not out:
        raise ValueError(f"urls: no shards in {urls!r}")
    for u in out:
        if not u.startswith(_REMOTE) and not os.path.exists(u):
            raise FileNotFoundError(f"urls: shard {u!r} does not exist")
    return out


def iter_sample_range(urls, start: int, stop: int, handler=None):
    """The raw webdataset samples at positions [start, stop) of `urls` read in order.

    Position p is the p-th sample of the shards concatenated in the given order, counted
    before any decoding, so every process asking for a range gets the same samples: a mining
    pool is split between ranks and workers without any decoding another's share
    (`solar.mining`).  Samples before `start` are read from the tar, not decoded."""
    import webdataset as wds

    if not 0 <= start <= stop:
        raise ValueError(f"start, stop: expected 0 <= start <= stop, got {start}, {stop}")
    if start == stop:
        return
    samples = wds.tarfile_to_samples(handler=handler or wds.reraise_exception)(
        iter([{"url": u} for u in expand_urls(urls)]))
    for pos, s in enumerate(samples):
        if pos >= start:
            yield s
        if pos + 1 >= stop:
            break


def _dist_info(rank, world_size):
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            r, ws = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            r, ws = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = r if rank is None else rank
        world_size = ws if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
    return rank, world_size


class PairDataset(torch.utils.data.IterableDataset):
    """Iterable of batches from webdataset shards (see the module docstring).

    Args:
        urls: path, brace pattern, ``pipe:`` url, ``::``-joined string, or a list of them.
        tokenizer: a tokenizer object, "shapesworld", or a local tokenizer folder.
        image_size, patch_size: model input size and patch size (for ``gt_patch_mask``).
        max_length: token limit (captions are truncated; EOS kept).
        batch_size, drop_last: batching inside each worker.
        shuffle_buffer: sample shuffle buffer size (0 = keep shard order).
        shard_shuffle: shuffle the shard list every epoch (same order on every rank).
        seed: seeds the shard order, the sample buffer and random crops (with epoch, rank, worker).
        rank, world_size: node split (default: torch.distributed, else $RANK/$WORLD_SIZE, else 0/1).
        crop: "center" or "random"; mean, std: normalisation.
        repeat: iterate epochs forever (train by steps).
        pad_to_max_length: pad every batch to ``max_length`` instead of its longest caption.
        stats: a :class:`ReaderStats` to count into (default: a new one, ``self.stats``).
        ground_truth: "auto", "require" or "none" (see the module docstring); the resolved
            mode is ``self.ground_truth``.
        sample_range: (start, stop): only the samples at these positions of the shards read
            in order (see :func:`iter_sample_range`), split contiguously between DataLoader
            workers; rank / world_size do not split them.  No repeat; positions / start unused.
        positions: add ``stream_position`` (int64 [4]: role, epoch, shard number, offset) to
            every batch.
        start: where to continue (a stream's state, see :func:`advance_state`):
            {"workers": W, "next_role": r, "roles": [[epoch, shard, offset] or None] * W}.
            DataLoader worker i plays reader role (i + r) % W, so the first batch comes from
            role r, as it would have in the uninterrupted stream.
    """

    def __init__(self, urls, tokenizer="shapesworld", image_size: int = 64, patch_size: int = 8,
                 max_length: int = 77, batch_size: int = 64, drop_last: bool = False, shuffle_buffer: int = 0,
                 shard_shuffle: bool = False, seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 crop: str = "center", mean=CLIP_MEAN, std=CLIP_STD, repeat: bool = False,
                 pad_to_max_length: bool = False, stats: ReaderStats | None = None, ground_truth: str = "auto",
                 sample_range: tuple | None = None, positions: bool = False, start: dict | None = None):
        super().__init__()
        if sample_range is not None:
            if len(sample_range) != 2 or not 0 <= int(sample_range[0]) <= int(sample_range[1]):
                raise ValueError(f"sample_range: expected (start, stop) with 0 <= start <= stop, got {sample_range!r}")
            if shuffle_buffer or shard_shuffle or repeat:
                raise ValueError("sample_range: reads the shards in order once; got shuffle_buffer="
                                 f"{shuffle_buffer}, shard_shuffle={shard_shuffle}, repeat={repeat}")
            sample_range = (int(sample_range[0]), int(sample_range[1]))
        self.sample_range = sample_range
        if ground_truth not in GROUND_TRUTH_MODES:
            raise ValueError(f"ground_truth: expected one of {GROUND_TRUTH_MODES}, got {ground_truth!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if image_size % patch_size:
            raise ValueError(f"patch_size: expected a divisor of image_size={image_size}, got {patch_size}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer: expected >= 0, got {shuffle_buffer}")
        self.urls = expand_urls(urls)
        if isinstance(tokenizer, str):
            from .tokenizer import load_tokenizer
            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.image_size, self.patch_size, self.max_length = image_size, patch_size, max_length
        self.batch_size, self.drop_last, self.shuffle_buffer = batch_size, drop_last, shuffle_buffer
        self.shard_shuffle, self.seed, self.repeat = shard_shuffle, seed, repeat
        self.rank, self.world_size = _dist_info(rank, world_size)
        self.transform = ImageTransform(image_size, crop, tuple(mean), tuple(std))
        self.pad_to_max_length = pad_to_max_length
        self.stats = stats if stats is not None else ReaderStats()
        self.epoch = 0
        self.positions = positions
        if start is not None and not (isinstance(start, dict) and {"workers", "next_role", "roles"} <= set(start)):
            raise ValueError(f"start: expected a dict with workers, next_role and roles, got {start!r}")
        self.start = start
        if ground_truth == "auto":
            found, read = _peek_ground_truth(self.urls)
            ground_truth = "require" if found else "none"
            if not read and not found:
                logger.warning("reader: no local shard could be inspected for ground truth; batches will have no "
                               "ground-truth fields (pass ground_truth='require' if the shards carry them)")
        self.ground_truth = ground_truth

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used to seed shuffles (call before each pass when not repeating)."""
        self.epoch = int(epoch)

    # -- stages --------------------------------------------------------------------------
    def _on_read_error(self, exn) -> bool:
        self.stats.add("read_error")
        logger.warning("reader: skipping unreadable data (%s: %s)", type(exn).__name__, exn)
        return True

    def plan(self, epoch: int, role: int, num_workers: int) -> list[tuple[str, int, int]]:
        """What reader `role` (of `num_workers` per rank) reads in `epoch`: [(url, stride, first)],
        the samples i of shard url with i % stride == first (see the module docstring)."""
        urls = list(self.urls)
        if self.shard_shuffle:
            random.Random(f"{self.seed}-{epoch}").shuffle(urls)
        slots = self.world_size * num_workers
        slot = self.rank + self.world_size * role
        if len(urls) >= slots:
            return [(u, 1, 0) for u in urls[slot::slots]]
        g = slot % len(urls)
        return [(urls[g], len(range(g, slots, len(urls))), slot // len(urls))]

    def _shard_samples(self, url: str, stride: int, first: int, key: str):
        """The raw samples of one shard that this reader keeps, in this epoch's order (blocks of
        shuffle_buffer consecutive kept samples, each permuted by a generator seeded with `key`
        and the block number)."""
        import webdataset as wds

        raw = wds.tarfile_to_samples(handler=self._on_read_error)(iter([{"url": url}]))
        kept = (x for i, x in enumerate(raw) if i % stride == first)
        if self.shuffle_buffer <= 1:
            yield from kept
            return
        block, n = [], 0
        for x in kept:
            block.append(x)
            if len(block) == self.shuffle_buffer:
                random.Random(f"{key}-{n}").shuffle(block)
                yield from block
                block, n = [], n + 1
        random.Random(f"{key}-{n}").shuffle(block)
        yield from block

    def _decode(self, sample: dict, rng: random.Random):
        self.stats.add("seen")
        img_key = next((k for k in IMAGE_EXTENSIONS if k in sample), None)
        if img_key is None:
            self.stats.add("missing_image")
            return None
        cap_key = next((k for k in CAPTION_EXTENSIONS if k in sample), None)
        if cap_key is None:
            self.stats.add("missing_caption")
            return None
        try:
            caption = sample[cap_key].decode("utf-8").strip()
        except (UnicodeDecodeError, AttributeError):
            self.stats.add("non_utf8_caption")
            return None
        if not caption:
            self.stats.add("empty_caption")
            return None
        meta = None
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except (ValueError, UnicodeDecodeError):
                self.stats.add("bad_json")
                return None
        if self.ground_truth == "require" and not has_ground_truth(meta):
            self.stats.add("missing_ground_truth")
            return None
        if self.ground_truth == "none":
            meta = None
        try:
            img = Image.open(io.BytesIO(sample[img_key]))
            img.load()
            x, geom = self.transform.to_uint8(img, rng)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
            self.stats.add("corrupt_image")
            logger.debug("reader: corrupt image in %s (%s)", sample.get("__key__"), e)
            return None
        patch = None
        if has_patch_ground_truth(meta):
            try:
                patch = gt_patch_mask(meta, img.size, self.transform, geom, self.patch_size)
            except (KeyError, IndexError, TypeError, ValueError) as e:
                self.stats.add("bad_json")
                logger.debug("reader: bad ground truth in %s (%s)", sample.get("__key__"), e)
                return None
        return sample["__key__"], x, caption, meta, patch

    def _collate(self, items) -> dict:
        keys, xs, caps, metas, patches = zip(*items)
        batch = collate_pairs(None, list(caps), self.tokenizer, self.image_size, self.patch_size, self.max_length,
                              metas=list(metas), keys=list(keys), transform=self.transform,
                              pad_to_max_length=self.pad_to_max_length, stats=self.stats,
                              _pixel_values=self.transform.normalize(np.stack(xs)), _patch_masks=list(patches))
        self.stats.add("yielded", len(items))
        self.stats.add("batches")
        self.stats.flush()
        return batch

    def _batch(self, buf, role: int, epoch: int, shard: int, offset: int) -> dict:
        batch = self._collate(buf)
        if self.positions:
            batch["stream_position"] = torch.tensor([role, epoch, shard, offset], dtype=torch.int64)
        return batch

    def _one_epoch(self, epoch: int, role: int, num_workers: int, shard0: int = 0, offset0: int = 0):
        """Reader `role`'s batches of `epoch`, from shard number `shard0`, sample `offset0` on
        (the samples before it are read but not decoded; earlier shards are not opened)."""
        plan = self.plan(epoch, role, num_workers)
        crop_random = self.transform.crop == "random"
        buf = []
        for p in range(shard0, len(plan)):
            url, stride, first = plan[p]
            key = f"{self.seed}-{epoch}-{self.rank}-{role}-{p}"
            for j, sample in enumerate(self._shard_samples(url, stride, first, key)):
                if p == shard0 and j < offset0:
                    continue
                item = self._decode(sample, random.Random(f"{key}-{j}") if crop_random else None)
                if item is None:
                    continue
                buf.append(item)
                if len(buf) == self.batch_size:
                    yield self._batch(buf, role, epoch, p, j + 1)
                    buf = []
        if buf and not self.drop_last:
            yield self._batch(buf, role, epoch, len(plan), 0)
        self.stats.flush()

    def _range_batches(self, worker: int, num_workers: int):
        """Batches of a `sample_range` reader: DataLoader worker `worker` reads its contiguous
        part of the range, in order (the mining pool's global ids follow sample order)."""
        start, stop = self.sample_range
        n = stop - start
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
        samples = iter_sample_range(self.urls, start + n * worker // num_workers,
                                    start + n * (worker + 1) // num_workers, handler=self._on_read_error)
        buf = []
        for s in samples:
            item = self._decode(s, rng)
            if item is None:
                continue
            buf.append(item)
            if len(buf) == self.batch_size:
                yield self._collate(buf)
                buf = []
        if buf and not self.drop_last:
            yield self._collate(buf)
        self.stats.flush()

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if info is not None:  # a forked worker inherits the parent's pending counts: not its own
            self.stats._pending = [0] * len(self.stats.FIELDS)
        if self.sample_range is not None:
            yield from self._range_batches(worker, num_workers)
            return
        role, (epoch, shard, offset) = worker, (self.epoch, 0, 0)
        if self.start is not None:
            if int(self.start["workers"]) != num_workers:
                raise ValueError(f"start: a position of a stream with {self.start['workers']} reader worker(s) "
                                 f"cannot continue with {num_workers}")
            role = (worker + int(self.start["next_role"])) % num_workers
            if self.start["roles"][role] is not None:
                epoch, shard, offset = (int(v) for v in self.start["roles"][role])
        while True:
            got = 0
            for b in self._one_epoch(epoch, role, num_workers, shard, offset):
                got += 1
                yield b
            if not self.repeat:
                break
            if not got and (shard, offset) == (0, 0):
                # a whole epoch without a full batch: the next epochs would be as empty
                logger.warning("reader: rank %d reader %d of %d got no full batch of %d from a whole epoch "
                               "(%d shard(s) for %d rank(s) x %d worker(s)); it stops", self.rank, role,
                               num_workers, self.batch_size, len(self.urls), self.world_size, num_workers)
                return
            epoch, shard, offset = epoch + 1, 0, 0


def advance_state(state: dict | None, position, num_workers: int) -> dict:
    """The stream state after a batch with ``stream_position`` `position` (role, epoch, shard,
    offset): that role continues after it and the next batch comes from the next role.
    `state` None is a stream's beginning."""
    workers = max(1, num_workers)
    if state is None:
        state = {"workers": workers, "next_role": 0, "roles": [None] * workers}
    role, epoch, shard, offset = (int(v) for v in position)
    roles = list(state["roles"])
    roles[role] = [epoch, shard, offset]
    return {"workers": workers, "next_role": (role + 1) % workers, "roles": roles}


class PairLoader:
    """A DataLoader over a :class:`PairDataset` that logs the reader's counts after every pass.

    ``last_report`` holds the last log line; ``stats`` the live counters.
    """

    def __init__(self, dataset: PairDataset, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None, persistent_workers: bool = False,
                 multiprocessing_context=None):
        if num_workers > ReaderStats.MAX_WORKERS:
            raise ValueError(f"num_workers: expected <= {ReaderStats.MAX_WORKERS}, got {num_workers}")
        if num_workers > 0:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        readers = dataset.world_size * max(1, num_workers)
        if len(dataset.urls) < readers and dataset.sample_range is None:   # a sample range is split by sample
            logger.info("reader: %d shard(s) for %d readers (%d rank(s) x %d worker(s)): shards are split by sample",
                        len(dataset.urls), readers, dataset.world_size, max(1, num_workers))
        self.dataset, self.stats = dataset, dataset.stats
        kw = dict(batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                  persistent_workers=persistent_workers and num_workers > 0,
                  multiprocessing_context=multiprocessing_context)
        if num_workers > 0 and prefetch_factor is not None:
            kw["prefetch_factor"] = prefetch_factor
        self.loader = torch.utils.data.DataLoader(dataset, **kw)
        self.last_report = None

    def __iter__(self):
        yield from self.loader
        self.last_report = self.stats.report()
        logger.info(self.last_report)


def make_loader(urls, tokenizer="shapesworld", num_workers: int = 0, **dataset_kw) -> PairLoader:
    """Shortcut: ``PairLoader(PairDataset(urls, tokenizer, **dataset_kw), num_workers)``."""
    return PairLoader(PairDataset(urls, tokenizer, **dataset_kw), num_workers=num_workers)
