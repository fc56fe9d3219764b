"""The ordered top-k of solar_kernels, in one place: best first by (score desc, id asc).

Ties go to the lower id, so a result does not depend on how its candidates were split:
the contrastive loss mines negatives tile by tile (and merges its in-batch list with the
hard negatives), the sharded search merges one list per rank, and both must give what one
exact top-k over all candidates at once gives.
"""
from __future__ import annotations

import torch

__all__ = ["merge_topk", "topk_lowest_index"]

_PAD_KEY = torch.iinfo(torch.int64).max


def topk_lowest_index(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of x [m, c] by (value desc, column asc), exact on ties.

    torch.topk does not promise which of several equal values it returns, so the k-th value
    is found first and, among the entries equal to it, the lowest columns are kept.  Returns
    (values [m, min(k, c)], columns int64 [m, min(k, c)]), best first.
    """
    k = min(k, x.shape[1])
    kth = x.topk(k, dim=1).values[:, k - 1:k]
    gt = x > kth
    eq = x == kth
    need = k - gt.sum(1, keepdim=True)
    keep = gt | (eq & (eq.cumsum(1) <= need))
    idx = keep.nonzero()[:, 1].view(x.shape[0], k)  # ascending columns per row
    val = x.gather(1, idx)
    order = torch.sort(val, dim=1, descending=True, stable=True).indices
    return val.gather(1, order), idx.gather(1, order)


def merge_topk(scores: torch.Tensor, ids: torch.Tensor, k: int, *, ties_in_id_order: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of candidate lists [m, c] by (score desc, id asc), in any input order.

    Args:
        scores: [m, c] floating scores (-inf is a real, worst score).
        ids: [m, c] int64 ids of the candidates, unique within a row except for padding:
            an id < 0 marks an empty slot, which sorts after every real candidate.
        k: how many to keep (k > c keeps all c).
        ties_in_id_order: the caller promises that, within each row, candidates with equal
            scores already come in ascending id order and there is no padding (true of
            best-first lists with ascending, disjoint id ranges concatenated in that order,
            as the CPU mining merges its column tiles); the id sort is then skipped.

    Returns:
        (scores [m, min(k, c)], ids [m, min(k, c)]) best first; an empty slot that is kept
        (fewer real candidates than k) reads (-inf, -1).

    Two stable sorts: by id ascending, then by score descending, so that equal scores stay
    in id order.
    """
    if ties_in_id_order:
        o = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        return scores.gather(1, o), ids.gather(1, o)
    pad = ids < 0
    scores = scores.masked_fill(pad, float("-inf"))
    key = ids.masked_fill(pad, _PAD_KEY)
    o = torch.argsort(key, dim=1, stable=True)
    s1, i1 = scores.gather(1, o), key.gather(1, o)
    o2 = torch.argsort(s1, dim=1, descending=True, stable=True)[:, :k]
    s, i = s1.gather(1, o2), i1.gather(1, o2)
    return s.contiguous(), i.masked_fill(i == _PAD_KEY, -1).contiguous()
