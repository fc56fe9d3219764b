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

1. ``@triton.jit`` kernels: ``_cl_stats_kernel`` (row statistics + running top-k of the
   negatives; for the symmetric loss also the column statistics, from the same S tiles, as
   per-program partials folded by the launcher) and the backward, in panels of rows and
   without atomics: ``_cl_grad_kernel`` (recompute S tile by tile, write G = dL/dS of the
   panel [R, N] in the input dtype),
   ``_cl_dq_kernel`` (dq of the panel's rows = G k, a GEMM) and ``_cl_dk_kernel`` (dk += G^T q,
   a GEMM whose output blocks each belong to one program).
2. Launchers (no autograd): :func:`contrastive_forward`, :func:`contrastive_backward`;
   the CPU path is the same tiled algorithm in chunked PyTorch.
3. ``torch.library`` custom ops ``solar::contrastive_fwd`` / ``solar::contrastive_bwd`` with
   fake kernels, and one ``autograd.Function``.
4. The checked public entry points :func:`contrastive_loss` (and the distributed form).
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

from .. import _checks, _dispatch

try:  # triton is optional on CPU-only installs
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

__all__ = ["contrastive_loss", "Mined", "contrastive_forward", "contrastive_backward"]

_dispatch.register_op("contrastive_loss", cuda="Triton", cpu_symbol=None,
                      cpu_fallback="chunked PyTorch (tiled)")

# fp32 inputs on CUDA: the dots run "tf32x3" by default (three TF32 tensor-core products,
# about fp32 accuracy: the relative error of a logit stays near 1e-6, where plain "tf32" gives
# about 5e-4 -- 1e-2 on a logit at temperature 0.05).  "ieee" (FMA, no tensor cores; the fp32
# backward spills at 64 x 64 tiles) and "tf32" can be chosen with SOLAR_CL_FP32_PRECISION.
# The interpreter ignores the mode and computes in fp32.
FP32_DOT_PRECISIONS = ("tf32x3", "tf32", "ieee")
FP32_DOT_PRECISION = os.environ.get("SOLAR_CL_FP32_PRECISION", "tf32x3")
if FP32_DOT_PRECISION not in FP32_DOT_PRECISIONS:
    raise ValueError(f"SOLAR_CL_FP32_PRECISION must be one of {FP32_DOT_PRECISIONS}, got {FP32_DOT_PRECISION!r}")
# The Triton statistics kernel keeps each row's running top-k in registers ([BLOCK_M, KP]
# values and indices, KP = next power of two >= mine_k).  Up to this bound it compiles without
# spills for sm_90 with hardness on (tests/aot_harness.py; 32 spilled 8 B).  A larger mine_k
# mines in a second, chunked pass (torch matmul + top-k over row chunks of S: one more
# N x N x D product, O(chunk x N) memory).
MAX_KERNEL_MINE_K = 16
# Column statistics from the row pass: at most this many statistics programs, each owning one
# [3, N] fp32 row of column partials (about 2 per SM of an H100 / H200; 264 x 3 x N x 4 bytes).
MAX_COL_PARTIALS = 264
# Backward panel: G = dL/dS is materialised for R rows at a time ([R, N] in the input dtype,
# twice for fp16), R = the largest multiple of the row blocks with R * N <= this many elements
# (512 MiB of bf16; O(R N) memory, never N x N).  Larger panels mean fewer read-modify-writes of
# dk (one per panel: N D 8 bytes each) and more dq programs (R / 128 x D / 128 of them: at
# N = 65536, R = 4096 gives 192 for 132 SMs); bench/RESULTS.md counts the trade-off.
MAX_PANEL_ELEMS = 1 << 28
# CPU tile budget (elements of one S tile).
CPU_TILE_ELEMS = 1 << 22
# CPU: logits of the first rows kept from forward to backward (when gradients are needed) so
# that backward skips their recompute; at most this many times n * D elements (O(N * D)).
CPU_CACHE_PER_ND = 2
CPU_CACHE_MAX_ELEMS = 1 << 24  # and at most 64 MiB: at large N the saved share is small anyway


# Largest bound on |logit| the ops accept: max_i |q_i| * max_j |k_j| * max(1, 1/temperature)
# * (1 + hardness) <= FLT_MAX / 3 (about 1.13e38).  By Cauchy-Schwarz it bounds every partial
# dot, logit and (1 + hardness) logit; every fp32 statistic then fits: a log-sum-exp is at most
# the bound + log N, a row's loss (B - A, or softplus(log n + B - C - A)) at most 2 bounds +
# 2 log N, and the mean over rows is taken as sum(loss_i / n) (see _reduce), so it never
# overflows on the way.  Beyond it a row's loss itself may not fit in fp32.  (The absolute error
# of a loss computed from fp32 logits grows like the bound times 2^-23.)
MAX_LOGIT_BOUND = torch.finfo(torch.float32).max / 3
# 1 / temperature scales every logit in fp32 (a kernel argument): it must be a finite fp32.
MIN_TEMPERATURE = 1.0 / torch.finfo(torch.float32).max


class Mined(NamedTuple):
    """Top negatives of each row (q->k direction): ``indices`` [N, k] int64 (in-batch column
    j < N, or N + h for hard negative h of that row) and ``scores`` [N, k] float32 (the
    logits S_ij = <q_i, k_j> / temperature), best first; ties go to the lower index."""

    indices: torch.Tensor
    scores: torch.Tensor


# ----------------------------------------------------------------------------------------
# 1. Triton kernels
# ----------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _cl_tile(Q_ptr, K_ptr, rows, cols, row_ok, col_ok, D, stride_qn, stride_qd, stride_kn, stride_kd,
                 inv_t, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """S tile [BLOCK_M, BLOCK_N] = q[rows] . k[cols] * inv_t, fp32 accumulation over D.

        Operands enter the dot in their storage dtype (tensor cores on a GPU); UPCAST (the
        interpreter, which multiplies raw bf16 bits otherwise) widens them to fp32 first,
        which is exact, so both paths see the same operand values."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        offs_d = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_ok = d < D
            qt = tl.load(Q_ptr + rows[:, None] * stride_qn + d[None, :] * stride_qd,
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            kt = tl.load(K_ptr + cols[:, None] * stride_kn + d[None, :] * stride_kd,
                         mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                qt = qt.to(tl.float32)
                kt = kt.to(tl.float32)
            acc += tl.dot(qt, tl.trans(kt), input_precision=PRECISION)
        return acc * inv_t

    @triton.jit
    def _cl_masks(rows, cols, row_ok, col_ok, GQ_ptr, GK_ptr, offset,
                  HAS_GROUPS: tl.constexpr, SINGLE: tl.constexpr):
        """(valid, pos) masks of a tile: valid = real column (not the diagonal in single-set
        mode); pos = same group (or the diagonal column in two-tower mode)."""
        valid = row_ok[:, None] & col_ok[None, :]
        is_diag = cols[None, :] == (rows + offset)[:, None]
        off_diag = cols[None, :] != (rows + offset)[:, None]
        if HAS_GROUPS:
            gq = tl.load(GQ_ptr + rows, mask=row_ok, other=-1)
            gk = tl.load(GK_ptr + cols, mask=col_ok, other=-2)
            same = gq[:, None] == gk[None, :]
        else:
            same = is_diag
        if SINGLE:
            valid = valid & off_diag
            pos = same & valid
        else:
            pos = (same | is_diag) & valid
        return valid, pos

    @triton.jit
    def _lse_update(m, l, x, COLS: tl.constexpr):
        """Online log-sum-exp: merge the rows of tile x (-inf = absent) into (m, l).

        COLS: also the log-sum-exp of each column of x over these rows (-inf where empty), from
        the same exponentials: exp(x_ij - m_i) exp(m_i - M) = exp(x_ij - M) with M the largest
        row shift, exact while every column's maximum is within SPREAD of M (then nothing that
        matters underflows); a tile with a wider spread takes one more exponential per element
        with per-column shifts."""
        m_new = tl.maximum(m, tl.max(x, 1))
        fin = m_new != float("-inf")
        m_safe = tl.where(fin, m_new, 0.0)
        e = tl.exp(x - m_safe[:, None])
        l = l * tl.exp(m - m_safe) + tl.sum(e, 1)
        col = tl.max(x, 0)
        if COLS:
            big = tl.max(tl.where(fin, m_safe, float("-inf")), 0)
            low = tl.min(tl.where(col != float("-inf"), col, float("inf")), 0)
            if low >= big - 60.0:
                w = tl.where(fin, tl.exp(m_safe - big), 0.0)
                cs = tl.sum(e * w[:, None], 0)
                col = tl.where(cs > 0, big + tl.log(cs), float("-inf"))
            else:
                c_safe = tl.where(col != float("-inf"), col, 0.0)
                cs = tl.sum(tl.exp(x - c_safe[None, :]), 0)
                col = tl.where(cs > 0, c_safe + tl.log(cs), float("-inf"))
        return m_new, l, col

    @triton.jit
    def _lse_merge(P_ptr, v, mask):
        """P[...] = log(exp(P[...]) + exp(v)) for a vector owned by this program (no atomics)."""
        old = tl.load(P_ptr, mask=mask, other=float("-inf"))
        mx = tl.maximum(old, v)
        mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
        new = tl.where(mx == float("-inf"), float("-inf"),
                       mx_safe + tl.log(tl.exp(old - mx_safe) + tl.exp(v - mx_safe)))
        tl.store(P_ptr, new, mask=mask)

    @triton.jit
    def _cl_stats_kernel(Q_ptr, K_ptr, GQ_ptr, GK_ptr, A_ptr, B_ptr, C_ptr, TV_ptr, TI_ptr, CP_ptr,
                         n_rows, n_cols, D, offset, inv_t, beta, mine_k,
                         stride_qn, stride_qd, stride_kn, stride_kd, stride_tn, stride_cpp, stride_cps,
                         HAS_GROUPS: tl.constexpr, SINGLE: tl.constexpr, HARD: tl.constexpr,
                         MINE: tl.constexpr, KP: tl.constexpr, COLS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """Row statistics over the in-batch columns, and with COLS the column statistics from the
        same S tiles; program p takes row blocks p, p + P, ... (P programs).

        S = q k^T * inv_t tile by tile ([BLOCK_M, BLOCK_N], fp32 accumulation over D);
        A[i] = LSE over positives of S, B[i] = LSE over all columns of S (HARD: over the
        negatives of (1+beta) S), C[i] = LSE over the negatives of beta S (HARD only); -inf
        when the set is empty.  MINE: the mine_k (<= KP) best negatives per row (values TV,
        column indices TI, unsorted; the caller sorts), ties to the lower column.
        COLS (two-tower symmetric: the masks are symmetric): the same three statistics of each
        column over this program's rows, merged into CP[p, stat, column] (fp32, -inf
        initialised; only program p touches row p, so no atomics); the caller folds CP over p.
        """
        pid = tl.program_id(0).to(tl.int64)
        nprog = tl.num_programs(0).to(tl.int64)
        slots = tl.arange(0, KP)
        for rb in range(pid, tl.cdiv(n_rows, BLOCK_M), nprog):
            rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < n_rows
            m_a = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            l_a = tl.zeros((BLOCK_M,), tl.float32)
            m_b = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            l_b = tl.zeros((BLOCK_M,), tl.float32)
            m_c = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            l_c = tl.zeros((BLOCK_M,), tl.float32)
            # padding slots hold +inf so that they are never the worst entry
            tv = tl.where(slots[None, :] < mine_k, float("-inf"), float("inf")) + tl.zeros((BLOCK_M, KP), tl.float32)
            ti = tl.full((BLOCK_M, KP), -1, tl.int64)
            for n0 in range(0, n_cols, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
                col_ok = cols < n_cols
                s = _cl_tile(Q_ptr, K_ptr, rows, cols, row_ok, col_ok, D, stride_qn, stride_qd, stride_kn,
                             stride_kd, inv_t, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION)
                valid, pos = _cl_masks(rows, cols, row_ok, col_ok, GQ_ptr, GK_ptr, offset, HAS_GROUPS, SINGLE)
                neg = valid & ~pos
                cp = CP_ptr + pid * stride_cpp + cols
                m_a, l_a, col = _lse_update(m_a, l_a, tl.where(pos, s, float("-inf")), COLS)
                if COLS:
                    _lse_merge(cp, col, col_ok)
                if HARD:
                    m_b, l_b, col = _lse_update(m_b, l_b, tl.where(neg, (1.0 + beta) * s, float("-inf")), COLS)
                    if COLS:
                        _lse_merge(cp + stride_cps, col, col_ok)
                    m_c, l_c, col = _lse_update(m_c, l_c, tl.where(neg, beta * s, float("-inf")), COLS)
                    if COLS:
                        _lse_merge(cp + 2 * stride_cps, col, col_ok)
                else:
                    m_b, l_b, col = _lse_update(m_b, l_b, tl.where(valid, s, float("-inf")), COLS)
                    if COLS:
                        _lse_merge(cp + stride_cps, col, col_ok)
                if MINE:
                    # Running top-k, unsorted: repeatedly take the tile's best remaining negative
                    # (lowest column on ties) and let it replace the row's worst kept entry (the
                    # highest index on ties) when strictly better.  Tiles come in column order, so
                    # an equal value never displaces a lower index.
                    cand = tl.where(neg, s, float("-inf"))
                    cur = tl.max(cand, 1)
                    worst = tl.min(tv, 1)
                    go = tl.max((cur > worst).to(tl.int32), 0)
                    while go > 0:
                        best_col = tl.min(tl.where(cand == cur[:, None], cols[None, :], 2147483647), 1)
                        upd = cur > worst
                        wkey = tl.where(tv == worst[:, None], ti * KP + slots[None, :], -(1 << 62))
                        wsel = tl.max(wkey, 1)
                        hit = (wkey == wsel[:, None]) & upd[:, None]
                        tv = tl.where(hit, cur[:, None], tv)
                        ti = tl.where(hit, best_col[:, None], ti)
                        cand = tl.where(cols[None, :] == best_col[:, None], float("-inf"), cand)
                        cur = tl.max(cand, 1)
                        worst = tl.min(tv, 1)
                        go = tl.max((cur > worst).to(tl.int32), 0)
            a = tl.where(l_a > 0, m_a + tl.log(l_a), float("-inf"))
            b = tl.where(l_b > 0, m_b + tl.log(l_b), float("-inf"))
            tl.store(A_ptr + rows, a, mask=row_ok)
            tl.store(B_ptr + rows, b, mask=row_ok)
            if HARD:
                c = tl.where(l_c > 0, m_c + tl.log(l_c), float("-inf"))
                tl.store(C_ptr + rows, c, mask=row_ok)
            if MINE:
                smask = row_ok[:, None] & (slots[None, :] < mine_k)
                tl.store(TV_ptr + rows[:, None] * stride_tn + slots[None, :], tv, mask=smask)
                tl.store(TI_ptr + rows[:, None] * stride_tn + slots[None, :], ti, mask=smask)

    @triton.jit
    def _cl_grad_dir(s, valid, pos, neg, r, a, b, c, beta, HARD: tl.constexpr):
        """dL/dS of one direction: r (F - [pos] exp(s - a)), stats broadcast along s."""
        if HARD:
            f = (1.0 + beta) * tl.exp((1.0 + beta) * s - b) - beta * tl.exp(beta * s - c)
            f = tl.where(neg, f, 0.0)
        else:
            f = tl.where(valid, tl.exp(s - b), 0.0)
        f = f - tl.where(pos, tl.exp(s - a), 0.0)
        return r * f

    @triton.jit
    def _pow2_scale(amax):
        """2^-floor(log2(amax)) (1 where amax == 0): brings a row's largest |value| into [1, 2)."""
        e = tl.floor(tl.log2(tl.where(amax > 0, amax, 1.0)))
        return tl.exp2(-e)

    @triton.jit
    def _cl_grad_kernel(Q_ptr, K_ptr, GQ_ptr, GK_ptr, RS_ptr, CS_ptr, G_ptr, G2_ptr, SR_ptr, SC_ptr,
                        r0, n_prow, n_cols, D, offset, inv_t, beta,
                        stride_qn, stride_qd, stride_kn, stride_kd, stride_rs, stride_cs, stride_gn,
                        stride_srn, stride_scn,
                        HAS_GROUPS: tl.constexpr, SINGLE: tl.constexpr, HARD: tl.constexpr,
                        BOTH: tl.constexpr, SCALED: tl.constexpr, GROUP_M: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """G = dL/dS for a panel of rows r0 .. r0 + n_prow - 1 (all columns), one tile per program.

        Per [BLOCK_M, BLOCK_N] tile: recompute S (fp32 accumulation over D chunks), build G from
        the row statistics RS = [r, A, B, C] (and, BOTH, the column statistics CS) and store it
        into the panel G [n_prow, n_cols] in G's dtype (fp32 for fp32 inputs, the input dtype
        otherwise: what the tensor-core dots of _cl_dq_kernel / _cl_dk_kernel consume).  Every
        tile is written by exactly one program: no atomics.  Tiles go in groups of GROUP_M row
        blocks (the column block's k stays in L2 across the group).

        SCALED (fp16): G's entries are about r / N (r = 1 / (2N) for the symmetric mean), below
        fp16's smallest subnormal at N = 65536.  So the tile is stored twice: G scaled per row
        by a power of two that brings the row's largest |G| in this tile into [1, 2) (for dq;
        the scale goes to SR [n_prow, n_col_blocks]) and G2 scaled per column likewise (for dk;
        SC [n_row_blocks, n_cols]).  The consumers divide the exact power of two back out of
        their fp32 partial sums, so the rounding is relative to each row's (column's) largest
        term in the tile, whatever N is.  bf16 has fp32's exponent range: stored unscaled.
        """
        pid = tl.program_id(0).to(tl.int64)
        n_m = tl.cdiv(n_prow, BLOCK_M)
        n_n = tl.cdiv(n_cols, BLOCK_N)
        group = pid // (GROUP_M * n_n)
        first_m = group * GROUP_M
        size_m = tl.minimum(n_m - first_m, GROUP_M)
        in_group = pid % (GROUP_M * n_n)
        pid_m = first_m + in_group % size_m
        pid_n = in_group // size_m
        prow = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = r0 + prow
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = prow < n_prow
        col_ok = cols < n_cols
        s = _cl_tile(Q_ptr, K_ptr, rows, cols, row_ok, col_ok, D, stride_qn, stride_qd, stride_kn,
                     stride_kd, inv_t, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION)
        valid, pos = _cl_masks(rows, cols, row_ok, col_ok, GQ_ptr, GK_ptr, offset, HAS_GROUPS, SINGLE)
        neg = valid & ~pos
        r = tl.load(RS_ptr + rows, mask=row_ok, other=0.0)
        a = tl.load(RS_ptr + stride_rs + rows, mask=row_ok, other=0.0)
        b = tl.load(RS_ptr + 2 * stride_rs + rows, mask=row_ok, other=0.0)
        c = tl.load(RS_ptr + 3 * stride_rs + rows, mask=row_ok, other=0.0)
        g = _cl_grad_dir(s, valid, pos, neg, r[:, None], a[:, None], b[:, None], c[:, None], beta, HARD)
        if BOTH:
            rc = tl.load(CS_ptr + cols, mask=col_ok, other=0.0)
            ac = tl.load(CS_ptr + stride_cs + cols, mask=col_ok, other=0.0)
            bc = tl.load(CS_ptr + 2 * stride_cs + cols, mask=col_ok, other=0.0)
            cc = tl.load(CS_ptr + 3 * stride_cs + cols, mask=col_ok, other=0.0)
            g += _cl_grad_dir(s, valid, pos, neg, rc[None, :], ac[None, :], bc[None, :], cc[None, :],
                              beta, HARD)
        tile_ok = row_ok[:, None] & col_ok[None, :]
        g_off = prow[:, None] * stride_gn + cols[None, :]
        if SCALED:
            sr = _pow2_scale(tl.max(tl.abs(g), 1))
            sc = _pow2_scale(tl.max(tl.abs(g), 0))
            tl.store(G_ptr + g_off, (g * sr[:, None]).to(G_ptr.dtype.element_ty), mask=tile_ok)
            tl.store(G2_ptr + g_off, (g * sc[None, :]).to(G2_ptr.dtype.element_ty), mask=tile_ok)
            tl.store(SR_ptr + prow * stride_srn + pid_n, sr, mask=row_ok)
            tl.store(SC_ptr + pid_m * stride_scn + cols, sc, mask=col_ok)
        else:
            tl.store(G_ptr + g_off, g.to(G_ptr.dtype.element_ty), mask=tile_ok)

    @triton.jit
    def _cl_dq_kernel(G_ptr, K_ptr, SR_ptr, DQ_ptr, r0, n_prow, n_cols, D, inv_t,
                      stride_gn, stride_kn, stride_kd, stride_srn, stride_dqn,
                      SCALED: tl.constexpr, SCALE_BLOCK: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """dq[r0 + i, d] = inv_t * sum_j G[i, j] k[j, d] for a [BLOCK_M, BLOCK_D] block of the
        panel's rows: a plain GEMM over the columns in BLOCK_K chunks, fp32 accumulator in
        registers, each output element written once (no atomics).  SCALED: chunk j0's product
        is divided by its rows' power-of-two scales SR[:, j0 // SCALE_BLOCK] (BLOCK_K divides
        SCALE_BLOCK, the grad kernel's BLOCK_N) before it joins the fp32 sum."""
        # D blocks vary fastest: the programs that read the same rows of G run together, so G
        # comes from HBM once and from L2 for the other D blocks
        pid = tl.program_id(0).to(tl.int64)
        n_d = tl.cdiv(D, BLOCK_D)
        pid_m = pid // n_d
        pid_d = pid % n_d
        prow = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = prow < n_prow
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < D
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for c0 in range(0, n_cols, BLOCK_K):
            cols = c0 + tl.arange(0, BLOCK_K).to(tl.int64)
            col_ok = cols < n_cols
            gt = tl.load(G_ptr + prow[:, None] * stride_gn + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                         other=0.0)
            kt = tl.load(K_ptr + cols[:, None] * stride_kn + d[None, :] * stride_kd,
                         mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                gt = gt.to(tl.float32)
                kt = kt.to(tl.float32)
            if SCALED:
                sr = tl.load(SR_ptr + prow * stride_srn + c0 // SCALE_BLOCK, mask=row_ok, other=1.0)
                acc += tl.dot(gt, kt, input_precision=PRECISION) * (1.0 / sr)[:, None]
            else:
                acc = tl.dot(gt, kt, acc, input_precision=PRECISION)
        tl.store(DQ_ptr + (r0 + prow)[:, None] * stride_dqn + d[None, :], acc * inv_t,
                 mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _cl_dk_kernel(G_ptr, Q_ptr, SC_ptr, DK_ptr, r0, n_prow, n_cols, D, inv_t,
                      stride_gn, stride_qn, stride_qd, stride_scn, stride_dkn,
                      SCALED: tl.constexpr, SCALE_BLOCK: tl.constexpr, ACCUM: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """dk[j, d] (+)= inv_t * sum_{i in panel} G[i, j] q[r0 + i, d] for a [BLOCK_N, BLOCK_D]
        block of columns: a GEMM over the panel's rows in BLOCK_K chunks (G^T enters the dot as
        a transposed tile), fp32 accumulator in registers.  The block is owned by this program:
        the first panel stores, later panels (ACCUM) add to what the previous launch stored --
        no atomics.  SCALED: chunk i0's product is divided by its columns' power-of-two scales
        SC[i0 // SCALE_BLOCK, :] (BLOCK_K divides the grad kernel's BLOCK_M)."""
        pid = tl.program_id(0).to(tl.int64)
        n_d = tl.cdiv(D, BLOCK_D)
        pid_n = pid // n_d
        pid_d = pid % n_d
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < D
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for p0 in range(0, n_prow, BLOCK_K):
            prow = p0 + tl.arange(0, BLOCK_K).to(tl.int64)
            p_ok = prow < n_prow
            gt = tl.load(G_ptr + prow[:, None] * stride_gn + cols[None, :], mask=p_ok[:, None] & col_ok[None, :],
                         other=0.0)
            qt = tl.load(Q_ptr + (r0 + prow)[:, None] * stride_qn + d[None, :] * stride_qd,
                         mask=p_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                gt = gt.to(tl.float32)
                qt = qt.to(tl.float32)
            if SCALED:
                sc = tl.load(SC_ptr + (p0 // SCALE_BLOCK) * stride_scn + cols, mask=col_ok, other=1.0)
                acc += tl.dot(tl.trans(gt), qt, input_precision=PRECISION) * (1.0 / sc)[:, None]
            else:
                acc = tl.dot(tl.trans(gt), qt, acc, input_precision=PRECISION)
        out = acc * inv_t
        dk_ptrs = DK_ptr + cols[:, None] * stride_dkn + d[None, :]
        ok = col_ok[:, None] & d_ok[None, :]
        if ACCUM:
            out += tl.load(dk_ptrs, mask=ok, other=0.0)
        tl.store(dk_ptrs, out, mask=ok)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _triton_settings(n_rows: int, n_cols: int, D: int, dtype: torch.dtype, target: str) -> dict:
    """Block sizes, warps and dot precision, in one visible place.

    target "interpreter" (CPU tensors under TRITON_INTERPRET=1): large blocks (the
    interpreter pays per tile operation), fp32 dots.  target "cuda": 64 x 64 tiles over D
    chunks of 64, bf16 / fp16 operands on tensor cores with fp32 accumulation; fp32 inputs
    take FP32_DOT_PRECISION.  UPCAST (widen operands to fp32 before each dot) is set by the
    launchers when the interpreter runs, whatever the target: tests can run the CUDA target's
    exact blocks and roundings in the interpreter (``_dispatch.kernel_target("cuda")``).
    """
    if target != "cuda":
        return dict(BLOCK_M=max(16, min(64, _next_pow2(n_rows))), BLOCK_N=max(16, min(64, _next_pow2(n_cols))),
                    BLOCK_D=max(16, min(128, _next_pow2(D))), PRECISION="ieee")
    fp32 = dtype == torch.float32
    # D chunks no wider than D needs (a 64-wide chunk for D = 17 is 3/4 padding).  fp32:
    # tf32x3 keeps the operands' high and low parts live; of the 64 x 64 configurations
    # compiled for sm_90 only 16-wide D chunks with 8 warps keep the backward free of spills
    # (32-wide at 4 warps: 96 B of stack; bench/RESULTS.md, compile harness)
    bd = max(16, min(16 if fp32 else 64, _next_pow2(D)))
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=bd, PRECISION=FP32_DOT_PRECISION if fp32 else "ieee",
                num_warps=8 if fp32 else 4, num_stages=2)


def _settings_for(q: torch.Tensor, n_cols: int) -> dict:
    cfg = _triton_settings(q.shape[0], n_cols, q.shape[1], q.dtype, _dispatch.target_for(q.device))
    cfg["UPCAST"] = _dispatch.triton_interpreted()
    return cfg


# ----------------------------------------------------------------------------------------
# 2. Launchers (no autograd)
# ----------------------------------------------------------------------------------------
def _stats_triton(q, k, gq, gk, offset, inv_t, beta, single, mine_k, cols=False):
    """Row statistics (A, B, C or None), the mined (values, indices) or None and, with cols
    (two-tower symmetric: n == N, offset 0), the column statistics from the same S pass."""
    n, D = q.shape
    N = k.shape[0]
    dev = q.device
    cfg = _settings_for(q, N)
    hard = beta > 0
    if cols and hard and "num_warps" in cfg:
        # three running log-sum-exps per row, three column partials: 4 warps spilled (sm_90, fp16
        # with hardness and mining, Triton 3.6); 8 warps halve each thread's share of the tile
        cfg["num_warps"] = 8
    A = torch.empty(n, device=dev, dtype=torch.float32)
    B = torch.empty(n, device=dev, dtype=torch.float32)
    C = torch.empty(n, device=dev, dtype=torch.float32) if hard else A
    kernel_mine = 0 < mine_k <= MAX_KERNEL_MINE_K
    kk = mine_k if kernel_mine else 1
    tv = torch.empty((n, kk), device=dev, dtype=torch.float32)
    ti = torch.empty((n, kk), device=dev, dtype=torch.int64)
    has_groups = gq is not None
    n_blocks = triton.cdiv(n, cfg["BLOCK_M"])
    # with cols, each program keeps one row of column partials: fewer programs, less memory
    n_prog = min(n_blocks, MAX_COL_PARTIALS) if cols else n_blocks
    n_stats = 3 if hard else 2
    cp = torch.full((n_prog if cols else 1, n_stats, N if cols else 1), float("-inf"), device=dev)
    _cl_stats_kernel[(n_prog,)](
        q, k, gq if has_groups else A, gk if has_groups else A, A, B, C, tv, ti, cp,
        n, N, D, offset, inv_t, beta, kk,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), tv.stride(0), cp.stride(0), cp.stride(1),
        HAS_GROUPS=has_groups, SINGLE=single, HARD=hard, MINE=kernel_mine, KP=_next_pow2(kk), COLS=bool(cols),
        **cfg)
    if not hard:
        C = None
    if mine_k == 0:
        mined = None
    elif kernel_mine:
        mined = (tv, ti)
    else:
        mined = _mine_chunked(q, k, gq, gk, offset, inv_t, single, mine_k)
    if not cols:
        return A, B, C, mined
    col = torch.logsumexp(cp, dim=0)
    return A, B, C, mined, (col[0], col[1], col[2] if hard else None)


def _mine_chunked(q, k, gq, gk, offset, inv_t, single, mine_k):
    """The mine_k best negatives per row for mine_k > MAX_KERNEL_MINE_K: S in row chunks of
    at most CPU_TILE_ELEMS elements (fp32 matmul, any device), exact top-k with ties to the
    lower column.  Same contract as the kernel's (values, indices), sorted."""
    n, N = q.shape[0], k.shape[0]
    R = max(1, min(n, CPU_TILE_ELEMS // max(N, 1)))
    kf = k.float()
    tv = torch.empty((n, mine_k), device=q.device, dtype=torch.float32)
    ti = torch.empty((n, mine_k), device=q.device, dtype=torch.int64)
    for r0 in range(0, n, R):
        r1 = min(n, r0 + R)
        s = q[r0:r1].float() @ kf.t() * inv_t
        pos, diag = _tile_masks(gq, gk, r0, r1, 0, N, offset, single, q.device)
        s = s.masked_fill(_pos_full(pos, diag, s), float("-inf"))
        if single and diag is not None:
            s[diag] = float("-inf")
        tv[r0:r1], ti[r0:r1] = _topk_lowest_index(s, mine_k)
    return tv, ti


def _bwd_settings(n_rows: int, n_cols: int, D: int, dtype: torch.dtype, target: str) -> dict:
    """Blocks of the three backward kernels and the panel height, in one visible place.

    "grad" (S recompute + G) takes the statistics kernel's D chunks and precision; on CUDA its
    tile is 64 x 128 with 8 warps for bf16 / fp16 (a GEMM tile with a store epilogue: no
    accumulator lives across column tiles).  "dq" / "dk" are plain GEMMs (output block [BLOCK_M or BLOCK_N,
    BLOCK_D], reduction in BLOCK_K chunks).  For fp16 BLOCK_K must divide the grad tile's
    side along the reduction (one power-of-two scale per chunk).
    """
    base = _triton_settings(n_rows, n_cols, D, dtype, target)
    prec = base["PRECISION"]
    if target != "cuda":
        grad = dict(base)
        bd = base["BLOCK_D"]
        dq = dict(BLOCK_M=base["BLOCK_M"], BLOCK_K=base["BLOCK_N"], BLOCK_D=bd, PRECISION=prec)
        dk = dict(BLOCK_N=base["BLOCK_N"], BLOCK_K=base["BLOCK_M"], BLOCK_D=bd, PRECISION=prec)
    elif dtype == torch.float32:
        grad = dict(base)
        bd = max(16, min(64, _next_pow2(D)))
        dq = dict(BLOCK_M=64, BLOCK_K=16, BLOCK_D=bd, PRECISION=prec, num_warps=4, num_stages=2)
        dk = dict(BLOCK_N=64, BLOCK_K=16, BLOCK_D=bd, PRECISION=prec, num_warps=4, num_stages=2)
    else:
        # 128 x 128 spilled (576 B of stack for fp16 + hardness + both directions, Triton 3.6)
        grad = dict(base, BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3)
        bd = max(16, min(128, _next_pow2(D)))
        dq = dict(BLOCK_M=128, BLOCK_K=64, BLOCK_D=bd, PRECISION=prec, num_warps=8, num_stages=3)
        dk = dict(BLOCK_N=128, BLOCK_K=64, BLOCK_D=bd, PRECISION=prec, num_warps=8, num_stages=3)
    step = max(grad["BLOCK_M"], dq["BLOCK_M"], dk["BLOCK_K"])
    rows = max(step, MAX_PANEL_ELEMS // max(n_cols, 1) // step * step)
    return dict(grad=grad, dq=dq, dk=dk, panel_rows=min(rows, n_rows))


def _bwd_triton(q, k, gq, gk, offset, inv_t, beta, single, rstats, cstats):
    """dq [n, D], dk [N, D] (fp32) without atomics: for each panel of rows, _cl_grad_kernel
    writes G = dL/dS ([R, N]), then _cl_dq_kernel computes the panel's dq = G k and
    _cl_dk_kernel adds G^T q[panel] into dk (each output block owned by one program)."""
    n, D = q.shape
    N = k.shape[0]
    dev = q.device
    cfg = _bwd_settings(n, N, D, q.dtype, _dispatch.target_for(q.device))
    upcast = _dispatch.triton_interpreted()
    grad, cdq, cdk, R = cfg["grad"], cfg["dq"], cfg["dk"], cfg["panel_rows"]
    scaled = q.dtype == torch.float16
    if scaled:
        assert grad["BLOCK_N"] % cdq["BLOCK_K"] == 0 and grad["BLOCK_M"] % cdk["BLOCK_K"] == 0
    gdt = torch.float32 if q.dtype == torch.float32 else q.dtype
    G = torch.empty((R, N), device=dev, dtype=gdt)
    G2 = torch.empty((R, N), device=dev, dtype=gdt) if scaled else G
    n_cb, n_rb = triton.cdiv(N, grad["BLOCK_N"]), triton.cdiv(R, grad["BLOCK_M"])
    SR = torch.empty((R, n_cb), device=dev, dtype=torch.float32) if scaled else rstats
    SC = torch.empty((n_rb, N), device=dev, dtype=torch.float32) if scaled else rstats
    dq = torch.empty((n, D), device=dev, dtype=torch.float32)
    dk = torch.empty((N, D), device=dev, dtype=torch.float32)
    has_groups = gq is not None
    both = cstats is not None
    cs = cstats if both else rstats
    for r0 in range(0, n, R):
        rp = min(R, n - r0)
        n_tiles = triton.cdiv(rp, grad["BLOCK_M"]) * n_cb
        _cl_grad_kernel[(n_tiles,)](
            q, k, gq if has_groups else rstats, gk if has_groups else rstats, rstats, cs, G, G2, SR, SC,
            r0, rp, N, D, offset, inv_t, beta,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), rstats.stride(0), cs.stride(0), G.stride(0),
            SR.stride(0), SC.stride(0),
            HAS_GROUPS=has_groups, SINGLE=single, HARD=beta > 0, BOTH=both, SCALED=scaled, GROUP_M=8,
            UPCAST=upcast, **grad)
        _cl_dq_kernel[(triton.cdiv(rp, cdq["BLOCK_M"]) * triton.cdiv(D, cdq["BLOCK_D"]),)](
            G, k, SR, dq, r0, rp, N, D, inv_t,
            G.stride(0), k.stride(0), k.stride(1), SR.stride(0), dq.stride(0),
            SCALED=scaled, SCALE_BLOCK=grad["BLOCK_N"], UPCAST=upcast, **cdq)
        _cl_dk_kernel[(triton.cdiv(N, cdk["BLOCK_N"]) * triton.cdiv(D, cdk["BLOCK_D"]),)](
            G2, q, SC, dk, r0, rp, N, D, inv_t,
            G2.stride(0), q.stride(0), q.stride(1), SC.stride(0), dk.stride(0),
            SCALED=scaled, SCALE_BLOCK=grad["BLOCK_M"], ACCUM=r0 > 0, UPCAST=upcast, **cdk)
    return dq, dk


def _cpu_tiles(n: int, N: int) -> tuple[int, int]:
    C = min(N, 8192)
    R = min(n, max(32, CPU_TILE_ELEMS // max(C, 1)))
    return max(R, 1), max(C, 1)


def _tile_masks(gq, gk, r0, r1, c0, c1, offset, single, device):
    """(pos, diag) for the CPU tile rows [r0, r1) x columns [c0, c1); pos None = diagonal only."""
    pos = None
    if gq is not None:
        pos = gq[r0:r1, None] == gk[None, c0:c1]
    # diagonal entries (global column == row + offset) inside this tile
    lo = max(r0 + offset, c0)
    hi = min(r1 + offset, c1)
    diag = None
    if lo < hi:
        rr = torch.arange(lo - offset - r0, hi - offset - r0, device=device)
        cc = torch.arange(lo - c0, hi - c0, device=device)
        diag = (rr, cc)
    return pos, diag


def _neg_inf_where(mask, x):
    return x.masked_fill(~mask, float("-inf"))


def _topk_lowest_index(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of x ordered by (value desc, column asc), exact on ties."""
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


def _merge_topk(v0, i0, v1, i1, k):
    """Merge two (value desc, index asc)-sorted lists whose indices satisfy i0 < i1."""
    if v0 is None:
        return v1[:, :k], i1[:, :k]
    v = torch.cat([v0, v1], 1)
    i = torch.cat([i0, i1], 1)
    order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :k]
    return v.gather(1, order), i.gather(1, order)


def _cache_rows(n: int, N: int, D: int, backend: str, need_grad: bool) -> int:
    """Rows of S the CPU forward keeps for the backward (0 on Triton or without gradients)."""
    if backend == "triton" or not need_grad:
        return 0
    return int(min(n, min(CPU_CACHE_PER_ND * n * D, CPU_CACHE_MAX_ELEMS) // max(N, 1)))


def _stats_torch(q, k, gq, gk, offset, inv_t, beta, single, mine_k, both, cache=None):
    """Chunked-PyTorch statistics: row stats (and column stats when `both`) in one sweep.

    `cache` ([rc, N] fp32 or None) receives the logits of the first rc rows."""
    n, D = q.shape
    N = k.shape[0]
    dev = q.device
    hard = beta > 0
    qf = q.float()  # no copy for fp32 inputs
    kf = k.float()
    R, C = _cpu_tiles(n, N)
    buf = torch.empty(R * C, device=dev)  # one tile buffer, reused
    diag_pos = gq is None and not single
    rows_A = torch.full((n,), float("-inf"), device=dev)
    rows_B = torch.full((n,), float("-inf"), device=dev)
    rows_C = torch.full((n,), float("-inf"), device=dev) if hard else None
    cols = None
    if both:
        cols = [torch.full((N,), float("-inf"), device=dev), torch.full((N,), float("-inf"), device=dev),
                torch.full((N,), float("-inf"), device=dev) if hard else None]
    top_v = top_i = None
    for r0 in range(0, n, R):
        r1 = min(n, r0 + R)
        rA = None if diag_pos else torch.full((r1 - r0,), float("-inf"), device=dev)
        rB = torch.full((r1 - r0,), float("-inf"), device=dev)
        rC = torch.full((r1 - r0,), float("-inf"), device=dev) if hard else None
        tv = ti = None
        for c0 in range(0, N, C):
            c1 = min(N, c0 + C)
            s = _logits(buf, qf[r0:r1], kf[c0:c1], inv_t)
            pos, diag = _tile_masks(gq, gk, r0, r1, c0, c1, offset, single, q.device)
            if diag_pos and diag is not None:
                # the positive is the diagonal logit itself, taken from the tile that B's
                # log-sum-exp sees (and the backward recomputes), so that B - A >= 0 in fp32
                rows_A[r0 + diag[0]] = s[diag]
            if single and diag is not None:
                s[diag] = float("-inf")
            if cache is not None and r0 < cache.shape[0]:
                h = min(r1, cache.shape[0]) - r0
                cache[r0:r0 + h, c0:c1].copy_(s[:h])
            need_neg = hard or mine_k > 0
            pos_t = _pos_full(pos, diag, s) if (need_neg or not diag_pos) else None
            if not diag_pos:
                sp = _neg_inf_where(pos_t, s)
                rA = torch.logaddexp(rA, torch.logsumexp(sp, 1))
                if both:
                    cols[0][c0:c1] = torch.logaddexp(cols[0][c0:c1], torch.logsumexp(sp, 0))
            sn = _neg_inf_where(~pos_t, s) if need_neg else None  # diagonal already -inf (single)
            if hard:
                t1 = sn * (1.0 + beta)
                t2 = sn * beta
                rB = torch.logaddexp(rB, torch.logsumexp(t1, 1))
                rC = torch.logaddexp(rC, torch.logsumexp(t2, 1))
                if both:
                    cols[1][c0:c1] = torch.logaddexp(cols[1][c0:c1], torch.logsumexp(t1, 0))
                    cols[2][c0:c1] = torch.logaddexp(cols[2][c0:c1], torch.logsumexp(t2, 0))
                del t1, t2
            elif both:
                lse_r, lse_c = _lse_rows_cols(s)
                rB = torch.logaddexp(rB, lse_r)
                cols[1][c0:c1] = torch.logaddexp(cols[1][c0:c1], lse_c)
            else:
                rB = torch.logaddexp(rB, torch.logsumexp(s, 1))
            if mine_k > 0:
                v, i = _topk_lowest_index(sn, mine_k)
                tv, ti = _merge_topk(tv, ti, v, i + c0, mine_k)
        if not diag_pos:
            rows_A[r0:r1] = rA
        rows_B[r0:r1] = rB
        if hard:
            rows_C[r0:r1] = rC
        if mine_k > 0:
            if tv.shape[1] < mine_k:  # fewer in-batch columns than mine_k: pad with -inf
                pad = mine_k - tv.shape[1]
                tv = torch.cat([tv, torch.full((tv.shape[0], pad), float("-inf"), device=dev)], 1)
                ti = torch.cat([ti, torch.full((ti.shape[0], pad), N, dtype=torch.int64, device=dev)], 1)
            if top_v is None:
                top_v = torch.empty((n, mine_k), device=dev)
                top_i = torch.empty((n, mine_k), dtype=torch.int64, device=dev)
            top_v[r0:r1] = tv
            top_i[r0:r1] = ti
    if both and diag_pos:
        cols[0] = rows_A.clone()
    mined = (top_v, top_i) if mine_k > 0 else None
    return (rows_A, rows_B, rows_C), cols, mined


def _bwd_torch(q, k, gq, gk, offset, inv_t, beta, single, rstats, cstats, cache=None):
    """Chunked-PyTorch backward: recompute each S tile (or read the forward's cached rows),
    G = dL/dS, dq += G k, dk += G^T q.  Tiles read from `cache` are never written to."""
    n_cached = 0 if cache is None else cache.shape[0]
    n, D = q.shape
    N = k.shape[0]
    dev = q.device
    hard = beta > 0
    qf = q.float()
    kf = k.float()
    dq = torch.zeros((n, D), dtype=torch.float32, device=dev)
    dk = torch.zeros((N, D), dtype=torch.float32, device=dev)
    R, C = _cpu_tiles(n, N)
    buf = torch.empty(R * C, device=dev)
    both = cstats is not None

    def direction(s, pos_t, diag, r, a, b, c, dim):
        # s: tile (masked -inf where invalid); stats broadcast along `dim` (1: rows, 0: cols)
        ex = (lambda v: v[:, None]) if dim == 1 else (lambda v: v[None, :])
        if hard:
            sn = s if pos_t is None and diag is None else s.masked_fill(_pos_full(pos_t, diag, s), float("-inf"))
            g = sn.mul(1.0 + beta).sub_(ex(b)).exp_().mul_(1.0 + beta)
            g.sub_(sn.mul(beta).sub_(ex(c)).exp_().mul_(beta))
        else:
            g = s.sub(ex(b)).exp_()
        if pos_t is None:  # diagonal positives only: exp(S_ii - A_i) == 1 exactly
            if diag is not None:
                g[diag] -= 1.0
        else:
            g.sub_(s.sub(ex(a)).exp_().masked_fill_(~pos_t, 0.0))
        return g.mul_(ex(r))

    for r0 in range(0, n, R):
        r1 = min(n, r0 + R)
        rr, ra, rb, rc = (rstats[j][r0:r1] for j in range(4))
        for c0 in range(0, N, C):
            c1 = min(N, c0 + C)
            h = max(0, min(r1, n_cached) - r0)
            if h == r1 - r0:
                s = cache[r0:r1, c0:c1]  # read-only: the diagonal was masked in forward
            else:
                s = buf[:(r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
                if h:
                    s[:h].copy_(cache[r0:r0 + h, c0:c1])
                s[h:].addmm_(qf[r0 + h:r1], kf[c0:c1].t(), beta=0, alpha=inv_t)
            pos, diag = _tile_masks(gq, gk, r0, r1, c0, c1, offset, single, q.device)
            if single and diag is not None and h < r1 - r0:
                s[diag] = float("-inf")
            g = None
            if both:
                cr, ca, cb, cc = (cstats[j][c0:c1] for j in range(4))
                if not hard:
                    g = _both_directions_plain(s, pos, diag, rr, ra, rb, cr, ca, cb)
            if g is None:
                g = direction(s, pos, diag, rr, ra, rb, rc, 1)
                if both:
                    g.add_(direction(s, pos, diag, cr, ca, cb, cc, 0))
            dq[r0:r1].addmm_(g, kf[c0:c1], alpha=inv_t)
            dk[c0:c1].addmm_(g.t(), qf[r0:r1], alpha=inv_t)
    return dq, dk


def _logits(buf: torch.Tensor, a: torch.Tensor, b: torch.Tensor, inv_t: float) -> torch.Tensor:
    """S tile = a b^T * inv_t written into the reused buffer (the scale rides on the GEMM)."""
    out = buf[:a.shape[0] * b.shape[0]].view(a.shape[0], b.shape[0])
    return out.addmm_(a, b.t(), beta=0, alpha=inv_t)


# Largest spread of log-sum-exp shifts for which one exp per element serves both
# directions (exp(-80) is still a normal fp32 number); wider tiles take the exact path.
_SHARED_EXP_RANGE = 80.0


def _lse_rows_cols(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column log-sum-exp of a tile with one exp pass when the tile's range allows.

    e = exp(s - rowmax) gives the row sums; the column sums are e^T exp(rowmax - mu), a
    matrix-vector product (mu = the tile max).  Exact unless a row or column max lies more
    than _SHARED_EXP_RANGE below mu, in which case the two plain logsumexps are used.
    """
    m_r = s.amax(1)
    m_c = s.amax(0)
    mu = m_r.max()
    if float(mu - torch.minimum(m_r.min(), m_c.min())) >= _SHARED_EXP_RANGE:
        return torch.logsumexp(s, 1), torch.logsumexp(s, 0)
    e = s.sub(m_r[:, None]).exp_()
    lse_r = e.sum(1).log_().add_(m_r)
    lse_c = torch.mv(e.t(), torch.exp(m_r - mu)).log_().add_(mu)
    return lse_r, lse_c


def _both_directions_plain(s, pos, diag, r, a, b, rc, ac, bc):
    """G of both directions for hardness 0 with one exp per element (None: range too wide).

    r_i exp(s - b_i) + c_j exp(s - bc_j) = e_ij (r_i + u_i c_j v_j), e = exp(s - b_i),
    u_i = exp(b_i - rho), v_j = exp(rho - bc_j), rho = max_i b_i; both factors stay finite
    and normal when b and bc span less than _SHARED_EXP_RANGE.
    """
    rho = b.max()
    if float(rho - torch.minimum(b.min(), bc.min())) >= _SHARED_EXP_RANGE:
        return None
    e = s.sub(b[:, None]).exp_()
    fac = torch.outer(torch.exp(b - rho), rc * torch.exp(rho - bc)).add_(r[:, None])
    g = e.mul_(fac)
    del fac
    if pos is None:  # diagonal positives: exp(S_ii - A_i) == 1 in both directions
        if diag is not None:
            g[diag] -= r[diag[0]] + rc[diag[1]]
    else:
        g.sub_(s.sub(a[:, None]).exp_().mul_(r[:, None]).add_(s.sub(ac[None, :]).exp_().mul_(rc[None, :]))
               .masked_fill_(~pos, 0.0))
    return g


def _pos_full(pos_t, diag, s):
    if pos_t is not None:
        return pos_t
    m = torch.zeros_like(s, dtype=torch.bool)
    if diag is not None:
        m[diag] = True
    return m


def _hard_logits(q, hn, inv_t):
    """[n, H] logits of each row against its own hard negatives (fp32)."""
    return torch.einsum("nd,nhd->nh", q.float(), hn.float()) * inv_t


def _finish_stats(A, B, C, hard_s, beta, n_neg):
    """Fold the hard-negative logits into (A, B, C); return per-row loss and logNeg."""
    if hard_s is not None and hard_s.shape[1] > 0:
        if beta > 0:
            B = torch.logaddexp(B, torch.logsumexp(hard_s * (1.0 + beta), 1))
            C = torch.logaddexp(C, torch.logsumexp(hard_s * beta, 1))
        else:
            B = torch.logaddexp(B, torch.logsumexp(hard_s, 1))
    has_pos = torch.isfinite(A)
    if beta > 0:
        has_neg = n_neg > 0
        log_neg = torch.where(has_neg, torch.log(n_neg.clamp_min(1).float()) + B - C,
                              torch.full_like(B, float("-inf")))
        z = log_neg - torch.where(has_pos, A, torch.zeros_like(A))
        loss = torch.where(has_pos, torch.nn.functional.softplus(z), torch.zeros_like(A))
    else:
        z = None
        loss = torch.where(has_pos, B - A, torch.zeros_like(A))
    return loss, A, B, C, z


def _group_counts(gq: torch.Tensor, gk: torch.Tensor) -> torch.Tensor:
    """For each row's group, the number of columns in that group (O(N log N), no N x N)."""
    sk = torch.sort(gk).values
    return (torch.searchsorted(sk, gq, right=True) - torch.searchsorted(sk, gq, right=False))


def _num_neg(n, N, gq, gk, H, device):
    if gq is None:
        return torch.full((n,), N - 1 + H, dtype=torch.int64, device=device)
    return N - _group_counts(gq, gk) + H


def _backend(q: torch.Tensor) -> str:
    return _dispatch.backend_for(q.device, None)


def contrastive_forward(q, k, groups_q, groups_k, hard_negatives, offset, temperature, hardness,
                        single_set, both, mine_k, backend=None, cache_rows=0):
    """Loss statistics of the rows of q against the columns of k; no autograd.

    Args:
        q: [n, D] rows (anchors); k: [N, D] columns (for single-set mode k is the whole set
            and q holds rows offset..offset+n-1 of it).
        groups_q / groups_k: [n] / [N] int64 or None.  hard_negatives: [n, H, D] or None.
        offset: global column index of row 0's own column (0 unless distributed).
        both: also compute the k->q direction (two-tower, n == N, offset == 0).
        mine_k: number of negatives to mine per row (0: none).

    Returns:
        row_loss [n] fp32, col_loss [N] (or [0]), row_stats [3, n] (A, B, C; C == B - log n_neg
        placeholder when hardness == 0), col_stats [3, N] (or [3, 0]), top_v [n, mine_k] fp32,
        top_i [n, mine_k] int64, s_cache [cache_rows, N] fp32 (the first rows of S, CPU only,
        handed to the backward so that it skips their recompute; [0, N] when not kept).
    """
    backend = backend or _backend(q)
    inv_t = 1.0 / float(temperature)
    beta = float(hardness)
    n, N = q.shape[0], k.shape[0]
    dev = q.device
    H = 0 if hard_negatives is None else hard_negatives.shape[1]
    n_neg = _num_neg(n, N, groups_q, groups_k, H, dev)
    if backend == "triton":
        if both:  # both directions from one pass over S
            A, B, C, mined, cols = _stats_triton(q, k, groups_q, groups_k, offset, inv_t, beta, single_set, mine_k,
                                                 cols=True)
        else:
            A, B, C, mined = _stats_triton(q, k, groups_q, groups_k, offset, inv_t, beta, single_set, mine_k)
            cols = None
    s_cache = torch.empty((cache_rows if backend != "triton" else 0, N), device=dev)
    if backend != "triton":
        (A, B, C), cols, mined = _stats_torch(q, k, groups_q, groups_k, offset, inv_t, beta, single_set,
                                              mine_k, both, s_cache if cache_rows else None)
    hard_s = _hard_logits(q, hard_negatives, inv_t) if H > 0 else None
    row_loss, A, B, C, _ = _finish_stats(A, B, C if C is not None else B, hard_s, beta, n_neg)
    row_stats = torch.stack([A, B, C])
    if both:
        n_neg_c = _num_neg(N, n, groups_k, groups_q, 0, dev)
        col_loss, Ac, Bc, Cc, _ = _finish_stats(cols[0], cols[1], cols[2] if cols[2] is not None else cols[1],
                                                None, beta, n_neg_c)
        col_stats = torch.stack([Ac, Bc, Cc])
    else:
        col_loss = torch.zeros(0, device=dev)
        col_stats = torch.zeros((3, 0), device=dev)
    if mine_k > 0:
        tv, ti = mined
        if hard_s is not None:
            hi = torch.arange(N, N + H, device=dev).expand(n, H)
            # in-batch (indices < N) first so that a stable sort keeps ties on the lower index
            order = torch.sort(ti, dim=1, stable=True).indices
            tv, ti = tv.gather(1, order), ti.gather(1, order)
            tv = torch.cat([tv, hard_s], 1)
            ti = torch.cat([ti, hi], 1)
        else:
            order = torch.sort(ti, dim=1, stable=True).indices
            tv, ti = tv.gather(1, order), ti.gather(1, order)
        order = torch.sort(tv, dim=1, descending=True, stable=True).indices[:, :mine_k]
        top_v, top_i = tv.gather(1, order), ti.gather(1, order)
    else:
        top_v = torch.zeros((n, 0), device=dev)
        top_i = torch.zeros((n, 0), device=dev, dtype=torch.int64)
    return row_loss, col_loss, row_stats, col_stats, top_v, top_i, s_cache


def _coeffs(grad, stats, beta, n_neg):
    """[4, n] = (r, A, B, C) for the backward kernels; -inf statistics sanitised to 0."""
    A, B, C = stats[0], stats[1], stats[2]
    has_pos = torch.isfinite(A)
    r = torch.where(has_pos, grad.float(), torch.zeros_like(A))
    if beta > 0:
        has_neg = n_neg > 0
        log_neg = torch.where(has_neg, torch.log(n_neg.clamp_min(1).float()) + B - C,
                              torch.full_like(B, float("-inf")))
        z = log_neg - torch.where(has_pos, A, torch.zeros_like(A))
        r = r * torch.sigmoid(z)
    fin = lambda v: torch.where(torch.isfinite(v), v, torch.zeros_like(v))  # noqa: E731
    return torch.stack([r, fin(A), fin(B), fin(C)]).contiguous()


def contrastive_backward(grad_row, grad_col, q, k, groups_q, groups_k, hard_negatives, row_stats, col_stats,
                         offset, temperature, hardness, single_set, both, backend=None, s_cache=None):
    """Gradients of sum(grad_row * row_loss) + sum(grad_col * col_loss); no autograd.

    Returns dq [n, D], dk [N, D] (in the inputs' dtypes) and dhn [n, H, D] (or [0]).
    """
    backend = backend or _backend(q)
    inv_t = 1.0 / float(temperature)
    beta = float(hardness)
    n, N = q.shape[0], k.shape[0]
    H = 0 if hard_negatives is None else hard_negatives.shape[1]
    rs = _coeffs(grad_row, row_stats, beta, _num_neg(n, N, groups_q, groups_k, H, q.device))
    cs = _coeffs(grad_col, col_stats, beta, _num_neg(N, n, groups_k, groups_q, 0, q.device)) if both else None
    if backend == "triton":
        dq, dk = _bwd_triton(q, k, groups_q, groups_k, offset, inv_t, beta, single_set, rs, cs)
    else:
        cache = s_cache if s_cache is not None and s_cache.shape[0] > 0 else None
        dq, dk = _bwd_torch(q, k, groups_q, groups_k, offset, inv_t, beta, single_set, rs, cs, cache)
    if H > 0:
        hs = _hard_logits(q, hard_negatives, inv_t)
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
# 3. torch.library registration and autograd
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


def _save(ctx, q, k, hard_negatives, groups_q, groups_k, rstats, cstats, s_cache, args):
    ctx.save_for_backward(q, k, hard_negatives, groups_q, groups_k, rstats, cstats, s_cache)
    ctx.args = args


def _backward_from_ctx(ctx, g_row, g_col):
    q, k, hn, gq, gk, rstats, cstats, s_cache = ctx.saved_tensors
    offset, temperature, hardness, single_set, both, backend = ctx.args
    if g_row is None:
        g_row = torch.zeros(q.shape[0], device=q.device)
    if g_col is None or g_col.numel() == 0:
        g_col = torch.zeros(k.shape[0] if both else 0, device=q.device)
    dq, dk, dhn = torch.ops.solar.contrastive_bwd(g_row.contiguous(), g_col.contiguous(), q, k, gq, gk, hn, rstats,
                                                  cstats, offset, temperature, hardness, single_set, both, backend,
                                                  s_cache)
    return dq, dk, (dhn if hn is not None else None)


def _fwd_setup_context(ctx, inputs, output):
    q, k, gq, gk, hn, offset, temperature, hardness, single_set, both, mine_k, backend, cache_rows = inputs
    _, _, rstats, cstats, top_v, top_i, s_cache = output
    _save(ctx, q, k, hn, gq, gk, rstats, cstats, s_cache, (offset, temperature, hardness, single_set, both, backend))
    ctx.mark_non_differentiable(rstats, cstats, top_v, top_i, s_cache)


def _fwd_backward(ctx, g_row, g_col, *_unused):
    dq, dk, dhn = _backward_from_ctx(ctx, g_row, g_col)
    return (dq, dk, None, None, dhn) + (None,) * 8


# Direct callers of torch.ops.solar.contrastive_fwd (and opcheck / torch.compile) get gradients too.
torch.library.register_autograd("solar::contrastive_fwd", _fwd_backward, setup_context=_fwd_setup_context)


class _ContrastiveFunction(torch.autograd.Function):
    """(row_loss [n], col_loss [N or 0], top_v, top_i) of the rows of q against k."""

    @staticmethod
    def forward(ctx, q, k, hard_negatives, groups_q, groups_k, offset, temperature, hardness, single_set,
                both, mine_k, backend, cache_rows):
        row_loss, col_loss, rstats, cstats, top_v, top_i, s_cache = torch.ops.solar.contrastive_fwd(
            q, k, groups_q, groups_k, hard_negatives, offset, temperature, hardness, single_set, both,
            mine_k, backend, cache_rows)
        _save(ctx, q, k, hard_negatives, groups_q, groups_k, rstats, cstats, s_cache,
              (offset, temperature, hardness, single_set, both, backend))
        ctx.mark_non_differentiable(top_v, top_i)
        return row_loss, col_loss, top_v, top_i

    @staticmethod
    def backward(ctx, g_row, g_col, _gv, _gi):
        dq, dk, dhn = _backward_from_ctx(ctx, g_row, g_col)
        return (dq, dk, dhn) + (None,) * 10


def _need_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------------
# 4. The checked public entry point
# ----------------------------------------------------------------------------------------
def _dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


def _validate(q, k, groups, hard_negatives, temperature, hardness, mine_k, names=("q", "k")):
    """Check the arguments of contrastive_loss; returns (temperature, hardness, mine_k) as python
    numbers.  `names`: how errors call q and k (pooled_contrastive_loss passes [N, D] stand-ins
    for its token tensors xq and xk)."""
    qn, kn = names
    _checks.check_tensor(qn, q, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    n, D = q.shape
    if k is not None:
        _checks.check_tensor(kn, k, ndim=2, dtypes=_checks.FLOAT_DTYPES)
        if tuple(k.shape) != (n, D):
            raise ValueError(f"{kn} must have the shape of {qn} [N, D] = {tuple(q.shape)}, got {tuple(k.shape)}")
        if k.dtype != q.dtype:
            raise TypeError(f"{kn} must have {qn}'s dtype {_dtype_name(q.dtype)}, got {_dtype_name(k.dtype)}")
    else:
        if groups is None:
            raise ValueError("single-set mode (k=None) needs groups: [N] int64 group ids of the rows of q")
    if n == 0 or D == 0:
        raise ValueError(f"{qn} must have N >= 1 rows and D >= 1 columns, got shape {tuple(q.shape)}")
    if groups is not None:
        _checks.check_tensor("groups", groups, ndim=1)
        if groups.dtype != torch.int64:
            raise TypeError(f"groups must have dtype int64, got {_dtype_name(groups.dtype)}")
        if groups.shape[0] != n:
            raise ValueError(f"groups must have length N = {n} (rows of {qn}), got {groups.shape[0]}")
    if hard_negatives is not None:
        _checks.check_tensor("hard_negatives", hard_negatives, ndim=3, dtypes=_checks.FLOAT_DTYPES)
        if hard_negatives.shape[0] != n or hard_negatives.shape[2] != D:
            raise ValueError(f"hard_negatives must have shape [N, H, D] = [{n}, H, {D}], "
                             f"got {tuple(hard_negatives.shape)}")
        if hard_negatives.dtype != q.dtype:
            raise TypeError(f"hard_negatives must have {qn}'s dtype {_dtype_name(q.dtype)}, "
                            f"got {_dtype_name(hard_negatives.dtype)}")
    _checks.check_same_device(**{qn: q, kn: k}, groups=groups, hard_negatives=hard_negatives)
    temperature = _checks.as_float("temperature", temperature)
    hardness = _checks.as_float("hardness", hardness)
    _checks.check_positive("temperature", temperature)
    _check_temperature(temperature)
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
    _check_logit_bound(qn, q, amax[qn], keys, temperature, hardness)
    return temperature, hardness, mine_k


def _check_temperature(temperature: float) -> None:
    if temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be >= {MIN_TEMPERATURE:.3g} (1 / temperature scales the logits in "
                         f"float32 and must be finite there), got {temperature!r}")


def _check_logit_bound(qn: str, q: torch.Tensor, q_absmax: float, keys: list, temperature: float,
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


def _check_counts(groups: torch.Tensor | None, n: int, H: int, mine_k: int, single: bool):
    """The number of rows that have a positive (the loss's divisor); raises when there is none
    (single-set mode), when no row has a negative (the loss would be 0 with no gradient) or
    when mine_k exceeds some row's number of negatives.

    groups: the [n] group ids of all rows the loss sees (None: each row is its own group);
    H: hard negatives per row.
    """
    if groups is not None:
        counts = _group_counts(groups, groups)
        n_rows_pos = int((counts > 1).sum()) if single else n
        min_neg = int((n - counts).min()) + H
        max_neg = n - int(counts.min()) + H
    else:
        n_rows_pos, min_neg = n, n - 1 + H
        max_neg = min_neg
    if single and n_rows_pos == 0:
        raise ValueError("no row has a positive: in single-set mode every group has one member "
                         "(give at least two rows the same group id)")
    if max_neg == 0:
        raise ValueError(f"no row has a negative: {'N = 1' if n == 1 else 'every row is in one group'} and "
                         "there are no hard negatives, so the loss is 0 and carries no gradient (use a batch "
                         "of at least two groups, or pass hard_negatives)")
    if mine_k > min_neg:
        raise ValueError(f"mine_k = {mine_k} is larger than the number of negatives of some row "
                         f"(the smallest is {min_neg})")
    return n_rows_pos


def _reduce(row_loss, col_loss, n_pos_rows: int, n: int, both: bool, mine_k: int, top_v, top_i):
    """The public result from per-row losses: the mean over rows with a positive (q->k), averaged
    with the k->q mean when symmetric; plus the mined negatives when mine_k > 0."""
    # divide before summing: a sum of row losses can overflow fp32 where their mean fits
    loss = (row_loss / n_pos_rows).sum()
    if both:
        loss = 0.5 * loss + 0.5 * (col_loss / n).sum()
    if mine_k > 0:
        return loss, Mined(top_i, top_v)
    return loss


def contrastive_loss(q: torch.Tensor, k: torch.Tensor | None = None, *, groups: torch.Tensor | None = None,
                     hard_negatives: torch.Tensor | None = None, temperature: float = 0.05,
                     symmetric: bool = True, hardness: float = 0.0, mine_k: int = 0, process_group=None):
    """Multi-positive InfoNCE over a batch, in O(N*D) memory (no N x N tensor, ever).

    S = q k^T / temperature (inputs used as given: normalise them first).

    * Two-tower mode (``k`` [N, D]): the positives of row i are column i and every column j
      with ``groups[j] == groups[i]``.  ``symmetric=True`` averages the q->k and k->q losses.
    * Single-set mode (``k=None``, ``groups`` required): S = q q^T / temperature without its
      diagonal; the positives of row i are the other rows of its group.  Rows without a
      positive are left out of the mean (ValueError if no row has one).
    * ``hard_negatives`` [N, H, D]: extra negative columns of row i only (q->k direction).
    * ``loss_i = -log(sum_{j in P(i)} exp S_ij / sum_{all j} exp S_ij)``, averaged over rows.
    * ``hardness`` = beta > 0 re-weights the negatives by exp(beta S_ij), normalised so that a
      row's negative weights sum to its number of negatives (Robinson et al. 2021); 0 = InfoNCE.
    * ``mine_k`` > 0 also returns :class:`Mined` (indices, scores) of each row's mine_k best
      negatives (column j < N in-batch, N + h for hard negative h), ties to the lower index.
    * ``process_group``: a torch.distributed group; each rank passes its local rows, keys are
      all-gathered with gradient, and the loss equals the single-process loss over the
      concatenated batch (every rank returns the same value).

    Args:
        q: [N, D] float32/float16/bfloat16.  k: [N, D] (same dtype) or None.
        groups: [N] int64 or None.  hard_negatives: [N, H, D] or None.
        temperature: > 0.  hardness: >= 0 (python or numpy numbers, or 0-d tensors that do not
        require grad: both are constants).  mine_k: int >= 0 (python or numpy integer).
        process_group: a torch.distributed ProcessGroup or None.

    Returns:
        The scalar loss (float32), or ``(loss, Mined)`` when mine_k > 0.

    Raises:
        TypeError / ValueError: bad shapes or dtypes, groups of the wrong length or dtype,
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
        gradient).  TypeError: process_group that is not a ProcessGroup.
    """
    temperature, hardness, mine_k = _validate(q, k, groups, hard_negatives, temperature, hardness, mine_k)
    if process_group is not None:
        from ..distributed import distributed_contrastive_loss

        return distributed_contrastive_loss(q, k, groups=groups, hard_negatives=hard_negatives,
                                            temperature=temperature, symmetric=symmetric, hardness=hardness,
                                            mine_k=mine_k, process_group=process_group)
    single = k is None
    n = q.shape[0]
    H = 0 if hard_negatives is None else hard_negatives.shape[1]
    n_pos_rows = _check_counts(groups, n, H, mine_k, single)
    both = bool(symmetric) and not single
    backend = _backend(q)
    kk = q if single else k
    g = groups.contiguous() if groups is not None else None
    cache_rows = _cache_rows(n, n, q.shape[1], backend, _need_grad(q, k, hard_negatives))
    row_loss, col_loss, top_v, top_i = _ContrastiveFunction.apply(
        q, kk, hard_negatives, g, g, 0, float(temperature), float(hardness), single, both, int(mine_k),
        backend, cache_rows)
    return _reduce(row_loss, col_loss, n_pos_rows, n, both, mine_k, top_v, top_i)
