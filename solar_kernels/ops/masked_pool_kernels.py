"""masked_pool's Triton kernels (layer 1 of ``ops/masked_pool.py``, which launches them).

The formulas are in ``ops/masked_pool.py``'s docstring.  Every kernel accumulates in fp32
and runs under ``TRITON_INTERPRET=1`` as well as compiled for a GPU.

The forward keeps its tiles two-dimensional: a [BLOCK_V, BLOCK_D] accumulator that each
token row l updates with the outer product w[:, l] x[l, :].  Nothing is reduced across
threads inside the L loop, and x is loaded as [1, BLOCK_D] rows in the accumulator's own
layout, so the compiled loop has no shared-memory layout conversion and no barrier
(tests/kernels/test_aot_compile.py checks the SASS).  Byte and half-word masks are read as
aligned 32-bit words (``WORD_ELEMS`` elements each) and unpacked in registers.
"""
from __future__ import annotations

# The kernels' names are public (imported by ops/masked_pool.py; tests/method/test_imports.py
# forbids _-names across modules); the helpers below them stay private to this module.
import triton
import triton.language as tl


@triton.jit
def _mask_word(W_ptr, q, q_end, v_ok):
    """The 32-bit word q (index from the aligned base W_ptr) of each mask row, zero-extended to
    64 bits; 0 past the word q_end that holds the row's last element (that memory is another
    row's, or past the tensor)."""
    word = tl.load(W_ptr + q, mask=v_ok & (q <= q_end), other=0)
    return word.to(tl.uint32, bitcast=True).to(tl.uint64)


@triton.jit
def _mask_elem(bits, k, ELEM_T, WORD_ELEMS: tl.constexpr):
    """Element k of the 32 bits `bits` (little-endian), as fp32."""
    if WORD_ELEMS == 4:  # bool / uint8: 0 or 1
        return ((bits >> (8 * k)) & 0xFF).to(tl.float32)
    else:  # fp16 / bf16: reinterpret the 16 bits
        half = ((bits >> (16 * k)) & 0xFFFF).to(tl.uint16)
        return half.to(ELEM_T, bitcast=True).to(tl.float32)


@triton.jit
def _accumulate_row(acc, wacc, w, x_row, offs_l, l_ok, d_ok, stride_xl, SKIP_ZERO: tl.constexpr):
    """One token row's step of the L loop, shared by the word and element mask paths: load x row
    offs_l ([1, BLOCK_D], upcast to fp32) and return (acc + w x_row, wacc + w) for the weights w
    [BLOCK_V, 1].  SKIP_ZERO leaves out the terms under a zero weight (0 * NaN).  Inlined into
    the loop like the code it replaces (tests/kernels/test_aot_compile.py checks the SASS)."""
    xr = tl.load(x_row + offs_l * stride_xl, mask=d_ok & l_ok, other=0.0).to(tl.float32)
    if SKIP_ZERO:
        acc += tl.where(w != 0.0, w * xr, 0.0)
    else:
        acc += w * xr
    return acc, wacc + w


@triton.jit
def _pool_fwd_sums(x_row, M_ptr, W_ptr, m_off, row_byte, offs_v, v_ok, offs_d, d_ok, L, stride_xl, stride_ml,
                   SKIP_ZERO: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                   UNROLL: tl.constexpr, WORD_ELEMS: tl.constexpr):
    """(sum_l w x [BLOCK_V, BLOCK_D], sum_l w [BLOCK_V, 1]) of one batch row's D slice, in fp32.

    offs_v / v_ok are [BLOCK_V, 1], offs_d / d_ok [1, BLOCK_D].  Element path (WORD_ELEMS 0):
    w[v, l] = M_ptr[m_off + l * stride_ml].  Word path: the row's elements start at byte
    row_byte [BLOCK_V, 1] of the 4-byte aligned int32 base W_ptr; each UNROLL group of L reads
    UNROLL / WORD_ELEMS + 1 words per row and funnel-shifts consecutive pairs into place.
    SKIP_ZERO leaves out the terms under a zero weight (0 * NaN)."""
    acc = tl.zeros([BLOCK_V, BLOCK_D], dtype=tl.float32)
    wacc = tl.zeros([BLOCK_V, 1], dtype=tl.float32)
    shift = ((row_byte % 4) * 8).to(tl.uint64)
    q_end = (row_byte + (L - 1) * (4 // max(WORD_ELEMS, 1))) // 4
    for l0 in range(0, L, UNROLL):
        if WORD_ELEMS > 0:
            # UNROLL is a multiple of WORD_ELEMS: l0's byte offset is a whole number of words
            q0 = row_byte // 4 + l0 // WORD_ELEMS
            lo = _mask_word(W_ptr, q0, q_end, v_ok)
            for j in tl.static_range(UNROLL // WORD_ELEMS):
                hi = _mask_word(W_ptr, q0 + j + 1, q_end, v_ok)
                bits = (((hi << 32) | lo) >> shift).to(tl.uint32)
                for k in tl.static_range(WORD_ELEMS):
                    offs_l = l0 + j * WORD_ELEMS + k
                    l_ok = tl.full([1, 1], offs_l, tl.int32) < L  # a tensor (the interpreter masks need one)
                    w = tl.where(l_ok, _mask_elem(bits, k, M_ptr.dtype.element_ty, WORD_ELEMS), 0.0)
                    acc, wacc = _accumulate_row(acc, wacc, w, x_row, offs_l, l_ok, d_ok, stride_xl, SKIP_ZERO)
                lo = hi
        else:
            for j in tl.static_range(UNROLL):
                offs_l = l0 + j
                l_ok = tl.full([1, 1], offs_l, tl.int32) < L  # a tensor (the interpreter masks need one)
                w = tl.load(M_ptr + m_off + offs_l * stride_ml, mask=v_ok & l_ok, other=0).to(tl.float32)
                acc, wacc = _accumulate_row(acc, wacc, w, x_row, offs_l, l_ok, d_ok, stride_xl, SKIP_ZERO)
    return acc, wacc


@triton.jit
def pool_fwd_kernel(
    X_ptr, M_ptr, Y_ptr, O_ptr, S_ptr, N_ptr,
    L, D, V, M_SHIFT,
    stride_xb, stride_xl, stride_xd,
    stride_mv, stride_mb, stride_ml,
    stride_yv, stride_yb,
    stride_sv,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr, WORD_ELEMS: tl.constexpr,
    STORE_Y: tl.constexpr, STORE_O: tl.constexpr, MIN_SUM: tl.constexpr,
):
    """y[v, b, d] = sum_{l: w != 0} w[v, b, l] x[b, l, d] / s[v, b],  s = sum_l w[v, b, l];
    y = 0 and s = 0 where s < MIN_SUM (the smallest normal fp32: the non-finite contract).

    Grid (B, cdiv(V, BLOCK_V), cdiv(D, BLOCK_D)): one program owns a BLOCK_D slice of row b
    for BLOCK_V masks, so each x row is loaded once for all of them.  x and the weights are
    upcast to fp32 and accumulate in fp32 ([BLOCK_V, BLOCK_D]; no reduction in the L loop).
    Stores y in fp32 to Y [V, B, D] when STORE_Y and in O's dtype to O (Y's strides) when
    STORE_O; S (the mask sums) fp32 [V, B]; N (S's strides) is set to 0, so that without
    normalize no other launch touches the outputs (pool_norm_kernel overwrites it with the
    norms when normalising).  Word masks (WORD_ELEMS > 0): M_ptr is the mask's first element,
    M_SHIFT its byte address mod 4 and stride_ml 1 (see _pool_fwd_sums).  Terms under a zero
    weight are skipped by recomputing a slice whose sum came out non-finite (only then can
    0 * NaN / inf have entered it).
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    pid_d = tl.program_id(2).to(tl.int64)
    offs_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V))[:, None]
    offs_d = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D))[None, :]
    v_ok = offs_v < V
    d_ok = offs_d < D
    x_row = X_ptr + pid_b * stride_xb + offs_d * stride_xd
    m_off = offs_v * stride_mv + pid_b * stride_mb
    # the word path addresses the mask in bytes from the 4-byte aligned address below M_ptr
    row_byte = M_SHIFT + m_off * (4 // max(WORD_ELEMS, 1))
    W_ptr = (M_ptr.to(tl.pointer_type(tl.uint8)) - M_SHIFT).to(tl.pointer_type(tl.int32))
    psum, wsum = _pool_fwd_sums(x_row, M_ptr, W_ptr, m_off, row_byte, offs_v, v_ok, offs_d, d_ok, L, stride_xl,
                                stride_ml, False, BLOCK_V, BLOCK_D, UNROLL, WORD_ELEMS)
    # a sum below the smallest normal fp32 is an empty row (1 / s would overflow)
    wsum = tl.where(wsum >= MIN_SUM, wsum, 0.0)
    # 0 * NaN / inf under a zero weight made the sum non-finite: redo this slice with
    # zero-weight terms skipped (rare: only when x holds non-finite values, so the hot
    # loop stays one FMA per weight and element)
    # (x * 0 is NaN exactly for non-finite x: one float reduction, no vector of bools, which
    # LLVM packs through a stack slot)
    probe = tl.sum(tl.sum(psum * 0.0, axis=1), axis=0)
    if probe != probe:
        psum, _ = _pool_fwd_sums(x_row, M_ptr, W_ptr, m_off, row_byte, offs_v, v_ok, offs_d, d_ok, L, stride_xl,
                                 stride_ml, True, BLOCK_V, BLOCK_D, UNROLL, WORD_ELEMS)
    safe = tl.where(wsum > 0, wsum, 1.0)
    y = tl.where(wsum > 0, psum / safe, 0.0)
    y_off = offs_v * stride_yv + pid_b * stride_yb + offs_d
    if STORE_Y:
        tl.store(Y_ptr + y_off, y, mask=v_ok & d_ok)
    if STORE_O:
        tl.store(O_ptr + y_off, y.to(O_ptr.dtype.element_ty), mask=v_ok & d_ok)
    if pid_d == 0:
        tl.store(S_ptr + offs_v * stride_sv + pid_b, wsum, mask=v_ok)
        tl.store(N_ptr + offs_v * stride_sv + pid_b, tl.zeros_like(wsum), mask=v_ok)


@triton.jit
def pool_norm_kernel(Y_ptr, O_ptr, N_ptr, D, eps, STORE_O: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row-wise L2 normalisation: n[r] = ||y[r]||, y[r] /= max(n[r], eps) in place in the fp32
    [V*B, D] buffer Y (the backward reads it), also stored in O's dtype to O when STORE_O.

    One program per row; BLOCK_D >= D.
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    y = tl.load(Y_ptr + row * D + offs, mask=ok, other=0.0)
    n = tl.sqrt(tl.sum(y * y, axis=0))
    y = y / tl.maximum(n, eps)
    tl.store(Y_ptr + row * D + offs, y, mask=ok)
    if STORE_O:
        tl.store(O_ptr + row * D + offs, y.to(O_ptr.dtype.element_ty), mask=ok)
    tl.store(N_ptr + row, n)


@triton.jit
def pool_bwd_prep_kernel(G_ptr, O_ptr, S_ptr, N_ptr, DP_ptr, C_ptr, D, eps,
                          NORMALIZE: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per (v, b) row: dp = dy / s and c = y . dp (formulas in the module docstring).

    G (grad of out), O (the fp32 output) and DP are fp32 [V*B, D]; S, N, C fp32 [V*B].
    One program per row; BLOCK_D >= D.
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    g = tl.load(G_ptr + row * D + offs, mask=ok, other=0.0).to(tl.float32)
    o = tl.load(O_ptr + row * D + offs, mask=ok, other=0.0)
    s = tl.load(S_ptr + row)
    if NORMALIZE:
        n = tl.load(N_ptr + row)
        denom = tl.maximum(n, eps)
        og = tl.sum(o * g, axis=0)
        proj = tl.where(n > eps, og, 0.0)
        dy = (g - o * proj) / denom
        y = o * denom
    else:
        dy = g
        y = o
    inv_s = tl.where(s > 0, 1.0 / tl.where(s > 0, s, 1.0), 0.0)
    dp = dy * inv_s
    tl.store(DP_ptr + row * D + offs, dp, mask=ok)
    tl.store(C_ptr + row, tl.sum(y * dp, axis=0))

# stride_ml is not specialised to 1: a mask column contiguous in L made Triton give the [BLOCK_L, 1]
# weight loads an L-major layout, converted through shared memory (barriers) on every D step
@triton.jit(do_not_specialize=["stride_ml"])
def pool_bwd_kernel(
    X_ptr, M_ptr, DP_ptr, C_ptr, GX_ptr, GM_ptr,
    L, D, V,
    stride_xb, stride_xl, stride_xd,
    stride_mv, stride_mb, stride_ml,
    stride_gxb, stride_gxl,
    stride_dpv, stride_dpb,
    stride_cv,
    stride_gmv, stride_gmb,
    NEED_MASK_GRAD: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """grad_x[b, l] = sum_v w[v, b, l] dp[v, b];  grad_w[v, b, l] = x[b, l] . dp[v, b] - c[v, b].

    Grid (B * cdiv(L, BLOCK_L),), b-major: the L tiles of one batch row run next to each other,
    so its dp rows (read by each of them) come from L2.  A program owns BLOCK_L token rows of
    batch row b for BLOCK_V >= V
    masks and sweeps D in BLOCK_D steps, so grad_x is written once and (only when the mask
    gradient is wanted) x read once from memory.  Tiles are 2-D [BLOCK_L, BLOCK_D]: grad_x
    adds the outer products w[v, :] dp[v, :] over the (unrolled) masks, and the mask gradient
    of mask v accumulates x * dp[v] elementwise and is reduced over D once, after its D loop;
    nothing is reduced across threads inside a loop.  All products accumulate in fp32; grad_x
    is stored in its buffer's dtype (ACCUMULATE adds to an fp32 buffer, for V split into groups).
    """
    pid = tl.program_id(0).to(tl.int64)
    n_lt = tl.cdiv(L, BLOCK_L)
    pid_b = pid // n_lt
    pid_l = pid % n_lt
    offs_l = (pid_l * BLOCK_L + tl.arange(0, BLOCK_L))[:, None]
    l_ok = offs_l < L
    m_row = M_ptr + pid_b * stride_mb + offs_l * stride_ml
    dp_row = DP_ptr + pid_b * stride_dpb
    # int64 mask strides: v * stride_dpv reaches (V - 1) * B * D, past 2^31 at V = 8, B ~ 400k,
    # D = 768 (and v * stride_mv past it for masks of 2 GiB)
    zero64 = tl.zeros([1, 1], dtype=tl.int64)
    smv, sdpv, sgmv = stride_mv + zero64, stride_dpv + zero64, stride_gmv + zero64
    for d0 in range(0, D, BLOCK_D):
        offs_d = (d0 + tl.arange(0, BLOCK_D))[None, :]
        d_ok = offs_d < D
        gx = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
        for v in tl.static_range(BLOCK_V):
            v_ok = (zero64 + v) < V  # a tensor (the interpreter masks need one)
            w = tl.load(m_row + v * smv, mask=l_ok & v_ok, other=0).to(tl.float32)
            dp = tl.load(dp_row + v * sdpv + offs_d, mask=d_ok & v_ok, other=0.0)
            gx += w * dp
        gx_ptrs = GX_ptr + pid_b * stride_gxb + offs_l * stride_gxl + offs_d
        tile_ok = l_ok & d_ok
        if ACCUMULATE:
            gx += tl.load(gx_ptrs, mask=tile_ok, other=0.0)
        tl.store(gx_ptrs, gx.to(GX_ptr.dtype.element_ty), mask=tile_ok)
    if NEED_MASK_GRAD:
        x_rows = X_ptr + pid_b * stride_xb + offs_l * stride_xl
        for v in tl.static_range(BLOCK_V):
            if v < V:
                acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    offs_d = (d0 + tl.arange(0, BLOCK_D))[None, :]
                    d_ok = offs_d < D
                    # x tile re-read per mask: from L1 / L2 after the first (BLOCK_L rows of D)
                    xt = tl.load(x_rows + offs_d * stride_xd, mask=l_ok & d_ok, other=0.0).to(tl.float32)
                    dp = tl.load(dp_row + v * sdpv + offs_d, mask=d_ok, other=0.0)
                    acc += xt * dp
                c = tl.load(C_ptr + v * stride_cv + pid_b)
                tl.store(GM_ptr + v * sgmv + pid_b * stride_gmb + offs_l,
                         tl.sum(acc, axis=1)[:, None] - c, mask=l_ok)
