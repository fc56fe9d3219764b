"""Argument checks of contrastive_loss, shared by its many-rank form and pooled_contrastive_loss.

Bad input fails here, before any kernel runs, with an error that names the argument, what
came and what was expected.  Beyond shapes and dtypes two numeric contracts are checked:
the inputs are finite, and their logits cannot overflow the float32 statistics
(MAX_LOGIT_BOUND, checked on norms, not on the logits).
"""
from __future__ import annotations

import torch

from .. import _checks
from .contrastive_stats import group_counts

# Largest bound on |logit| the ops accept: max_i |q_i| * max_j |k_j| * max(1, 1/temperature)
# * (1 + hardness) <= FLT_MAX / 3 (about 1.13e38).  By Cauchy-Schwarz it bounds every partial
# dot, logit and (1 + hardness) logit; every fp32 statistic then fits: a log-sum-exp is at most
# the bound + log N, a row's loss (B - A, or softplus(log n + B - C - A)) at most 2 bounds +
# 2 log N, and the mean over rows is taken as sum(loss_i / n) (see contrastive.mean_loss), so it never
# overflows on the way.  Beyond it a row's loss itself may not fit in fp32.  (The absolute error
# of a loss computed from fp32 logits grows like the bound times 2^-23.)
MAX_LOGIT_BOUND = torch.finfo(torch.float32).max / 3
# 1 / temperature scales every logit in fp32 (a kernel argument): it must be a finite fp32.
MIN_TEMPERATURE = 1.0 / torch.finfo(torch.float32).max


def dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


def validate(q, k, groups, hard_negatives, temperature, hardness, mine_k, names=("q", "k"), offset=None):
    """Check the arguments of contrastive_loss; returns (temperature, hardness, mine_k, offset) as
    python numbers (offset None stays None: the square form).  `names`: how errors call q and k
    (pooled_contrastive_loss passes [N, D] stand-ins for its token tensors xq and xk).

    Square form (offset None): k is [N, D] like q, groups [N].  Rectangular form (offset an
    int): k is [M, D] with M >= N, offset in [0, M - N], groups [M] (one per column)."""
    qn, kn = names
    _checks.check_tensor(qn, q, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    n, D = q.shape
    if k is not None:
        _checks.check_tensor(kn, k, ndim=2, dtypes=_checks.FLOAT_DTYPES)
        if offset is None and tuple(k.shape) != (n, D):
            raise ValueError(f"{kn} must have the shape of {qn} [N, D] = {tuple(q.shape)}, got {tuple(k.shape)} "
                             f"(for M > N columns pass offset, the column of row 0's positive)")
        if offset is not None and (k.shape[1] != D or k.shape[0] < n):
            raise ValueError(f"{kn} must have shape [M, D] with M >= N = {n} (the rows of {qn}) and D = {D}, "
                             f"got {tuple(k.shape)}")
        if k.dtype != q.dtype:
            raise TypeError(f"{kn} must have {qn}'s dtype {dtype_name(q.dtype)}, got {dtype_name(k.dtype)}")
    else:
        if offset is not None:
            raise ValueError(f"offset needs k: single-set mode (k=None) scores {qn} against itself, got "
                             f"offset = {offset!r} (expected None)")
        if groups is None:
            raise ValueError("single-set mode (k=None) needs groups: [N] int64 group ids of the rows of q")
    if n == 0 or D == 0:
        raise ValueError(f"{qn} must have N >= 1 rows and D >= 1 columns, got shape {tuple(q.shape)}")
    M = n if k is None else k.shape[0]
    if offset is not None:
        offset = _checks.as_int("offset", offset)
        if offset > M - n:
            raise ValueError(f"offset must be in [0, M - N] = [0, {M - n}] ({qn}: N = {n} rows, {kn}: M = {M} "
                             f"rows; row i's positive is column offset + i), got {offset}")
    if groups is not None:
        _checks.check_tensor("groups", groups, ndim=1)
        if groups.dtype != torch.int64:
            raise TypeError(f"groups must have dtype int64, got {dtype_name(groups.dtype)}")
        if offset is None and groups.shape[0] != n:
            raise ValueError(f"groups must have length N = {n} (rows of {qn}), got {groups.shape[0]}")
        if offset is not None and groups.shape[0] != M:
            raise ValueError(f"groups must have length M = {M} (rows of {kn}: one group per column, row i takes "
                             f"the group of column offset + i), got {groups.shape[0]}")
    if hard_negatives is not None:
        _checks.check_tensor("hard_negatives", hard_negatives, ndim=3, dtypes=_checks.FLOAT_DTYPES)
        if hard_negatives.shape[0] != n or hard_negatives.shape[2] != D:
            raise ValueError(f"hard_negatives must have shape [N, H, D] = [{n}, H, {D}], "
                             f"got {tuple(hard_negatives.shape)}")
        if hard_negatives.dtype != q.dtype:
            raise TypeError(f"hard_negatives must have {qn}'s dtype {dtype_name(q.dtype)}, "
                            f"got {dtype_name(hard_negatives.dtype)}")
    _checks.check_same_device(**{qn: q, kn: k}, groups=groups, hard_negatives=hard_negatives)
    temperature = _checks.as_float("temperature", temperature)
    hardness = _checks.as_float("hardness", hardness)
    _checks.check_positive("temperature", temperature)
    check_temperature(temperature)
    if hardness < 0:
        raise ValueError(f"hardness must be >= 0, got {hardness}")
    mine_k = _checks.as_int("mine_k", mine_k)
    amax = {}
    for name, t in ((qn, q), (kn, k), ("hard_negatives", hard_negatives)):
        if t is not None:
            amax[name] = _checks.check_finite_fast(name, t)
    # (pooled_contrastive_loss's all-zero stand-ins pass here: it checks its own tokens' bound)
    keys = [(kn, k, amax[kn]) if k is not None else (qn, q, amax[qn])]
    if hard_negatives is not None:
        keys.append(("hard_negatives", hard_negatives, amax["hard_negatives"]))
    check_logit_bound(qn, q, amax[qn], keys, temperature, hardness)
    return temperature, hardness, mine_k, offset


def check_temperature(temperature: float) -> None:
    if temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be >= {MIN_TEMPERATURE:.3g} (1 / temperature scales the logits in "
                         f"float32 and must be finite there), got {temperature!r}")


def check_logit_bound(qn: str, q: torch.Tensor, q_absmax: float, keys: list, temperature: float,
                       hardness: float) -> None:
    """Refuse inputs whose logits can overflow the fp32 statistics (see MAX_LOGIT_BOUND).

    q: the rows (or tokens whose weighted means are the rows: a mean's norm is at most the
    largest token norm), feature dimension last, with its max |entry|; keys: (name, tensor, max
    |entry|) triples holding the columns (k, the hard negatives, or key tokens).  The cheap bound
    sqrt(D) * max|entry| on each row norm (the max entries are known from the finiteness check)
    needs no pass over the data; only when it fails are the row norms computed (in fp64, so that
    they cannot overflow themselves).
    """
    scale = max(1.0, 1.0 / temperature) * (1.0 + hardness)
    cheap_k = max(t.shape[-1] ** 0.5 * a for _, t, a in keys)
    if q.shape[-1] ** 0.5 * q_absmax * cheap_k * scale <= MAX_LOGIT_BOUND:
        return
    with torch.no_grad():
        nq = float(torch.linalg.vector_norm(q, dim=-1, dtype=torch.float64).max())
        nk, kn = max((float(torch.linalg.vector_norm(t, dim=-1, dtype=torch.float64).max()), name)
                     for name, t, _ in keys)
    bound = nq * nk * scale
    if bound > MAX_LOGIT_BOUND:
        raise ValueError(
            f"{qn} and {kn} are too large for temperature = {temperature:.4g}"
            f"{f' and hardness = {hardness:.4g}' if hardness else ''}: logits can reach "
            f"max|{qn}_i| * max|{kn}_j| * max(1, 1/temperature) * (1 + hardness) = {bound:.4g} (largest row norms "
            f"{nq:.4g} and {nk:.4g}), above {MAX_LOGIT_BOUND:.4g} (a third of the largest float32), where "
            f"the float32 logits and loss can overflow; normalise {qn} and {kn} or raise temperature")


def check_counts(groups_rows: torch.Tensor | None, groups_cols: torch.Tensor | None, n: int, M: int, H: int,
                 mine_k: int, single: bool):
    """The number of rows that have a positive (the loss's divisor); raises when there is none
    (single-set mode), when no row has a negative (the loss would be 0 with no gradient) or
    when mine_k exceeds some row's number of negatives.

    groups_rows / groups_cols: the [n] group ids of all rows and the [M] ids of all columns the
    loss sees (None: each row's only positive is its own column); H: hard negatives per row.
    """
    if groups_cols is not None:
        counts = group_counts(groups_rows, groups_cols)
        n_rows_pos = int((counts > 1).sum()) if single else n
        min_neg = int((M - counts).min()) + H
        max_neg = M - int(counts.min()) + H
    else:
        n_rows_pos, min_neg = n, M - 1 + H
        max_neg = min_neg
    if single and n_rows_pos == 0:
        raise ValueError("no row has a positive: in single-set mode every group has one member "
                         "(give at least two rows the same group id)")
    if max_neg == 0:
        raise ValueError(f"no row has a negative: {'N = 1' if M == 1 else 'every row is in one group'} and "
                         "there are no hard negatives, so the loss is 0 and carries no gradient (use a batch "
                         "of at least two groups, or pass hard_negatives)")
    if mine_k > min_neg:
        raise ValueError(f"mine_k = {mine_k} is larger than the number of negatives of some row "
                         f"(the smallest is {min_neg})")
    return n_rows_pos


def positive_columns(groups_rows: torch.Tensor | None, groups_cols: torch.Tensor | None, n: int) -> int:
    """The number of columns with a positive among the n rows (the divisor of the symmetric
    loss's column direction): each row's own column, plus, with groups, every column whose
    group is some row's group.  n when there are no groups (the paired columns) or as many
    columns as rows (the square form: every column is some row's own, so no count, no host sync)."""
    if groups_cols is None or groups_cols.shape[0] == n:
        return n
    return int((group_counts(groups_cols, groups_rows) > 0).sum())
