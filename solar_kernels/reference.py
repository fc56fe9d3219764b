"""Plain-PyTorch references of every op, computed in the caller's dtype or (for test
oracles) in float64.  Slow and memory-hungry on purpose: they materialise everything.
Tests and benchmarks import them from here; nothing else should.
"""
from __future__ import annotations

import torch

__all__: list[str] = []


# --- masked_pool -----------------------------------------------------------------------
def masked_pool_reference(x: torch.Tensor, mask: torch.Tensor, *, normalize: bool = False, eps: float = 1e-6,
                          dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference of `solar_kernels.masked_pool`, computed entirely in `dtype` (default: x's).

    x [B, L, D]; mask [B, L] or [V, B, L] (bool or float weights); returns [B, D] or
    [V, B, D] in `dtype`.  The plain expression ``(x * m[..., None]).sum(1) / m.sum(1)``
    with rows whose mask sums to less than the smallest normal float32 set to 0 (the op's
    empty rows) and optional row L2 normalisation by max(||row||, eps).
    Differentiable (autograd through plain torch ops).
    """
    dtype = dtype or x.dtype
    xf = x.to(dtype)
    m = mask.to(dtype)
    squeeze = m.dim() == 2
    if squeeze:
        m = m.unsqueeze(0)
    num = (xf.unsqueeze(0) * m[..., None]).sum(2)  # [V, B, D]
    den = m.sum(-1, keepdim=True)  # [V, B, 1]
    keep = den >= torch.finfo(torch.float32).tiny
    safe = torch.where(keep, den, torch.ones_like(den))
    out = torch.where(keep, num / safe, torch.zeros_like(num))
    if normalize:
        out = out / out.norm(dim=-1, keepdim=True).clamp_min(eps)
    return out.squeeze(0) if squeeze else out


__all__ += ["masked_pool_reference"]


# --- contrastive_loss ------------------------------------------------------------------
def contrastive_loss_reference(q: torch.Tensor, k: torch.Tensor | None = None, *, groups: torch.Tensor | None = None,
                               hard_negatives: torch.Tensor | None = None, temperature: float = 0.05,
                               symmetric: bool = True, hardness: float = 0.0, mine_k: int = 0,
                               offset: int | None = None, dtype: torch.dtype | None = None):
    """Reference of `solar_kernels.contrastive_loss` that materialises S, in `dtype` (default q's).

    With no groups, hard negatives, hardness, mining or offset, this is the open_clip ClipLoss
    computation (``F.cross_entropy`` on the full logits, both directions): the eager peer of
    the benchmarks.  Otherwise the full masked formula (see ``solar_kernels.ops.contrastive``)
    on the [N, M] logits (M = k's rows; with ``offset`` row i's own column is offset + i and
    its group ``groups[offset + i]``); the k->q direction is the same formula on S^T with the
    transposed masks, averaged over the columns that have a positive.
    Returns the loss, or ``(loss, (indices, scores))`` when mine_k > 0 (ties to the lower index).
    """
    dtype = dtype or q.dtype
    inv_t = 1.0 / temperature
    qf = q.to(dtype)
    single = k is None
    kf = qf if single else k.to(dtype)
    n, M = qf.shape[0], kf.shape[0]
    off = 0 if offset is None else offset
    plain = (groups is None and hard_negatives is None and hardness == 0 and mine_k == 0 and not single
             and off == 0 and M == n)
    if plain:
        logits = qf @ kf.t() * inv_t
        labels = torch.arange(n, device=q.device)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        if symmetric:
            loss = 0.5 * (loss + torch.nn.functional.cross_entropy(logits.t(), labels))
        return loss

    dev = q.device
    own = torch.arange(M, device=dev)[None, :] == (torch.arange(n, device=dev) + off)[:, None]
    same = (groups[off:off + n, None] == groups[None, :]) if groups is not None else own
    valid = ~own if single else torch.ones_like(own)
    pos = same & valid if single else (same | own)
    neg = valid & ~pos

    def one_direction(S, pos, neg, Sh, mine):
        if Sh is not None:
            S = torch.cat([S, Sh], 1)
            pos = torch.cat([pos, torch.zeros_like(Sh, dtype=torch.bool)], 1)
            neg = torch.cat([neg, torch.ones_like(Sh, dtype=torch.bool)], 1)
        has_pos = pos.any(1)
        has_neg = neg.any(1)
        ninf = torch.tensor(float("-inf"), dtype=dtype, device=dev)
        zero = torch.zeros((), dtype=dtype, device=dev)
        # rows without positives (negatives) get a harmless all-zero row so gradients stay finite
        log_pos = torch.logsumexp(torch.where(has_pos[:, None], torch.where(pos, S, ninf), zero), 1)
        if hardness > 0:
            Sn = torch.where(has_neg[:, None], torch.where(neg, S, ninf), zero)
            log_neg = (torch.log(neg.sum(1).to(dtype)) + torch.logsumexp((1 + hardness) * Sn, 1)
                       - torch.logsumexp(hardness * Sn, 1))
        else:
            log_neg = torch.logsumexp(torch.where(has_neg[:, None], torch.where(neg, S, ninf), zero), 1)
        z = torch.where(has_neg, log_neg, ninf) - log_pos
        per_row = torch.where(has_pos, torch.nn.functional.softplus(z), zero)
        loss = per_row.sum() / has_pos.sum()
        mined = None
        if mine:
            cand = torch.where(neg, S, ninf).detach()
            order = torch.sort(cand, dim=1, descending=True, stable=True).indices[:, :mine_k]
            mined = (order, cand.gather(1, order))
        return loss, mined

    S = qf @ kf.t() * inv_t
    Sh = None
    if hard_negatives is not None:
        Sh = torch.einsum("nd,nhd->nh", qf, hard_negatives.to(dtype)) * inv_t
    loss, mined = one_direction(S, pos, neg, Sh, mine_k > 0)
    if symmetric and not single:
        loss = 0.5 * (loss + one_direction(S.t(), pos.t(), neg.t(), None, False)[0])
    return (loss, mined) if mine_k > 0 else loss


__all__ += ["contrastive_loss_reference"]


# --- topk_search -----------------------------------------------------------------------
def topk_search_reference(q: torch.Tensor, db: torch.Tensor, k: int, dtype: str = "fp32"):
    """Brute-force reference of `solar_kernels.Index(dtype=...).search` / `topk_search`.

    q [m, d], db [n, d] (float).  Scores of every (query, row) pair, then the top-k by
    (score descending, row id ascending).  Returns (scores [m, k], ids [m, k] int64):
      * "fp32": float64 scores of the fp32 values;
      * "fp16": float64 scores of fp32 queries against the rows rounded to float16;
      * "int8": both sides quantised per row (scale = max|x| / 127, codes = round(x / scale)
        clamped to [-127, 127], zero rows -> scale 0), exact integer dots, and the float32
        score float(dot) * (scale_row * scale_query), as the int8 index defines it.
    """
    qf = q.to(torch.float32)
    xf = db.to(torch.float32)
    if dtype == "fp32":
        scores = qf.double() @ xf.double().T
    elif dtype == "fp16":
        scores = qf.double() @ xf.half().double().T
    elif dtype == "int8":
        def quant(t):
            s = t.abs().amax(dim=1) / 127.0
            safe = torch.where(s > 0, s, torch.ones_like(s))
            c = torch.round(t / safe[:, None]).clamp(-127, 127)
            c = torch.where(s[:, None] > 0, c, torch.zeros_like(c))
            return c.to(torch.int64), s

        cq, sq = quant(qf)
        cx, sx = quant(xf)
        dots = cq @ cx.T
        scores = dots.to(torch.float32) * (sx[None, :] * sq[:, None])
    else:
        raise ValueError(f"dtype must be fp32, fp16 or int8, got {dtype!r}")
    # Columns are in id order, so a stable descending sort keeps ties in id order.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), order


__all__ += ["topk_search_reference"]
