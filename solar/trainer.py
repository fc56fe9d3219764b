"""The one training loop of every phase (stage 1, stage 2, the CLIP-SF baseline).

A `Phase` is a loss module over a model plus its data and its optimisation settings;
`train_loop(phase, ...)` runs it and gives every phase the same features:

- AdamW with per-parameter-group learning rates (`Phase.lr_scales`: a name prefix -> lr
  multiplier, e.g. the towers vs the layers trained from scratch), linear warm-up + cosine
  decay (`lr_at`), gradient clipping;
- DDP on every phase (gradient all-reduce overlaps the backward pass).  The losses are
  solar_kernels' global-batch losses (every rank holds the global value, its gradient is the
  rank's share), so the loop multiplies by the world size to turn DDP's mean into the sum;
- precision "bf16": the loss forward under bf16 autocast (CUDA or CPU) and TF32 for fp32
  matmuls on CUDA; "fp32" leaves everything in fp32;
- activation checkpointing of the towers and of E_VL (`SolarModel.set_activation_checkpointing`);
- gradient accumulation over micro-batches in the GradCache scheme: the loss module splits
  into `embed(batch) -> dict of tensors` and `loss_from(batch, embeddings, step)`; the
  micro-batches are embedded without a graph, the loss runs once over the whole batch (the
  contrastive losses keep every in-batch negative), and each micro-batch is embedded again
  with its slice of the embedding gradients (RNG state replayed, so dropout matches);
- metrics per log interval: interval means of the loss and of the phase's metrics, step
  time, data-wait time, pairs/s, and on CUDA the peak memory and an achieved TFLOP/s
  estimate (torch's FLOP counter over the first step).  Losses stay on the device and are
  read once per interval, never with a per-step `.item()`; a non-finite loss is raised at
  the end of its interval (and before any checkpoint is written);
- checkpoints ({out_dir}/ckpt): model, optimizer (with its per-group lr scales), RNG states
  (torch, CUDA, the phase's generators) and the step, written to a temporary name and
  renamed; with `resume` the loop continues from there with the same batches and RNG
  streams as an uninterrupted run.  The data position: a `PairBank`'s batch s is a pure
  function of s; data with `state_dict()` / `load_state_dict()` (`StreamBatches`) has every
  rank's state saved with the checkpoint (gathered to rank 0), so a seekable stream continues
  from its readers' shard and sample offsets without decoding the consumed batches.
  State that each rank holds a different share of (`Phase.rank_state`: the streamed mining
  pool's embeddings) is written by every rank into the checkpoint's ``ranks/<r>/`` and read
  back by the same rank on resume, so no rank ever holds another's share;
  bf16 needs no loss scaler, so there is no scaler state to save.

With micro_batches > 1 the step is not wrapped in DDP (its hooks would all-reduce once per
micro-batch); the loop broadcasts rank 0's weights at the start and sums the gradients over
the ranks itself after the last micro-batch.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .checkpoint import (CheckpointError, fsync_path, load_training_state, rank_state_dir, recover_interrupted_save,
                         save_training_state, sha256_file)
from .distributed import DistInfo, barrier
from .logging import progress_bar

__all__ = ["OptimSpec", "Phase", "LoopOptions", "train_loop", "lr_at", "make_optimizer", "save_train_state",
           "load_train_state", "batch_to", "split_batch", "broadcast_params", "clip_order", "CheckpointError"]


def batch_to(batch: dict, device) -> dict:
    """Move the tensors of a batch dict to `device` (other values unchanged)."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def split_batch(batch: dict, parts: int) -> list:
    """`batch` cut into `parts` consecutive micro-batches of equal size (tensors and lists)."""
    n = len(batch["input_ids"]) if "input_ids" in batch else len(next(iter(batch.values())))
    if parts < 1 or n % parts:
        raise ValueError(f"micro_batches: {parts} does not divide this rank's batch of {n} pairs")
    m = n // parts
    return [{k: v[i * m:(i + 1) * m] for k, v in batch.items()} for i in range(parts)]


# --------------------------------------------------------------------------- settings

@dataclass
class OptimSpec:
    """AdamW and its schedule for one phase.  `decay_1d`: also apply weight decay to biases,
    norms and other 1-d parameters (stage 1 does, as it always did)."""

    lr: float
    warmup: int
    weight_decay: float
    grad_clip: float
    min_lr_ratio: float = 0.1
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    decay_1d: bool = False


@dataclass
class Phase:
    """One training phase: `loss(batch, step) -> (loss, metrics)` over `model`'s parameters.

    data: `.batch(step, global_batch, rank, world) -> dict` (solar.data.batches).
    lr_scales: parameter-name prefix -> lr multiplier (the first matching prefix wins; others 1).
    generators: torch.Generators the loss draws from, saved and restored with checkpoints.
    on_step(step): runs before each step (e.g. re-mining).  after_step(done) -> dict or None:
    runs after each step on every rank; a dict returned is logged (e.g. an evaluation).
    extra_state() -> (json dict, tensor dict) is saved with each checkpoint (rank 0's) and handed
    back to restore_extra(json, tensors) on resume.  rank_state(folder) runs on every rank at each
    checkpoint and writes that rank's own files into `folder` (fsync'd); on resume
    restore_rank_state(folder or None) runs on every rank with the folder this rank wrote (None
    when the checkpoint has none or was written by another number of ranks)."""

    name: str
    model: nn.Module
    loss: Callable
    data: object
    steps: int
    global_batch: int
    optim: OptimSpec
    lr_scales: dict = field(default_factory=dict)
    ckpt_every: int = 100
    log_every: int = 10
    generators: dict = field(default_factory=dict)
    on_step: Optional[Callable[[int], None]] = None
    after_step: Optional[Callable[[int], Optional[dict]]] = None
    extra_state: Optional[Callable[[], tuple]] = None
    restore_extra: Optional[Callable[[dict, dict], None]] = None
    rank_state: Optional[Callable[[str], None]] = None
    restore_rank_state: Optional[Callable[[Optional[str]], None]] = None


@dataclass
class LoopOptions:
    """What the run asks of the loop (RunConfig's precision / activation_checkpointing /
    micro_batches).  count_flops: estimate TFLOP/s from the first step (default: on CUDA)."""

    precision: str = "fp32"
    activation_checkpointing: bool = False
    micro_batches: int = 1
    progress: bool = True
    count_flops: Optional[bool] = None

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision: expected 'fp32' or 'bf16', got {self.precision!r}")
        if not isinstance(self.micro_batches, int) or self.micro_batches < 1:
            raise ValueError(f"micro_batches: expected an int >= 1, got {self.micro_batches!r}")


# --------------------------------------------------------------------------- optimisation

def lr_at(step: int, *, lr: float, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to `lr` over `warmup` steps, then cosine decay to lr*min_ratio."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, steps - warmup)
    t = min(1.0, (step - warmup) / span)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model: nn.Module, spec: OptimSpec, lr_scales: Optional[dict] = None) -> torch.optim.Optimizer:
    """AdamW over `model`'s trainable parameters, one group per (lr scale, decay) pair; each
    group carries its "lr_scale" (the loop sets lr = scheduled lr * lr_scale)."""
    lr_scales = dict(lr_scales or {})
    for prefix, s in lr_scales.items():
        if not isinstance(s, (int, float)) or s < 0:
            raise ValueError(f"lr_scales: the scale of {prefix!r} must be a number >= 0, got {s!r}")
    groups: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((float(s) for pre, s in lr_scales.items() if name.startswith(pre)), 1.0)
        decay = spec.decay_1d or p.ndim >= 2
        groups.setdefault((scale, decay), []).append(p)
    if not groups:
        raise ValueError("model: no trainable parameters")
    param_groups = [{"params": ps, "lr": spec.lr * scale, "lr_scale": scale,
                     "weight_decay": spec.weight_decay if decay else 0.0}
                    for (scale, decay), ps in groups.items()]
    return torch.optim.AdamW(param_groups, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps)


def clip_order(model: nn.Module, opt: torch.optim.Optimizer, lr_scales: Optional[dict] = None) -> list:
    """The optimizer's parameters in a fixed order: those trained at the base lr (no lr_scales
    prefix) first, then the prefixed ones, each in model order.  Gradient clipping and the
    all-reduce use it, so the global gradient norm is summed in the same order as in one
    process and as before per-group learning rates (the last bits of the norm depend on it)."""
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    prefixes = tuple(lr_scales or ())
    named = [(n, p) for n, p in model.named_parameters() if id(p) in ids]
    return [p for n, p in named if not (prefixes and n.startswith(prefixes))] + \
        [p for n, p in named if prefixes and n.startswith(prefixes)]


# --------------------------------------------------------------------------- checkpoints

def save_train_state(path: str, *, model, step: int, optimizer, generators: dict, extra: Optional[dict] = None,
                     extra_tensors: Optional[dict] = None, run: Optional[dict] = None,
                     data: Optional[list] = None, rank_dir: Optional[str] = None,
                     rank_sha256: Optional[dict] = None) -> None:
    """Model + optimizer + RNG states + the step + caller state (json-able `extra`, tensors
    `extra_tensors`) + the run's settings (`run`, see `run_spec`; checked on resume) + the data
    position of every rank (`data`, json-able, one entry per rank) + the ranks' own files
    (`rank_dir`, see `_write_rank_state`) through `solar.checkpoint.save_training_state`
    (safetensors + json, no pickle, written to a temporary name and renamed)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for name, g in generators.items():
        tensors[f"gen.{name}"] = g.get_state()
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra.{k}"] = v.detach().cpu().contiguous()
    meta = {"step": int(step), "extra": extra or {}, "run": run or {}, "format": "solar-train-state-v1"}
    if data is not None:
        meta["data"] = data
    save_training_state(path, model, optimizer, meta, tensors, rank_dir=rank_dir, rank_sha256=rank_sha256)


def load_train_state(path: str, *, model, optimizer, generators: dict) -> dict:
    """Restore what `save_train_state` wrote (model in place, optimizer, RNG streams).

    Returns {"step", "extra", "run", "data", "extra_tensors"} ("data": the ranks' data positions
    or None); raises CheckpointError (naming the path)
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
    return {"step": int(meta["step"]), "extra": meta.get("extra", {}), "run": meta.get("run", {}),
            "data": meta.get("data"),
            "extra_tensors": {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}}


def run_spec(phase: "Phase") -> dict:
    """The settings a checkpoint of `phase` was written under (json-able), checked on resume."""
    return {"steps": int(phase.steps), "global_batch": int(phase.global_batch),
            "optim": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(phase.optim).items()},
            "lr_scales": dict(phase.lr_scales)}


def check_resume(path: str, step: int, saved: dict, now: dict, name: str) -> list:
    """Refuse a checkpoint past this run's last step (its model would be written under the
    run's smaller step count); return a warning line per setting that changed since it was
    written (changing the lr, batch or schedule on resume is allowed, never silent).  Model
    shape changes are refused by the strict state-dict load."""
    if step > now["steps"]:
        raise CheckpointError(f"checkpoint: {path!r} is at step {step}, past this run's {name} steps = "
                              f"{now['steps']}; resume with at least {step} steps or start a new run directory")
    changed = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                        if a.get(k) != b.get(k)]
        elif a != b and key in saved:
            changed.append(f"{key}: {a!r} -> {b!r}")
    return changed


# --------------------------------------------------------------------------- one step

class _Step(nn.Module):
    """What DDP wraps: the phase's loss over the model, with autocast and micro-batching."""

    def __init__(self, model: nn.Module, loss_fn: Callable, autocast):
        super().__init__()
        self.module = model
        self._loss_fn = loss_fn
        self._autocast = autocast

    def forward(self, batch, step):
        """(loss, metrics) of the phase's loss on `batch` under the run's autocast."""
        with self._autocast():
            return self._loss_fn(batch, step)


class _RandState:
    """The CPU (and CUDA) RNG state at construction, to replay a micro-batch's forward."""

    def __init__(self, device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self):
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def _grad_cache_step(loss_fn, batch: dict, step: int, parts: int, autocast, device, scale: float):
    """One GradCache step: embed micro-batches without a graph, the loss over the whole batch,
    then each micro-batch again with its slice of the embedding gradients.  Returns
    (loss, metrics); gradients are accumulated into the parameters (times `scale`)."""
    if not (hasattr(loss_fn, "embed") and hasattr(loss_fn, "loss_from")):
        raise ValueError(f"micro_batches: {type(loss_fn).__name__} has no embed / loss_from split, so it "
                         f"cannot be accumulated over micro-batches")
    micro = split_batch(batch, parts)
    states, reps = [], []
    with torch.no_grad():
        for mb in micro:
            states.append(_RandState(device))
            with autocast():
                reps.append(loss_fn.embed(mb))
    keys = list(reps[0])
    full = {k: torch.cat([r[k] for r in reps]).detach().requires_grad_() for k in keys}
    with autocast():
        loss, metrics = loss_fn.loss_from(batch, full, step)
    (loss * scale).backward()
    after = _RandState(device)
    m = len(micro[0]["input_ids"])
    for i, (mb, st) in enumerate(zip(micro, states)):
        st.restore()
        with autocast():
            r = loss_fn.embed(mb)
        outs = [r[k] for k in keys if full[k].grad is not None]
        grads = [full[k].grad[i * m:(i + 1) * m] for k in keys if full[k].grad is not None]
        if outs:
            torch.autograd.backward(outs, grads)
    after.restore()
    return loss, metrics


# --------------------------------------------------------------------------- the loop

def _interval_row(acc: dict, n: int) -> dict:
    """Interval means of the accumulated metrics, read from the device in one transfer."""
    tens = {k: v for k, v in acc.items() if torch.is_tensor(v)}
    row = {k: v / n for k, v in acc.items() if isinstance(v, (int, float))}
    if tens:
        dev = next(iter(tens.values())).device
        vals = torch.stack([v.float().reshape(()).to(dev) for v in tens.values()]).tolist()
        row.update({k: x / n for k, x in zip(tens, vals)})
    return row


def _accumulate(acc: dict, last: dict, metrics: dict) -> None:
    for k, v in metrics.items():
        if torch.is_tensor(v) and v.numel() == 1:
            acc[k] = acc.get(k, 0) + v.detach().float()
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            acc[k] = acc.get(k, 0) + float(v)
        else:
            last[k] = v


def train_loop(phase: Phase, *, out_dir: str, resume: bool, log, dist_info: DistInfo,
               options: Optional[LoopOptions] = None) -> dict:
    """Run `phase.steps` optimizer steps of `phase` (see the module docstring).

    Checkpoints go to {out_dir}/ckpt (latest, replaced atomically); with `resume` the loop
    continues from there.  `log(row, stage=..., step=...)` receives the interval rows.
    Returns {"step", "loss", "seconds"} (loss: the last interval's mean)."""
    opts = options or LoopOptions()
    name, model, device = phase.name, phase.model, dist_info.device
    if phase.global_batch % dist_info.world:
        raise ValueError(f"batch_size: global batch {phase.global_batch} of {name} is not divisible by the world "
                         f"size {dist_info.world}")
    bf16 = opts.precision == "bf16"
    if bf16 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    if hasattr(model, "set_activation_checkpointing"):
        model.set_activation_checkpointing(opts.activation_checkpointing)
    elif opts.activation_checkpointing:
        raise ValueError(f"activation_checkpointing: {type(model).__name__} does not support it")
    ckpt = os.path.join(out_dir, "ckpt")
    opt = make_optimizer(model, phase.optim, phase.lr_scales)
    start = 0
    if resume and recover_interrupted_save(ckpt):
        meta = load_train_state(ckpt, model=model, optimizer=opt, generators=phase.generators)
        start = int(meta["step"])
        if dist_info.is_main:
            print(f"[{name}] resumed from step {start} ({ckpt})", flush=True)
        for line in check_resume(ckpt, start, meta.get("run", {}), run_spec(phase), name):
            if dist_info.is_main:
                print(f"[{name}] warning: --resume with a changed setting: {line}", flush=True)
        if phase.restore_extra is not None:
            phase.restore_extra(meta.get("extra", {}), meta.get("extra_tensors", {}))
        _restore_data_state(phase, meta.get("data"), dist_info, ckpt)
        if phase.restore_rank_state is not None:
            folder = _rank_state_folder(ckpt, dist_info)
            phase.restore_rank_state(None if folder is None else str(folder))
    elif resume and dist_info.is_main:
        print(f"[{name}] --resume: no checkpoint in {ckpt!r}, starting from step 0")
    step_mod = _Step(model, phase.loss, autocast)
    wrapped = step_mod
    if dist_info.enabled and opts.micro_batches == 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped = DDP(step_mod, device_ids=[device.index] if device.type == "cuda" else None,
                      find_unused_parameters=True, broadcast_buffers=False)
    elif dist_info.enabled:
        broadcast_params(model, dist_info)
    params = clip_order(model, opt, phase.lr_scales)
    scale = float(dist_info.world) if dist_info.enabled else 1.0
    count_flops = opts.count_flops if opts.count_flops is not None else device.type == "cuda"
    flops_per_step = None
    model.train()
    bar = progress_bar(total=phase.steps, initial=start, desc=name,
                       disable=not (opts.progress and dist_info.is_main), dynamic_ncols=True, mininterval=1.0)
    t_start = t_int = time.perf_counter()
    wait = 0.0
    acc, last = {}, {}
    n_int = pairs_int = 0
    result_loss = float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(start, phase.steps):
        if phase.on_step is not None:
            phase.on_step(step)
        cur_lr = lr_at(step, lr=phase.optim.lr, steps=phase.steps, warmup=phase.optim.warmup,
                       min_ratio=phase.optim.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = cur_lr * g.get("lr_scale", 1.0)
        t0 = time.perf_counter()
        batch = batch_to(phase.data.batch(step, phase.global_batch, dist_info.rank, dist_info.world), device)
        wait += time.perf_counter() - t0
        opt.zero_grad(set_to_none=True)
        counter = _flop_counter() if count_flops and flops_per_step is None else nullcontext()
        with counter:
            if opts.micro_batches > 1:
                # no DDP here: the loop sums the ranks' shares itself (_allreduce_grads), so no scale
                loss, metrics = _grad_cache_step(phase.loss, batch, step, opts.micro_batches, autocast, device, 1.0)
            else:
                loss, metrics = wrapped(batch, step)
                (loss * scale).backward()
        if count_flops and flops_per_step is None:
            flops_per_step = counter.get_total_flops() * dist_info.world
        if dist_info.enabled and opts.micro_batches > 1:
            _allreduce_grads(params, dist_info)
        gnorm = torch.nn.utils.clip_grad_norm_(params, phase.optim.grad_clip if phase.optim.grad_clip > 0
                                               else float("inf"))
        opt.step()
        n_int += 1
        pairs_int += len(batch["input_ids"]) * dist_info.world
        _accumulate(acc, last, {"loss": loss.detach(), "grad_norm": gnorm, **(metrics or {})})
        bar.update(1)
        done = step + 1
        extra_row = phase.after_step(done) if phase.after_step is not None else None
        due_ckpt = phase.ckpt_every > 0 and (done % phase.ckpt_every == 0 or done == phase.steps)
        if done % max(1, phase.log_every) == 0 or done == phase.steps or due_ckpt:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t_int
            row = _interval_row(acc, n_int)
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"[{name}] non-finite loss in steps {done - n_int + 1}..{done}")
            result_loss = row["loss"]
            row.update(last)
            row.update(lr=cur_lr, step_time_s=dt / n_int, data_wait_s=wait / n_int, pairs_per_s=pairs_int / dt)
            if device.type == "cuda":
                row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            if flops_per_step:
                row["tflops"] = flops_per_step * n_int / dt / 1e12
            if log is not None:
                log(row, stage=name, step=done)
            bar.set_postfix(loss=f"{row['loss']:.4f}", pairs_s=f"{row['pairs_per_s']:.0f}", lr=f"{cur_lr:.1e}")
            acc, last, n_int, pairs_int, wait, t_int = {}, {}, 0, 0, 0.0, time.perf_counter()
        if extra_row and log is not None:
            log(extra_row, stage=name, step=done)
        if due_ckpt:
            data_state = _gather_data_state(phase.data, dist_info)
            rank_dir, rank_sha = _write_rank_state(phase, ckpt, dist_info)
            if dist_info.is_main:
                ex, ext = phase.extra_state() if phase.extra_state else ({}, {})
                save_train_state(ckpt, model=model, step=done, optimizer=opt, generators=phase.generators,
                                 extra=ex, extra_tensors=ext, run=run_spec(phase), data=data_state,
                                 rank_dir=rank_dir, rank_sha256=rank_sha)
            barrier()
    bar.close()
    return {"step": phase.steps, "loss": result_loss, "seconds": time.perf_counter() - t_start}


def _gather_data_state(data, di: DistInfo) -> Optional[list]:
    """Every rank's `data.state_dict()` (a list by rank, on every rank), or None when the data
    has no state beyond the step (a PairBank)."""
    if not hasattr(data, "state_dict"):
        return None
    state = data.state_dict()
    if not di.enabled:
        return [state]
    import torch.distributed as dist
    out = [None] * di.world
    dist.all_gather_object(out, state, group=di.group)
    return out


def _write_rank_state(phase: "Phase", ckpt: str, di: DistInfo) -> tuple:
    """Every rank writes its own state (`phase.rank_state`) into {ckpt}.ranks.tmp/<rank>/ and
    hashes its files; returns (that folder, {rank: {file: sha256}}) on every rank, or
    (None, None) when the phase keeps no state per rank.  Rank 0 moves the folder into the
    checkpoint it writes next (`save_training_state`), so the shares become part of the
    checkpoint in the same atomic rename; a folder left by a killed save is removed first."""
    if phase.rank_state is None:
        return None, None
    staging = ckpt + ".ranks.tmp"
    if di.is_main and os.path.exists(staging):
        shutil.rmtree(staging)
    barrier()
    mine = os.path.join(staging, str(di.rank))
    os.makedirs(mine)
    phase.rank_state(mine)
    fsync_path(mine)
    hashes = {name: sha256_file(os.path.join(mine, name)) for name in sorted(os.listdir(mine))}
    if not di.enabled:
        return staging, {"0": hashes}
    import torch.distributed as dist
    out = [None] * di.world
    dist.all_gather_object(out, hashes, group=di.group)   # also: every rank has written before rank 0 moves
    return staging, {str(r): h for r, h in enumerate(out)}


def _rank_state_folder(ckpt: str, di: DistInfo):
    """This rank's folder of per-rank state in `ckpt` (`solar.checkpoint.rank_state_dir`), or
    None.  Every rank checks its own files; a corrupt one is a CheckpointError on every rank
    (agreed over the group, so that no rank waits for one that has failed)."""
    folder, err = None, None
    try:
        folder = rank_state_dir(ckpt, di.rank, di.world)
    except CheckpointError as e:
        err = e
    if di.enabled:
        import torch.distributed as dist
        bad = torch.tensor([int(err is not None)], device=di.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=di.group)
        if int(bad.item()) and err is None:
            err = CheckpointError(f"checkpoint: {ckpt!r}: another rank's files in ranks/ are missing or corrupt "
                                  f"(its error names them)")
    if err is not None:
        raise err
    return folder


def _restore_data_state(phase: "Phase", states: Optional[list], di: DistInfo, ckpt: str) -> None:
    """Hand this rank's saved data position to `phase.data` (when both have one).  A checkpoint
    written by another world size cannot place this rank's readers: the data then replays
    from the step (said once)."""
    if states is None or not hasattr(phase.data, "load_state_dict"):
        return
    if len(states) != di.world:
        if di.is_main:
            print(f"[{phase.name}] warning: {ckpt!r} holds the data position of {len(states)} rank(s), this run has "
                  f"{di.world}: the stream is read again from its start up to the checkpoint's step", flush=True)
        return
    phase.data.load_state_dict(states[di.rank])


def _flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    return FlopCounterMode(display=False)


@torch.no_grad()
def broadcast_params(model: nn.Module, di: DistInfo) -> None:
    """Rank 0's parameters and buffers on every rank (what DDP does at construction)."""
    import torch.distributed as dist
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, 0, group=di.group)


@torch.no_grad()
def _allreduce_grads(params, di: DistInfo) -> None:
    """Sum the gradients over ranks (micro-batched steps, where DDP's hooks would fire once per
    micro-batch): one flat buffer per dtype/device."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
    buckets: dict = {}
    for p in params:   # every rank runs the same graph, so the same parameters have gradients
        if p.grad is not None:
            buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for key in sorted(buckets, key=str):
        grads = buckets[key]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=di.group)
        for g, r in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(r)
