"""The training loop shared by stage 2 and the CLIP-SF baseline.

- `PairBank`: training pairs decoded once and kept in memory (small data such as
  ShapesWorld); batch `step` is a pure function of (seed, step), split by rank, so a
  resumed run sees exactly the batches an uninterrupted run would have seen.
- `StreamBatches`: the same interface over a streaming loader (real webdataset shards);
  on resume it skips the batches already consumed.
- `train_loop`: AdamW + linear warm-up + cosine decay, gradient clipping, DDP over the
  given loss module, tqdm progress (loss, pairs/s), JSONL metrics, periodic checkpoints
  (model + optimizer + RNG states, safetensors + json, no pickle) and exact resume.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Optional

import torch
from torch import nn

from .checkpoint import CheckpointError, load_training_state, save_training_state
from .distributed import DistInfo, barrier

__all__ = ["PairBank", "StreamBatches", "lr_at", "train_loop", "save_train_state", "load_train_state",
           "CheckpointError", "batch_to"]


def batch_to(batch: dict, device) -> dict:
    """Move the tensors of a batch dict to `device` (other values unchanged)."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


# --------------------------------------------------------------------------- data

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
        """The pairs at indices `idx` as a batch dict."""
        out = {}
        for k, v in self.fields.items():
            if torch.is_tensor(v):
                out[k] = v[idx]
            else:
                out[k] = [v[int(i)] for i in idx]
        out["bank_index"] = idx.clone()
        return out

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
    """Batches from a streaming loader (an iterable of batch dicts), resumable by skipping."""

    def __init__(self, make_loader: Callable[[], object]):
        self.make_loader = make_loader
        self._it = None
        self._pos = 0

    def batch(self, step: int, global_batch: int = 0, rank: int = 0, world: int = 1) -> dict:
        if self._it is None or step < self._pos:
            self._it, self._pos = iter(self.make_loader()), 0
        while True:
            try:
                b = next(self._it)
            except StopIteration:
                self._it = iter(self.make_loader())
                b = next(self._it)
            self._pos += 1
            if self._pos > step:
                return b


# --------------------------------------------------------------------------- optimisation

def lr_at(step: int, *, lr: float, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to `lr` over `warmup` steps, then cosine decay to lr*min_ratio."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, steps - warmup)
    t = min(1.0, (step - warmup) / span)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with no decay on biases, norms and 1-d parameters."""
    decay, no_decay = [], []
    for p in params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


# --------------------------------------------------------------------------- checkpoints

def save_train_state(path: str, *, model, step: int, optimizer, generators: dict, extra: Optional[dict] = None,
                     extra_tensors: Optional[dict] = None) -> None:
    """Model + optimizer + RNG states + the step + caller state (json-able `extra`, tensors
    `extra_tensors`) through `solar.checkpoint.save_training_state` (safetensors + json, no
    pickle, written atomically)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for name, g in generators.items():
        tensors[f"gen.{name}"] = g.get_state()
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra.{k}"] = v.detach().cpu().contiguous()
    save_training_state(path, model, optimizer, {"step": int(step), "extra": extra or {},
                                                 "format": "solar-train-state-v1"}, tensors)


def load_train_state(path: str, *, model, optimizer, generators: dict) -> dict:
    """Restore what `save_train_state` wrote (model in place, optimizer, RNG streams).

    Returns {"step", "extra", "extra_tensors"}; raises CheckpointError (naming the path)
    for a missing, incomplete or corrupt checkpoint."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint: {path!r} does not exist or is not a directory")
    meta, tensors = load_training_state(path, model, optimizer)
    if not isinstance(meta, dict) or meta.get("format") != "solar-train-state-v1":
        raise CheckpointError(f"checkpoint: {path!r} was not written by solar's training loop")
    if "rng.torch" not in tensors:
        raise CheckpointError(f"checkpoint: {path!r} lacks the RNG state")
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    for name, g in generators.items():
        key = f"gen.{name}"
        if key not in tensors:
            raise CheckpointError(f"checkpoint: {path!r} lacks generator state {name!r}")
        g.set_state(tensors[key])
    return {"step": int(meta["step"]), "extra": meta.get("extra", {}),
            "extra_tensors": {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}}


# --------------------------------------------------------------------------- the loop

class _Unwrap(nn.Module):
    """Lets DDP wrap an arbitrary loss callable whose parameters live in `module`."""

    def __init__(self, module: nn.Module, loss_fn: Callable):
        super().__init__()
        self.module = module
        self._loss_fn = loss_fn

    def forward(self, batch, step):
        return self._loss_fn(batch, step)


def train_loop(*, name: str, model: nn.Module, loss_fn: Callable, data, steps: int, global_batch: int,
               lr: float, warmup: int, min_lr_ratio: float, weight_decay: float, grad_clip: float,
               out_dir: str, resume: bool, log, dist_info: DistInfo, ckpt_every: int, log_every: int,
               generators: Optional[dict] = None, on_step: Optional[Callable[[int], None]] = None,
               progress: bool = True, extra_state: Optional[Callable[[], tuple]] = None,
               restore_extra: Optional[Callable[[dict, dict], None]] = None) -> dict:
    """Run `steps` optimizer steps of `loss_fn(batch, step) -> (loss, metrics)` on `model`.

    `on_step(step)` runs before each step (e.g. re-mining); `extra_state() -> (json dict,
    tensor dict)` is saved with each checkpoint and handed back to
    `restore_extra(json, tensors)` on resume.
    Checkpoints go to {out_dir}/ckpt (latest, replaced atomically); with `resume` the
    loop continues from there (the same batches, RNG streams and optimizer state as an
    uninterrupted run). Returns {"step", "loss", "seconds"}.
    """
    from .logging import progress_bar

    generators = generators or {}
    device = dist_info.device
    ckpt = os.path.join(out_dir, "ckpt")
    opt = make_optimizer(model.parameters(), lr, weight_decay)
    start = 0
    if resume and os.path.isdir(ckpt):
        meta = load_train_state(ckpt, model=model, optimizer=opt, generators=generators)
        start = int(meta["step"])
        if restore_extra is not None:
            restore_extra(meta.get("extra", {}), meta.get("extra_tensors", {}))
    elif resume and dist_info.is_main:
        print(f"[{name}] --resume: no checkpoint in {ckpt!r}, starting from step 0")
    wrapped = _Unwrap(model, loss_fn)
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped = DDP(wrapped, device_ids=[device.index] if device.type == "cuda" else None,
                      find_unused_parameters=True, broadcast_buffers=False)
    model.train()
    bar = progress_bar(total=steps, initial=start, desc=name, disable=not (progress and dist_info.is_main),
               dynamic_ncols=True, mininterval=1.0)
    t0 = time.time()
    seen = 0
    last_loss = float("nan")
    for step in range(start, steps):
        if on_step is not None:
            on_step(step)
        cur_lr = lr_at(step, lr=lr, steps=steps, warmup=warmup, min_ratio=min_lr_ratio)
        for gi, g in enumerate(opt.param_groups):
            g["lr"] = cur_lr
        batch = batch_to(data.batch(step, global_batch, dist_info.rank, dist_info.world), device)
        loss, metrics = wrapped(batch, step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"[{name}] non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        # the losses are solar_kernels' global-batch losses: each rank's gradient is its share
        # of d(global loss); DDP averages over ranks, so scale by the world size to get the sum
        (loss * dist_info.world if dist_info.enabled else loss).backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        opt.step()
        seen += global_batch
        last_loss = float(loss.item())   # already the global-batch loss on every rank
        rate = seen / max(1e-9, time.time() - t0)
        bar.set_postfix(loss=f"{last_loss:.4f}", pairs_s=f"{rate:.0f}", lr=f"{cur_lr:.1e}", refresh=False)
        bar.update(1)
        done = step + 1
        if log is not None and (done % max(1, log_every) == 0 or done == steps):
            row = {"loss": last_loss, "lr": cur_lr, "grad_norm": float(gnorm), "pairs_per_s": rate}
            row.update({k: float(v) for k, v in (metrics or {}).items()})
            log(row, stage=name, step=done)
        if ckpt_every > 0 and (done % ckpt_every == 0 or done == steps):
            if dist_info.is_main:
                ex, ext = extra_state() if extra_state else ({}, {})
                save_train_state(ckpt, model=model, step=done, optimizer=opt, generators=generators,
                                 extra=ex, extra_tensors=ext)
            barrier()
    bar.close()
    return {"step": steps, "loss": last_loss, "seconds": time.time() - t0}
