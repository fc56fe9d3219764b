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

Mask quality: what we chose and why (tiny preset, ShapesWorld; 8000 training pairs, batch 64,
600 steps, 256 held-out pairs of unseen items; IoU image / text, all-ones baselines 0.11 / 0.39):

* Per-position towers alone (no context; the direct QDA of the whole true-pair Gaussian):
  0.56 / 0.35 (text below the all-ones mask).  Diagnosis: a word without context ("top",
  "red", "at") cannot say whether *its* object is in the image -- the scene has other top-row
  or red objects -- and the text global is a bag of words, which a patch cannot match as
  "red circle at top left" as a whole.  Position words were scored at chance; the ground
  truth marks the content words of phrases that describe shown objects (not "a", "at", "and").
* Local phrase context (``ModelConfig.text_context_window=5``: a residual 5-token convolution
  between E_L and A_L, ``model.LocalContext``): 0.64 / 0.40.  Wider mixing is what failed
  before (attention copies the whole caption into every token); a window keeps tokens local.
  3 tokens: 0.60 / 0.38.  A 3x3 patch-grid convolution (``vision_context_window=3``)
  collapsed the image masks (0.25: ShapesWorld objects never leave their patch, so
  neighbours only blur them); it stays off.
* Phrase-level s_L (``ModelConfig.text_segment_words``: phrases end at "and" and
  punctuation, the text analogue of stage 2's image segments; ``SolarModel.text_segments``):
  each token's local feature is its phrase's mean unit feature, so a phrase describing a
  shown object is kept as a whole.  It needs no per-word statistics and applies to real
  captions (commas, "and").  Its ceiling here is below 1: "a" and "at" are inside the
  phrases but never in the ground truth (a perfect phrase mask scores about 5/7 = 0.71).
* QDA threshold (``Stage1Config.qda_mode="mixture"``, ``qda.mixture_threshold``): the
  true-pair similarities are a mixture of intersection positions and difference positions
  that score like negatives; the boundary is taken between the intersection component
  (recovered from the moments) and the negatives, instead of between the whole wide mixture
  Gaussian and the negatives, which kept ~3x the true number of patches.

Measured (held-out IoU image / text; random-with-same-ratio baseline in brackets; each run
alone on 1 thread while another ran beside it):

    per-position towers, direct QDA (before)        0.56 (0.08) / 0.35 (0.26)
    + 5-token context, direct QDA                   0.64 (0.08) / 0.40 (0.29)
    + 5-token context, mixture QDA                  0.66 (0.07) / 0.35 (0.28)
    phrase s_L + mixture QDA, no context            0.59 (0.07) / 0.32 (0.29)
    context + phrase s_L + mixture QDA (default)    0.75 (0.07) / 0.51 (0.31); seed 1: 0.77 / 0.50

The image side clears the 0.6 target; the text side beats both baselines (all-ones 0.39) but
stays near 0.5 of the 0.71 a phrase-level mask can reach: it keeps ~61% of the tokens for a
39% ground truth (the function words of kept phrases, and text-only attribute phrases that
some images still match).  The extras cost ~5% of the step time.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F

import solar_kernels as sk

from .checkpoint import CheckpointError, load_training_state, save_training_state
from .config import ConfigError, check_fields, option, validate_config
from .losses import gla_hinge, global_distill_loss, local_distill_loss
from .model import SolarModel
from .qda import RunningGaussian, batch_moments, mixture_threshold, qda_threshold

__all__ = ["Stage1Config", "run_stage1", "evaluate_masks", "rho_at", "stage1_losses", "mask_iou"]

TEACHERS = ("none", "init")
QDA_MODES = ("mixture", "direct")
RHO_SCHEDULES = ("linear", "cosine", "step")


@dataclass
class Stage1Config:
    """Stage 1: learning the intersection masks (SOLAR.md "Stage 1").

    Each field's help (``option``; ``python -m solar.train --help``) says what it means.  The
    paper gives none of these values: they are our choices.  Notes:

    lr:               3e-3 for the from-scratch tiny model: measured to halve the ITC loss ~2x
                      sooner than 1e-3 at the same mask IoU
    tower_lr_scale:   1.0 from scratch, lower when fine-tuning real CLIP weights
    teacher:          "init" is meaningful with pretrained towers; gd_weight / ld_weight need it
    qda_mode:         see the module docstring for the measurements behind "mixture"
    rho_end_frac:     1.0: rho reaches 0 at the last step.  Measured on the tiny run: with 0.9,
                      training on the bare hard masks for the last 10% of the steps collapsed the
                      ITC loss from 1.5 to 4.5 and halved the image-mask IoU
    """

    steps: int = option(600, "optimizer steps of stage 1", ge=1)
    lr: float = option(3e-3, "AdamW peak learning rate (linear warm-up, cosine decay to 10%)", gt=0)
    tower_lr_scale: float = option(1.0, "lr multiplier for the towers E_V / E_L", ge=0)
    weight_decay: float = option(0.05, "AdamW weight decay", ge=0)
    warmup_steps: int = option(50, "linear warm-up steps", ge=0)
    grad_clip: float = option(1.0, "max global gradient norm (0 disables clipping)", ge=0)
    temperature: float = option(0.07, "InfoNCE temperature of both masked ITC losses", gt=0)
    gla_margin: float = option(0.2, "delta, the margin of the GLA hinge")
    gla_weight: float = option(1.0, "lambda1, weight of L_GLA", ge=0)
    itc_weight: float = option(1.0, "weight of the pooled masked ITC", ge=0)
    fusion_itc_weight: float = option(1.0, "weight of the masked ITC through E_VL (0 leaves E_VL untrained)", ge=0)
    gd_weight: float = option(0.0, "lambda2, weight of the global distillation L_GD (needs teacher init)", ge=0)
    ld_weight: float = option(0.0, "lambda3, weight of the local distillation L_LD (needs teacher init)", ge=0)
    teacher: str = option("none", "distillation teacher: none, or init (frozen copies of the towers as stage 1 "
                                  "starts)", choices=TEACHERS)
    qda_momentum: float = option(0.05, "EMA momentum of the QDA Gaussian statistics", gt=0, le=1)
    qda_mode: str = option("mixture", "QDA threshold: mixture (intersection component of the true-pair "
                                      "similarities vs negatives) or direct (whole true-pair Gaussian vs "
                                      "negatives)", choices=QDA_MODES)
    rho_schedule: str = option("linear", "how rho of the evolutionary mask goes 1 -> 0", choices=RHO_SCHEDULES)
    rho_hold_frac: float = option(0.3, "rho stays 1 for this fraction of the steps", ge=0, le=1)
    rho_end_frac: float = option(1.0, "rho reaches 0 at this fraction of the steps and stays there", ge=0, le=1)
    log_every: int = option(20, "steps between metric dicts passed to `log`", ge=1)
    eval_every: int = option(200, "steps between mask-IoU evaluations (0: only at the end)", ge=0)
    eval_batches: int = option(8, "batches per mask-IoU evaluation (0: all)", ge=0)
    ckpt_every: int = option(200, "steps between checkpoints in out_dir/stage1_ckpt (0: only at the end)", ge=0)
    seed: int = option(0, "seed of the torch RNG used in stage 1")

    @classmethod
    def preset(cls, name: str, **overrides) -> "Stage1Config":
        """Named presets: ``tiny`` (CPU, from scratch, the defaults) and ``clip-b16`` (fine-tuning
        real CLIP towers: lower learning rates, distillation from the initial towers; our choice)."""
        presets = {
            "tiny": {},
            "clip-b16": dict(steps=5000, lr=1e-4, tower_lr_scale=0.1, warmup_steps=200, temperature=0.05,
                             teacher="init", gd_weight=1.0, ld_weight=1.0, log_every=50, eval_every=500,
                             ckpt_every=1000),
        }
        if name not in presets:
            raise ValueError(f"unknown stage-1 preset {name!r}; available: {sorted(presets)}")
        return cls(**{**presets[name], **overrides})

    def __post_init__(self):
        check_fields(self)
        if not self.rho_hold_frac <= self.rho_end_frac:
            raise ConfigError(type(self).__name__, "rho_hold_frac", f"must be <= rho_end_frac ({self.rho_end_frac}), "
                              f"got {self.rho_hold_frac}")
        for name in ("gd_weight", "ld_weight"):
            if getattr(self, name) and self.teacher == "none":
                raise ConfigError(type(self).__name__, name, f"needs teacher 'init' (distillation from the initial "
                                  f"towers), got {getattr(self, name)} with teacher 'none'")


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


def lr_factor(step: int, cfg: Stage1Config) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    x = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, x)))


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
    def update(self, s_v, s_l, text_valid, v, t, g_i, g_t, segments=None) -> dict:
        first = int(self.model.qda_initialized) == 0
        if self.group is not None:
            from .stage1_dist import qda_moments
            (mpv, vpv), (mpl, vpl), (mnv, vnv), (mnl, vnl), c_i, c_t = qda_moments(
                self.model, s_v, s_l, text_valid, v, t, g_i, g_t, segments, self.group)
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
    """One stage-1 forward: (total loss, metrics dict).  Updates the QDA statistics/thresholds
    when `state` is given (training); otherwise uses the stored thresholds.

    process_group: a torch.distributed group (None: this process only).  `batch` is then this
    rank's share of the global batch; the losses are those of the global batch (every rank gets
    the same value, its gradient is its share: sum the ranks' gradients, see solar.stage1_dist)."""
    pg = process_group
    if pg is not None:
        from . import stage1_dist as sd
    pv, ids, am = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    v = model.patch_tokens(pv)
    t = model.text_tokens(ids, am)
    valid = model.text_valid_mask(ids, am)
    segments = model.text_segments(ids, am)
    s_v, s_l, g_i, g_t = model.similarities_from_tokens(v, t, valid, segments)
    metrics: dict[str, Any] = {}
    if pg is not None:
        loss_gla = sd.gla_hinge_dist(v, None, g_t, cfg.gla_margin, pg) + sd.gla_hinge_dist(t, valid, g_i, cfg.gla_margin, pg)
    else:
        loss_gla = gla_hinge(v, None, g_t, cfg.gla_margin) + gla_hinge(t, valid, g_i, cfg.gla_margin)
    if state is not None:
        metrics.update(state.update(s_v, s_l, valid, v, t, g_i.detach(), g_t.detach(), segments))
    with torch.no_grad():
        hv, hl = model.masks_from_similarities(s_v, s_l, valid)
        hv = _with_best(hv, s_v, None)
        hl = _with_best(hl, s_l, valid)
        m_v = rho + (1 - rho) * hv.float()
        m_l = (rho + (1 - rho) * hl.float()) * valid
    total = cfg.gla_weight * loss_gla
    metrics["loss_gla"] = float(loss_gla.detach())
    if cfg.itc_weight:
        if pg is not None:   # pool locally, gather the pooled rows: same math as the fused op
            loss_itc = sk.contrastive_loss(sk.masked_pool(v, m_v, normalize=True), sk.masked_pool(t, m_l, normalize=True),
                                           temperature=cfg.temperature, process_group=pg)
        else:
            loss_itc = sk.pooled_contrastive_loss(v, m_v, t, m_l, normalize=True, temperature=cfg.temperature)
        total = total + cfg.itc_weight * loss_itc
        metrics["loss_itc"] = float(loss_itc.detach())
    if cfg.fusion_itc_weight:
        B, P, _ = v.shape
        T = t.shape[1]
        f_v = model.fuse(v, t, m_v, torch.zeros(B, T, dtype=torch.bool, device=v.device))
        f_l = model.fuse(v, t, torch.zeros(B, P, dtype=torch.bool, device=v.device), m_l)
        loss_f = sk.contrastive_loss(f_v, f_l, temperature=cfg.temperature, process_group=pg)
        total = total + cfg.fusion_itc_weight * loss_f
        metrics["loss_fusion_itc"] = float(loss_f.detach())
    if teacher is not None and (cfg.gd_weight or cfg.ld_weight):
        tv_tower, tl_tower = teacher
        with torch.no_grad():
            tv = tv_tower(pixel_values=pv).last_hidden_state[:, 1:]
            tl = tl_tower(input_ids=ids, attention_mask=am.long()).last_hidden_state
        if cfg.ld_weight:
            l_ld = (sd.local_distill_dist(v, tv, None, pg) + sd.local_distill_dist(t, tl, valid, pg)) if pg is not None \
                else local_distill_loss(v, tv) + local_distill_loss(t, tl, valid)
            total = total + cfg.ld_weight * l_ld
            metrics["loss_ld"] = float(l_ld.detach())
        if cfg.gd_weight:
            tg_v = sk.masked_pool(tv, torch.ones(tv.shape[:2], dtype=torch.bool, device=tv.device), normalize=True)
            tg_l = sk.masked_pool(tl, valid, normalize=True)
            l_gd = (sd.global_distill_dist(g_i, tg_v, pg) + sd.global_distill_dist(g_t, tg_l, pg)) if pg is not None \
                else global_distill_loss(g_i, tg_v) + global_distill_loss(g_t, tg_l)
            total = total + cfg.gd_weight * l_gd
            metrics["loss_gd"] = float(l_gd.detach())
    metrics["loss"] = float(total.detach())
    metrics["rho"] = rho
    metrics["mask_ratio_v"] = float(hv.float().mean())
    metrics["mask_ratio_l"] = float(hl.float().sum() / valid.sum().clamp_min(1))
    if "gt_patch_mask" in batch and "gt_token_mask" in batch:
        gv, gl = batch["gt_patch_mask"].to(hv.device).bool(), batch["gt_token_mask"].to(hv.device).bool() & valid
        metrics["train_iou_v"] = float(mask_iou(hv, gv).mean())
        metrics["train_iou_l"] = float(mask_iou(hl, gl).mean())
    return total, metrics


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


def _param_groups(model: SolarModel, cfg: Stage1Config):
    towers, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (towers if name.startswith(("vision.", "text.")) else rest).append(p)
    groups = [{"params": rest, "lr_scale": 1.0}]
    if towers:
        groups.append({"params": towers, "lr_scale": cfg.tower_lr_scale})
    return groups


def _make_teacher(model: SolarModel):
    tv, tl = copy.deepcopy(model.vision).eval(), copy.deepcopy(model.text).eval()
    tv.requires_grad_(False)
    tl.requires_grad_(False)
    return tv, tl


def run_stage1(model: SolarModel, train_loader: Iterable[Mapping[str, Any]], cfg: Stage1Config, *,
               out_dir: str | Path, resume: bool = False, log: Optional[Callable[[dict], None]] = None,
               eval_loader: Optional[Iterable[Mapping[str, Any]]] = None, progress: bool = True,
               process_group=None) -> dict:
    """Train stage 1 for ``cfg.steps`` optimizer steps; returns the final metrics dict.

    process_group: train over the ranks of this torch.distributed group (default: the default
    group when torch.distributed is initialised with several ranks).  Every rank passes a loader
    of its own share of each global batch (same size on every rank); the losses, the QDA
    statistics and thresholds are those of the global batch, gradients are summed over ranks
    (each rank's is its share), rank 0's weights are broadcast first, so the ranks stay equal
    and match one process over the global batch.  Rank 0 writes checkpoints and evaluates.

    train_loader: any re-iterable of batches (dicts: pixel_values, input_ids, attention_mask,
    optionally gt_patch_mask / gt_token_mask); it is iterated again when exhausted.
    out_dir: ``stage1_ckpt/`` (model + optimizer + progress, every ``ckpt_every`` steps) and
    ``stage1_model/`` (the final model with its thresholds) are written there.
    resume: continue from ``out_dir/stage1_ckpt`` (CheckpointError if it is missing); batches
    already consumed are skipped so a deterministic loader resumes where it stopped.
    log: called with a metrics dict every ``log_every`` steps, after each evaluation
    (``{"event": "eval", ...}``) and at the end (``{"event": "final", ...}``).
    eval_loader: batches with ground truth for ``evaluate_masks`` during and after training.
    """
    from .logging import progress_bar

    validate_config(cfg)   # fields may have been set after construction
    log = log or (lambda m: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "stage1_ckpt"
    from .stage1_dist import allreduce_grads, broadcast_model, resolve_group
    pg = resolve_group(process_group)
    if pg is not None:
        import torch.distributed as dist
        broadcast_model(model, pg)
    main = pg is None or dist.get_rank(pg) == 0
    world = 1 if pg is None else dist.get_world_size(pg)
    torch.manual_seed(cfg.seed)
    model.train()
    groups = _param_groups(model, cfg)
    opt = torch.optim.AdamW([{"params": g["params"], "lr": cfg.lr * g["lr_scale"]} for g in groups],
                            lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    scales = [g["lr_scale"] for g in groups]
    step, consumed = 0, 0
    teacher = None
    if cfg.teacher == "init":
        teacher_path = out / "stage1_teacher"
        if resume and teacher_path.exists():
            from .checkpoint import load_model
            teacher = _make_teacher(load_model(teacher_path, map_location=model.device))
        else:
            teacher = _make_teacher(model)
            if main:
                model.save_pretrained(teacher_path)
    if resume:
        if not ckpt_dir.exists():
            raise CheckpointError(f"resume: no stage-1 checkpoint at {ckpt_dir}")
        extra, _ = load_training_state(ckpt_dir, model, opt)
        step, consumed = int(extra["step"]), int(extra["consumed"])
        torch.manual_seed(cfg.seed + step)
    state = _Stage1State(model, cfg.qda_momentum, cfg.qda_mode, group=pg)

    def save():
        if main:
            save_training_state(ckpt_dir, model, opt, {"step": step, "consumed": consumed,
                                                       "stage1_config": dataclasses.asdict(cfg)})

    def batches():
        skip = consumed
        while True:
            got = False
            for b in train_loader:
                got = True
                if skip:
                    skip -= 1
                    continue
                yield b
            if not got:
                raise ValueError("run_stage1: train_loader yielded no batches")

    it = batches()
    bar = progress_bar(total=cfg.steps, initial=step, desc="stage 1", disable=not progress, dynamic_ncols=True)
    t0, pairs, last = time.perf_counter(), 0, {}
    while step < cfg.steps:
        batch = _to(next(it), model.device)
        consumed += 1
        f = lr_factor(step, cfg)
        for g, sc in zip(opt.param_groups, scales):
            g["lr"] = cfg.lr * sc * f
        rho = rho_at(step, cfg)
        loss, metrics = stage1_losses(model, batch, cfg, rho, state, teacher, process_group=pg)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"stage 1: non-finite loss at step {step}: {metrics}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if pg is not None:
            allreduce_grads([p for g in groups for p in g["params"]], pg)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
        opt.step()
        step += 1
        pairs += batch["pixel_values"].shape[0] * world
        rate = pairs / max(time.perf_counter() - t0, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", pairs_s=f"{rate:.0f}", rho=f"{rho:.2f}")
        last = metrics
        if step % cfg.log_every == 0 or step == cfg.steps:
            log({"event": "train", "stage": 1, "step": step, "lr": cfg.lr * f, "pairs_per_s": rate, **metrics})
        if main and eval_loader is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            ev = evaluate_masks(model, eval_loader, max_batches=cfg.eval_batches, seed=cfg.seed)
            log({"event": "eval", "stage": 1, "step": step, **ev})
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
            save()
    bar.close()
    save()
    if main:
        model.save_pretrained(out / "stage1_model")
    if pg is not None:
        dist.barrier(group=pg)
    final = {"event": "final", "stage": 1, "step": step, "wall_s": time.perf_counter() - t0, **last}
    if main and eval_loader is not None:
        final.update(evaluate_masks(model, eval_loader, max_batches=0, seed=cfg.seed))
    log(final)
    return final
