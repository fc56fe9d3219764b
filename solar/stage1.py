"""Stage 1: learn the intersection mask of each image-text pair.

Per batch of B true pairs (see SOLAR.md, "Stage 1"):

1. Local-to-global similarities: s_V(p) = cos(patch p, global text), s_L(t) = cos(token t,
   global image); globals are the normalised masked means of the adapted tokens.
2. GLA hinge per direction (``losses.gla_hinge``): the mean local-to-global similarity of a
   true pair must beat the mean over in-batch negatives by ``gla_margin``.
3. MaskGen with QDA: EMA Gaussian statistics of true-pair and negative-pair (all in-batch
   off-diagonal pairs) similarities per modality; tau = their equal-density point
   (``qda.qda_threshold``), stored in the model's ``tau_v`` / ``tau_l`` buffers.
   M_hat = [s > tau] (at least the best position of each sample is kept).
4. Evolutionary mask M = rho * 1 + (1 - rho) * M_hat with rho annealed 1 -> 0
   (``rho_at``; linear by default).
5. Masked ITC, two ways (both on by default):
   * pooled: ``solar_kernels.pooled_contrastive_loss`` over the M-weighted means of the
     adapted patch / text tokens.  This is the cheap, exact form of "[CLS] only sees the
     intersection" for the towers and adapters: the fused kernel keeps memory at O(B*W),
     accepts the soft evolutionary weights directly, and its gradient reaches exactly the
     tokens inside the mask -- which is what moves the similarities, hence the masks;
   * through E_VL: ``model.fuse`` of the image side alone (patch keep = M_V) and of the
     text side alone (text keep = M_L, soft weights enter the attention as log M), trained
     with ``solar_kernels.contrastive_loss``.  This trains the fusion encoder in stage 1 so
     that a stage-1-only model gives usable pair embeddings (a baseline of stage 2).
6. Optional distillation from frozen copies of the initial towers (``teacher="init"``):
   L_LD (token-token similarity rows) and L_GD (in-batch similarity rows), Pearson.

Total: L = w_itc * L_ITC + w_fusion * L_ITC(E_VL) + lambda1 * L_GLA + lambda2 * L_GD + lambda3 * L_LD.

``evaluate_masks`` scores M_V / M_L against ShapesWorld's ground truth (IoU) next to two
baselines: the all-ones mask and a random mask with the same number of kept positions.

Why the tiny preset gives text tokens a 5-token context window, scores s_L per phrase and uses
the mixture QDA threshold (and the IoU measured with and without each): docs/EXPERIMENTS.md.
``run_stage1`` trains through the shared loop (``solar.trainer.train_loop``): checkpoints,
resume, DDP, precision and micro-batches are the loop's.  Under torch.distributed the losses
and the QDA statistics are the global batch's (``process_group``).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from typing import Any, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

import solar_kernels as sk

from . import towers
from .checkpoint import CheckpointError
from .config import QDA_MODES, RHO_SCHEDULES, TEACHERS, Stage1Config, validate_config
from .data.batches import StreamBatches
from .distributed import DistInfo, get_dist
from .losses import gather_rows, gla_hinge, global_distill_loss, local_distill_loss, resolve_group, row_offset
from .model import SolarModel
from .qda import RunningGaussian, batch_moments, global_moments, mixture_threshold, qda_threshold
from .trainer import LoopOptions, OptimSpec, Phase, broadcast_params, train_loop

__all__ = ["Stage1Config", "Stage1Loss", "run_stage1", "evaluate_masks", "rho_at", "stage1_losses", "mask_iou",
           "TEACHERS", "QDA_MODES", "RHO_SCHEDULES"]

def rho_at(step: int, cfg: Stage1Config) -> float:
    """rho of the evolutionary mask at `step` (1 while holding, then annealed to 0)."""
    t0, t1 = cfg.rho_hold_frac * cfg.steps, cfg.rho_end_frac * cfg.steps
    if step <= t0:
        return 1.0
    if step >= t1 or t1 <= t0:
        return 0.0
    x = (step - t0) / (t1 - t0)
    if cfg.rho_schedule == "linear":
        return 1.0 - x
    if cfg.rho_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * x))
    if cfg.rho_schedule == "step":
        return 1.0 if x < 0.5 else 0.0
    raise ValueError(f"rho_schedule: expected one of {RHO_SCHEDULES}, got {cfg.rho_schedule!r}")


def _to(batch: Mapping[str, Any], device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _with_best(hard: torch.Tensor, s: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """Make sure each row of a hard mask keeps at least its highest-similarity valid position."""
    s = s if valid is None else s.masked_fill(~valid, float("-inf"))
    best = F.one_hot(s.argmax(1), s.shape[1]).bool()
    if valid is not None:
        best &= valid
    empty = ~hard.any(1, keepdim=True)
    return hard | (best & empty)


@torch.no_grad()
def _negative_moments(n: torch.Tensor, valid: Optional[torch.Tensor], other_global: torch.Tensor,
                      center: torch.Tensor):
    """Moments of the local-to-global similarity of token of i with the global of j, j != i
    (`n`: the unit local features whose dot with a global is the similarity)."""
    s = torch.einsum("blw,jw->bjl", n, other_global - center)  # [B, B, L]
    B, _, L = s.shape
    w = (~torch.eye(B, dtype=torch.bool, device=s.device))[:, :, None].expand(B, B, L)
    if valid is not None:
        w = w & valid[:, None, :]
    return batch_moments(s, w)


class _Stage1State:
    """QDA running Gaussians bound to the model's buffers."""

    def __init__(self, model: SolarModel, momentum: float, mode: str = "mixture", group=None):
        self.model = model
        if mode not in QDA_MODES:
            raise ValueError(f"qda_mode: expected one of {QDA_MODES}, got {mode!r}")
        self.group = group   # torch.distributed group: moments and centres over the global batch
        self.momentum = momentum
        self.mode = mode
        self.pos_v = RunningGaussian(model.qda_v[0:2], momentum)
        self.neg_v = RunningGaussian(model.qda_v[2:4], momentum)
        self.pos_l = RunningGaussian(model.qda_l[0:2], momentum)
        self.neg_l = RunningGaussian(model.qda_l[2:4], momentum)

    @torch.no_grad()
    def _global_moments(self, s_v, s_l, text_valid, v, t, g_i, g_t, segments):
        """Global-batch moments ((mean, var) of true-pair s_V, true-pair s_L, negative-pair s_V,
        negative-pair s_L) and the global means of g_I and g_T (negatives: every off-diagonal
        pair of the global batch)."""
        model, group = self.model, self.group
        n = v.shape[0]
        off, N = row_offset(n, group)
        gi_all, gt_all = gather_rows(g_i, group, grad=False), gather_rows(g_t, group, grad=False)
        neg = torch.ones(n, N, dtype=torch.bool, device=v.device)
        neg[torch.arange(n), off + torch.arange(n)] = False
        s_nv = torch.einsum("blw,jw->bjl", F.normalize(v, dim=-1), gt_all - model.center_t)       # [n, N, P]
        w_nv = neg[:, :, None].expand_as(s_nv)
        s_nl = torch.einsum("blw,jw->bjl", model.local_text_features(t, segments), gi_all - model.center_v)
        w_nl = neg[:, :, None] & text_valid.bool()[:, None, :]
        out = global_moments([(s_v, torch.ones_like(s_v, dtype=torch.bool)), (s_l, text_valid),
                              (s_nv, w_nv), (s_nl, w_nl)], group)
        return out[0], out[1], out[2], out[3], gi_all.mean(0), gt_all.mean(0)

    @torch.no_grad()
    def update(self, s_v, s_l, text_valid, v, t, g_i, g_t, segments=None) -> dict:
        first = int(self.model.qda_initialized) == 0
        if self.group is not None:
            (mpv, vpv), (mpl, vpl), (mnv, vnv), (mnl, vnl), c_i, c_t = self._global_moments(
                s_v, s_l, text_valid, v, t, g_i, g_t, segments)
        else:
            _, mpv, vpv = batch_moments(s_v, torch.ones_like(s_v, dtype=torch.bool))
            _, mpl, vpl = batch_moments(s_l, text_valid)
            _, mnv, vnv = _negative_moments(F.normalize(v, dim=-1), None, g_t, self.model.center_t)
            _, mnl, vnl = _negative_moments(self.model.local_text_features(t, segments), text_valid, g_i,
                                            self.model.center_v)
            c_i, c_t = g_i.mean(0), g_t.mean(0)
        # the centres follow the globals (used from the next step on)
        m = 1.0 if first else self.momentum
        self.model.center_v.lerp_(c_i, m)
        self.model.center_t.lerp_(c_t, m)
        self.pos_v.update(mpv, vpv, first)
        self.neg_v.update(mnv, vnv, first)
        self.pos_l.update(mpl, vpl, first)
        self.neg_l.update(mnl, vnl, first)
        self.model.qda_initialized.fill_(1)
        if self.mode == "mixture":
            thr = lambda *a: mixture_threshold(*a)[:2]   # noqa: E731
        elif self.mode == "direct":
            thr = qda_threshold
        else:
            raise ValueError(f"qda_mode: expected one of {QDA_MODES}, got {self.mode!r}")
        tv, case_v = thr(self.pos_v.mean, self.pos_v.var, self.neg_v.mean, self.neg_v.var)
        tl, case_l = thr(self.pos_l.mean, self.pos_l.var, self.neg_l.mean, self.neg_l.var)
        # "not_separated" gives +inf; store a finite stand-in above every cosine (nothing kept)
        self.model.tau_v.fill_(tv if math.isfinite(tv) else 2.0)
        self.model.tau_l.fill_(tl if math.isfinite(tl) else 2.0)
        return {"tau_v": float(self.model.tau_v), "tau_l": float(self.model.tau_l),
                "qda_case_v": case_v, "qda_case_l": case_l,
                "mu_pos_v": self.pos_v.mean, "mu_neg_v": self.neg_v.mean,
                "mu_pos_l": self.pos_l.mean, "mu_neg_l": self.neg_l.mean}


def stage1_losses(model: SolarModel, batch: Mapping[str, Any], cfg: Stage1Config, rho: float,
                  state: Optional[_Stage1State] = None, teacher=None,
                  process_group=None) -> tuple[torch.Tensor, dict]:
    """One stage-1 forward: (total loss, metrics dict; metric values are detached tensors or
    numbers).  Updates the QDA statistics/thresholds when `state` is given (training); otherwise
    uses the stored thresholds.

    process_group: a torch.distributed group (None: this process only).  `batch` is then this
    rank's share of the global batch; the losses are those of the global batch (every rank gets
    the same value, its gradient is its share: sum the ranks' gradients, see solar.losses)."""
    v = model.patch_tokens(batch["pixel_values"])
    t = model.text_tokens(batch["input_ids"], batch["attention_mask"])
    return stage1_losses_from_tokens(model, batch, v, t, cfg, rho, state, teacher, process_group)


def stage1_losses_from_tokens(model: SolarModel, batch: Mapping[str, Any], v: torch.Tensor, t: torch.Tensor,
                              cfg: Stage1Config, rho: float, state: Optional[_Stage1State] = None, teacher=None,
                              process_group=None) -> tuple[torch.Tensor, dict]:
    """`stage1_losses` given the adapted patch tokens `v` [B, P, W] and text tokens `t` [B, T, W]
    of `batch` (what the towers and adapters produce; the GradCache split of the loop)."""
    pg = resolve_group(process_group)
    pv, ids, am = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    valid = model.text_valid_mask(ids, am)
    segments = model.text_segments(ids, am)
    s_v, s_l, g_i, g_t = model.similarities_from_tokens(v, t, valid, segments)
    metrics: dict[str, Any] = {}
    loss_gla = gla_hinge(v, None, g_t, cfg.gla_margin, pg) + gla_hinge(t, valid, g_i, cfg.gla_margin, pg)
    if state is not None:   # QDA statistics in fp32 whatever the autocast dtype
        with torch.autocast(v.device.type, enabled=False):
            metrics.update(state.update(s_v.float(), s_l.float(), valid, v.detach().float(), t.detach().float(),
                                        g_i.detach().float(), g_t.detach().float(), segments))
    with torch.no_grad():
        hv, hl = model.masks_from_similarities(s_v, s_l, valid)
        hv = _with_best(hv, s_v, None)
        hl = _with_best(hl, s_l, valid)
        m_v = rho + (1 - rho) * hv.float()
        m_l = (rho + (1 - rho) * hl.float()) * valid
    total = cfg.gla_weight * loss_gla
    metrics["loss_gla"] = loss_gla.detach()
    if cfg.itc_weight:
        if pg is not None:   # pool locally, gather the pooled rows: same math as the fused op
            loss_itc = sk.contrastive_loss(sk.masked_pool(v, m_v, normalize=True), sk.masked_pool(t, m_l, normalize=True),
                                           temperature=cfg.temperature, process_group=pg)
        else:
            loss_itc = sk.pooled_contrastive_loss(v, m_v, t, m_l, normalize=True, temperature=cfg.temperature)
        total = total + cfg.itc_weight * loss_itc
        metrics["loss_itc"] = loss_itc.detach()
    if cfg.fusion_itc_weight:
        B, P, _ = v.shape
        T = t.shape[1]
        f_v = model.fuse(v, t, m_v, torch.zeros(B, T, dtype=torch.bool, device=v.device))
        f_l = model.fuse(v, t, torch.zeros(B, P, dtype=torch.bool, device=v.device), m_l)
        loss_f = sk.contrastive_loss(f_v, f_l, temperature=cfg.temperature, process_group=pg)
        total = total + cfg.fusion_itc_weight * loss_f
        metrics["loss_fusion_itc"] = loss_f.detach()
    if teacher is not None and (cfg.gd_weight or cfg.ld_weight):
        tv_tower, tl_tower = teacher
        with torch.no_grad():
            # the teacher towers' states in the students' convention (solar.towers)
            tv = towers.patch_states(tv_tower, pv.to(v.device))
            tl = towers.text_states(tl_tower, ids.to(v.device), am.to(v.device).bool(), model.cfg.text_causal)
        if cfg.ld_weight:
            l_ld = local_distill_loss(v, tv, None, pg) + local_distill_loss(t, tl, valid, pg)
            total = total + cfg.ld_weight * l_ld
            metrics["loss_ld"] = l_ld.detach()
        if cfg.gd_weight:
            tg_v = sk.masked_pool(tv, torch.ones(tv.shape[:2], dtype=torch.bool, device=tv.device), normalize=True)
            tg_l = sk.masked_pool(tl, valid, normalize=True)
            l_gd = global_distill_loss(g_i, tg_v, pg) + global_distill_loss(g_t, tg_l, pg)
            total = total + cfg.gd_weight * l_gd
            metrics["loss_gd"] = l_gd.detach()
    metrics["loss"] = total.detach()
    metrics["rho"] = rho
    metrics["mask_ratio_v"] = hv.float().mean()
    metrics["mask_ratio_l"] = hl.float().sum() / valid.sum().clamp_min(1)
    if "gt_patch_mask" in batch and "gt_token_mask" in batch:
        gv, gl = batch["gt_patch_mask"].to(hv.device).bool(), batch["gt_token_mask"].to(hv.device).bool() & valid
        metrics["train_iou_v"] = mask_iou(hv, gv).mean()
        metrics["train_iou_l"] = mask_iou(hl, gl).mean()
    return total, metrics


class Stage1Loss(nn.Module):
    """Stage 1 as a loss module for the training loop: forward(batch, step) -> (loss, metrics)
    with rho = rho_at(step) and the QDA statistics updated from each (global) batch.

    embed(batch) -> {"v", "t"} (towers + adapters) and loss_from(batch, tokens, step) split the
    forward for micro-batched (GradCache) steps: the masks, QDA update and every loss are
    computed once over the whole batch."""

    def __init__(self, model: SolarModel, cfg: Stage1Config, *, teacher=None, process_group=None):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.teacher = teacher
        self.process_group = resolve_group(process_group)
        self.state = _Stage1State(model, cfg.qda_momentum, cfg.qda_mode, group=self.process_group)

    def embed(self, batch: Mapping[str, Any]) -> dict:
        """The adapted patch and text tokens of `batch`."""
        return {"v": self.model.patch_tokens(batch["pixel_values"]),
                "t": self.model.text_tokens(batch["input_ids"], batch["attention_mask"])}

    def loss_from(self, batch: Mapping[str, Any], tokens: dict, step: int):
        """The stage-1 loss of `batch` given its tokens (see `embed`)."""
        return stage1_losses_from_tokens(self.model, batch, tokens["v"], tokens["t"], self.cfg,
                                         rho_at(step, self.cfg), self.state, self.teacher, self.process_group)

    def forward(self, batch: Mapping[str, Any], step: int):
        """(loss, metrics) of `batch` at optimizer step `step`."""
        return self.loss_from(batch, self.embed(batch), step)


def mask_iou(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU of bool masks [B, L] -> [B] (1.0 where both are empty)."""
    inter = (pred & gt).sum(1).float()
    union = (pred | gt).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def _random_like(pred: torch.Tensor, valid: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random mask keeping, per row, as many valid positions as `pred` keeps."""
    scores = torch.rand(pred.shape, generator=gen).to(pred.device).masked_fill(~valid, -1.0)
    order = scores.argsort(1, descending=True).argsort(1)
    return (order < pred.sum(1, keepdim=True)) & valid


@torch.no_grad()
def evaluate_masks(model: SolarModel, loader: Iterable[Mapping[str, Any]], *, max_batches: int = 0,
                   seed: int = 0) -> dict:
    """IoU of the stage-1 masks against ShapesWorld ground truth, with two baselines.

    Returns a dict with, per modality x in {v, l}: ``iou_x`` (mean per-sample IoU of M_x),
    ``iou_x_ones`` (all-ones mask over valid positions), ``iou_x_random`` (random mask with
    the same per-sample count as M_x), ``micro_iou_x`` (total intersection / total union),
    ``ratio_x`` (kept share of valid positions) and ``gt_ratio_x``; plus ``samples``.
    Batches need ``gt_patch_mask`` [B, P] and ``gt_token_mask`` [B, T] (KeyError otherwise).
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    acc: dict[str, float] = {}
    n = 0
    try:
        for bi, batch in enumerate(loader):
            if max_batches and bi >= max_batches:
                break
            for k in ("gt_patch_mask", "gt_token_mask"):
                if k not in batch:
                    raise KeyError(f"evaluate_masks: batch has no {k!r}; IoU needs ShapesWorld ground truth")
            batch = _to(batch, model.device)
            m_v, m_l = model.intersection_masks(batch)
            valid_l = model.text_valid_mask(batch["input_ids"], batch["attention_mask"])
            valid_v = torch.ones_like(m_v)
            g_v = batch["gt_patch_mask"].bool()
            g_l = batch["gt_token_mask"].bool() & valid_l
            for x, pred, gt, valid in (("v", m_v, g_v, valid_v), ("l", m_l, g_l, valid_l)):
                rnd = _random_like(pred, valid, gen)
                parts = {
                    f"iou_{x}": mask_iou(pred, gt).sum(),
                    f"iou_{x}_ones": mask_iou(valid, gt).sum(),
                    f"iou_{x}_random": mask_iou(rnd, gt).sum(),
                    f"_inter_{x}": (pred & gt).sum(), f"_union_{x}": (pred | gt).sum(),
                    f"_kept_{x}": pred.sum(), f"_gt_{x}": gt.sum(), f"_valid_{x}": valid.sum(),
                }
                for k, val in parts.items():
                    acc[k] = acc.get(k, 0.0) + float(val)
            n += m_v.shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate_masks: the loader yielded no batches")
    out: dict[str, float] = {"samples": n}
    for x in ("v", "l"):
        for k in (f"iou_{x}", f"iou_{x}_ones", f"iou_{x}_random"):
            out[k] = acc[k] / n
        out[f"micro_iou_{x}"] = acc[f"_inter_{x}"] / max(acc[f"_union_{x}"], 1.0)
        out[f"ratio_{x}"] = acc[f"_kept_{x}"] / max(acc[f"_valid_{x}"], 1.0)
        out[f"gt_ratio_{x}"] = acc[f"_gt_{x}"] / max(acc[f"_valid_{x}"], 1.0)
    out["tau_v"], out["tau_l"] = float(model.tau_v), float(model.tau_l)
    return out


TOWER_PREFIXES = ("vision.", "text.")   # parameter names of E_V / E_L (stage1.tower_lr_scale)


def _make_teacher(model: SolarModel):
    tv, tl = copy.deepcopy(model.vision).eval(), copy.deepcopy(model.text).eval()
    tv.requires_grad_(False)
    tl.requires_grad_(False)
    return tv, tl


def _as_batches(data):
    """`data` with the loop's `.batch(step, ...)` interface: as is, or a re-iterable of batches
    (e.g. a reader) read in order (solar.data.batches.StreamBatches)."""
    if hasattr(data, "batch"):
        return data
    return StreamBatches(lambda: data)


def run_stage1(model: SolarModel, data, cfg: Stage1Config, *, out_dir: str, resume: bool = False, log=None,
               eval_loader: Optional[Iterable[Mapping[str, Any]]] = None, progress: bool = True,
               dist_info: Optional[DistInfo] = None, global_batch: int = 0, options=None) -> dict:
    """Train stage 1 for ``cfg.steps`` optimizer steps through ``solar.trainer.train_loop``;
    returns the final metrics dict (with the mask IoU when `eval_loader` is given).

    data: a `PairBank` (batch s is global batch s of `global_batch` pairs, this rank's share),
    or any re-iterable of this rank's batches (read in order, iterated again when exhausted;
    dicts: pixel_values, input_ids, attention_mask, optionally gt_patch_mask / gt_token_mask).
    dist_info: the ranks to train over (default: `solar.distributed.get_dist()`); the losses,
    the QDA statistics and thresholds are the global batch's, so every rank stays equal to one
    process over the global batch.  Rank 0 writes checkpoints and evaluates.
    out_dir: ``ckpt/`` (the loop's checkpoint), ``stage1_model/`` (the final model with its
    thresholds) and, with teacher "init", ``stage1_teacher/`` are written there.
    resume: continue from ``out_dir/ckpt`` (CheckpointError if it is missing).
    log: ``log(row, stage="stage1", step=...)`` per log interval, after each mask evaluation
    (``event: "eval"``) and at the end (``event: "final"``).
    options: `solar.trainer.LoopOptions` (precision, activation checkpointing, micro-batches).
    """

    validate_config(cfg)   # fields may have been set after construction
    di = dist_info or get_dist()
    os.makedirs(out_dir, exist_ok=True)
    ckpt_dir = os.path.join(out_dir, "ckpt")
    if resume and not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"resume: no stage-1 checkpoint at {ckpt_dir}")
    torch.manual_seed(cfg.seed)
    teacher = None
    if cfg.teacher == "init":
        teacher_path = os.path.join(out_dir, "stage1_teacher")
        if resume and os.path.isdir(teacher_path):
            teacher = _make_teacher(SolarModel.from_pretrained(teacher_path, map_location=model.device))
        else:
            if di.enabled:   # the teacher is rank 0's initial towers on every rank
                broadcast_params(model, di)
            teacher = _make_teacher(model)
            if di.is_main:
                model.save_pretrained(teacher_path)
    loss = Stage1Loss(model, cfg, teacher=teacher, process_group=di.group)
    eval_every = cfg.eval_every if eval_loader is not None else 0

    def after_step(done: int) -> Optional[dict]:
        if di.is_main and eval_every and done % eval_every == 0 and done < cfg.steps:
            return {"event": "eval", **evaluate_masks(model, eval_loader, max_batches=cfg.eval_batches,
                                                       seed=cfg.seed)}
        return None

    batches = _as_batches(data)
    gb = global_batch or getattr(batches, "global_batch", 0)
    phase = Phase(name="stage1", model=model, loss=loss, data=batches, steps=cfg.steps,
                  global_batch=gb if gb else di.world,
                  optim=OptimSpec(lr=cfg.lr, warmup=cfg.warmup_steps, weight_decay=cfg.weight_decay,
                                  grad_clip=cfg.grad_clip, min_lr_ratio=0.1, betas=(0.9, 0.98), eps=1e-8,
                                  decay_1d=True),
                  lr_scales={p: cfg.tower_lr_scale for p in TOWER_PREFIXES}, ckpt_every=cfg.ckpt_every,
                  log_every=cfg.log_every, after_step=after_step)
    options = options or LoopOptions()
    options = dataclasses.replace(options, progress=progress and options.progress)
    summary = train_loop(phase, out_dir=out_dir, resume=resume, log=log, dist_info=di, options=options)
    if di.is_main:
        model.save_pretrained(os.path.join(out_dir, "stage1_model"))
    if di.enabled:
        import torch.distributed as dist
        dist.barrier(group=di.group)
    final = {"event": "final", "loss": summary["loss"], "wall_s": summary["seconds"]}
    if di.is_main and eval_loader is not None:
        final.update(evaluate_masks(model, eval_loader, max_batches=0, seed=cfg.seed))
    if log is not None:
        log(final, stage="stage1", step=cfg.steps)
    return final
