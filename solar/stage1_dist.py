"""torch.distributed pieces of stage 1 (``solar.stage1.run_stage1`` under torchrun).

Every rank holds its local rows (global batch / world, rank r = global rows r*n .. r*n+n-1).
The batch-level parts of stage 1 see every rank's rows:

* masked ITC (pooled and through E_VL): ``solar_kernels.contrastive_loss(process_group=)``;
  the pooled form pools locally (``masked_pool``) and gathers the [n, W] pooled rows, the
  same math as the fused ``pooled_contrastive_loss`` of one process;
* GLA hinge and global distillation: local rows against all-gathered (with gradient) globals;
* QDA: true-pair / negative-pair moments and the global centres are all-reduced, so every
  rank stores the same thresholds (negatives are all off-diagonal pairs of the global batch).

Gradient convention (the one of ``solar_kernels.distributed``): every loss returned here has
the global-batch value on every rank, and its gradient on rank r is r's share, so the SUM of
the ranks' gradients is the gradient of the global loss (``allreduce_grads``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .losses import local_distill_loss, pearson_rows

__all__ = ["resolve_group", "gather_grad", "gather_nograd", "global_value", "gla_hinge_dist",
           "global_distill_dist", "local_distill_dist", "qda_moments", "allreduce_grads", "broadcast_model"]


def resolve_group(process_group=None):
    """The group stage 1 trains over: `process_group`, else the default group when
    torch.distributed is initialised with more than one rank, else None (single process)."""
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    return process_group if dist.get_world_size(process_group) > 1 else None


def gather_nograd(t: torch.Tensor, group) -> torch.Tensor:
    """Concatenation over ranks of `t` (same shape everywhere), no gradient."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def gather_grad(t: torch.Tensor, group) -> torch.Tensor:
    """Concatenation over ranks of `t`; the backward sums every rank's gradient into its slice."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t.contiguous(), group=group))


def global_value(share: torch.Tensor, group) -> torch.Tensor:
    """`share` (this rank's part of a global sum) with the summed value and the local gradient."""
    total = share.detach().clone()
    dist.all_reduce(total, group=group)
    return share + (total - share.detach())


def _offset(n: int, group) -> tuple[int, int]:
    world = dist.get_world_size(group)
    return dist.get_rank(group) * n, n * world


def gla_hinge_dist(tokens: torch.Tensor, valid: Optional[torch.Tensor], other_global: torch.Tensor,
                   margin: float, group) -> torch.Tensor:
    """``losses.gla_hinge`` over the global batch: local anchors [n, L, W] against the
    all-gathered globals of the other modality ([n, W] local -> [N, W])."""
    import solar_kernels as sk

    n, L, _ = tokens.shape
    off, N = _offset(n, group)
    g_all = gather_grad(other_global, group)
    if valid is None:
        valid = torch.ones(n, L, dtype=torch.bool, device=tokens.device)
    pooled = sk.masked_pool(F.normalize(tokens, dim=-1), valid)
    m = pooled @ g_all.t()                                          # [n, N]
    pos = m[torch.arange(n, device=m.device), off + torch.arange(n, device=m.device)]
    if N < 2:
        return global_value((pos * 0).sum(), group)
    neg = (m.sum(1) - pos) / (N - 1)
    return global_value(F.relu(neg + margin - pos).sum() / N, group)


def global_distill_dist(student: torch.Tensor, teacher: torch.Tensor, group) -> torch.Tensor:
    """``losses.global_distill_loss`` over the global batch (local rows x gathered columns)."""
    n = student.shape[0]
    off, N = _offset(n, group)
    s = F.normalize(student, dim=-1)
    t = F.normalize(teacher.detach().to(student.dtype), dim=-1)
    s_all, t_all = gather_grad(s, group), gather_nograd(t, group)
    gs, gt = s @ s_all.t(), t @ t_all.t()                           # [n, N]
    if N < 3:
        return global_value((gs * 0).sum(), group)
    off_diag = torch.ones(n, N, dtype=torch.bool, device=s.device)
    off_diag[torch.arange(n), off + torch.arange(n)] = False
    return global_value((1 - pearson_rows(gs, gt, off_diag)).sum() / N, group)


def local_distill_dist(student: torch.Tensor, teacher: torch.Tensor, valid: Optional[torch.Tensor],
                       group) -> torch.Tensor:
    """``losses.local_distill_loss`` (a mean over the rows of all ranks; per-sample otherwise)."""
    B, L, _ = student.shape
    v = torch.ones(B, L, dtype=torch.bool, device=student.device) if valid is None else valid.bool()
    rows = (v & (v.sum(1, keepdim=True) >= 2)).sum().to(torch.float64)
    total_rows = rows.clone()
    dist.all_reduce(total_rows, group=group)
    local = local_distill_loss(student, teacher, valid)
    return global_value(local * float(rows / total_rows.clamp_min(1)), group)


@torch.no_grad()
def _global_moments(pairs, group) -> list[tuple[float, float]]:
    """(mean, var) over all ranks of each (values, weights) pair, two-pass like qda.batch_moments."""
    ws = [w.to(torch.float64) for _, w in pairs]
    vs = [v.detach().to(torch.float64) for v, _ in pairs]
    first = torch.stack([torch.stack([w.sum(), (w * v).sum()]) for v, w in zip(vs, ws)])
    dist.all_reduce(first, group=group)
    cnt = first[:, 0]
    mean = torch.where(cnt > 0, first[:, 1] / cnt.clamp_min(1e-300), torch.zeros_like(cnt))
    sq = torch.stack([(w * (v - m) ** 2).sum() for v, w, m in zip(vs, ws, mean)])
    dist.all_reduce(sq, group=group)
    var = torch.where(cnt > 0, sq / cnt.clamp_min(1e-300), torch.zeros_like(cnt))
    return [(float(m), float(s)) for m, s in zip(mean, var)]


@torch.no_grad()
def qda_moments(model, s_v, s_l, text_valid, v, t, g_i, g_t, segments, group):
    """Global-batch moments for the QDA update: ((mean, var) of true-pair s_V, true-pair s_L,
    negative-pair s_V, negative-pair s_L), and the global means of g_I and g_T."""
    n = v.shape[0]
    off, N = _offset(n, group)
    gi_all, gt_all = gather_nograd(g_i, group), gather_nograd(g_t, group)
    neg = ~torch.zeros(n, N, dtype=torch.bool, device=v.device)
    neg[torch.arange(n), off + torch.arange(n)] = False
    nv = F.normalize(v, dim=-1)
    s_nv = torch.einsum("blw,jw->bjl", nv, gt_all - model.center_t)              # [n, N, P]
    w_nv = neg[:, :, None].expand_as(s_nv)
    nl = F.normalize(t, dim=-1) if segments is None else model.local_text_features(t, segments)
    s_nl = torch.einsum("blw,jw->bjl", nl, gi_all - model.center_v)              # [n, N, T]
    w_nl = neg[:, :, None] & text_valid.bool()[:, None, :]
    out = _global_moments([(s_v, torch.ones_like(s_v, dtype=torch.bool)), (s_l, text_valid),
                           (s_nv, w_nv), (s_nl, w_nl)], group)
    return out[0], out[1], out[2], out[3], gi_all.mean(0), gt_all.mean(0)


@torch.no_grad()
def allreduce_grads(params, group) -> None:
    """Sum the gradients of `params` over ranks (flattened into one buffer per dtype/device)."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    buckets: dict = {}
    for p in params:
        if p.grad is not None:
            buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for key in sorted(buckets, key=str):
        grads = buckets[key]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        for g, r in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(r)


@torch.no_grad()
def broadcast_model(model: torch.nn.Module, group, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers to every rank (as DDP does at construction).
    `src` is a rank of `group`."""
    g_src = dist.get_global_rank(group, src) if group is not dist.group.WORLD else src
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, g_src, group=group)
