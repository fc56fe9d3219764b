"""Rows against a larger set of columns with the public square contrastive loss.

`solar_kernels.contrastive_loss` scores N rows against N columns (row i's positive is column
i).  Peers' losses often score n rows against M > n columns (open_clip's ``local_loss``,
sentence-transformers' shared negatives).  Padding the rows with zero vectors to M rows makes
the square loss compute exactly that: a zero row has logit 0 against every column, so its loss
is the constant log(M / c) (c: the number of its positives) and its gradient into every column
is zero.  The padded rows' constant and the mean over M rows are then undone in closed form.
The cost is M x M logits instead of n x M; memory stays O(M x D).
"""
from __future__ import annotations

import torch

import solar_kernels as sk

__all__ = ["padded_rows_loss"]


def _all_gather_ints(t: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def padded_rows_loss(rows: torch.Tensor, cols: torch.Tensor, offset: int, *, temperature: float = 1.0,
                     col_groups: torch.Tensor | None = None, hardness: float = 0.0, mine_k: int = 0,
                     process_group=None):
    """Mean over the n rows of ``-log(sum_pos exp S_ij / sum_j exp S_ij)``, S = rows cols^T / temperature.

    rows: [n, D]; cols: [M, D] (M >= n); row i stands at column position ``offset + i``: its
    positive is that column, plus, with ``col_groups`` ([M] int64, one group per column
    position), every column of its group (row i's group is ``col_groups[offset + i]``).
    ``hardness`` re-weights negatives as in `contrastive_loss`.  With ``process_group``,
    every rank passes its own rows / columns / groups (the same n, M and offset everywhere);
    the result is the mean over all ranks' rows against all ranks' columns (rank r's positions
    are ``r * M + j``), with `contrastive_loss(process_group=...)`'s gradient semantics.
    Returns the loss, or (loss, Mined) when ``mine_k > 0`` (column indices are positions: global
    ``rank * M + j`` for local column j).
    """
    n, D = rows.shape
    M = cols.shape[0]
    if not 0 <= offset <= M - n:
        raise ValueError(f"offset must be in [0, {M - n}] (rows: {n}, cols: {M}), got {offset}")
    if M == n:
        padded = rows
    else:
        padded = torch.cat([rows.new_zeros(offset, D), rows, rows.new_zeros(M - n - offset, D)])
    out = sk.contrastive_loss(padded, cols, groups=col_groups, temperature=temperature, symmetric=False,
                              hardness=hardness, mine_k=mine_k, process_group=process_group)
    loss, mined = out if isinstance(out, tuple) else (out, None)
    if padded is not rows:
        world = 1
        is_pad = torch.ones(M, dtype=torch.bool, device=cols.device)
        is_pad[offset:offset + n] = False
        g = col_groups if col_groups is not None else None
        if process_group is not None:
            import torch.distributed as dist

            world = dist.get_world_size(process_group)
            is_pad = _all_gather_ints(is_pad, process_group)
            g = _all_gather_ints(g, process_group) if g is not None else None
        m_all, n_all = M * world, n * world
        if g is None:
            counts = torch.ones(m_all, dtype=torch.float64, device=cols.device)
        else:
            _, inv, cnt = torch.unique(g, return_inverse=True, return_counts=True)
            counts = cnt[inv].to(torch.float64)
        # each zero row contributes -log(c / M) to the sum over all M rows
        pad_sum = float(torch.log(m_all / counts[is_pad]).sum())
        loss = (loss * m_all - pad_sum) / n_all
    return (loss, mined) if mined is not None else loss
