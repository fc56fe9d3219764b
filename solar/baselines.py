"""Baselines trained on the same data with the same budget as SOLAR.

* CLIP-SF (CLIP score fusion): the same towers and adapters as SOLAR (a `SolarModel`
  whose E_VL is simply unused), trained with the plain symmetric image-text InfoNCE on
  the global embeddings f_I = global_image, f_T = global_text.  The pair embedding is
  normalise(f_I + f_T), so the inner product of two pair embeddings is (up to the
  norm) the sum of the four image/text cross scores: score fusion.
* Zero-shot CLIP-SF (the paper's "zero-shot CLIP score fusion"): no training; the pretrained
  towers' own pooled embeddings in their shared image-text space (CLIP: [CLS] / EOS through
  CLIP's projection heads; SigLIP: its pooling heads), normalised, summed and normalised
  again.  Needs towers that came with those heads (``cfg.tower_projections``).
* SOLAR after stage 1 only: the stage-1 checkpoint embedded with `SolarModel.embed`
  (no code here; `solar.evaluate` handles it).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import solar_kernels as sk

from . import towers
from .distributed import DistInfo, get_dist
from .trainer import LoopOptions, OptimSpec, Phase, train_loop

__all__ = ["clip_sf_embed", "zero_shot_embed", "ClipSFLoss", "run_clip_sf", "EMBEDDING_KINDS", "pair_embedding",
           "embedding_dim"]

EMBEDDING_KINDS = ("solar", "clip_sf", "clip_zs")


def clip_sf_embed(model, batch: dict) -> torch.Tensor:
    """CLIP-SF pair embedding [B, W]: normalise(global_image + global_text)."""
    f_i = model.global_image(batch["pixel_values"])
    f_t = model.global_text(batch["input_ids"], batch["attention_mask"])
    return F.normalize(f_i + f_t, dim=-1)


def _check_zero_shot(model) -> None:
    if not model.cfg.tower_projections:
        raise ValueError("kind 'clip_zs': the model's towers did not come with pretrained image-text projection "
                         "heads (zero-shot CLIP-SF needs pretrained CLIP or SigLIP towers, e.g. a full CLIP folder)")


def zero_shot_embed(model, batch: dict) -> torch.Tensor:
    """Zero-shot CLIP-SF pair embedding [B, D]: normalise(normalise(f_I) + normalise(f_T)) with the
    towers' own pooled, projected embeddings (D: CLIP's projection_dim)."""
    _check_zero_shot(model)
    dev = model.device
    f_i = towers.zero_shot_image(model.vision, batch["pixel_values"].to(dev))
    f_t = towers.zero_shot_text(model.text, batch["input_ids"].to(dev).long(), batch["attention_mask"].to(dev).bool())
    return F.normalize(F.normalize(f_i, dim=-1) + F.normalize(f_t, dim=-1), dim=-1)


def embedding_dim(model, kind: str) -> int:
    """The width of `model`'s pair embeddings under embedding rule `kind`."""
    if kind == "solar":
        return int(model.cfg.embed_dim)
    if kind == "clip_sf":
        return int(model.cfg.width)
    if kind == "clip_zs":
        _check_zero_shot(model)
        vc = model.vision.config
        return int(getattr(vc, "projection_dim", None) or vc.hidden_size)
    raise ValueError(f"kind: expected one of {EMBEDDING_KINDS}, got {kind!r}")


def pair_embedding(model, batch: dict, kind: str = "solar") -> torch.Tensor:
    """The pair embedding of `batch` for an embedding rule in EMBEDDING_KINDS."""
    if kind == "solar":
        return model.embed(batch)
    if kind == "clip_sf":
        return clip_sf_embed(model, batch)
    if kind == "clip_zs":
        return zero_shot_embed(model, batch)
    raise ValueError(f"kind: expected one of {EMBEDDING_KINDS}, got {kind!r}")


class ClipSFLoss(nn.Module):
    """Symmetric image-text InfoNCE on the global embeddings (over the global batch)."""

    def __init__(self, model, temperature: float = 0.05, dist_info: Optional[DistInfo] = None):
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.dist_info = dist_info or get_dist()

    def embed(self, batch: dict) -> dict:
        """The global image and text embeddings of `batch` (the part a micro-batched step splits)."""
        return {"f_i": self.model.global_image(batch["pixel_values"]),
                "f_t": self.model.global_text(batch["input_ids"], batch["attention_mask"])}

    def loss_from(self, batch: dict, emb: dict, step: int):
        """The symmetric InfoNCE of the embeddings `emb` of `batch` (see `embed`)."""
        f_i, f_t = emb["f_i"], emb["f_t"]
        loss = sk.contrastive_loss(f_i, f_t, temperature=self.temperature, symmetric=True,
                                   process_group=self.dist_info.group)
        with torch.no_grad():
            pos = (f_i * f_t).sum(-1).mean()
        return loss, {"pos_sim": pos}

    def forward(self, batch: dict, step: int):
        """(loss, metrics) of `batch`."""
        return self.loss_from(batch, self.embed(batch), step)


def run_clip_sf(model, data, *, steps: int, global_batch: int, lr: float, temperature: float, out_dir: str,
                resume: bool = False, log=None, dist_info: Optional[DistInfo] = None, warmup: int = 20,
                min_lr_ratio: float = 0.1, weight_decay: float = 0.05, grad_clip: float = 1.0,
                ckpt_every: int = 100, log_every: int = 10, progress: bool = True, options=None) -> dict:
    """Train the CLIP-SF baseline for `steps` steps of `global_batch` pairs (checkpoints in
    {out_dir}/ckpt, resumable; options: `solar.trainer.LoopOptions`); returns the loop's
    summary dict."""
    di = dist_info or get_dist()
    phase = Phase(name="clip_sf", model=model, loss=ClipSFLoss(model, temperature, di), data=data, steps=steps,
                  global_batch=global_batch,
                  optim=OptimSpec(lr=lr, warmup=warmup, weight_decay=weight_decay, grad_clip=grad_clip,
                                  min_lr_ratio=min_lr_ratio),
                  ckpt_every=ckpt_every, log_every=log_every)
    options = options or LoopOptions()
    options = dataclasses.replace(options, progress=progress and options.progress)
    return train_loop(phase, out_dir=out_dir, resume=resume, log=log, dist_info=di, options=options)
