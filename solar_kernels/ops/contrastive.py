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
2. Launchers (no autograd): :func:`contrastive_forward`, :func:`contrastive_backward`.
3. ``torch.library`` custom ops ``solar::contrastive_fwd`` / ``solar::contrastive_bwd`` with
   fake kernels; the forward op's autograd formula (``register_autograd``) is the one
   autograd path.
4. The checked public entry point :func:`contrastive_loss`, on one rank or many (with a
   ``process_group`` the same op runs on each rank's rows against the gathered columns).

Beside this file: ``contrastive_cpu.py`` (the same tiled algorithm in chunked PyTorch, the
CPU path), ``contrastive_stats.py`` (what every backend does with the statistics: hard
negatives, losses, backward coefficients, mined lists), ``contrastive_checks.py`` (argument
checks), ``solar_kernels/_topk.py`` (the ordered top-k merge) and
``solar_kernels/distributed.py`` (the collectives of the many-rank form).
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

from .. import _dispatch, distributed
from .._topk import topk_lowest_index as _topk_lowest_index
from .contrastive_checks import check_counts, validate
from .contrastive_cpu import CPU_TILE_ELEMS, bwd_torch, cache_rows, stats_torch
from .contrastive_cpu import pos_full as _pos_full, tile_masks as _tile_masks
from .contrastive_stats import coeffs, finish_stats, hard_logits, merge_mined, num_neg

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
        both: also compute the k->q direction (two-tower, n == N, offset == 0).
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
            A, B, C, mined, cols = _stats_triton(q, k, groups_q, groups_k, offset, inv_t, beta, single_set, mine_k,
                                                 cols=True)
        else:
            A, B, C, mined = _stats_triton(q, k, groups_q, groups_k, offset, inv_t, beta, single_set, mine_k)
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
        dq, dk = _bwd_triton(q, k, groups_q, groups_k, offset, inv_t, beta, single_set, rs, cs)
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
# 4. The checked public entry point (one rank or many)
# ----------------------------------------------------------------------------------------
def _need_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def mean_loss(row_loss: torch.Tensor, col_loss: torch.Tensor, n_pos_rows: int, n: int, both: bool) -> torch.Tensor:
    """The loss from per-row losses: the mean over the n_pos_rows rows with a positive (q->k),
    averaged with the mean of the n k->q rows when `both`.  Each term is divided before the
    sum: a sum of row losses can overflow fp32 where their mean fits."""
    loss = (row_loss / n_pos_rows).sum()
    if both:
        loss = 0.5 * loss + 0.5 * (col_loss / n).sum()
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
    * ``process_group``: a torch.distributed group; each rank passes its local rows (the same
      n and H on every rank), the columns are all-gathered with gradient (their backward sums
      every rank's gradients into each rank's slice), and each rank computes the terms of its
      own rows against all columns.  The loss equals the single-process loss over the
      concatenated batch (every rank returns the same value; row i of rank r is global row
      r * n + i, and mined indices are global).  Memory per rank is O(N_total * D).  All ranks
      must call it, and its backward, together.

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
        gradient), ranks with different numbers of rows or hard negatives.  TypeError:
        process_group that is not a ProcessGroup.
    """
    temperature, hardness, mine_k = validate(q, k, groups, hard_negatives, temperature, hardness, mine_k)
    group = process_group
    world, rank = (1, 0) if group is None else distributed.world_and_rank(group)
    single = k is None
    n, D = q.shape
    H = 0 if hard_negatives is None else hard_negatives.shape[1]
    if world > 1:
        sizes = distributed.all_gather_rows(torch.tensor([n, H], device=q.device, dtype=torch.int64), group)
        sizes = sizes.view(world, 2)
        if bool((sizes[:, 0] != n).any()) or bool((sizes[:, 1] != H).any()):
            raise ValueError(f"every rank must pass the same number of rows and hard negatives; got (rows, H) "
                             f"per rank {sizes.tolist()}")
    # rank r holds the global rows r * n .. r * n + n - 1 and sees all N columns
    N, offset = n * world, rank * n
    g = groups.contiguous() if groups is not None else None
    g_all = distributed.all_gather_rows(g, group) if world > 1 and g is not None else g
    n_pos_rows = check_counts(g_all, N, H, mine_k, single)
    both = bool(symmetric) and not single
    # on one rank the k->q statistics come from the same sweep over S; on many, the columns
    # of that direction (all rows of q) are gathered and it is a pass of its own
    fused = both and world == 1
    backend = choose_backend(q)
    rc = cache_rows(n, N, D, backend, _need_grad(q, k, hard_negatives))
    T, beta = float(temperature), float(hardness)
    cols = q if single else k
    if world > 1:
        cols = distributed.all_gather_rows_with_grad(cols, group)
    row_loss, col_loss, _, _, top_v, top_i, _ = torch.ops.solar.contrastive_fwd(
        q, cols, g, g_all, hard_negatives, offset, T, beta, single, fused, int(mine_k), backend, rc)
    if both and not fused:
        q_all = distributed.all_gather_rows_with_grad(q, group)
        col_loss = torch.ops.solar.contrastive_fwd(k, q_all, g, g_all, None, offset, T, beta, False, False, 0,
                                                   backend, rc)[0]
    loss = mean_loss(row_loss, col_loss, n_pos_rows, N, both)
    if world > 1:
        loss = distributed.sum_over_ranks(loss, group)
    return (loss, Mined(top_i, top_v)) if mine_k > 0 else loss
