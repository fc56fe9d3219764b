"""Hard-negative mining and caption document frequencies over a streamed pool, in bounded memory.

Stage 2 mines each pair's hard negatives among the nearest neighbours of its embedding in a
large pool of training pairs (the paper: about a million) and never hides caption tokens
that occur in most captions (`solar.stage2.frequent_token_ids`).  On streamed shards the
pool is not held as pairs: it is the first `size` samples of the training shards, named by
a `PoolSource` (a recipe: urls, tokenizer, sizes), and

* `EmbeddingPool` holds only their embeddings (in `solar_kernels.Index` storage: fp16 gives
  N x D x 2 bytes) plus one int64 key hash per pair, sharded by rank: rank r of w holds the
  pairs at positions [N r / w, N (r + 1) / w).  Every R steps (`Stage2Config.refresh_every`)
  `refresh` re-reads this rank's share from the shards (decoding only it, see
  `solar.data.reader.iter_sample_range`) and embeds it with the current model in no-grad
  eval batches; the old bank is dropped first, so the peak is one bank plus one batch.
  `neighbours` searches every shard at once with the sharded search of `solar_kernels.Index`
  (global ids in rank order, which is position order, so ids and results do not depend on
  the number of ranks), excludes each query's own pair by key hash, and returns the stored
  embeddings of its hard negatives.  The loss treats mined negatives as constants (no
  gradient flows into them), so their stored embeddings are all it needs: nothing of a
  mined pair is re-read.
  Memory per rank: ceil(N / w) x (D x b + 8) bytes, b = 4 (fp32), 2 (fp16) or 1 + 8 / D
  (int8 codes, per-row scale and code sum); plus, while mining, the global batch's
  candidates (G x (k + 1) x D x 4 bytes for a global batch of G).
  Each stage-2 checkpoint holds every rank's share as written (`save_state`: the index file
  in its stored dtype, the key hashes, the ranks' sizes and the refresh step; the same bytes
  per rank, plus two file headers), and a resumed run restores it (`restore`) instead of
  re-embedding the pool with the resumed weights, so it mines the same negatives as an
  uninterrupted run until the next refresh.
* `DocFrequency` counts in how many captions each token id occurs, one batch at a time
  (unique (caption, id) pairs, bincount): memory O(vocabulary), never a caption x
  vocabulary matrix.  `pool_frequent_token_ids` runs it over the pool's captions in one
  caption-only pass (no image is decoded), each rank over its share, the counts summed.

The in-memory path (`solar.data.batches.PairBank`, ShapesWorld's default) keeps
`solar.stage2.Miner`, whose pool is a subset of the bank already in memory.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import solar_kernels as sk

from .checkpoint import read_tensors, write_tensors
from .data.reader import IMAGE_EXTENSIONS, iter_sample_range, make_loader
from .distributed import DistInfo, get_dist
from .logging import progress_bar
from .trainer import batch_to

__all__ = ["DocFrequency", "PoolSource", "EmbeddingPool", "key_hash", "pool_frequent_token_ids"]


# --------------------------------------------------------------------------- document frequencies

class DocFrequency:
    """Document frequency of token ids: in how many captions each id occurs, counted in batches.

    `update(input_ids, valid)` adds a batch of captions ([B, T] ids and content mask); each
    (caption, id) pair counts once however often the id repeats in that caption.  Memory is
    one int64 count per id up to the largest id seen; no caption x vocabulary matrix."""

    def __init__(self):
        self.counts = torch.zeros(0, dtype=torch.int64)
        self.documents = 0

    def update(self, input_ids: torch.Tensor, valid: torch.Tensor) -> None:
        """Count the captions of one batch (input_ids [B, T] int, valid [B, T] bool content tokens)."""
        if input_ids.dim() != 2 or input_ids.shape != valid.shape:
            raise ValueError(f"input_ids / valid: expected two [B, T] tensors, got {tuple(input_ids.shape)} "
                             f"and {tuple(valid.shape)}")
        ids, valid = input_ids.long().cpu(), valid.bool().cpu()
        self.documents += ids.shape[0]
        content = ids[valid]
        if content.numel() == 0:
            return
        if int(content.min()) < 0:
            raise ValueError(f"input_ids: expected ids >= 0 at content positions, got {int(content.min())}")
        width = int(content.max()) + 1
        rows = torch.arange(ids.shape[0])[:, None].expand_as(ids)[valid]
        pairs = torch.unique(rows * width + content)              # one entry per (caption, id)
        counts = torch.bincount(pairs % width, minlength=width)
        self._add(counts)

    def _add(self, counts: torch.Tensor) -> None:
        if len(counts) > len(self.counts):
            self.counts = torch.cat([self.counts, self.counts.new_zeros(len(counts) - len(self.counts))])
        self.counts[:len(counts)] += counts

    def all_reduce(self, group=None) -> None:
        """Sum the counts and caption numbers of every rank of `group` (every rank calls it)."""
        import torch.distributed as dist
        width = torch.tensor([len(self.counts)], dtype=torch.int64)
        dist.all_reduce(width, op=dist.ReduceOp.MAX, group=group)
        counts = torch.cat([self.counts, self.counts.new_zeros(int(width) - len(self.counts))])
        docs = torch.tensor([self.documents], dtype=torch.int64)
        dist.all_reduce(counts, group=group)
        dist.all_reduce(docs, group=group)
        self.counts, self.documents = counts, int(docs)

    def frequent(self, max_df: float) -> torch.Tensor:
        """Sorted int64 ids that occur in more than `max_df` of the captions (empty when
        max_df <= 0 or >= 1 or nothing was counted).  The share is computed in float32, as
        a float32 mean over a caption x id presence matrix would."""
        if not 0 < max_df < 1 or self.documents == 0:
            return torch.zeros(0, dtype=torch.long)
        df = self.counts.to(torch.float32) / self.documents
        return (df > max_df).nonzero().flatten()


def pool_frequent_token_ids(source: "PoolSource", valid_fn: Callable, max_df: float,
                            dist_info: Optional[DistInfo] = None, batch_size: int = 4096) -> torch.Tensor:
    """Token ids in more than `max_df` of the pool's captions, in one caption-only pass.

    valid_fn(input_ids, attention_mask) -> [B, T] bool content tokens (the model's
    `text_valid_mask`).  Each rank counts its share of the pool; the counts are summed, so
    every rank returns the same ids, equal to `solar.stage2.frequent_token_ids` over the
    pool's captions."""
    if not 0 < max_df < 1:
        return torch.zeros(0, dtype=torch.long)
    di = dist_info or get_dist()
    counter = DocFrequency()
    lo, hi = source.rank_range(di.rank, di.world)
    for ids, am in source.captions(lo, hi, batch_size):
        counter.update(ids, valid_fn(ids, am).cpu())
    if di.enabled:
        counter.all_reduce(_cpu_group(di))
    return counter.frequent(max_df)


# --------------------------------------------------------------------------- the pool

def key_hash(keys) -> torch.Tensor:
    """int64 [n]: a 64-bit hash (blake2b) of each sample key; the pool stores these, not strings."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(str(k).encode(), digest_size=8).digest(), "little",
                                        signed=True) for k in keys], dtype=torch.int64)


@dataclass
class PoolSource:
    """The mining pool of streamed training data: the first `size` samples of `urls` read in order.

    Holds no pairs, only how to read them (tokenizer, model input sizes, reader workers),
    so building one costs nothing; `EmbeddingPool` and `pool_frequent_token_ids` read it."""

    urls: list
    tokenizer: object
    size: int
    image_size: int
    patch_size: int
    max_length: int
    num_workers: int = 0
    mean: Optional[tuple] = None     # the vision tower's pixel normalisation (None: the reader's default)
    std: Optional[tuple] = None

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"stage2.mine_pool_size: streamed data needs a positive mining pool size, got "
                             f"{self.size}")

    def __len__(self) -> int:
        return self.size

    def rank_range(self, rank: int, world: int) -> tuple:
        """Positions [lo, hi) of rank `rank`'s share (contiguous, sizes differ by at most one)."""
        if not 0 <= rank < world:
            raise ValueError(f"rank: expected 0 <= rank < world={world}, got {rank}")
        return self.size * rank // world, self.size * (rank + 1) // world

    def loader(self, start: int, stop: int, batch_size: int):
        """A `PairLoader` of the decoded pairs at positions [start, stop) (center crop, in order)."""
        return make_loader(self.urls, self.tokenizer, num_workers=self.num_workers, image_size=self.image_size,
                           patch_size=self.patch_size, max_length=self.max_length, batch_size=batch_size,
                           sample_range=(start, stop), rank=0, world_size=1,
                           **({} if self.mean is None else {"mean": tuple(self.mean), "std": tuple(self.std)}))

    def captions(self, start: int, stop: int, batch_size: int):
        """(input_ids, attention_mask) batches of the captions at positions [start, stop), without
        decoding images (samples the reader would drop for a missing image or caption are skipped)."""
        import webdataset as wds

        buf = []
        for s in iter_sample_range(self.urls, start, stop, handler=wds.warn_and_continue):
            if not any(k in s for k in IMAGE_EXTENSIONS) or "txt" not in s:
                continue
            try:
                cap = s["txt"].decode("utf-8").strip()
            except (UnicodeDecodeError, AttributeError):
                continue
            if cap:
                buf.append(cap)
            if len(buf) == batch_size:
                yield self._tokenize(buf)
                buf = []
        if buf:
            yield self._tokenize(buf)

    def _tokenize(self, captions):
        enc = self.tokenizer(captions, padding="longest", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return enc["input_ids"].to(torch.int64), enc["attention_mask"].bool()

    def eval_batches(self, n_batches: int = 4, batch_size: int = 128):
        """The first `n_batches` batches of the pool when they carry ground-truth masks (stage 1's
        mask IoU), else None."""
        out = list(itertools.islice(self.loader(0, min(self.size, n_batches * batch_size), batch_size), n_batches))
        return out if out and "gt_patch_mask" in out[0] and "gt_token_mask" in out[0] else None


_GLOO_GROUPS: dict = {}


def _cpu_group(di: DistInfo):
    """A group that carries CPU tensors: the training group under gloo, else a gloo group over
    the same ranks (made once, on every rank at the same call: it is collective)."""
    import torch.distributed as dist
    if dist.get_backend(di.group) == "gloo":
        return di.group
    if id(di.group) not in _GLOO_GROUPS:
        _GLOO_GROUPS[id(di.group)] = dist.new_group(backend="gloo")
    return _GLOO_GROUPS[id(di.group)]


class EmbeddingPool:
    """Offline mining over a streamed pool that holds embeddings only (see the module docstring).

    The duck type of `solar.stage2.Miner`: `refresh(model, step)`, `self_rows(batch)` (here:
    the key hashes of the batch), `neighbours(f, self_rows, k)`, `refreshed_at`, `index`.
    `neighbours` is collective: every rank calls it with its share of the global batch.
    Counters: `refreshes`, `decoded` (pairs this rank decoded, all refreshes), `refresh_seconds`."""

    def __init__(self, source: PoolSource, *, dtype: str = "fp16", exclude_top: int = 0, chunk: int = 256,
                 dist_info: Optional[DistInfo] = None, progress: bool = True):
        self.source, self.dtype, self.exclude_top, self.chunk = source, dtype, exclude_top, chunk
        self.dist_info = dist_info or get_dist()
        self.progress = progress
        self.index: Optional[sk.Index] = None
        self.keys: Optional[torch.Tensor] = None      # int64 key hash of each local row
        self.sizes: list = []                         # rows held by each rank
        self.refreshed_at = -1
        self.refreshes = 0
        self.decoded = 0
        self.refresh_seconds: list = []

    @property
    def nbytes(self) -> int:
        """Bytes this rank holds for the pool: the index storage and the key hashes."""
        if self.index is None:
            return 0
        return self.index.nbytes + self.keys.numel() * self.keys.element_size()

    def __len__(self) -> int:
        return sum(self.sizes)

    @torch.no_grad()
    def refresh(self, model, step: int, dist_info: Optional[DistInfo] = None) -> None:
        """Re-embed this rank's share of the pool with `model` (eval mode, no grad) and rebuild
        its shard of the index; the previous bank is released first."""
        di = dist_info or self.dist_info
        t0 = time.perf_counter()
        self.index = self.keys = None
        lo, hi = self.source.rank_range(di.rank, di.world)
        keys = torch.empty(hi - lo, dtype=torch.int64)
        index, n = None, 0
        was_training = model.training
        model.eval()
        loader = self.source.loader(lo, hi, self.chunk)
        bar = progress_bar(desc="mining pool", unit="pair", total=hi - lo,
                           disable=not (self.progress and di.is_main), mininterval=1.0)
        try:
            for b in loader:
                e = model.embed(batch_to(b, di.device)).float()
                if index is None:
                    index = sk.Index(e.shape[1], dtype=self.dtype)
                    index.reserve(hi - lo)
                index.add(e.cpu())
                keys[n:n + len(e)] = key_hash(b["key"])
                n += len(e)
                bar.update(len(e))
        finally:
            bar.close()
            model.train(was_training)
        self.decoded += loader.stats.totals()["seen"]
        if index is None:   # an empty share: the rank still takes part in the sharded search
            index = sk.Index(model.cfg.embed_dim, dtype=self.dtype)
        self.index, self.keys = index, keys[:n]
        self.sizes = [n]
        if di.enabled:
            import torch.distributed as dist
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(di.world)]
            dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64), group=_cpu_group(di))
            self.sizes = [int(s) for s in sizes]
        self.refreshed_at = int(step)
        self.refreshes += 1
        self.refresh_seconds.append(time.perf_counter() - t0)
        if self.progress and di.is_main:
            print(f"[stage2] mining pool: {len(self)} pairs embedded at step {step} in "
                  f"{self.refresh_seconds[-1]:.1f} s ({self.nbytes / 2 ** 20:.1f} MiB on this rank)", flush=True)

    # ---- checkpoints: each rank writes and reads its own share

    INDEX_FILE, KEYS_FILE = "mining_pool.index", "mining_pool.safetensors"

    def _identity(self, di: DistInfo) -> dict:
        """What a saved share must match to be this rank's share of this pool."""
        return {"rank": di.rank, "world": di.world, "pool_size": len(self.source), "dtype": self.dtype}

    def save_state(self, folder: str) -> None:
        """Write this rank's share into `folder`: the index (`solar_kernels.Index.save`, its
        stored rows, CRC-checked, fsync'd, renamed into place) and a safetensors file with the
        key hashes, whose metadata holds the ranks' sizes, the refresh step and what the share
        belongs to (rank, world, pool size, dtype).  Nothing is written before the first refresh."""
        if self.index is None:
            return
        di = self.dist_info
        self.index.save(os.path.join(folder, self.INDEX_FILE))
        meta = {**self._identity(di), "sizes": list(self.sizes), "refreshed_at": int(self.refreshed_at)}
        write_tensors(os.path.join(folder, self.KEYS_FILE), {"keys": self.keys},
                      {"solar": "mining_pool", "state": json.dumps(meta, sort_keys=True)})

    def load_state(self, folder: Optional[str]) -> Optional[str]:
        """Install the share `save_state` wrote into `folder` (this rank only, not collective).
        Returns None when it was installed, else why not (no folder or files, or a share of
        another rank, world size, pool size or dtype); a corrupt file raises."""
        if folder is None:
            return "the checkpoint holds no pool share for this rank and world size"
        ipath, kpath = os.path.join(folder, self.INDEX_FILE), os.path.join(folder, self.KEYS_FILE)
        if not (os.path.isfile(ipath) and os.path.isfile(kpath)):
            return f"no pool share in {folder}"
        tensors, meta = read_tensors(kpath)
        state = json.loads(meta.get("state", "{}"))
        want = self._identity(self.dist_info)
        changed = {k: (state.get(k), v) for k, v in want.items() if state.get(k) != v}
        if changed:
            return "the saved share was written under other settings: " + ", ".join(
                f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
        index = sk.Index.load(ipath)
        keys, sizes = tensors["keys"], [int(n) for n in state["sizes"]]
        if not len(index) == len(keys) == sizes[self.dist_info.rank]:
            raise ValueError(f"{folder}: the pool share holds {len(index)} rows, {len(keys)} keys and sizes "
                             f"{sizes}: not one share")
        self.index, self.keys, self.sizes = index, keys, sizes
        self.refreshed_at = int(state["refreshed_at"])
        return None

    def restore(self, folder: Optional[str]) -> bool:
        """Collective (every rank calls it): install each rank's saved share (`load_state`); when
        any rank cannot, every rank drops its share, so that the next step re-embeds the pool
        on all ranks (said once, with the reason).  Returns whether the shares were restored."""
        di = self.dist_info
        why = self.load_state(folder)
        ok = why is None
        if di.enabled:
            import torch.distributed as dist
            flag = torch.tensor([int(ok)], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=_cpu_group(di))
            ok = bool(flag.item())
        if not ok:
            self.index = self.keys = None
            self.sizes = []
            if di.is_main:
                print(f"[stage2] mining pool not restored ({why or 'another rank could not'}): it is embedded "
                      f"again with the resumed weights", flush=True)
        return ok

    def self_rows(self, batch: dict) -> torch.Tensor:
        """The key hash of each pair of `batch` (its own pool entry is never its negative)."""
        if "key" not in batch:
            raise ValueError("batch: streamed mining needs the sample keys ('key'), got none")
        return key_hash(batch["key"])

    @torch.no_grad()
    def neighbours(self, f: torch.Tensor, self_rows: torch.Tensor, k: int) -> torch.Tensor:
        """[B, k, E] stored embeddings of each row's k nearest pool pairs, its own pair and the
        first `exclude_top` others skipped (f [B, E]: this rank's rows of the global batch)."""
        if self.index is None:
            raise RuntimeError("EmbeddingPool.neighbours: call refresh() first")
        di = self.dist_info
        want = min(len(self), k + 1 + self.exclude_top)
        if want < k + 1:
            raise ValueError(f"mine_k: {k} neighbours need a pool of at least {k + 1} pairs, have {len(self)}")
        q, own = f.detach().float().cpu().contiguous(), self_rows.long().cpu()
        B = q.shape[0]
        if di.enabled:
            import torch.distributed as dist
            group = _cpu_group(di)
            qs = [torch.empty_like(q) for _ in range(di.world)]
            owns = [torch.empty_like(own) for _ in range(di.world)]
            dist.all_gather(qs, q, group=group)
            dist.all_gather(owns, own, group=group)
            q, own = torch.cat(qs), torch.cat(owns)
            _, ids = self.index.search(q, want, process_group=group)
        else:
            _, ids = self.index.search(q, want)
        # each rank fills the candidates it holds; a sum over ranks assembles them
        lo = sum(self.sizes[:di.rank])
        mine = (ids >= lo) & (ids < lo + len(self.index))
        local = ids[mine] - lo
        rows = torch.zeros(*ids.shape, self.index.dim)
        hashes = torch.zeros(ids.shape, dtype=torch.int64)
        rows[mine] = self.index.reconstruct(local)
        hashes[mine] = self.keys[local]
        if di.enabled:
            dist.all_reduce(rows, group=group)
            dist.all_reduce(hashes, group=group)
            rows, hashes, own = (x[di.rank * B:(di.rank + 1) * B] for x in (rows, hashes, own))
        keep = hashes != own[:, None]
        rank = keep.long().cumsum(1)
        sel = keep & (rank > self.exclude_top) & (rank <= self.exclude_top + k)
        if not bool((sel.sum(1) == k).all()):   # a pool where one key repeats more than `want` allows
            raise ValueError(f"mine_k: fewer than {k} pool pairs other than the query itself among its "
                             f"{want} nearest (duplicate sample keys in the pool?)")
        return rows[sel].view(B, k, -1).to(f.device, f.dtype)
