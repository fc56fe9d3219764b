"""pooled_contrastive_loss: masked pooling of both towers fused with contrastive_loss.

    fq = masked_pool(xq, mask_q, normalize), fk = masked_pool(xk, mask_k, normalize)
    loss = contrastive_loss(fq, fk, **loss_kwargs)

One op, ``solar::pooled_contrastive_fwd`` (a ``torch.library`` custom op with a fake kernel,
so torch.compile and opcheck see one node), whose autograd formula is the op
``solar::pooled_contrastive_bwd``: the forward keeps only the pooled rows [N, D] (fp32) and
their per-row pooling statistics; the backward runs the contrastive backward into [N, D] row
gradients and hands them straight to the pooling backward, which writes the token
gradients [N, L, D] (no pooled intermediates beyond [N, D], no extra [N, L, D] temporary).
Pooling is ``solar_kernels.ops.masked_pool.pool_forward/pool_backward`` (Triton on CUDA,
C++ or chunked torch on CPU); the loss is ``contrastive_forward/contrastive_backward``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _checks, _dispatch
from .contrastive import Mined, choose_backend, contrastive_backward, contrastive_forward, mean_loss
from .contrastive_checks import check_counts, check_logit_bound, validate as validate_loss
from .masked_pool import check_weights, pool_backward, pool_forward, validate as validate_pool

__all__ = ["pooled_contrastive_loss"]

# CPU: the pooling is the C++ kernel (masked_pool's), the loss the tiled PyTorch path.
_dispatch.register_op("pooled_contrastive_loss", cuda="Triton (pool + loss kernels)", cpu_symbol=None,
                      cpu_fallback="C++ pool + tiled PyTorch loss")


# ----------------------------------------------------------------------------------------
# torch.library registration and autograd
# ----------------------------------------------------------------------------------------
@torch.library.custom_op("solar::pooled_contrastive_fwd", mutates_args=())
def _pooled_fwd_op(xq: torch.Tensor, mask_q: torch.Tensor, xk: torch.Tensor, mask_k: torch.Tensor,
                   hard_negatives: Optional[torch.Tensor], groups: Optional[torch.Tensor], normalize: bool,
                   eps: float, temperature: float, hardness: float, both: bool, mine_k: int, backend: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_loss [N], col_loss [N or 0], top_v, top_i [N, mine_k]) of
    contrastive_forward(pool(xq, mask_q), pool(xk, mask_k)), then what the backward needs:
    fq, aux_q, fk, aux_k (pool_forward's outputs, [1, N, D] and [2, 1, N] fp32) and the row /
    column statistics [3, N] / [3, N or 0].  Masks are [N, L]; hard_negatives fp32 or None."""
    fq, aux_q = pool_forward(xq, mask_q.unsqueeze(0), normalize, eps)  # [1, N, D] fp32
    fk, aux_k = pool_forward(xk, mask_k.unsqueeze(0), normalize, eps)
    # no logits cache here: the [N, N]-free bound is what this fused op is for
    row_loss, col_loss, rstats, cstats, top_v, top_i, _ = contrastive_forward(
        fq[0], fk[0], groups, groups, hard_negatives, 0, temperature, hardness, False, both, mine_k, backend)
    return row_loss, col_loss, top_v, top_i, fq, aux_q, fk, aux_k, rstats, cstats


@_pooled_fwd_op.register_fake
def _(xq, mask_q, xk, mask_k, hard_negatives, groups, normalize, eps, temperature, hardness, both, mine_k, backend):
    n, D = xq.shape[0], xq.shape[2]
    nc = n if both else 0
    f32 = dict(dtype=torch.float32)
    return (xq.new_empty((n,), **f32), xq.new_empty((nc,), **f32), xq.new_empty((n, mine_k), **f32),
            xq.new_empty((n, mine_k), dtype=torch.int64), xq.new_empty((1, n, D), **f32),
            xq.new_empty((2, 1, n), **f32), xq.new_empty((1, n, D), **f32), xq.new_empty((2, 1, n), **f32),
            xq.new_empty((3, n), **f32), xq.new_empty((3, nc), **f32))


@torch.library.custom_op("solar::pooled_contrastive_bwd", mutates_args=())
def _pooled_bwd_op(grad_row: torch.Tensor, grad_col: torch.Tensor, xq: torch.Tensor, mask_q: torch.Tensor,
                   xk: torch.Tensor, mask_k: torch.Tensor, hard_negatives: Optional[torch.Tensor],
                   groups: Optional[torch.Tensor], fq: torch.Tensor, aux_q: torch.Tensor, fk: torch.Tensor,
                   aux_k: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor, normalize: bool,
                   eps: float, temperature: float, hardness: float, both: bool, backend: str, need_xq: bool,
                   need_mask_q: bool, need_xk: bool, need_mask_k: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad xq, grad mask_q, grad xk, grad mask_k, grad hard_negatives) of
    sum(grad_row * row_loss) + sum(grad_col * col_loss); a gradient that is not needed is an
    empty tensor (a tower's token gradient comes with its mask's, they are one pass)."""
    dfq, dfk, dhn = contrastive_backward(grad_row, grad_col, fq[0], fk[0], groups, groups, hard_negatives,
                                         row_stats, col_stats, 0, temperature, hardness, False, both, backend)
    none = lambda: fq.new_empty((0,))  # noqa: E731  (outputs must not alias each other)
    gxq, gmq, gxk, gmk = none(), none(), none(), none()
    if need_xq or need_mask_q:
        gxq, gm = pool_backward(dfq[None], xq, mask_q.unsqueeze(0), fq, aux_q, normalize, eps, need_mask_q)
        gmq = gm[0].to(mask_q.dtype) if need_mask_q else none()
    del dfq
    if need_xk or need_mask_k:
        gxk, gm = pool_backward(dfk[None], xk, mask_k.unsqueeze(0), fk, aux_k, normalize, eps, need_mask_k)
        gmk = gm[0].to(mask_k.dtype) if need_mask_k else none()
    return gxq, gmq, gxk, gmk, dhn


@_pooled_bwd_op.register_fake
def _(grad_row, grad_col, xq, mask_q, xk, mask_k, hard_negatives, groups, fq, aux_q, fk, aux_k, row_stats,
      col_stats, normalize, eps, temperature, hardness, both, backend, need_xq, need_mask_q, need_xk, need_mask_k):
    def g(t, need):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if need else fq.new_empty((0,))

    dhn = torch.empty_like(hard_negatives) if hard_negatives is not None else fq.new_empty((0,))
    return (g(xq, need_xq or need_mask_q), g(mask_q, need_mask_q), g(xk, need_xk or need_mask_k),
            g(mask_k, need_mask_k), dhn)


def _setup_context(ctx, inputs, output):
    xq, mask_q, xk, mask_k, hn, groups, normalize, eps, temperature, hardness, both, _mine_k, backend = inputs
    _, _, top_v, top_i, fq, aux_q, fk, aux_k, rstats, cstats = output
    ctx.save_for_backward(xq, mask_q, xk, mask_k, hn, groups, fq, aux_q, fk, aux_k, rstats, cstats)
    ctx.args = (normalize, eps, temperature, hardness, both, backend)
    ctx.mark_non_differentiable(top_v, top_i, fq, aux_q, fk, aux_k, rstats, cstats)


def _backward(ctx, g_row, g_col, *_unused):
    """Gradients of the op's row_loss and col_loss for xq, mask_q, xk, mask_k (float masks) and
    hard_negatives, by solar::pooled_contrastive_bwd."""
    xq, mask_q, xk, mask_k, hn, groups, fq, aux_q, fk, aux_k, rstats, cstats = ctx.saved_tensors
    normalize, eps, temperature, hardness, both, backend = ctx.args
    n = fq.shape[1]
    if g_row is None:
        g_row = torch.zeros(n, device=fq.device)
    if g_col is None or g_col.numel() == 0:
        g_col = torch.zeros(n if both else 0, device=fq.device)
    need = [bool(x) for x in ctx.needs_input_grad[:5]]
    gxq, gmq, gxk, gmk, dhn = torch.ops.solar.pooled_contrastive_bwd(
        g_row, g_col, xq, mask_q, xk, mask_k, hn, groups, fq, aux_q, fk, aux_k, rstats, cstats, normalize, eps,
        temperature, hardness, both, backend, need[0], need[1], need[2], need[3])
    grads = [g if ok else None for g, ok in zip((gxq, gmq, gxk, gmk), need)]
    return (*grads, dhn if hn is not None and need[4] else None) + (None,) * 8


torch.library.register_autograd("solar::pooled_contrastive_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# The checked public entry point
# ----------------------------------------------------------------------------------------
def pooled_contrastive_loss(xq: torch.Tensor, mask_q: torch.Tensor, xk: torch.Tensor, mask_k: torch.Tensor, *,
                            normalize: bool = True, eps: float = 1e-6, groups: torch.Tensor | None = None,
                            hard_negatives: torch.Tensor | None = None, temperature: float = 0.05,
                            symmetric: bool = True, hardness: float = 0.0, mine_k: int = 0):
    """Two-tower contrastive loss of masked-mean-pooled token sets, fused into one autograd node.

    Args:
        xq: [N, Lq, D] query tokens; mask_q: [N, Lq] (bool or non-negative float weights).
        xk: [N, Lk, D] key tokens (xq's dtype); mask_k: [N, Lk].
        normalize: L2-normalise each pooled row (max(||row||, eps)) before the loss.
        groups, hard_negatives ([N, H, D] embeddings in xq's dtype, used in float32),
        temperature, symmetric, hardness, mine_k: as in :func:`solar_kernels.contrastive_loss`
        (two-tower mode).

    Returns:
        The scalar loss, or ``(loss, Mined)`` when mine_k > 0.  Gradients reach xq, xk, float
        masks that require grad, and hard_negatives.

    Raises:
        TypeError / ValueError: as :func:`solar_kernels.masked_pool` for each tower (non-finite
        tokens or mask weights included) and :func:`solar_kernels.contrastive_loss` for the
        loss arguments (xk or hard_negatives not in xq's dtype included), naming xq, mask_q,
        xk, mask_k.  The logit bound of contrastive_loss is checked on the pooled rows' norms:
        at most 1 with normalize=True, else at most the largest token norm of xq / xk.
    """
    validate_pool(xq, mask_q, eps, names=("xq", "mask_q"))
    validate_pool(xk, mask_k, eps, names=("xk", "mask_k"))
    if mask_q.dim() != 2 or mask_k.dim() != 2:
        raise ValueError(f"mask_q and mask_k must be [N, L], got {tuple(mask_q.shape)} and {tuple(mask_k.shape)}")
    if xq.shape[0] != xk.shape[0] or xq.shape[2] != xk.shape[2]:
        raise ValueError(f"xq [N, Lq, D] and xk [N, Lk, D] must agree on N and D, got {tuple(xq.shape)} "
                         f"and {tuple(xk.shape)}")
    n, _, D = xq.shape
    if n == 0 or D == 0:
        raise ValueError(f"xq must have N >= 1 rows and D >= 1 features, got shape {tuple(xq.shape)}")
    # the loss arguments are checked on [N, D] stand-ins of the pooled rows, with xq's and xk's
    # dtype, device and names (so xq and xk are also checked against each other there)
    probe_q = xq.new_zeros(()).expand(n, D)
    probe_k = xk.new_zeros(()).expand(n, D)
    temperature, hardness, mine_k, _ = validate_loss(probe_q, probe_k, groups, hard_negatives, temperature, hardness,
                                                      mine_k, names=("xq", "xk"))
    aq = _checks.check_finite_fast("xq", xq)
    ak = _checks.check_finite_fast("xk", xk)
    check_weights(mask_q, "mask_q")
    check_weights(mask_k, "mask_k")
    # the logit bound on the pooled rows: norm <= 1 when normalised, else at most the largest
    # token norm (a weighted mean with non-negative weights)
    one = torch.ones((1, 1))  # stands for rows of norm 1 (only read when the cheap bound fails)
    rows_q, rows_k = ((one, 1.0), ("xk", one, 1.0)) if normalize else ((xq, aq), ("xk", xk, ak))
    keys = [rows_k] + ([("hard_negatives", hard_negatives,
                         _checks.check_finite_fast("hard_negatives", hard_negatives))]
                       if hard_negatives is not None else [])
    check_logit_bound("xq", rows_q[0], rows_q[1], keys, temperature, hardness)
    hn = hard_negatives.float() if hard_negatives is not None else None
    H = 0 if hn is None else hn.shape[1]
    n_pos_rows = check_counts(groups, groups, n, n, H, mine_k, False)
    both = bool(symmetric)
    row_loss, col_loss, top_v, top_i = torch.ops.solar.pooled_contrastive_fwd(
        xq, mask_q, xk, mask_k, hn, groups.contiguous() if groups is not None else None, bool(normalize),
        float(eps), float(temperature), float(hardness), both, int(mine_k), choose_backend(xq))[:4]
    loss = mean_loss(row_loss, col_loss, n_pos_rows, n, both)
    return (loss, Mined(top_i, top_v)) if mine_k > 0 else loss
