"""pooled_contrastive_loss: masked pooling of both towers fused with contrastive_loss.

    fq = masked_pool(xq, mask_q, normalize), fk = masked_pool(xk, mask_k, normalize)
    loss = contrastive_loss(fq, fk, **loss_kwargs)

One ``autograd.Function``: the forward keeps only the pooled rows [N, D] (fp32) and their
per-row pooling statistics; the backward runs the contrastive backward into [N, D] row
gradients and hands them straight to the pooling backward, which writes the token
gradients [N, L, D] (no pooled intermediates beyond [N, D], no extra [N, L, D] temporary).
Pooling is ``solar_kernels.ops.masked_pool.pool_forward/pool_backward`` (Triton on CUDA,
C++ or chunked torch on CPU); the loss is ``contrastive_forward/contrastive_backward``.
"""
from __future__ import annotations

import torch

from .. import _checks, _dispatch
from .contrastive import Mined, choose_backend, contrastive_backward, contrastive_forward, mean_loss
from .contrastive_checks import check_counts, check_logit_bound, validate as validate_loss
from .masked_pool import check_weights, pool_backward, pool_forward, validate as validate_pool

__all__ = ["pooled_contrastive_loss"]

# CPU: the pooling is the C++ kernel (masked_pool's), the loss the tiled PyTorch path.
_dispatch.register_op("pooled_contrastive_loss", cuda="Triton (pool + loss kernels)", cpu_symbol=None,
                      cpu_fallback="C++ pool + tiled PyTorch loss")


class _PooledContrastiveFunction(torch.autograd.Function):
    """(row_loss, col_loss, top_v, top_i) of contrastive_loss(pool(xq, mq), pool(xk, mk))."""

    @staticmethod
    def forward(ctx, xq, mask_q, xk, mask_k, hard_negatives, groups, normalize, eps, temperature, hardness,
                both, mine_k, backend):
        fq, aux_q = pool_forward(xq, mask_q, normalize, eps)  # [1, N, D] fp32
        fk, aux_k = pool_forward(xk, mask_k, normalize, eps)
        # no logits cache here: the [N, N]-free bound is what this fused op is for
        row_loss, col_loss, rstats, cstats, top_v, top_i, _ = contrastive_forward(
            fq[0], fk[0], groups, groups, hard_negatives, 0, temperature, hardness, False, both, mine_k, backend)
        ctx.save_for_backward(xq, mask_q, xk, mask_k, hard_negatives, groups, fq, aux_q, fk, aux_k, rstats, cstats)
        ctx.args = (normalize, eps, temperature, hardness, both, backend)
        ctx.mark_non_differentiable(top_v, top_i)
        return row_loss, col_loss, top_v, top_i

    @staticmethod
    def backward(ctx, g_row, g_col, _gv, _gi):
        xq, mask_q, xk, mask_k, hn, groups, fq, aux_q, fk, aux_k, rstats, cstats = ctx.saved_tensors
        normalize, eps, temperature, hardness, both, backend = ctx.args
        n = fq.shape[1]
        if g_row is None:
            g_row = torch.zeros(n, device=fq.device)
        if g_col is None or g_col.numel() == 0:
            g_col = torch.zeros(n if both else 0, device=fq.device)
        dfq, dfk, dhn = contrastive_backward(g_row, g_col, fq[0], fk[0], groups, groups, hn, rstats, cstats, 0,
                                             temperature, hardness, False, both, backend)
        need = ctx.needs_input_grad
        gxq = gmq = gxk = gmk = None
        if need[0] or need[1]:
            gxq, gmq = pool_backward(dfq[None], xq, mask_q, fq, aux_q, normalize, eps, bool(need[1]))
        del dfq
        if need[2] or need[3]:
            gxk, gmk = pool_backward(dfk[None], xk, mask_k, fk, aux_k, normalize, eps, bool(need[3]))
        gmq = gmq.to(mask_q.dtype) if gmq is not None else None
        gmk = gmk.to(mask_k.dtype) if gmk is not None else None
        return (gxq, gmq, gxk, gmk, dhn if hn is not None else None) + (None,) * 8


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
    temperature, hardness, mine_k = validate_loss(probe_q, probe_k, groups, hard_negatives, temperature, hardness,
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
    n_pos_rows = check_counts(groups, n, H, mine_k, False)
    mq = mask_q.unsqueeze(0)
    mk = mask_k.unsqueeze(0)
    both = bool(symmetric)
    row_loss, col_loss, top_v, top_i = _PooledContrastiveFunction.apply(
        xq, mq, xk, mk, hn, groups.contiguous() if groups is not None else None, bool(normalize), float(eps),
        float(temperature), float(hardness), both, int(mine_k), choose_backend(xq))
    loss = mean_loss(row_loss, col_loss, n_pos_rows, n, both)
    return (loss, Mined(top_i, top_v)) if mine_k > 0 else loss
