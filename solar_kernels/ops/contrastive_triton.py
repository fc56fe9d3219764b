"""The Triton kernels of contrastive_loss, their tuning and their launchers.

The formulas (statistics A, B, C per row; dL/dS) are in ``solar_kernels.ops.contrastive``,
which dispatches here for CUDA tensors (and for CPU tensors under ``TRITON_INTERPRET=1``).

Layers, in order (STYLE.md):

1. ``@triton.jit`` kernels: ``_cl_stats_kernel`` (row statistics + running top-k of the
   negatives; for the symmetric loss also the column statistics, from the same S tiles, as
   per-program partials folded by the launcher) and the backward, in panels of rows and
   without atomics: ``_cl_grad_kernel`` (recompute S tile by tile, write G = dL/dS of the
   panel [R, N] in the input dtype) and ``_cl_gemm_kernel``, run twice per panel: dq of the
   panel's rows = G k, and dk += G^T q (both plain GEMMs whose output blocks each belong to one
   program).
2. Tuning, in one place: the config set of each kernel per dtype class (``CONFIGS``), the
   features that narrow it (:func:`kernel_configs`) and ``triton.autotune`` over it with an
   explicit key (:data:`TUNING_KEYS`).  The interpreter never benchmarks: it launches one
   config, chosen deterministically (:func:`kernel_configs`' first, or its own large blocks).
3. Launchers (no autograd): :func:`stats_triton`, :func:`bwd_triton`.
"""
from __future__ import annotations

import os

import torch

from .. import _dispatch
from .contrastive_cpu import mine_chunked

try:  # triton is optional on CPU-only installs
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

__all__ = ["stats_triton", "bwd_triton", "kernel_configs", "panel_rows", "CONFIGS", "TUNING_KEYS"]

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
# twice for fp16), R = the largest multiple of PANEL_STEP with R * N <= this many elements
# (512 MiB of bf16; O(R N) memory, never N x N).  Larger panels mean fewer read-modify-writes of
# dk (one per panel: N D 8 bytes each) and more dq programs (R / 128 x D / 128 of them: at
# N = 65536, R = 4096 gives 192 for 132 SMs); bench/RESULTS.md counts the trade-off.
MAX_PANEL_ELEMS = 1 << 28
# Panels are whole multiples of every row block of the backward configs (grad BLOCK_M, the dq
# GEMM's BLOCK_M and the dk GEMM's BLOCK_K are all <= 128), so only the last panel has a
# partial block.
PANEL_STEP = 128


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
                         n_rows, n_cols, D, offset, inv_t, beta, mine_k, n_bucket,
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
        COLS (two-tower symmetric: column j's positives are the rows i with pos[i, j]): the
        same three statistics of each column over this program's rows, merged into CP[p, stat, column] (fp32, -inf
        initialised; only program p touches row p, so no atomics); the caller folds CP over p.
        n_bucket is unused in the body: it is part of the autotuning key (TUNING_KEYS).
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
                        r0, n_prow, n_cols, D, offset, inv_t, beta, n_bucket,
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
        otherwise: what the tensor-core dots of _cl_gemm_kernel consume).  Every
        tile is written by exactly one program: no atomics.  Tiles go in groups of GROUP_M row
        blocks (the column block's k stays in L2 across the group).

        SCALED (fp16): G's entries are about r / N (r = 1 / (2N) for the symmetric mean), below
        fp16's smallest subnormal at N = 65536.  So the tile is stored twice: G scaled per row
        by a power of two that brings the row's largest |G| in this tile into [1, 2) (for dq;
        the scale goes to SR [n_prow, n_col_blocks]) and G2 scaled per column likewise (for dk;
        SC [n_row_blocks, n_cols]).  The consumers divide the exact power of two back out of
        their fp32 partial sums, so the rounding is relative to each row's (column's) largest
        term in the tile, whatever N is.  bf16 has fp32's exponent range: stored unscaled.
        n_bucket: autotuning key only.
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
    def _cl_gemm_kernel(A_ptr, B_ptr, S_ptr, Out_ptr, n_out, n_red, D, inv_t, n_bucket,
                        stride_am, stride_ak, stride_bk, stride_bd, stride_sm, stride_sk, stride_om,
                        SCALED: tl.constexpr, SCALE_BLOCK: tl.constexpr, ACCUM: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """Out[i, d] (+)= inv_t * sum_k A[i, k] B[k, d] for one [BLOCK_M, BLOCK_D] output block:
        a GEMM over n_red in BLOCK_K chunks, fp32 accumulator in registers, each output element
        written by one program (no atomics).  The backward's two products are this kernel:

        * dq of a panel = G k: A = G [R, N] (stride_ak = 1), B = k, Out = dq[panel rows];
        * dk += G^T q[panel]: A = G^T by strides (stride_am = 1), B = q[panel rows], Out = dk;
          the first panel stores, later panels (ACCUM) add to what the previous launch stored.

        SCALED (fp16 G, see _cl_grad_kernel): chunk k0's product is divided by the power-of-two
        scales S[i, k0 // SCALE_BLOCK] of its output rows (BLOCK_K divides SCALE_BLOCK, the grad
        tile's side along the reduction) before it joins the fp32 sum.  n_bucket is unused in
        the body: it is part of the autotuning key (TUNING_KEYS)."""
        # D blocks vary fastest: the programs that read the same rows of A run together, so A
        # comes from HBM once and from L2 for the other D blocks
        pid = tl.program_id(0).to(tl.int64)
        n_d = tl.cdiv(D, BLOCK_D)
        pid_m = pid // n_d
        pid_d = pid % n_d
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < n_out
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < D
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for k0 in range(0, n_red, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            k_ok = offs_k < n_red
            at = tl.load(A_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                         mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            bt = tl.load(B_ptr + offs_k[:, None] * stride_bk + d[None, :] * stride_bd,
                         mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                at = at.to(tl.float32)
                bt = bt.to(tl.float32)
            if SCALED:
                sc = tl.load(S_ptr + offs_m * stride_sm + (k0 // SCALE_BLOCK) * stride_sk, mask=m_ok, other=1.0)
                acc += tl.dot(at, bt, input_precision=PRECISION) * (1.0 / sc)[:, None]
            else:
                acc = tl.dot(at, bt, acc, input_precision=PRECISION)
        out = acc * inv_t
        out_ptrs = Out_ptr + offs_m[:, None] * stride_om + d[None, :]
        ok = m_ok[:, None] & d_ok[None, :]
        if ACCUM:
            out += tl.load(out_ptrs, mask=ok, other=0.0)
        tl.store(out_ptrs, out, mask=ok)


# ----------------------------------------------------------------------------------------
# 2. Tuning
# ----------------------------------------------------------------------------------------
def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


# The CUDA config set of each kernel, per dtype class: (BLOCK_M, BLOCK_N -- for "gemm" BLOCK_K --,
# BLOCK_D, num_warps, num_stages).  The first of each list is the default: what the interpreter
# runs under the CUDA target and what SOLAR_CL_AUTOTUNE=0 launches.  Every entry is compiled for
# sm_90 by tests/aot_harness.py and must stay free of spills (bench/RESULTS.md, compile harness):
# * bf16 / fp16 ("16bit"): operands on tensor cores (wgmma), fp32 accumulation.  The GEMM's
#   BLOCK_K (64) divides every grad tile side (64 or 128): fp16's per-chunk scales.
#   The statistics and grad kernels reload the q and k chunks of every tile, so a BM x BN tile
#   does BM BN / (BM + BN) FLOP per byte it reads: 32 at 64 x 64, 43 at 128 x 64.  128 x 128
#   (64) spilled in both kernels even without hardness (up to 328 B at D = 768, Triton 3.6).
#   With in-kernel mining (the running top-k in registers) only 64 x 64 at 8 warps stayed
#   spill-free (128 x 64 / 64 x 128: 24-72 B; 4 warps: 8-56 B).  GEMMs with more than 64
#   accumulator values per thread (128 x 128 at 4 warps, 128 x 256 at 8) spilled for fp16 (whose
#   scaled products cannot chain the accumulator through the dot: 136-176 B at D = 768) and for
#   bf16 at the harness's D = 4096 case (N = 130; 8 B on Triton 3.6, 96-104 B on 3.9).
# * fp32 (tf32x3 keeps each operand's high and low parts live): of the 64 x 64 statistics / grad
#   configurations compiled, only 16-wide D chunks with 8 warps kept the backward free of spills
#   (32-wide at 4 warps: 96 B of stack); so the fp32 sets vary stages and the GEMM's shape only.
CONFIGS = {
    "stats": {"16bit": [(64, 64, 64, 4, 2), (64, 64, 64, 8, 3), (128, 64, 64, 8, 2), (64, 128, 64, 8, 2)],
              "fp32": [(64, 64, 16, 8, 2), (64, 64, 16, 8, 3)]},
    "grad": {"16bit": [(64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 64, 64, 4, 3)],
             "fp32": [(64, 64, 16, 8, 2), (64, 64, 16, 8, 3)]},
    "gemm": {"16bit": [(128, 64, 128, 8, 3), (64, 64, 128, 4, 3)],
             "fp32": [(64, 16, 64, 4, 2), (64, 16, 64, 4, 3), (128, 16, 64, 8, 2)]},
}
# The autotuning key of each kernel (triton.autotune adds every tensor argument's dtype): the
# column count's power-of-two bucket, D, and the constexpr features that change the kernel's
# work or register pressure.  "gemm_dq" and "gemm_dk" are two tuners of _cl_gemm_kernel.
TUNING_KEYS = {
    "stats": ["n_bucket", "D", "HAS_GROUPS", "SINGLE", "HARD", "MINE", "KP", "COLS"],
    "grad": ["n_bucket", "D", "HAS_GROUPS", "SINGLE", "HARD", "BOTH", "SCALED"],
    "gemm_dq": ["n_bucket", "D", "SCALED", "SCALE_BLOCK"],
    "gemm_dk": ["n_bucket", "D", "SCALED", "SCALE_BLOCK"],
}
# Arguments a kernel reads and writes: saved before and restored after each benchmarked config
_RESTORE = {"stats": ["CP_ptr"], "grad": [], "gemm_dq": [], "gemm_dk": ["Out_ptr"]}
_TUNERS: dict = {}


def autotuning() -> bool:
    """True when the launchers autotune (CUDA, or the sm_90 compile harness): not under the
    interpreter, whose tests would multiply their time by the number of configs, and not with
    SOLAR_CL_AUTOTUNE=0 (then every kernel runs its default config)."""
    return not _dispatch.triton_interpreted() and os.environ.get("SOLAR_CL_AUTOTUNE", "1") != "0"


def kernel_configs(kernel: str, dtype: torch.dtype, n_rows: int, n_cols: int, D: int, target: str, *,
                   hard: bool = False, cols: bool = False, mine: bool = False, scale_block: int = 0) -> list:
    """The configs (``triton.Config``) `kernel` may run with, default first.

    kernel: "stats", "grad", "gemm_dq" or "gemm_dk".  target "cuda": CONFIGS for the dtype
    class, with BLOCK_D narrowed to D's power of two (a 64-wide chunk for D = 17 is 3/4
    padding), the statistics kernel at 8 warps when the column statistics and hardness are both
    on (4 warps spilled: three running log-sum-exps and three column partials), only 64 x 64 at
    8 warps with in-kernel mining (`mine`; the others spilled), and, for fp16's scaled GEMMs
    (`scale_block` > 0), only BLOCK_K that divide `scale_block` (the grad tile's side along
    the reduction).  target "interpreter" (CPU tensors under TRITON_INTERPRET=1): one config of
    large blocks (the interpreter pays per tile operation)."""
    if target != "cuda":
        bm, bn = max(16, min(64, _next_pow2(n_rows))), max(16, min(64, _next_pow2(n_cols)))
        bd = max(16, min(128, _next_pow2(D)))
        second = {"stats": ("BLOCK_N", bn), "grad": ("BLOCK_N", bn), "gemm_dq": ("BLOCK_K", bn),
                  "gemm_dk": ("BLOCK_K", bm)}[kernel]
        first = bn if kernel == "gemm_dk" else bm
        return [triton.Config({"BLOCK_M": first, second[0]: second[1], "BLOCK_D": bd})]
    table = CONFIGS["gemm" if kernel.startswith("gemm") else kernel]["fp32" if dtype == torch.float32 else "16bit"]
    second = "BLOCK_K" if kernel.startswith("gemm") else "BLOCK_N"
    out, seen = [], set()
    for bm, b2, bd, warps, stages in table:
        bd = min(bd, max(16, _next_pow2(D)))
        if kernel == "stats" and cols and hard and warps < 8:
            continue
        if kernel == "stats" and mine and (bm * b2 > 64 * 64 or warps < 8):
            continue
        if scale_block and scale_block % b2:
            continue
        if (bm, b2, bd, warps, stages) not in seen:
            seen.add((bm, b2, bd, warps, stages))
            out.append(triton.Config({"BLOCK_M": bm, second: b2, "BLOCK_D": bd}, num_warps=warps, num_stages=stages))
    if not out:
        raise RuntimeError(f"no {kernel} config for dtype {dtype}, scale_block {scale_block} (CONFIGS)")
    return out


def _launch(kernel: str, fn, configs: list, grid, args: tuple, meta: dict):
    """Launch `fn` with one of `configs` and return the config it ran: autotuned over all of
    them with the key TUNING_KEYS[kernel] (one tuner per kernel and config list, cached),
    or the first when not autotuning or there is only one.  grid: meta-parameters -> grid."""
    if len(configs) > 1 and autotuning():
        sig = (kernel, tuple(str(c) for c in configs))
        tuner = _TUNERS.get(sig)
        if tuner is None:
            tuner = _TUNERS[sig] = triton.autotune(configs, key=TUNING_KEYS[kernel],
                                                   restore_value=_RESTORE[kernel] or None)(fn)
        tuner[grid](*args, **meta)
        return tuner.best_config
    cfg = configs[0]
    fn[grid(cfg.kwargs)](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return cfg


def panel_rows(n_rows: int, n_cols: int) -> int:
    """Rows per backward panel: the largest multiple of PANEL_STEP with rows x n_cols <=
    MAX_PANEL_ELEMS (at least PANEL_STEP), at most n_rows."""
    rows = max(PANEL_STEP, MAX_PANEL_ELEMS // max(n_cols, 1) // PANEL_STEP * PANEL_STEP)
    return min(rows, n_rows)


# ----------------------------------------------------------------------------------------
# 3. Launchers (no autograd)
# ----------------------------------------------------------------------------------------
def stats_triton(q, k, gq, gk, offset, inv_t, beta, single, mine_k, cols=False):
    """Row statistics (A, B, C or None), the mined (values, indices) or None and, with cols
    (two-tower symmetric, square or rectangular), the column statistics from the same S pass."""
    n, D = q.shape
    N = k.shape[0]
    dev = q.device
    hard = beta > 0
    kernel_mine = 0 < mine_k <= MAX_KERNEL_MINE_K
    configs = kernel_configs("stats", q.dtype, n, N, D, _dispatch.target_for(dev), hard=hard, cols=bool(cols),
                             mine=kernel_mine)
    A = torch.empty(n, device=dev, dtype=torch.float32)
    B = torch.empty(n, device=dev, dtype=torch.float32)
    C = torch.empty(n, device=dev, dtype=torch.float32) if hard else A
    kk = mine_k if kernel_mine else 1
    tv = torch.empty((n, kk), device=dev, dtype=torch.float32)
    ti = torch.empty((n, kk), device=dev, dtype=torch.int64)
    has_groups = gq is not None

    def grid(meta):
        # with cols, each program keeps one row of column partials: fewer programs, less memory
        n_blocks = triton.cdiv(n, meta["BLOCK_M"])
        return (min(n_blocks, MAX_COL_PARTIALS) if cols else n_blocks,)

    n_prog = max(grid(c.kwargs)[0] for c in configs)
    n_stats = 3 if hard else 2
    cp = torch.full((n_prog if cols else 1, n_stats, N if cols else 1), float("-inf"), device=dev)
    args = (q, k, gq if has_groups else A, gk if has_groups else A, A, B, C, tv, ti, cp,
            n, N, D, offset, inv_t, beta, kk, _next_pow2(N),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), tv.stride(0), cp.stride(0), cp.stride(1))
    meta = dict(HAS_GROUPS=has_groups, SINGLE=single, HARD=hard, MINE=kernel_mine, KP=_next_pow2(kk),
                COLS=bool(cols), UPCAST=_dispatch.triton_interpreted(), PRECISION=_precision(q.dtype))
    _launch("stats", _cl_stats_kernel, configs, grid, args, meta)
    if not hard:
        C = None
    if mine_k == 0:
        mined = None
    elif kernel_mine:
        mined = (tv, ti)
    else:
        mined = mine_chunked(q, k, gq, gk, offset, inv_t, single, mine_k)
    if not cols:
        return A, B, C, mined
    col = torch.logsumexp(cp, dim=0)  # rows of programs that did not run stay -inf
    return A, B, C, mined, (col[0], col[1], col[2] if hard else None)


def _precision(dtype: torch.dtype) -> str:
    return FP32_DOT_PRECISION if dtype == torch.float32 else "ieee"


def bwd_triton(q, k, gq, gk, offset, inv_t, beta, single, rstats, cstats):
    """dq [n, D], dk [N, D] (fp32) without atomics: for each panel of rows, _cl_grad_kernel
    writes G = dL/dS ([R, N]), then _cl_gemm_kernel computes the panel's dq = G k and adds
    G^T q[panel] into dk (each output block owned by one program).  rstats / cstats: the
    backward coefficients [4, n] / [4, N] (r, A, B, C) of each direction (cstats None: one)."""
    n, D = q.shape
    N = k.shape[0]
    dev = q.device
    target = _dispatch.target_for(dev)
    hard, both, scaled = beta > 0, cstats is not None, q.dtype == torch.float16
    grad_cfgs = kernel_configs("grad", q.dtype, n, N, D, target, hard=hard, cols=both)
    R = panel_rows(n, N)
    gdt = torch.float32 if q.dtype == torch.float32 else q.dtype
    G = torch.empty((R, N), device=dev, dtype=gdt)
    G2 = torch.empty((R, N), device=dev, dtype=gdt) if scaled else G
    # the scales' shapes follow the grad tile: sized for the smallest of the candidates
    bm_min = min(c.kwargs["BLOCK_M"] for c in grad_cfgs)
    bn_min = min(c.kwargs["BLOCK_N"] for c in grad_cfgs)
    SR = torch.empty((R, triton.cdiv(N, bn_min)), device=dev, dtype=torch.float32) if scaled else rstats
    SC = torch.empty((triton.cdiv(R, bm_min), N), device=dev, dtype=torch.float32) if scaled else rstats
    dq = torch.empty((n, D), device=dev, dtype=torch.float32)
    dk = torch.empty((N, D), device=dev, dtype=torch.float32)
    cs = cstats if both else rstats
    common = dict(UPCAST=_dispatch.triton_interpreted(), PRECISION=_precision(q.dtype))
    nb = _next_pow2(N)
    for r0 in range(0, n, R):
        rp = min(R, n - r0)
        g_cfg = _launch(
            "grad", _cl_grad_kernel, grad_cfgs,
            lambda m, rp=rp: (triton.cdiv(rp, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),),
            (q, k, gq if gq is not None else rstats, gk if gk is not None else rstats, rstats, cs, G, G2, SR, SC,
             r0, rp, N, D, offset, inv_t, beta, nb,
             q.stride(0), q.stride(1), k.stride(0), k.stride(1), rstats.stride(0), cs.stride(0), G.stride(0),
             SR.stride(0), SC.stride(0)),
            dict(HAS_GROUPS=gq is not None, SINGLE=single, HARD=hard, BOTH=both, SCALED=scaled, GROUP_M=8, **common))
        # dq[panel] = G k: rows of G are the output rows, its columns the reduction
        sb = g_cfg.kwargs["BLOCK_N"]
        _launch("gemm_dq", _cl_gemm_kernel,
                kernel_configs("gemm_dq", q.dtype, n, N, D, target, scale_block=sb if scaled else 0),
                lambda m, rp=rp: (triton.cdiv(rp, m["BLOCK_M"]) * triton.cdiv(D, m["BLOCK_D"]),),
                (G, k, SR, dq[r0:r0 + rp], rp, N, D, inv_t, nb,
                 G.stride(0), 1, k.stride(0), k.stride(1), SR.stride(0), 1, dq.stride(0)),
                dict(SCALED=scaled, SCALE_BLOCK=sb, ACCUM=False, **common))
        # dk (+)= G^T q[panel]: G's columns are the output rows, its rows the reduction
        sb = g_cfg.kwargs["BLOCK_M"]
        _launch("gemm_dk", _cl_gemm_kernel,
                kernel_configs("gemm_dk", q.dtype, n, N, D, target, scale_block=sb if scaled else 0),
                lambda m: (triton.cdiv(N, m["BLOCK_M"]) * triton.cdiv(D, m["BLOCK_D"]),),
                (G2, q[r0:r0 + rp], SC, dk, N, rp, D, inv_t, nb,
                 1, G2.stride(0), q.stride(0), q.stride(1), 1, SC.stride(0), dk.stride(0)),
                dict(SCALED=scaled, SCALE_BLOCK=sb, ACCUM=r0 > 0, **common))
    return dq, dk
