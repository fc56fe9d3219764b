"""Statistics folding of contrastive_loss: from per-row log-sum-exps to losses and back.

Both backends (the Triton kernels and the chunked PyTorch path) reduce the in-batch columns
of each row into A (positives), B and C (negatives; see ``solar_kernels.ops.contrastive``
for the formulas).  What follows is the same for every backend and for every rank of the
many-rank form, and lives here once:

* counts: group sizes and each row's number of negatives n_i (O(N log N), no N x N);
* folding: the hard negatives' logits into (A, B, C), then the per-row loss;
* the backward coefficients (r, A, B, C) the gradient kernels read;
* the mined lists: the in-batch best negatives merged with the row's hard negatives.
"""
from __future__ import annotations

import torch

from .._topk import merge_topk


def group_counts(gq: torch.Tensor, gk: torch.Tensor) -> torch.Tensor:
    """For each row's group (gq [n]), the number of columns in that group (gk [N])."""
    sk = torch.sort(gk).values
    return (torch.searchsorted(sk, gq, right=True) - torch.searchsorted(sk, gq, right=False))


def num_neg(n: int, N: int, gq, gk, H: int, device) -> torch.Tensor:
    """[n] int64: each row's negatives among N columns (its group's columns, or its own
    column without groups, are positives) plus its H hard negatives."""
    if gq is None:
        return torch.full((n,), N - 1 + H, dtype=torch.int64, device=device)
    return N - group_counts(gq, gk) + H


def hard_logits(q: torch.Tensor, hn: torch.Tensor, inv_t: float) -> torch.Tensor:
    """[n, H] logits of each row against its own hard negatives [n, H, D] (fp32)."""
    return torch.einsum("nd,nhd->nh", q.float(), hn.float()) * inv_t


def _log_neg_minus_a(A, B, C, has_pos, n_neg):
    """logNeg_i - A_i for hardness > 0 (logNeg = -inf for a row without negatives, A read
    as 0 for a row without positives, whose loss is 0 anyway)."""
    has_neg = n_neg > 0
    log_neg = torch.where(has_neg, torch.log(n_neg.clamp_min(1).float()) + B - C,
                          torch.full_like(B, float("-inf")))
    return log_neg - torch.where(has_pos, A, torch.zeros_like(A))


def finish_stats(A, B, C, hard_s, beta: float, n_neg):
    """Fold the hard-negative logits hard_s [n, H] (or None) into the in-batch (A, B, C);
    returns (per-row loss, A, B, C).  Rows without a positive (A = -inf) have loss 0."""
    if hard_s is not None and hard_s.shape[1] > 0:
        if beta > 0:
            B = torch.logaddexp(B, torch.logsumexp(hard_s * (1.0 + beta), 1))
            C = torch.logaddexp(C, torch.logsumexp(hard_s * beta, 1))
        else:
            B = torch.logaddexp(B, torch.logsumexp(hard_s, 1))
    has_pos = torch.isfinite(A)
    if beta > 0:
        z = _log_neg_minus_a(A, B, C, has_pos, n_neg)
        loss = torch.where(has_pos, torch.nn.functional.softplus(z), torch.zeros_like(A))
    else:
        loss = torch.where(has_pos, B - A, torch.zeros_like(A))
    return loss, A, B, C


def coeffs(grad: torch.Tensor, stats: torch.Tensor, beta: float, n_neg) -> torch.Tensor:
    """[4, n] = (r, A, B, C) for the backward kernels: r = dL/dloss_i (times
    sigmoid(logNeg_i - A_i) when beta > 0, 0 for rows without a positive); -inf statistics
    sanitised to 0 (their terms are zero)."""
    A, B, C = stats[0], stats[1], stats[2]
    has_pos = torch.isfinite(A)
    r = torch.where(has_pos, grad.float(), torch.zeros_like(A))
    if beta > 0:
        r = r * torch.sigmoid(_log_neg_minus_a(A, B, C, has_pos, n_neg))
    fin = lambda v: torch.where(torch.isfinite(v), v, torch.zeros_like(v))  # noqa: E731
    return torch.stack([r, fin(A), fin(B), fin(C)]).contiguous()


def merge_mined(tv: torch.Tensor, ti: torch.Tensor, hard_s: torch.Tensor | None, N: int, mine_k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's mine_k best negatives, best first, ties to the lower index.

    tv / ti [n, k']: the in-batch candidates of a backend (any order; column ids < N, -1 for
    an empty slot); hard_s [n, H] or None: the row's hard-negative logits, ids N + h.
    """
    if hard_s is not None:
        n, H = hard_s.shape
        tv = torch.cat([tv, hard_s], 1)
        ti = torch.cat([ti, torch.arange(N, N + H, device=ti.device).expand(n, H)], 1)
    return merge_topk(tv, ti, mine_k)
