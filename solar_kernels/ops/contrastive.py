"""contrastive_loss: multi-positive InfoNCE with hard negatives and mining, in O(N*D) memory.

Logits ``S = q k^T / temperature`` are never materialised: tiles of S are computed on the
fly, reduced into per-row statistics with an online log-sum-exp, and recomputed in the
backward pass (the flash-attention / Inf-CL approach).  Groups are compared inside each
tile; hard negatives ([N, H, D], one set per row) are folded into the row statistics.

Per row i (P(i) = positives, N(i) = negatives, n_i = |N(i)|, beta = hardness):

    A_i = LSE_{j in P(i)} S_ij
    beta == 0:  B_i = LSE_{all columns j} S_ij               loss_i = B_i - A_i
    beta  > 0:  B_i = LSE_{j in N(i)} (1 + beta) S_ij
                C_i = LSE_{j in N(i)} beta S_ij
                logNeg_i = log n_i + B_i - C_i               loss_i = softplus(logNeg_i - A_i)

beta > 0 is Robinson et al.'s reweighting: negative j gets weight
``n_i exp(beta S_ij) / sum_{k in N(i)} exp(beta S_ik)`` (the weights sum to n_i), and
``exp(logNeg_i) = sum_j w_ij exp(S_ij)``.  The weights are differentiated through, as in the
paper's estimator.  With r_i = dL/dloss_i (times sigmoid(logNeg_i - A_i) when beta > 0):

    dL/dS_ij = r_i ( F_ij - [j in P(i)] exp(S_ij - A_i) )
    F_ij = exp(S_ij - B_i)                                              (beta == 0, any column)
    F_ij = [j in N(i)] ((1+beta) exp((1+beta) S_ij - B_i) - beta exp(beta S_ij - C_i))   (beta > 0)

Layers, in order (STYLE.md):

1. Launchers (no autograd): :func:`contrastive_forward`, :func:`contrastive_backward`, which
   dispatch to the Triton launchers (``contrastive_triton.py``: the kernels, their autotuned
   configs, the backward in panels of rows without atomics) or the chunked PyTorch path.
2. ``torch.library`` custom ops ``solar::contrastive_fwd`` / ``solar::contrastive_bwd`` with
   fake kernels; the forward op's autograd formula (``register_autograd``) is the one
   autograd path.
3. The checked public entry point :func:`contrastive_loss`, on one rank or many (with a
   ``process_group`` the same op runs on each rank's rows against the gathered columns).

Beside this file: ``contrastive_triton.py`` (the Triton kernels, tuning and launchers),
``contrastive_cpu.py`` (the same tiled algorithm in chunked PyTorch, the
CPU path), ``contrastive_stats.py`` (what every backend does with the statistics: hard
negatives, losses, backward coefficients, mined lists), ``contrastive_checks.py`` (argument
checks), ``solar_kernels/_topk.py`` (the ordered top-k merge) and
``solar_kernels/distributed.py`` (the collectives of the many-rank form).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import _dispatch, distributed
from .contrastive_checks import check_counts, positive_columns, validate
from .contrastive_cpu import bwd_torch, cache_rows, stats_torch
from .contrastive_stats import coeffs, finish_stats, hard_logits, merge_mined, num_neg
from .contrastive_triton import bwd_triton, stats_triton

__all__ = ["contrastive_loss", "Mined", "contrastive_forward", "contrastive_backward"]

_dispatch.register_op("contrastive_loss", cuda="Triton", cpu_symbol=None,
                      cpu_fallback="chunked PyTorch (tiled)")


class Mined(NamedTuple):
    """Top negatives of each row (q->k direction): ``indices`` [N, k] int64 (in-batch column
    j < M, or M + h for hard negative h of that row; M = N columns unless the loss is
    rectangular) and ``scores`` [N, k] float32 (the logits S_ij = <q_i, k_j> / temperature),
    best first; ties go to the lower index."""

    indices: torch.Tensor
    scores: torch.Tensor


# ----------------------------------------------------------------------------------------
# 1. Launchers (no autograd): the Triton kernels are in contrastive_triton.py, the chunked
#    PyTorch path in contrastive_cpu.py
# ----------------------------------------------------------------------------------------
def choose_backend(q: torch.Tensor) -> str:
    """The backend for rows on q's device: "triton" (CUDA, or the interpreter when chosen with
    ``solar_kernels.use_backend``) or "torch" (the chunked PyTorch path, ops/contrastive_cpu.py)."""
    return _dispatch.backend_for(q.device, None)


def contrastive_forward(q, k, groups_q, groups_k, hard_negatives, offset, temperature, hardness,
                        single_set, both, mine_k, backend=None, cache_rows=0):
    """Loss statistics of the rows of q against the columns of k; no autograd.

    Args:
        q: [n, D] rows (anchors); k: [N, D] columns (for single-set mode k is the whole set
            and q holds rows offset..offset+n-1 of it).
        groups_q / groups_k: [n] / [N] int64 or None.  hard_negatives: [n, H, D] or None.
        offset: global column index of row 0's own column (0 unless distributed).
        both: also compute the k->q direction (two-tower; the column statistics are those of
            each column against the n rows, -inf A for a column without a positive row).
        mine_k: number of negatives to mine per row (0: none).

    Returns:
        row_loss [n] fp32, col_loss [N] (or [0]), row_stats [3, n] (A, B, C; C == B - log n_neg
        placeholder when hardness == 0), col_stats [3, N] (or [3, 0]), top_v [n, mine_k] fp32,
        top_i [n, mine_k] int64, s_cache [cache_rows, N] fp32 (the first rows of S, CPU only,
        handed to the backward so that it skips their recompute; [0, N] when not kept).
    """
    backend = backend or choose_backend(q)
    inv_t = 1.0 / float(temperature)
    beta = float(hardness)
    n, N = q.shape[0], k.shape[0]
    dev = q.device
    H = 0 if hard_negatives is None else hard_negatives.shape[1]
    n_neg = num_neg(n, N, groups_q, groups_k, H, dev)
    if backend == "triton":
        if both:  # both directions from one pass over S
            A, B, C, mined, cols = stats_triton(q, k, groups_q, groups_k, offset, inv_t, beta, single_set, mine_k,
                                                 cols=True)
        else:
            A, B, C, mined = stats_triton(q, k, groups_q, groups_k, offset, inv_t, beta, single_set, mine_k)
            cols = None
    s_cache = torch.empty((cache_rows if backend != "triton" else 0, N), device=dev)
    if backend != "triton":
        (A, B, C), cols, mined = stats_torch(q, k, groups_q, groups_k, offset, inv_t, beta, single_set,
                                             mine_k, both, s_cache if cache_rows else None)
    hard_s = hard_logits(q, hard_negatives, inv_t) if H > 0 else None
    row_loss, A, B, C = finish_stats(A, B, C if C is not None else B, hard_s, beta, n_neg)
    row_stats = torch.stack([A, B, C])
    if both:
        n_neg_c = num_neg(N, n, groups_k, groups_q, 0, dev)
        col_loss, Ac, Bc, Cc = finish_stats(cols[0], cols[1], cols[2] if cols[2] is not None else cols[1],
                                            None, beta, n_neg_c)
        col_stats = torch.stack([Ac, Bc, Cc])
    else:
        col_loss = torch.zeros(0, device=dev)
        col_stats = torch.zeros((3, 0), device=dev)
    if mine_k > 0:
        top_v, top_i = merge_mined(mined[0], mined[1], hard_s, N, mine_k)
    else:
        top_v = torch.zeros((n, 0), device=dev)
        top_i = torch.zeros((n, 0), device=dev, dtype=torch.int64)
    return row_loss, col_loss, row_stats, col_stats, top_v, top_i, s_cache


def contrastive_backward(grad_row, grad_col, q, k, groups_q, groups_k, hard_negatives, row_stats, col_stats,
                         offset, temperature, hardness, single_set, both, backend=None, s_cache=None):
    """Gradients of sum(grad_row * row_loss) + sum(grad_col * col_loss); no autograd.

    Returns dq [n, D], dk [N, D] (in the inputs' dtypes) and dhn [n, H, D] (or [0]).
    """
    backend = backend or choose_backend(q)
    inv_t = 1.0 / float(temperature)
    beta = float(hardness)
    n, N = q.shape[0], k.shape[0]
    H = 0 if hard_negatives is None else hard_negatives.shape[1]
    rs = coeffs(grad_row, row_stats, beta, num_neg(n, N, groups_q, groups_k, H, q.device))
    cs = coeffs(grad_col, col_stats, beta, num_neg(N, n, groups_k, groups_q, 0, q.device)) if both else None
    if backend == "triton":
        dq, dk = bwd_triton(q, k, groups_q, groups_k, offset, inv_t, beta, single_set, rs, cs)
    else:
        cache = s_cache if s_cache is not None and s_cache.shape[0] > 0 else None
        dq, dk = bwd_torch(q, k, groups_q, groups_k, offset, inv_t, beta, single_set, rs, cs, cache)
    if H > 0:
        hs = hard_logits(q, hard_negatives, inv_t)
        r, b, c = rs[0][:, None], rs[2][:, None], rs[3][:, None]
        if beta > 0:
            gh = (1.0 + beta) * torch.exp((1.0 + beta) * hs - b) - beta * torch.exp(beta * hs - c)
        else:
            gh = torch.exp(hs - b)
        gh = gh * r * inv_t
        dq += torch.einsum("nh,nhd->nd", gh, hard_negatives.float())
        dhn = (gh[:, :, None] * q.float()[:, None, :]).to(hard_negatives.dtype)
    elif hard_negatives is not None:  # H == 0
        dhn = torch.zeros_like(hard_negatives)
    else:
        dhn = q.new_zeros((0,))
    return dq.to(q.dtype), dk.to(k.dtype), dhn


# ----------------------------------------------------------------------------------------
# 2. torch.library registration and autograd
# ----------------------------------------------------------------------------------------
@torch.library.custom_op("solar::contrastive_fwd", mutates_args=())
def _contrastive_fwd_op(q: torch.Tensor, k: torch.Tensor, groups_q: Optional[torch.Tensor],
                        groups_k: Optional[torch.Tensor], hard_negatives: Optional[torch.Tensor],
                        offset: int, temperature: float, hardness: float, single_set: bool, both: bool,
                        mine_k: int, backend: str, cache_rows: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor, torch.Tensor]:
    """Custom-op form of :func:`contrastive_forward`."""
    return contrastive_forward(q, k, groups_q, groups_k, hard_negatives, offset, temperature, hardness,
                               single_set, both, mine_k, backend, cache_rows)


@_contrastive_fwd_op.register_fake
def _(q, k, groups_q, groups_k, hard_negatives, offset, temperature, hardness, single_set, both, mine_k,
      backend, cache_rows):
    n, N = q.shape[0], k.shape[0]
    f32 = dict(dtype=torch.float32)
    nc = N if both else 0
    rc = cache_rows if backend != "triton" else 0
    return (q.new_empty((n,), **f32), q.new_empty((nc,), **f32), q.new_empty((3, n), **f32),
            q.new_empty((3, nc), **f32), q.new_empty((n, mine_k), **f32),
            q.new_empty((n, mine_k), dtype=torch.int64), q.new_empty((rc, N), **f32))


@torch.library.custom_op("solar::contrastive_bwd", mutates_args=())
def _contrastive_bwd_op(grad_row: torch.Tensor, grad_col: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        groups_q: Optional[torch.Tensor], groups_k: Optional[torch.Tensor],
                        hard_negatives: Optional[torch.Tensor], row_stats: torch.Tensor,
                        col_stats: torch.Tensor, offset: int, temperature: float, hardness: float,
                        single_set: bool, both: bool, backend: str, s_cache: Optional[torch.Tensor]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Custom-op form of :func:`contrastive_backward`."""
    return contrastive_backward(grad_row, grad_col, q, k, groups_q, groups_k, hard_negatives, row_stats,
                                col_stats, offset, temperature, hardness, single_set, both, backend, s_cache)


@_contrastive_bwd_op.register_fake
def _(grad_row, grad_col, q, k, groups_q, groups_k, hard_negatives, row_stats, col_stats, offset,
      temperature, hardness, single_set, both, backend, s_cache):
    dhn = torch.empty_like(hard_negatives) if hard_negatives is not None else q.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(k), dhn


def _setup_context(ctx, inputs, output):
    q, k, gq, gk, hn, offset, temperature, hardness, single_set, both, _mine_k, backend, _cache_rows = inputs
    _, _, rstats, cstats, top_v, top_i, s_cache = output
    ctx.save_for_backward(q, k, hn, gq, gk, rstats, cstats, s_cache)
    ctx.args = (offset, temperature, hardness, single_set, both, backend)
    ctx.mark_non_differentiable(rstats, cstats, top_v, top_i, s_cache)


def _backward(ctx, g_row, g_col, *_unused):
    """Gradients of solar::contrastive_fwd's row_loss and col_loss (the other outputs are
    non-differentiable) for q, k and hard_negatives, by solar::contrastive_bwd."""
    q, k, hn, gq, gk, rstats, cstats, s_cache = ctx.saved_tensors
    offset, temperature, hardness, single_set, both, backend = ctx.args
    if g_row is None:
        g_row = torch.zeros(q.shape[0], device=q.device)
    if g_col is None or g_col.numel() == 0:
        g_col = torch.zeros(k.shape[0] if both else 0, device=q.device)
    dq, dk, dhn = torch.ops.solar.contrastive_bwd(g_row.contiguous(), g_col.contiguous(), q, k, gq, gk, hn, rstats,
                                                  cstats, offset, temperature, hardness, single_set, both, backend,
                                                  s_cache)
    return (dq, dk, None, None, dhn if hn is not None else None) + (None,) * 8


# The one autograd path: contrastive_loss, its many-rank form, direct callers of
# torch.ops.solar.contrastive_fwd, opcheck and torch.compile all differentiate the op through this.
torch.library.register_autograd("solar::contrastive_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# 3. The checked public entry point (one rank or many)
# ----------------------------------------------------------------------------------------
def _need_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def mean_loss(row_loss: torch.Tensor, col_loss: torch.Tensor, n_pos_rows: int, n_pos_cols: int,
              both: bool) -> torch.Tensor:
    """The loss from per-row losses: the mean over the n_pos_rows rows with a positive (q->k),
    averaged with the mean over the n_pos_cols columns with a positive (k->q) when `both`.
    Each term is divided before the sum: a sum of row losses can overflow fp32 where their
    mean fits."""
    loss = (row_loss / n_pos_rows).sum()
    if both:
        loss = 0.5 * loss + 0.5 * (col_loss / n_pos_cols).sum()
    return loss


def _column_direction(q, k, g, gq_all, off, rank, group, T, beta, backend, need_grad) -> torch.Tensor:
    """The k->q losses of this rank's columns against all ranks' rows (gathered with gradient),
    the many-rank form of the symmetric loss.  The op pairs row j of a pass with column
    j + offset: the n paired columns k[off:off + n] go in one pass whose offset puts them on
    their global rows (r * n + i); the unpaired columns, which only have positives through
    their groups, in a second pass whose offset lies beyond every column (no pairing).
    Without groups the unpaired columns have no positive (loss 0) and are skipped."""
    n, D = q.shape
    m = k.shape[0]
    q_all = distributed.all_gather_rows_with_grad(q, group)
    N = q_all.shape[0]
    paired = k[off:off + n]
    gp = g[off:off + n] if g is not None else None
    losses = [torch.ops.solar.contrastive_fwd(paired, q_all, gp, gq_all, None, rank * n, T, beta, False, False, 0,
                                              backend, cache_rows(n, N, D, backend, need_grad))[0]]
    if g is not None and m > n:
        rest = torch.cat([k[:off], k[off + n:]])
        gr = torch.cat([g[:off], g[off + n:]])
        losses.append(torch.ops.solar.contrastive_fwd(rest, q_all, gr, gq_all, None, N, T, beta, False, False, 0,
                                                      backend, cache_rows(m - n, N, D, backend, need_grad))[0])
    return torch.cat(losses)


def contrastive_loss(q: torch.Tensor, k: torch.Tensor | None = None, *, groups: torch.Tensor | None = None,
                     hard_negatives: torch.Tensor | None = None, temperature: float = 0.05,
                     symmetric: bool = True, hardness: float = 0.0, mine_k: int = 0, offset: int | None = None,
                     process_group=None):
    """Multi-positive InfoNCE over a batch, in O(N*D) memory (no N x N tensor, ever).

    S = q k^T / temperature (inputs used as given: normalise them first).

    * Two-tower mode (``k`` [N, D]): the positives of row i are column i and every column j
      with ``groups[j] == groups[i]``.  ``symmetric=True`` averages the q->k and k->q losses.
    * Rectangular two-tower mode (``offset`` an int, ``k`` [M, D] with M >= N): N rows against
      M columns, N x M logits; row i's positive is column ``offset + i``
      (0 <= offset <= M - N), plus, with ``groups`` [M] (one id per *column*), every column of
      its group, row i's group being ``groups[offset + i]``.  The other columns (negatives
      shared by all rows, a queue, the hard negatives of every row of a batch) are negatives of
      each row outside their group.  With M == N and offset 0 this is the two-tower mode.
      ``symmetric=True``: the k->q direction scores each column j against the N rows, its
      positives being row j - offset (if 0 <= j - offset < N) and the rows of its group, and is
      averaged over the columns that have a positive (without groups: the N paired columns
      offset .. offset + N - 1, as sentence-transformers' MultipleNegativesSymmetricRankingLoss
      does); columns without a positive row are left out.
    * Single-set mode (``k=None``, ``groups`` required): S = q q^T / temperature without its
      diagonal; the positives of row i are the other rows of its group.  Rows without a
      positive are left out of the mean (ValueError if no row has one).
    * ``hard_negatives`` [N, H, D]: extra negative columns of row i only (q->k direction).
    * ``loss_i = -log(sum_{j in P(i)} exp S_ij / sum_{all j} exp S_ij)``, averaged over rows.
    * ``hardness`` = beta > 0 re-weights the negatives by exp(beta S_ij), normalised so that a
      row's negative weights sum to its number of negatives (Robinson et al. 2021); 0 = InfoNCE.
    * ``mine_k`` > 0 also returns :class:`Mined` (indices, scores) of each row's mine_k best
      negatives (column j < M in-batch, M + h for hard negative h; M = N in the square modes),
      ties to the lower index.
    * ``process_group``: a torch.distributed group; each rank passes its local rows (the same
      n and H on every rank), the columns are all-gathered with gradient (their backward sums
      every rank's gradients into each rank's slice), and each rank computes the terms of its
      own rows against all columns.  The loss equals the single-process loss over the
      concatenated batch (every rank returns the same value; row i of rank r is global row
      r * n + i, and mined indices are global).  In the rectangular mode each rank passes its
      n rows, its m columns and its [m] groups (the same n, m, H and offset on every rank):
      rank r's column j is global column r * m + j, its row i global row r * n + i, whose
      positive is global column r * m + offset + i; mined indices are global column positions
      (hard negative h: world * m + h).  Memory per rank is O(N_total * D).  All ranks
      must call it, and its backward, together.

    Args:
        q: [N, D] float32/float16/bfloat16.  k: [N, D] (same dtype), [M, D] with ``offset``, or
        None.  groups: [N] int64 (square modes), [M] int64 (with ``offset``) or None.
        hard_negatives: [N, H, D] or None.
        temperature: > 0.  hardness: >= 0 (python or numpy numbers, or 0-d tensors that do not
        require grad: both are constants).  mine_k: int >= 0 (python or numpy integer).
        offset: None (square: k has N rows) or an int in [0, M - N]: the column of row 0's
        positive (needs k).
        process_group: a torch.distributed ProcessGroup or None.

    Returns:
        The scalar loss (float32), or ``(loss, Mined)`` when mine_k > 0.

    Raises:
        TypeError / ValueError: bad shapes or dtypes (k with a row count other than N without
        offset, fewer than N rows with it), offset outside [0, M - N] or given without k,
        groups of the wrong length or dtype,
        temperature <= 0 or so small that 1/temperature overflows float32 (below about
        2.9e-39), hardness < 0, mine_k larger than a row's number of negatives,
        inputs whose logits can overflow float32: ``max_i |q_i| * max_j |k_j| *
        max(1, 1/temperature) * (1 + hardness)`` above a third of the largest float32, about
        1.13e38 (k includes hard_negatives; the bound is checked, not the actual logits, and
        costs no pass over the data unless ``D * max|q| * max|k|`` exceeds it; below it every
        backend computes the loss without overflow, with an absolute error that grows like the
        bound times 2^-23),
        non-finite inputs, single-set mode without any positive pair, no row with any negative
        (N = 1 or every row in one group, without hard negatives: the loss would be 0 with no
        gradient), ranks with different numbers of rows, columns or hard negatives or different
        offsets.  TypeError: process_group that is not a ProcessGroup.
    """
    temperature, hardness, mine_k, offset = validate(q, k, groups, hard_negatives, temperature, hardness, mine_k,
                                                     offset=offset)
    group = process_group
    world, rank = (1, 0) if group is None else distributed.world_and_rank(group)
    single = k is None
    n, D = q.shape
    m = n if single else k.shape[0]
    off = 0 if offset is None else offset
    H = 0 if hard_negatives is None else hard_negatives.shape[1]
    if world > 1:
        local = torch.tensor([n, m, H, off], device=q.device, dtype=torch.int64)
        sizes = distributed.all_gather_rows(local, group).view(world, 4)
        if bool((sizes != local).any()):
            raise ValueError(f"every rank must pass the same number of rows, columns and hard negatives and the "
                             f"same offset; got (rows, columns, H, offset) per rank {sizes.tolist()}")
    # rank r holds the global rows r * n .. r * n + n - 1 and the global columns r * m .. r * m + m - 1,
    # and sees all N x M of them; its row i is paired with global column r * m + off + i
    N, M, row_offset = n * world, m * world, rank * m + off
    g = groups.contiguous() if groups is not None else None
    g_all = distributed.all_gather_rows(g, group) if world > 1 and g is not None else g
    gq = g[off:off + n] if g is not None and m != n else g                 # each row's group: its column's
    gq_all = g_all.view(world, m)[:, off:off + n].reshape(-1) if g is not None and m != n else g_all
    n_pos_rows = check_counts(gq_all, g_all, N, M, H, mine_k, single)
    both = bool(symmetric) and not single
    # on one rank the k->q statistics come from the same sweep over S; on many, the columns
    # of that direction (all rows of q) are gathered and it is a pass of its own
    fused = both and world == 1
    backend = choose_backend(q)
    need_grad = _need_grad(q, k, hard_negatives)
    T, beta = float(temperature), float(hardness)
    cols = q if single else k
    if world > 1:
        cols = distributed.all_gather_rows_with_grad(cols, group)
    row_loss, col_loss, _, _, top_v, top_i, _ = torch.ops.solar.contrastive_fwd(
        q, cols, gq, g_all, hard_negatives, row_offset, T, beta, single, fused, int(mine_k), backend,
        cache_rows(n, M, D, backend, need_grad))
    if both and not fused:
        col_loss = _column_direction(q, k, g, gq_all, off, rank, group, T, beta, backend, need_grad)
    n_pos_cols = positive_columns(gq_all, g_all, N) if both else 1
    loss = mean_loss(row_loss, col_loss, n_pos_rows, n_pos_cols, both)
    if world > 1:
        loss = distributed.sum_over_ranks(loss, group)
    return (loss, Mined(top_i, top_v)) if mine_k > 0 else loss
