"""Distributed contrastive loss: every rank holds its local rows, every row sees every column.

Keys (and, in single-set and symmetric mode, queries) are all-gathered *with gradient*
(``torch.distributed.nn.functional.all_gather``, whose backward sums the gradients of all
ranks' losses into each rank's slice).  Each rank computes the loss terms of its own rows
against the gathered columns, scaled by the global normaliser; the returned value is the
all-reduced sum, so every rank returns the single-process loss over the concatenated batch
while its gradients flow only through its own terms (the all-gather backward adds the rest).

Memory per rank is O(N_total * D) (the gathered keys), never O(N_total^2).
"""
from __future__ import annotations

import torch

__all__ = ["distributed_contrastive_loss"]


def _gather_nograd(t: torch.Tensor, group, world: int) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def _gather_grad(t: torch.Tensor, group) -> torch.Tensor:
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t.contiguous(), group=group))


def distributed_contrastive_loss(q, k=None, *, groups=None, hard_negatives=None, temperature=0.05, symmetric=True,
                                 hardness=0.0, mine_k=0, process_group=None):
    """:func:`solar_kernels.contrastive_loss` over the rows of all ranks of `process_group`.

    Every rank passes its local [n, D] rows (the same n on every rank; ValueError otherwise),
    its local groups [n] and hard negatives [n, H, D] (the same H everywhere).  Row i of rank r
    is global row r * n + i; mined indices are global (column j < N_total, N_total + h for a
    hard negative).  All ranks must call it (and backward) together.
    """
    import torch.distributed as dist

    from .ops.contrastive import (Mined, _backend, _cache_rows, _check_counts, _ContrastiveFunction,
                                   _need_grad)

    if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None, got "
                        f"{type(process_group).__name__}")
    group = process_group
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    n = q.shape[0]
    H = 0 if hard_negatives is None else hard_negatives.shape[1]
    dev = q.device
    sizes = _gather_nograd(torch.tensor([n, H], device=dev, dtype=torch.int64), group, world).view(world, 2)
    if bool((sizes[:, 0] != n).any()) or bool((sizes[:, 1] != H).any()):
        raise ValueError(f"every rank must pass the same number of rows and hard negatives; got (rows, H) "
                         f"per rank {sizes.tolist()}")
    N = n * world
    offset = rank * n
    single = k is None
    g_all = _gather_nograd(groups, group, world) if groups is not None else None
    n_pos_rows = _check_counts(g_all, N, H, mine_k, single)
    backend = _backend(q)
    rc = _cache_rows(n, N, q.shape[1], backend, _need_grad(q, k, hard_negatives))
    T, beta = float(temperature), float(hardness)
    q_all = _gather_grad(q, group) if (single or symmetric) else None
    g_loc = groups.contiguous() if groups is not None else None
    if single:
        row_loss, _, top_v, top_i = _ContrastiveFunction.apply(q, q_all, hard_negatives, g_loc, g_all, offset, T,
                                                               beta, True, False, int(mine_k), backend, rc)
        local = (row_loss / n_pos_rows).sum()
    else:
        k_all = _gather_grad(k, group)
        row_loss, _, top_v, top_i = _ContrastiveFunction.apply(q, k_all, hard_negatives, g_loc, g_all, offset, T,
                                                               beta, False, False, int(mine_k), backend, rc)
        local = (row_loss / N).sum()  # divided first: the sum may overflow
        if symmetric:
            col_loss = _ContrastiveFunction.apply(k, q_all, None, g_loc, g_all, offset, T, beta, False, False, 0,
                                                  backend, rc)[0]
            local = 0.5 * local + 0.5 * (col_loss / N).sum()
    total = local.detach().clone()
    dist.all_reduce(total, group=group)
    loss = local + (total - local.detach())
    if mine_k > 0:
        return loss, Mined(top_i, top_v)
    return loss
