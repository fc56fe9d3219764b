"""The ordered top-k (solar_kernels._topk) against a plain python sort by (score desc, id asc).

Hypothesis draws shapes, k, how many distinct scores there are (few: many ties), how many
slots are empty and a seed; the tensors are built from the seed.
"""
import math

import torch
from hypothesis import example, given, strategies as st

from solar_kernels._topk import merge_topk, topk_lowest_index


def _expected(scores, ids, k):
    """Per row: the real candidates sorted by (-score, id), then the empty slots as (-inf, -1)."""
    out_s, out_i = [], []
    for srow, irow in zip(scores.tolist(), ids.tolist()):
        real = sorted((-s, i) for s, i in zip(srow, irow) if i >= 0)
        pads = [(math.inf, -1)] * sum(i < 0 for i in irow)
        best = (real + pads)[:k]
        out_s.append([-s for s, _ in best])
        out_i.append([i for _, i in best])
    return out_s, out_i


def _candidates(m, c, levels, n_pad, n_neginf, seed):
    gen = torch.Generator().manual_seed(seed)
    # few distinct values -> many ties; scores in [-1, 1] plus some -inf
    scores = torch.randint(0, levels, (m, c), generator=gen).float() / max(levels - 1, 1) * 2 - 1
    ids = torch.stack([torch.randperm(4 * c + 1, generator=gen)[:c] for _ in range(m)])  # unique per row
    for r in range(m):
        cols = torch.randperm(c, generator=gen)
        scores[r, cols[:n_neginf]] = float("-inf")
        ids[r, cols[n_neginf:n_neginf + n_pad]] = -1
        scores[r, cols[n_neginf:n_neginf + n_pad]] = torch.randn(min(n_pad, c - min(n_neginf, c)),
                                                                  generator=gen)  # ignored
    return scores, ids


@given(m=st.integers(1, 4), c=st.integers(1, 40), k=st.integers(1, 50), levels=st.integers(1, 6),
       n_pad=st.integers(0, 5), n_neginf=st.integers(0, 5), seed=st.integers(0, 2 ** 16))
@example(m=1, c=5, k=3, levels=1, n_pad=0, n_neginf=0, seed=0)      # all scores tie: lowest ids win
@example(m=2, c=3, k=10, levels=3, n_pad=1, n_neginf=1, seed=1)     # k larger than the candidates
@example(m=1, c=4, k=4, levels=2, n_pad=0, n_neginf=4, seed=2)      # every score -inf: by id
@example(m=1, c=6, k=6, levels=2, n_pad=3, n_neginf=3, seed=3)      # -inf before the empty slots
def test_merge_topk_matches_a_sort_by_score_then_id(m, c, k, levels, n_pad, n_neginf, seed):
    scores, ids = _candidates(m, c, levels, n_pad, n_neginf, seed)
    s, i = merge_topk(scores, ids, k)
    es, ei = _expected(scores, ids, k)
    assert s.shape == i.shape == (m, min(k, c))
    assert i.tolist() == ei
    assert s.tolist() == es


@given(m=st.integers(1, 4), c=st.integers(1, 40), k=st.integers(1, 50), levels=st.integers(1, 6),
       n_neginf=st.integers(0, 5), seed=st.integers(0, 2 ** 16))
@example(m=1, c=7, k=3, levels=1, n_neginf=0, seed=0)
@example(m=2, c=3, k=8, levels=2, n_neginf=3, seed=5)
def test_topk_lowest_index_matches_a_sort_by_value_then_column(m, c, k, levels, n_neginf, seed):
    scores, _ = _candidates(m, c, levels, 0, n_neginf, seed)
    v, i = topk_lowest_index(scores, k)
    cols = torch.arange(c).expand(m, c)
    es, ei = _expected(scores, cols, k)
    assert i.tolist() == ei and v.tolist() == es


@given(m=st.integers(1, 3), c=st.integers(2, 40), parts=st.integers(2, 5), k=st.integers(1, 12),
       levels=st.integers(1, 4), seed=st.integers(0, 2 ** 16))
def test_merging_split_lists_equals_one_topk(m, c, parts, k, levels, seed):
    """Top-k of column blocks merged block by block (as the CPU mining does per tile) equals
    the top-k of the whole rows: the merge does not depend on the split."""
    scores, _ = _candidates(m, c, levels, 0, 0, seed)
    whole = topk_lowest_index(scores, k)
    bounds = torch.linspace(0, c, parts + 1).long().unique().tolist()
    tv = ti = None
    for c0, c1 in zip(bounds[:-1], bounds[1:]):
        v, i = topk_lowest_index(scores[:, c0:c1], k)
        if tv is None:
            tv, ti = v, i + c0
        else:
            both = torch.cat([tv, v], 1), torch.cat([ti, i + c0], 1)
            fast = merge_topk(*both, k, ties_in_id_order=True)
            tv, ti = merge_topk(*both, k)
            assert torch.equal(fast[0], tv) and torch.equal(fast[1], ti)
    assert torch.equal(ti, whole[1]) and torch.equal(tv, whole[0])


def test_merge_topk_orders_by_score_then_id():
    s = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    i = torch.tensor([[4, 9, 2, 0, -1]])
    ms, mi = merge_topk(s, i, 3)
    assert mi.tolist() == [[2, 9, 0]] and ms.tolist() == [[3.0, 3.0, 2.0]]
    # an empty slot that has to be kept reads (-inf, -1)
    ms, mi = merge_topk(s, i, 5)
    assert mi.tolist() == [[2, 9, 0, 4, -1]] and ms[0, -1].item() == float("-inf")
