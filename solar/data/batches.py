"""Training data as the loop sees it: `data.batch(step, global_batch, rank, world) -> dict`.

- `PairBank`: training pairs decoded once and kept in memory (small data such as
  ShapesWorld); batch `step` is a pure function of (seed, step), split by rank, so a
  resumed run sees exactly the batches an uninterrupted run would have seen.  Batches come
  out with float32 pixels and text trimmed to the longest caption of the batch.
- `StreamBatches`: the same interface over a streaming loader (real webdataset shards); it
  reports its position (`state_dict`) so a resumed run continues from the same batch (from
  the readers' shard and sample offsets when the loader is seekable).
- `ShardStreams`: makes one `StreamBatches` per phase over the training shards, split by rank.
- `load_pair_bank`: decode shards once into a `PairBank`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["PairBank", "StreamBatches", "ShardStreams", "load_pair_bank", "float_pixels"]


def float_pixels(b: dict) -> dict:
    """`b` with float32 pixels and its text columns trimmed to the last one any row uses
    (captions are short; the banks keep them padded to max_text_len)."""
    if "pixel_values" in b and b["pixel_values"].dtype != torch.float32:
        b["pixel_values"] = b["pixel_values"].float()
    if "attention_mask" in b:
        am = b["attention_mask"]
        used = am.any(0).nonzero()
        t = int(used.max()) + 1 if len(used) else am.shape[1]
        for k in ("input_ids", "attention_mask", "gt_token_mask"):
            if k in b:
                b[k] = b[k][:, :t]
    return b


class PairBank:
    """Training pairs held in memory as padded tensors, with deterministic batching.

    fields: dict of tensors with a common first dim n (pixel_values, input_ids,
    attention_mask, optional gt masks); other per-pair values (keys) as lists.
    Batch `step` of an epoch is rows perm[(step % spe) * G : ...] of a permutation drawn
    from a generator seeded with (seed, epoch); rank r takes its contiguous share of the
    global batch G."""

    def __init__(self, fields: dict, seed: int = 0):
        n = None
        for k, v in fields.items():
            m = v.shape[0] if torch.is_tensor(v) else len(v)
            if n is None:
                n = m
            elif m != n:
                raise ValueError(f"PairBank: field {k!r} has {m} rows, expected {n}")
        if not n:
            raise ValueError("PairBank: no training pairs")
        self.fields = fields
        self.n = n
        self.seed = seed
        self._perm_cache = {}

    def __len__(self):
        return self.n

    def rows(self, idx: torch.Tensor) -> dict:
        """The pairs at indices `idx` as a batch dict (float32 pixels, trimmed text)."""
        out = {}
        for k, v in self.fields.items():
            if torch.is_tensor(v):
                out[k] = v[idx]
            else:
                out[k] = [v[int(i)] for i in idx]
        out["bank_index"] = idx.clone()
        return float_pixels(out)

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm_cache = {epoch: torch.randperm(self.n, generator=g)}
        return self._perm_cache[epoch]

    def global_indices(self, step: int, global_batch: int) -> torch.Tensor:
        """Indices of global batch `step` (batches never straddle epochs)."""
        if global_batch > self.n:
            raise ValueError(f"batch_size: global batch {global_batch} is larger than the {self.n} training pairs")
        spe = self.n // global_batch
        epoch, j = divmod(step, spe)
        return self._perm(epoch)[j * global_batch:(j + 1) * global_batch]

    def batch(self, step: int, global_batch: int, rank: int = 0, world: int = 1) -> dict:
        """This rank's share of global batch `step`."""
        if global_batch % world:
            raise ValueError(f"batch_size: global batch {global_batch} is not divisible by the world size {world}")
        idx = self.global_indices(step, global_batch)
        per = global_batch // world
        return self.rows(idx[rank * per:(rank + 1) * per])

    def iter_chunks(self, chunk: int, rank: int = 0, world: int = 1):
        """All pairs in order, in chunks (this rank's strided share when world > 1)."""
        idx = torch.arange(rank, self.n, world)
        for s in range(0, len(idx), chunk):
            yield self.rows(idx[s:s + chunk])


class StreamBatches:
    """Batches from a streaming loader (an iterable of batch dicts, re-iterated when exhausted).

    Asked for step s, it returns the s-th batch of the stream.  `state_dict()` is the stream's
    position after the last batch returned (json-able); a fresh object given it with
    `load_state_dict` continues there:

    - seekable (`make_loader(start)` takes a position, as `ShardStreams`' readers do): the
      loader starts at the position, so no consumed batch is read or decoded again;
    - otherwise (`make_loader()`): it reads the batches before s again and throws them away.

    `skipped` counts batches read and thrown away."""

    def __init__(self, make_loader: Callable, *, seekable: bool = False, num_workers: int = 0):
        self.make_loader = make_loader
        self.seekable, self.num_workers = seekable, num_workers
        self._it = None
        self._pos = 0
        self._stream = None        # the reader position after batch _pos - 1 (seekable)
        self._resume = None        # a state given to load_state_dict, used by the next (re)start
        self.skipped = 0

    def state_dict(self) -> dict:
        """{"step": batches consumed, "stream": the reader position (None unless seekable)}."""
        return {"step": self._pos, "stream": self._stream}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (a `state_dict()`) when next asked for a step at or after it."""
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError(f"state: expected a StreamBatches.state_dict(), got {state!r}")
        self._resume = state
        self._it = None

    def _restart(self, step: int) -> None:
        r = self._resume
        workers = max(1, self.num_workers)
        if (self.seekable and r is not None and isinstance(r.get("stream"), dict) and int(r["step"]) <= step
                and r["stream"].get("workers") == workers):
            self._pos, self._stream = int(r["step"]), r["stream"]
            self._it = iter(self.make_loader(self._stream))
        else:
            self._pos, self._stream = 0, None
            self._it = iter(self.make_loader(None) if self.seekable else self.make_loader())

    def batch(self, step: int, global_batch: int = 0, rank: int = 0, world: int = 1) -> dict:
        """Batch number `step` of the stream (the loader is already this rank's share)."""
        if self._it is None or step < self._pos:
            self._restart(step)
        while True:
            try:
                b = next(self._it)
            except StopIteration:
                self._it, self._stream = iter(self.make_loader(None) if self.seekable else self.make_loader()), None
                try:
                    b = next(self._it)
                except StopIteration:
                    raise ValueError("data: the training loader yielded no batches") from None
            if self.seekable:
                from .reader import advance_state
                self._stream = advance_state(self._stream, b.pop("stream_position").tolist(), self.num_workers)
            self._pos += 1
            if self._pos > step:
                return b
            self.skipped += 1


class ShardStreams:
    """Streaming training data (real shards): one reader per phase, split by rank and by
    DataLoader worker (`solar.data.reader`), each rank reading global_batch / world pairs
    per step.  Its streams are seekable: resume continues from the recorded shard and sample
    offset of every reader, without decoding the batches already consumed."""

    def __init__(self, urls, tokenizer, *, image_size: int, patch_size: int, max_length: int, num_workers: int,
                 seed: int, rank: int = 0, world: int = 1, mean=None, std=None):
        self.urls, self.tokenizer = urls, tokenizer
        self.norm = {} if mean is None else {"mean": tuple(mean), "std": tuple(std)}   # the vision tower's own
        self.image_size, self.patch_size, self.max_length = image_size, patch_size, max_length
        self.num_workers, self.seed, self.rank, self.world = num_workers, seed, rank, world

    def make(self, global_batch: int, salt: int, start: Optional[dict] = None):
        """A loader of this rank's share of each global batch (seeded by `salt` per phase),
        continuing from reader position `start` (None: the beginning)."""
        from .reader import make_loader
        if global_batch % self.world:
            raise ValueError(f"batch_size: global batch {global_batch} is not divisible by the world size "
                             f"{self.world}")
        return make_loader(self.urls, self.tokenizer, num_workers=self.num_workers, image_size=self.image_size,
                           patch_size=self.patch_size, max_length=self.max_length,
                           batch_size=global_batch // self.world, drop_last=True, shuffle_buffer=2000,
                           shard_shuffle=True, seed=self.seed * 1000 + salt, rank=self.rank,
                           world_size=self.world, crop="random", repeat=True, positions=True, start=start,
                           **self.norm)

    def phase(self, global_batch: int, salt: int) -> StreamBatches:
        """The batches of one phase (`salt` tells the phases' shuffles apart)."""
        return StreamBatches(lambda start: self.make(global_batch, salt, start), seekable=True,
                             num_workers=self.num_workers)


def load_pair_bank(urls, tokenizer, *, image_size: int, patch_size: int, max_length: int, seed: int,
                   num_workers: int = 0, limit: int = 0, progress: bool = True, mean=None, std=None) -> PairBank:
    """Decode every training pair of `urls` once (the first `limit` when > 0) into a `PairBank`
    whose batch order is seeded by `seed` (pixels kept as float16, returned as float32;
    normalised with `mean` / `std`, default CLIP's)."""
    from ..logging import progress_bar
    from .reader import make_loader
    loader = make_loader(urls, tokenizer, image_size=image_size, patch_size=patch_size, max_length=max_length,
                         batch_size=500, pad_to_max_length=True, rank=0, world_size=1, num_workers=num_workers,
                         **({} if mean is None else {"mean": tuple(mean), "std": tuple(std)}))
    fields: dict = {}
    n = 0
    bar = progress_bar(desc="load pairs", unit="pair", disable=not progress, total=limit or None)
    for b in loader:
        for k, v in b.items():
            if k == "pixel_values":
                v = v.half()
            fields.setdefault(k, []).append(v)
        n += len(b["key"])
        bar.update(len(b["key"]))
        if limit and n >= limit:
            break
    bar.close()
    stats = loader.stats.totals()
    if progress or stats["skipped"]:  # what the reader dropped reaches the user, not only its logger
        print(f"[data] {loader.stats.report()}", flush=True)
    if n == 0:
        raise ValueError(f"data: no readable pairs in {len(urls)} shard(s) (first: {urls[0] if urls else None!r}); "
                         f"{loader.stats.report()}")
    out = {}
    for k, parts in fields.items():
        out[k] = torch.cat(parts) if torch.is_tensor(parts[0]) else [x for p in parts for x in p]
    if limit:
        out = {k: v[:limit] for k, v in out.items()}
    bank = PairBank(out, seed=seed)
    bank.reader_stats = stats
    return bank

