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

Each loss takes ``process_group=`` as solar_kernels' ops do: with a torch.distributed group
the inputs are this rank's rows of the global batch (rank r holds global rows r*n .. r*n+n-1),
the value returned is the global batch's on every rank, and its gradient on rank r is r's
share, so the SUM of the ranks' gradients is the gradient of the global loss (the training
loop turns DDP's mean into that sum).  ``None`` (or a group of one rank) is the plain
single-process computation.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

import solar_kernels as sk

__all__ = ["gla_hinge", "pearson_rows", "local_distill_loss", "global_distill_loss", "resolve_group",
           "gather_rows", "global_value", "row_offset"]


def resolve_group(process_group=None):
    """`process_group` when it spans more than one rank, else None (a single-process loss)."""
    if process_group is None or not (dist.is_available() and dist.is_initialized()):
        return None
    return process_group if dist.get_world_size(process_group) > 1 else None


def gather_rows(t: torch.Tensor, group, grad: bool = True) -> torch.Tensor:
    """Concatenation over the ranks of `group` of `t` (same shape everywhere); with `grad` the
    backward sums every rank's gradient into its slice."""
    if grad:
        from torch.distributed.nn.functional import all_gather
        return torch.cat(all_gather(t.contiguous(), group=group))
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def global_value(share: torch.Tensor, group) -> torch.Tensor:
    """`share` (this rank's part of a global sum) with the summed value and the local gradient."""
    total = share.detach().clone()
    dist.all_reduce(total, group=group)
    return share + (total - share.detach())


def row_offset(n: int, group) -> tuple[int, int]:
    """(first global row of this rank, global rows) for `n` rows per rank (0, n without a group)."""
    if group is None:
        return 0, n
    return dist.get_rank(group) * n, n * dist.get_world_size(group)


def gla_hinge(tokens: torch.Tensor, valid: Optional[torch.Tensor], other_global: torch.Tensor,
              margin: float, process_group=None) -> torch.Tensor:
    """GLA hinge for one direction.

    tokens [B, L, W] local tokens of one modality (normalised here), valid [B, L] bool/float
    (None: all), other_global [B, W] normalised globals of the other modality.  Returns a
    scalar; with B = 1 there are no negatives and the loss is 0 (still differentiable).
    process_group: the local anchors against the globals of every rank (module docstring).
    """
    if tokens.dim() != 3:
        raise ValueError(f"tokens: expected [B, L, W], got {tuple(tokens.shape)}")
    B, L, W = tokens.shape
    if other_global.shape != (B, W):
        raise ValueError(f"other_global: expected {(B, W)}, got {tuple(other_global.shape)}")
    if valid is None:
        valid = torch.ones(B, L, dtype=torch.bool, device=tokens.device)
    pg = resolve_group(process_group)
    pooled = sk.masked_pool(F.normalize(tokens, dim=-1), valid)  # [B, W] mean of cosines' left factor
    if pg is None:
        m = pooled @ other_global.t()                              # m[i, j]
        pos = m.diagonal()
        if B < 2:
            return (pos * 0).sum()
        neg = (m.sum(1) - pos) / (B - 1)
        return F.relu(neg + margin - pos).mean()
    off, N = row_offset(B, pg)
    m = pooled @ gather_rows(other_global, pg).t()                 # [B, N]
    ar = torch.arange(B, device=m.device)
    pos = m[ar, off + ar]
    if N < 2:
        return global_value((pos * 0).sum(), pg)
    neg = (m.sum(1) - pos) / (N - 1)
    return global_value(F.relu(neg + margin - pos).sum() / N, pg)


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


def local_distill_loss(student: torch.Tensor, teacher: torch.Tensor, valid: Optional[torch.Tensor] = None,
                       process_group=None) -> torch.Tensor:
    """L_LD: 1 - Pearson(rows of student / teacher token-token cosine matrices).

    student [B, L, Ds], teacher [B, L, Dt] (widths may differ), valid [B, L] bool (None: all).
    Rows (and columns) at invalid positions are excluded; rows with fewer than 2 valid
    columns are skipped.  process_group: the mean over the rows of every rank.
    """
    pg = resolve_group(process_group)
    if pg is not None:
        B, L, _ = student.shape
        v = torch.ones(B, L, dtype=torch.bool, device=student.device) if valid is None else valid.bool()
        rows = (v & (v.sum(1, keepdim=True) >= 2)).sum().to(torch.float64)
        total_rows = rows.clone()
        dist.all_reduce(total_rows, group=pg)
        local = local_distill_loss(student, teacher, valid)
        return global_value(local * float(rows / total_rows.clamp_min(1)), pg)
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


def global_distill_loss(student: torch.Tensor, teacher: torch.Tensor, process_group=None) -> torch.Tensor:
    """L_GD: 1 - Pearson(rows of the in-batch similarity matrices), diagonal excluded.

    student [B, Ds], teacher [B, Dt] globals (normalised here).  B < 3 gives 0.
    process_group: local rows against the columns of every rank.
    """
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"global_distill_loss: expected student [B, Ds] and teacher [B, Dt], "
                         f"got {tuple(student.shape)} and {tuple(teacher.shape)}")
    B = student.shape[0]
    s = F.normalize(student, dim=-1)
    t = F.normalize(teacher.detach().to(student.dtype), dim=-1)
    pg = resolve_group(process_group)
    if pg is None:
        gs, gt = s @ s.t(), t @ t.t()
        if B < 3:
            return (gs * 0).sum()
        off = ~torch.eye(B, dtype=torch.bool, device=s.device)
        return (1 - pearson_rows(gs, gt, off)).mean()
    off, N = row_offset(B, pg)
    gs, gt = s @ gather_rows(s, pg).t(), t @ gather_rows(t, pg, grad=False).t()   # [B, N]
    if N < 3:
        return global_value((gs * 0).sum(), pg)
    off_diag = torch.ones(B, N, dtype=torch.bool, device=s.device)
    off_diag[torch.arange(B), off + torch.arange(B)] = False
    return global_value((1 - pearson_rows(gs, gt, off_diag)).sum() / N, pg)
