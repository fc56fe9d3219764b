"""Baselines trained on the same data with the same budget as SOLAR.

* CLIP-SF (CLIP score fusion): the same towers and adapters as SOLAR (a `SolarModel`
  whose E_VL is simply unused), trained with the plain symmetric image-text InfoNCE on
  the global embeddings f_I = global_image, f_T = global_text.  The pair embedding is
  normalise(f_I + f_T), so the inner product of two pair embeddings is (up to the
  norm) the sum of the four image/text cross scores: score fusion.
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

from .distributed import DistInfo, get_dist
from .trainer import LoopOptions, OptimSpec, Phase, train_loop

__all__ = ["clip_sf_embed", "ClipSFLoss", "run_clip_sf", "EMBEDDING_KINDS", "pair_embedding"]

EMBEDDING_KINDS = ("solar", "clip_sf")


def clip_sf_embed(model, batch: dict) -> torch.Tensor:
    """CLIP-SF pair embedding [B, W]: normalise(global_image + global_text)."""
    f_i = model.global_image(batch["pixel_values"])
    f_t = model.global_text(batch["input_ids"], batch["attention_mask"])
    return F.normalize(f_i + f_t, dim=-1)


def pair_embedding(model, batch: dict, kind: str = "solar") -> torch.Tensor:
    """The pair embedding of `batch` for an embedding rule in EMBEDDING_KINDS."""
    if kind == "solar":
        return model.embed(batch)
    if kind == "clip_sf":
        return clip_sf_embed(model, batch)
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
