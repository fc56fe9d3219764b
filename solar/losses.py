"""Stage-1 losses: Global-Local Alignment (GLA) hinge and Pearson-correlation distillation.

* ``gla_hinge``: for anchor i of one modality, m(i, j) = mean over i's valid local tokens
  of cos(token, global embedding j of the other modality).  The true pair must beat the
  mean over in-batch negatives by a margin:
      L = mean_i max(0, mean_{j != i} m(i, j) + margin - m(i, i)).
  The masked mean is a ``solar_kernels.masked_pool`` of the L2-normalised tokens, so the
  whole B x B table costs one [B, W] x [W, B] product.
* ``local_distill_loss`` (L_LD): per sample, the token-token cosine-similarity matrix of
  the student and of a frozen teacher; 1 - Pearson correlation of each row (over valid
  columns), averaged over valid rows.
* ``global_distill_loss`` (L_GD): the in-batch similarity matrix of student globals and
  of teacher globals; 1 - Pearson correlation of each row over the other samples (the
  diagonal, always 1 for normalised vectors, is left out: our choice), averaged over rows.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

import solar_kernels as sk

__all__ = ["gla_hinge", "pearson_rows", "local_distill_loss", "global_distill_loss"]


def gla_hinge(tokens: torch.Tensor, valid: Optional[torch.Tensor], other_global: torch.Tensor,
              margin: float) -> torch.Tensor:
    """GLA hinge for one direction.

    tokens [B, L, W] local tokens of one modality (normalised here), valid [B, L] bool/float
    (None: all), other_global [B, W] normalised globals of the other modality.  Returns a
    scalar; with B = 1 there are no negatives and the loss is 0 (still differentiable).
    """
    if tokens.dim() != 3:
        raise ValueError(f"tokens: expected [B, L, W], got {tuple(tokens.shape)}")
    B, L, W = tokens.shape
    if other_global.shape != (B, W):
        raise ValueError(f"other_global: expected {(B, W)}, got {tuple(other_global.shape)}")
    if valid is None:
        valid = torch.ones(B, L, dtype=torch.bool, device=tokens.device)
    pooled = sk.masked_pool(F.normalize(tokens, dim=-1), valid)  # [B, W] mean of cosines' left factor
    m = pooled @ other_global.t()                                  # m[i, j]
    pos = m.diagonal()
    if B < 2:
        return (pos * 0).sum()
    neg = (m.sum(1) - pos) / (B - 1)
    return F.relu(neg + margin - pos).mean()


def pearson_rows(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None,
                 eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of matching rows of a and b [..., K] over masked columns -> [...]."""
    if a.shape != b.shape:
        raise ValueError(f"pearson_rows: a {tuple(a.shape)} and b {tuple(b.shape)} must match")
    w = torch.ones_like(a) if mask is None else mask.to(a.dtype).expand_as(a)
    n = w.sum(-1, keepdim=True).clamp_min(1)
    ca = (a - (w * a).sum(-1, keepdim=True) / n) * w
    cb = (b - (w * b).sum(-1, keepdim=True) / n) * w
    num = (ca * cb).sum(-1)
    den = (ca.pow(2).sum(-1) * cb.pow(2).sum(-1)).clamp_min(eps * eps).sqrt()
    return num / den


def local_distill_loss(student: torch.Tensor, teacher: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """L_LD: 1 - Pearson(rows of student / teacher token-token cosine matrices).

    student [B, L, Ds], teacher [B, L, Dt] (widths may differ), valid [B, L] bool (None: all).
    Rows (and columns) at invalid positions are excluded; rows with fewer than 2 valid
    columns are skipped.
    """
    if student.dim() != 3 or teacher.dim() != 3 or student.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"local_distill_loss: expected student [B, L, Ds] and teacher [B, L, Dt], "
                         f"got {tuple(student.shape)} and {tuple(teacher.shape)}")
    B, L, _ = student.shape
    if valid is None:
        valid = torch.ones(B, L, dtype=torch.bool, device=student.device)
    valid = valid.bool()
    s = F.normalize(student, dim=-1)
    t = F.normalize(teacher.detach().to(student.dtype), dim=-1)
    ss = s @ s.transpose(1, 2)
    tt = t @ t.transpose(1, 2)
    col = valid[:, None, :].expand(B, L, L)
    r = pearson_rows(ss, tt, col)
    rows = valid & (valid.sum(1, keepdim=True) >= 2)
    if not rows.any():
        return (ss * 0).sum()
    return (1 - r)[rows].mean()


def global_distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """L_GD: 1 - Pearson(rows of the in-batch similarity matrices), diagonal excluded.

    student [B, Ds], teacher [B, Dt] globals (normalised here).  B < 3 gives 0.
    """
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"global_distill_loss: expected student [B, Ds] and teacher [B, Dt], "
                         f"got {tuple(student.shape)} and {tuple(teacher.shape)}")
    B = student.shape[0]
    s = F.normalize(student, dim=-1)
    t = F.normalize(teacher.detach().to(student.dtype), dim=-1)
    gs, gt = s @ s.t(), t @ t.t()
    if B < 3:
        return (gs * 0).sum()
    off = ~torch.eye(B, dtype=torch.bool, device=s.device)
    return (1 - pearson_rows(gs, gt, off)).mean()
