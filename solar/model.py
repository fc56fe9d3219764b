"""The SOLAR model: unimodal towers E_V / E_L, adapters A_V / A_L, fusion encoder E_VL.

    pixel_values --E_V--> patch states --A_V--> patch tokens  [B, P, W] --\
                                                                          +-- E_VL([CLS] + kept
    input_ids ----E_L--> token states --A_L--> text tokens   [B, T, W] --/    positions) -> f [B, E]

* E_V / E_L are transformers ``CLIPVisionModel`` / ``CLIPTextModel`` towers: built with random
  weights from a ``CLIPVisionConfig`` / ``CLIPTextConfig`` (the ``tiny`` preset, trained from
  scratch on ShapesWorld), or loaded with ``from_pretrained`` from a local path or a hub name
  (``clip-b16``: openai/clip-vit-base-patch16).  ``HF_HUB_OFFLINE=1`` (or
  ``TRANSFORMERS_OFFLINE=1``) is honoured: nothing is downloaded, only local files are read.
* A_V / A_L: two-layer MLPs (LayerNorm -> Linear -> GELU -> Linear) into the shared width W.
* E_VL: ``fusion_layers`` pre-norm transformer layers over a learned [CLS] token, the adapted
  patch tokens and the adapted text tokens (plus a learned modality embedding each).  Keep
  masks are key-padding masks: [CLS] (and every query) attends only to kept positions.  The
  [CLS] output is projected to ``embed_dim`` and L2-normalised: the pair embedding f.
* Stage-1 thresholds ``tau_v`` / ``tau_l``, the QDA running statistics and the running means
  of the globals (``center_v`` / ``center_t``, see ``similarities_from_tokens``) are buffers,
  so they travel with the checkpoint (stage 2 and users reuse them).

Checkpoints are ``model.safetensors`` + ``config.json``: loading never executes code.
Token pooling goes through ``solar_kernels.masked_pool``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import solar_kernels as sk

from . import towers
from .checkpoint import load_model_files, load_state_strict, save_model
from .config import ModelConfig
from .data.tokenizer import model_tokenizer
from .towers import hub_offline

__all__ = ["ModelConfig", "SolarModel", "hub_offline", "load_model"]


class Adapter(nn.Module):
    """Two-layer MLP adapter: LayerNorm -> Linear(d_in, hidden) -> GELU -> Linear(hidden, W)."""

    def __init__(self, d_in: int, hidden: int, d_out: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(d_in)
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> [..., d_out]."""
        return self.fc2(self.drop(F.gelu(self.fc1(self.norm(x)))))


class LocalContext(nn.Module):
    """Residual local mixing of token states: x + conv(x) over a small window (1-D over text
    positions, or k x k over the square patch grid).

    Why (our choice, measured on ShapesWorld, docs/EXPERIMENTS.md): the tiny towers have no attention layers,
    because attention trained from scratch copies the whole input into every position and
    the local-to-global similarities stop being local.  Without any context, though, a word
    is a fixed vector: "top" or "red" alone cannot say *which* object it describes, so
    s_L(t) cannot tell a phrase describing a visible object from one describing an unseen
    object, and the text global is a bag of words (a patch cannot match "red circle at top
    left" as a whole).  A window of a few tokens gives each word its phrase (a real caption's
    noun phrase, ShapesWorld's "a small red circle at top left") and nothing beyond it, so
    positions stay local.  The convolution is zero-initialised: training starts from the
    per-position towers.  Padding positions (``valid`` False) are zeroed before mixing.
    """

    def __init__(self, dim: int, window: int, grid: bool = False):
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise ValueError(f"context window: expected a positive odd size, got {window}")
        self.grid = grid
        conv = nn.Conv2d if grid else nn.Conv1d
        self.conv = conv(dim, dim, window, padding=window // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, L, D] (L a square number of patches when ``grid``), valid [B, L] bool -> [B, L, D]."""
        B, L, D = x.shape
        xin = x if valid is None else x * valid[..., None].to(x.dtype)
        if self.grid:
            side = math.isqrt(L)
            if side * side != L:
                raise ValueError(f"LocalContext(grid=True): {L} patches are not a square grid")
            y = self.conv(xin.transpose(1, 2).reshape(B, D, side, side)).reshape(B, D, L).transpose(1, 2)
        else:
            y = self.conv(xin.transpose(1, 2)).transpose(1, 2)
        return x + y


class FusionLayer(nn.Module):
    """One pre-norm transformer layer whose attention takes an additive key bias [B, L]."""

    def __init__(self, width: int, heads: int, mlp: int, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"fusion width {width} must be divisible by fusion_heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp), nn.GELU(), nn.Linear(mlp, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, W]; key_bias [B, L] (0 keeps a key, -inf drops it, log w weights it)."""
        B, L, W = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        bias = key_bias[:, None, None, :].to(q.dtype)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, L, W)))
        return x + self.drop(self.mlp(self.norm2(x)))


def _keep_to_bias(keep: torch.Tensor, name: str, shape: tuple) -> torch.Tensor:
    """Bool keep mask -> 0 / -inf; float weights w in [0, 1] -> log w (soft attention masks)."""
    if keep.shape != shape:
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(keep.shape)}")
    if keep.dtype == torch.bool:
        return torch.zeros(shape, device=keep.device).masked_fill(~keep, float("-inf"))
    if not keep.is_floating_point():
        raise TypeError(f"{name}: expected a bool mask or float weights, got dtype {keep.dtype}")
    if (keep < 0).any() or (keep > 1).any():
        raise ValueError(f"{name}: float keep weights must lie in [0, 1]")
    return keep.float().clamp_min(0).log()


class SolarModel(nn.Module):
    """SOLAR's encoder (see the module docstring for the architecture).

    Public API (stable; stage 2, evaluation and users build on it):

    * ``patch_tokens(pixel_values)`` -> adapted patch tokens [B, P, W]
    * ``text_tokens(input_ids, attention_mask)`` -> adapted text tokens [B, T, W]
    * ``text_valid_mask(input_ids, attention_mask)`` -> [B, T] bool, content tokens only
    * ``global_image(pixel_values)`` / ``global_text(input_ids, attention_mask)`` -> [B, W]
      L2-normalised globals (masked mean of the adapted tokens) used by the local-to-global
      similarities
    * ``local_similarities(batch)`` -> (s_V [B, P], s_L [B, T]) for the batch's true pairs
    * ``fuse(patch_tokens, text_tokens, patch_keep, text_keep)`` -> f [B, E] normalised
    * ``embed(batch)`` -> f [B, E]: inference, one pass over all positions, no masks
    * ``intersection_masks(batch)`` -> (M_V [B, P] bool, M_L [B, T] bool) with tau_v / tau_l
    * ``save_pretrained(dir)`` / ``SolarModel.from_pretrained(dir)``: safetensors + json
    """

    def __init__(self, cfg: ModelConfig, *, _load_tower_weights: bool = True):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"cfg: expected a ModelConfig, got {type(cfg).__name__}")
        cfg = dataclasses.replace(cfg)
        offline = hub_offline()
        proj_v = proj_t = False
        # --- E_V ---
        if cfg.vision_tower_config is not None and (not _load_tower_weights or not cfg.vision_pretrained):
            self.vision, _ = towers.build_tower(cfg.vision_tower_class or "CLIPVisionModel",
                                                config=cfg.vision_tower_config)
            proj_v = cfg.tower_projections
        elif cfg.vision_pretrained:
            cfg.vision_tower_class = towers.tower_class_for("vision", cfg.vision_pretrained, offline)
            self.vision, proj_v = towers.build_tower(cfg.vision_tower_class, pretrained=cfg.vision_pretrained,
                                                     offline=offline)
        else:
            self.vision = CLIPVisionModel(CLIPVisionConfig(
                hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_mlp,
                num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3,
                attention_dropout=cfg.dropout))
        # --- E_L ---
        if cfg.text_tower_config is not None and (not _load_tower_weights or not cfg.text_pretrained):
            self.text, _ = towers.build_tower(cfg.text_tower_class or "CLIPTextModel", config=cfg.text_tower_config)
            proj_t = cfg.tower_projections
        elif cfg.text_pretrained:
            cfg.text_tower_class = towers.tower_class_for("text", cfg.text_pretrained, offline)
            self.text, proj_t = towers.build_tower(cfg.text_tower_class, pretrained=cfg.text_pretrained,
                                                   offline=offline)
        else:
            self.text = CLIPTextModel(CLIPTextConfig(
                vocab_size=cfg.vocab_size, hidden_size=cfg.text_hidden, intermediate_size=cfg.text_mlp,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                max_position_embeddings=cfg.max_text_len, bos_token_id=cfg.bos_token_id,
                eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                attention_dropout=cfg.dropout))
        if not cfg.text_pretrained and cfg.text_tower_config is None and cfg.text_layers == 0:
            # a tower without layers is a bag of words: caption positions are arbitrary (phrases
            # come in random order), so start the position embeddings at 0 (our choice; they are
            # still trained) instead of adding position noise to every word
            with torch.no_grad():
                getattr(self.text, "text_model", self.text).embeddings.position_embedding.weight.zero_()
        vc, tc = self.vision.config, self.text.config
        cfg.vision_tower_class = type(self.vision).__name__
        cfg.text_tower_class = type(self.text).__name__
        cfg.tower_projections = bool(proj_v and proj_t)
        cfg.vision_tower_config = _jsonable(vc.to_dict())
        cfg.text_tower_config = _jsonable(tc.to_dict())
        cfg.patch_size = int(vc.patch_size)
        if towers.family(self.vision) != "dinov2":   # DINOv2 interpolates its positions: any multiple of the patch
            cfg.image_size = int(vc.image_size)
        elif cfg.image_size % cfg.patch_size:
            raise ValueError(f"model.image_size: must be a multiple of the DINOv2 patch ({cfg.patch_size}), "
                             f"got {cfg.image_size}")
        cfg.vocab_size = int(tc.vocab_size)
        if towers.family(self.text) == "clip":
            cfg.max_text_len = int(tc.max_position_embeddings)
        else:   # RoBERTa / XLM-R positions start after the pad id
            limit = int(tc.max_position_embeddings) - (int(tc.pad_token_id) + 1 if "Roberta" in
                                                       cfg.text_tower_class else 0)
            if cfg.max_text_len > limit:
                raise ValueError(f"model.max_text_len: the {cfg.text_tower_class} tower takes at most {limit} "
                                 f"tokens, got {cfg.max_text_len}")
        if not cfg.image_mean:   # recorded, so that a saved model is fed pixels as in training
            cfg.image_mean, cfg.image_std = (list(x) for x in towers.image_stats(cfg))
        self.cfg = cfg
        self.tokenizer = None   # set by solar.train / load_model; saved with the model (tokenizer/)

        W = cfg.width
        self.context_v = LocalContext(vc.hidden_size, cfg.vision_context_window, grid=True) \
            if cfg.vision_context_window else None
        self.context_l = LocalContext(tc.hidden_size, cfg.text_context_window) if cfg.text_context_window else None
        self.adapter_v = Adapter(vc.hidden_size, cfg.adapter_hidden, W, cfg.dropout)
        self.adapter_l = Adapter(tc.hidden_size, cfg.adapter_hidden, W, cfg.dropout)
        self.cls = nn.Parameter(torch.randn(1, 1, W) * 0.02)
        self.type_v = nn.Parameter(torch.randn(1, 1, W) * 0.02)
        self.type_l = nn.Parameter(torch.randn(1, 1, W) * 0.02)
        self.fusion = nn.ModuleList(FusionLayer(W, cfg.fusion_heads, cfg.fusion_mlp, cfg.dropout)
                                    for _ in range(cfg.fusion_layers))
        self.fusion_norm = nn.LayerNorm(W)
        self.head = nn.Linear(W, cfg.embed_dim)

        # stage-1 thresholds and QDA running statistics (mean, var of true / negative pairs)
        self.register_buffer("tau_v", torch.tensor(0.0))
        self.register_buffer("tau_l", torch.tensor(0.0))
        self.register_buffer("qda_v", torch.zeros(4))  # mu_pos, var_pos, mu_neg, var_neg
        self.register_buffer("qda_l", torch.zeros(4))
        self.register_buffer("qda_initialized", torch.tensor(0, dtype=torch.int64))
        # running means of the image / text globals (see similarities_from_tokens)
        self.register_buffer("center_v", torch.zeros(W))
        self.register_buffer("center_t", torch.zeros(W))
        if cfg.lora_rank > 0:
            self.enable_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        self.set_freeze(vision=cfg.freeze_vision, text=cfg.freeze_text)
        self.activation_checkpointing = False   # a run-time switch, not part of the architecture

    # ------------------------------------------------------------------ options
    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute activations in the backward pass instead of keeping them (less memory, one
        more forward): each E_VL layer through ``torch.utils.checkpoint``, the towers' layers
        through transformers' gradient checkpointing.  Active in training mode only."""
        self.activation_checkpointing = bool(enabled)
        for tower in (self.vision, self.text):
            if hasattr(tower, "activation_checkpointing_enable"):   # transformers >= 5 spelling
                if enabled:
                    tower.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                elif tower.is_activation_checkpointing:
                    tower.activation_checkpointing_disable()
            elif enabled:
                tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            elif tower.is_gradient_checkpointing:
                tower.gradient_checkpointing_disable()

    def set_freeze(self, *, vision: Optional[bool] = None, text: Optional[bool] = None) -> None:
        """Freeze (True) or fine-tune (False) the towers; None leaves a tower as it is.  A tower
        with LoRA fine-tunes its LoRA weights only; heads SOLAR never uses (CLIP's projections,
        poolers) stay frozen (`solar.towers.set_trainable`)."""
        if vision is not None:
            self.cfg.freeze_vision = bool(vision)
            towers.set_trainable(self.vision, not vision)
        if text is not None:
            self.cfg.freeze_text = bool(text)
            towers.set_trainable(self.text, not text)

    def enable_lora(self, rank: int, alpha: float, dropout: float = 0.0, targets=()) -> None:
        """Inject LoRA (``peft``) of `rank` / `alpha` into both towers' attention and MLP linears
        (`targets`: their names; empty: each tower family's default, `solar.towers`); the base
        weights are then frozen and only the LoRA weights train.  A tower that has LoRA already is
        left as it is.  ``save_pretrained`` folds the LoRA deltas into the weights."""
        if rank < 1:
            raise ValueError(f"model.lora_rank: expected >= 1 to enable LoRA, got {rank}")
        for tower in (self.vision, self.text):
            if not towers.has_lora(tower):
                towers.apply_lora(tower, rank, alpha, dropout, targets)
        self.cfg.lora_rank, self.cfg.lora_alpha, self.cfg.lora_dropout = int(rank), float(alpha), float(dropout)
        self.cfg.lora_targets = list(targets)
        self.set_freeze(vision=self.cfg.freeze_vision, text=self.cfg.freeze_text)

    def merged_state_dict(self) -> dict:
        """The state dict with LoRA folded into the tower weights (plain names; see
        `solar.towers.merged_state_dict`); ``state_dict()`` itself when there is no LoRA."""
        return towers.merged_state_dict(self) if self.cfg.lora_rank > 0 else self.state_dict()

    def train(self, mode: bool = True):
        """nn.Module.train, keeping frozen towers in eval mode."""
        super().train(mode)
        if self.cfg.freeze_vision:
            self.vision.eval()
        if self.cfg.freeze_text:
            self.text.eval()
        return self

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return self.cls.device

    # ------------------------------------------------------------------ tokens
    def patch_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """E_V then A_V.  pixel_values [B, 3, H, W] float (H = W = cfg.image_size) -> [B, P, W]."""
        if not torch.is_tensor(pixel_values) or pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values: expected a [B, 3, H, W] tensor, got "
                             f"{tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values)}")
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values: expected a float tensor, got {pixel_values.dtype}")
        s = self.cfg.image_size
        if tuple(pixel_values.shape[2:]) != (s, s):
            raise ValueError(f"pixel_values: expected spatial size {s}x{s}, got {tuple(pixel_values.shape[2:])}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_vision):
            h = towers.patch_states(self.vision, pixel_values.to(self.device))
        if self.context_v is not None:
            h = self.context_v(h)
        return self.adapter_v(h)

    def _check_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids: expected an int64 [B, T] tensor, got "
                             f"{(input_ids.dtype, tuple(input_ids.shape)) if torch.is_tensor(input_ids) else type(input_ids)}")
        if not torch.is_tensor(attention_mask) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)} like input_ids, got "
                             f"{tuple(attention_mask.shape) if torch.is_tensor(attention_mask) else type(attention_mask)}")
        if input_ids.shape[1] > self.cfg.max_text_len:
            raise ValueError(f"input_ids: {input_ids.shape[1]} tokens exceed the text tower's "
                             f"max_text_len={self.cfg.max_text_len}")
        if input_ids.numel() and (int(input_ids.max()) >= self.cfg.vocab_size or int(input_ids.min()) < 0):
            raise ValueError(f"input_ids: ids must lie in [0, {self.cfg.vocab_size}) (the text tower's vocab_size); "
                             f"got range [{int(input_ids.min())}, {int(input_ids.max())}] - was the model built "
                             f"with ModelConfig.with_tokenizer(tokenizer)?")

    def text_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """E_L then A_L.  input_ids int64 [B, T], attention_mask bool [B, T] -> [B, T, W]."""
        self._check_text(input_ids, attention_mask)
        dev = self.device
        ids, am = input_ids.to(dev).long(), attention_mask.to(dev).bool()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_text):
            h = towers.text_states(self.text, ids, am, self.cfg.text_causal)
        if self.context_l is not None:
            h = self.context_l(h, am)
        return self.adapter_l(h)

    def text_valid_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] bool: positions that are real content tokens (padding, BOS and EOS excluded)."""
        self._check_text(input_ids, attention_mask)
        ids = input_ids.to(self.device)
        keep = attention_mask.to(self.device).bool()
        for special in {self.cfg.bos_token_id, self.cfg.eos_token_id, self.cfg.pad_token_id}:
            keep = keep & (ids != special)
        return keep

    # ------------------------------------------------------------------ globals
    @staticmethod
    def pool_global(tokens: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """normalize(masked mean of tokens [B, L, W] over `valid` [B, L]) -> [B, W]."""
        if valid is None:
            valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return sk.masked_pool(tokens, valid, normalize=True)

    def global_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised global image embedding [B, W]: mean of the adapted patch tokens."""
        return self.pool_global(self.patch_tokens(pixel_values))

    def global_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised global text embedding [B, W]: mean of the adapted content tokens."""
        return self.pool_global(self.text_tokens(input_ids, attention_mask),
                                self.text_valid_mask(input_ids, attention_mask))

    def text_segments(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Optional[torch.Tensor]:
        """[B, T] int64 phrase index of each content token (-1: not in a phrase: delimiters,
        BOS / EOS / padding), or None when the config has no ``text_segment_ids`` (per token).

        A phrase is a maximal run of content tokens between delimiter tokens (``text_segment_ids``:
        conjunctions and punctuation, e.g. "and", ","), the text analogue of stage 2's image
        segments.  See ``similarities_from_tokens``.
        """
        if not self.cfg.text_segment_ids:
            return None
        valid = self.text_valid_mask(input_ids, attention_mask)
        ids = input_ids.to(self.device)
        delim = torch.zeros_like(valid)
        for d in self.cfg.text_segment_ids:
            delim |= ids == d
        delim &= valid
        seg = torch.cumsum(delim.long(), 1)
        return seg.masked_fill(~valid | delim, -1)

    @staticmethod
    def local_text_features(t: torch.Tensor, segments: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Unit-norm text features [B, T, W] whose dot with a global gives s_L: normalize(t), and,
        with ``segments`` [B, T] (see ``text_segments``), the mean of the unit features over each
        token's phrase (tokens with segment -1 keep their own feature)."""
        n = F.normalize(t, dim=-1)
        if segments is None:
            return n
        if segments.shape != t.shape[:2]:
            raise ValueError(f"segments: expected shape {tuple(t.shape[:2])}, got {tuple(segments.shape)}")
        member = segments >= 0
        S = int(segments.max()) + 1 if member.any() else 1
        oh = F.one_hot(segments.clamp_min(0), S).to(n.dtype) * member[..., None].to(n.dtype)  # [B, T, S]
        mean = torch.einsum("bts,btw->bsw", oh, n) / oh.sum(1).clamp_min(1)[..., None]
        return torch.where(member[..., None], torch.einsum("bts,bsw->btw", oh, mean), n)

    def similarities_from_tokens(self, v: torch.Tensor, t: torch.Tensor, text_valid: torch.Tensor,
                                 segments: Optional[torch.Tensor] = None):
        """Local-to-global similarities from adapted tokens.

        v [B, P, W], t [B, T, W], text_valid [B, T] bool ->
        (s_V [B, P], s_L [B, T], g_I [B, W], g_T [B, W]), s_L 0 at invalid positions.

        s_V(p) = <normalize(patch p), g_T - c_T> and s_L(t) = <normalize(token t), g_I - c_I>,
        where c_T / c_I (buffers ``center_t`` / ``center_v``) are running means of the text /
        image globals over the training data (stage 1 keeps them; zero = plain cosine).  Our
        choice: the part of a global shared by every pair (background patches, "a", "and")
        says nothing about which positions this pair shares, and without the centering a
        position that matches every caption scores as high as the intersection.  The centering
        is linear and batch-independent, so masks of a pair do not depend on its batch.

        ``segments`` [B, T] (from ``text_segments``; None: per token): s_L(t) uses the mean unit
        feature of t's phrase (``local_text_features``), so a phrase is kept or dropped as a whole.
        Our choice, measured on ShapesWorld (docs/EXPERIMENTS.md): a word alone ("top", "at")
        often cannot say whether its phrase describes something in the image; its phrase can.
        """
        g_i = self.pool_global(v)
        g_t = self.pool_global(t, text_valid)
        s_v = torch.einsum("bpw,bw->bp", F.normalize(v, dim=-1), g_t - self.center_t)
        s_l = torch.einsum("btw,bw->bt", self.local_text_features(t, segments), g_i - self.center_v) * text_valid
        return s_v, s_l, g_i, g_t

    def _batch_tensors(self, batch: Mapping[str, Any]):
        for k in ("pixel_values", "input_ids", "attention_mask"):
            if k not in batch:
                raise KeyError(f"batch: missing field {k!r} (has {sorted(batch)})")
        return batch["pixel_values"], batch["input_ids"], batch["attention_mask"]

    def local_similarities(self, batch: Mapping[str, Any]):
        """(s_V [B, P], s_L [B, T]) for the batch's true (image, caption) pairs.

        s_V(p) = cos(patch token p, global text of the same pair); s_L(t) = cos(token t, global
        image of the same pair); s_L is 0 at padding / special positions.
        """
        pv, ids, am = self._batch_tensors(batch)
        v = self.patch_tokens(pv)
        t = self.text_tokens(ids, am)
        s_v, s_l, _, _ = self.similarities_from_tokens(v, t, self.text_valid_mask(ids, am),
                                                       self.text_segments(ids, am))
        return s_v, s_l

    # ------------------------------------------------------------------ fusion
    def fuse(self, patch_tokens: torch.Tensor, text_tokens: torch.Tensor,
             patch_keep: Optional[torch.Tensor] = None, text_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """E_VL over [CLS] + kept positions -> normalised pair embedding f [B, E].

        patch_tokens [B, P, W], text_tokens [B, T, W] (adapted); patch_keep [B, P] and
        text_keep [B, T] are bool key masks (None keeps every position).  Float weights in
        [0, 1] are also accepted: they enter the attention as an additive log-weight (a soft
        mask; 0 drops the key).  [CLS] is always kept, so a pair with nothing kept on one side
        (e.g. ``text_keep`` all False: an image-only view) is well defined.
        """
        if patch_tokens.dim() != 3 or text_tokens.dim() != 3 or patch_tokens.shape[0] != text_tokens.shape[0] \
                or patch_tokens.shape[2] != self.cfg.width or text_tokens.shape[2] != self.cfg.width:
            raise ValueError(f"fuse: expected patch_tokens [B, P, {self.cfg.width}] and text_tokens "
                             f"[B, T, {self.cfg.width}], got {tuple(patch_tokens.shape)} and {tuple(text_tokens.shape)}")
        B, P, _ = patch_tokens.shape
        T = text_tokens.shape[1]
        dev = patch_tokens.device
        pk = torch.ones(B, P, dtype=torch.bool, device=dev) if patch_keep is None else patch_keep.to(dev)
        tk = torch.ones(B, T, dtype=torch.bool, device=dev) if text_keep is None else text_keep.to(dev)
        biases, xs = [torch.zeros(B, 1, device=dev)], [self.cls.expand(B, -1, -1)]
        # A side that no row keeps is left out of the sequence: dropped keys never reach a kept
        # position, so the result is the same and an image-only / text-only view costs half.
        for keep, tokens, type_emb, name, shape in ((pk, patch_tokens, self.type_v, "patch_keep", (B, P)),
                                                    (tk, text_tokens, self.type_l, "text_keep", (B, T))):
            b = _keep_to_bias(keep, name, shape)
            if torch.isneginf(b).all():
                continue
            biases.append(b)
            xs.append(tokens + type_emb)
        bias, x = torch.cat(biases, dim=1), torch.cat(xs, dim=1)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.fusion:
            x = torch.utils.checkpoint.checkpoint(layer, x, bias, use_reentrant=False) if recompute else layer(x, bias)
        return F.normalize(self.head(self.fusion_norm(x[:, 0])), dim=-1)

    def embed(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Inference: the pair embedding f [B, E] in one pass (all content positions, no masks).

        Padding, BOS and EOS positions are excluded from E_VL's keys.
        """
        pv, ids, am = self._batch_tensors(batch)
        v = self.patch_tokens(pv)
        t = self.text_tokens(ids, am)
        return self.fuse(v, t, None, self.text_valid_mask(ids, am))

    # ------------------------------------------------------------------ masks
    def masks_from_similarities(self, s_v: torch.Tensor, s_l: torch.Tensor, text_valid: torch.Tensor):
        """(M_V, M_L) bool: s_V > tau_v over patches, s_L > tau_l over valid text tokens."""
        return s_v > self.tau_v, (s_l > self.tau_l) & text_valid

    @torch.no_grad()
    def intersection_masks(self, batch: Mapping[str, Any]):
        """(M_V [B, P] bool, M_L [B, T] bool): the stage-1 intersection masks of a batch.

        Position p (t) is in the intersection when s_V(p) > tau_v (s_L(t) > tau_l), with the
        thresholds learnt by stage 1's QDA; padding / special text positions are always False.
        """
        pv, ids, am = self._batch_tensors(batch)
        v = self.patch_tokens(pv)
        t = self.text_tokens(ids, am)
        valid = self.text_valid_mask(ids, am)
        s_v, s_l, _, _ = self.similarities_from_tokens(v, t, valid, self.text_segments(ids, am))
        return self.masks_from_similarities(s_v, s_l, valid)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory: str | os.PathLike, *, merge_lora: bool = True) -> Path:
        """Write ``model.safetensors`` (all parameters and buffers), ``config.json`` and the
        model's tokenizer (``tokenizer/``, when it has one).  LoRA weights are folded into the
        towers (`merge_lora`, the default: the folder loads without peft); training checkpoints
        keep them apart (``merge_lora=False``) so a resumed run continues the same adapters."""
        return save_model(self, directory, merge_lora=merge_lora)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> "SolarModel":
        """Load a model written by ``save_pretrained`` (no pickle, no code execution)."""
        return load_model(directory, map_location=map_location)


def load_model(directory: str | os.PathLike, *, map_location="cpu") -> SolarModel:
    """Rebuild a SolarModel from a directory written by ``save_pretrained``.

    The towers are rebuilt from the recorded configs (the hub is never contacted) and every
    tensor is loaded strictly: a missing or unexpected key is a CheckpointError."""
    meta, state = load_model_files(directory)
    model = SolarModel(ModelConfig.from_dict(meta), _load_tower_weights=False)
    load_state_strict(model, state, directory)
    model.tokenizer = model_tokenizer(directory, model.cfg.max_text_len)
    return model.to(map_location)


def _jsonable(d: dict) -> dict:
    """Drop non-JSON values from a transformers config dict."""
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out

