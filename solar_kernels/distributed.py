"""Collectives of the many-rank form of solar_kernels' ops (torch.distributed).

``contrastive_loss(..., process_group=group)`` is the one-rank code run on every rank: each
rank computes the loss terms of its own rows against all columns, which it gathers here
*with gradient* (the all-gather's backward sums the gradients of every rank's loss into each
rank's slice).  The loss is then summed over ranks so that every rank returns the loss of the
concatenated batch, while its gradient flows only through the rank's own terms (the gather's
backward adds the rest).  This module holds only those collectives; it imports no op.
"""
from __future__ import annotations

import torch

__all__ = ["world_and_rank", "all_gather_rows", "all_gather_rows_with_grad", "sum_over_ranks"]


def world_and_rank(process_group) -> tuple[int, int]:
    """(world size, this rank) of `process_group`; TypeError unless it is a ProcessGroup."""
    import torch.distributed as dist

    if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None, got "
                        f"{type(process_group).__name__}")
    return dist.get_world_size(process_group), dist.get_rank(process_group)


def all_gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    """Every rank's `t` (the same shape on each) concatenated along dim 0, in rank order; no
    gradient."""
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def all_gather_rows_with_grad(t: torch.Tensor, group) -> torch.Tensor:
    """As :func:`all_gather_rows`, differentiable: the backward hands each rank the sum over
    ranks of the gradients of its slice."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t.contiguous(), group=group))


def sum_over_ranks(local: torch.Tensor, group) -> torch.Tensor:
    """The sum of `local` over the ranks of `group` as value, with the gradient of `local`
    alone (the other ranks' terms reach this rank's inputs through the gathers' backward)."""
    import torch.distributed as dist

    total = local.detach().clone()
    dist.all_reduce(total, group=group)
    return local + (total - local.detach())
