"""masked_pool: weighted mean of token rows under V masks, in one pass over x.

    out[v, b] = sum_{l: mask[v, b, l] != 0} mask[v, b, l] * x[b, l] / s[v, b],   s[v, b] = sum_l mask[v, b, l]
                (0 when s[v, b] < MIN_WEIGHT_SUM, the smallest normal float32: an empty row)
    normalize=True:  out[v, b] /= max(||out[v, b]||_2, eps)

Non-finite values, the same on every backend (native C++, Triton, torch): mask weights must be
finite and >= 0 (ValueError).  x is not scanned (that would be a second full read of the
largest tensor); a NaN / inf in x[b, l] under a nonzero weight propagates, IEEE-style, into the
output row out[v, b] (the affected features; with normalize=True the whole row is unusable);
under a zero weight it never reaches the output (the term is skipped, not computed as 0 * NaN).

Layers, in order (STYLE.md):

1. ``@triton.jit`` kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``):
   ``pool_fwd_kernel``, ``pool_norm_kernel``, ``pool_bwd_prep_kernel``, ``pool_bwd_kernel``,
   in ``ops/masked_pool_kernels.py``.
2. Launchers that dispatch by backend and do no autograd: :func:`pool_forward`,
   :func:`pool_backward` (also used by ``pooled_contrastive_loss``).  The CPU kernel is
   C++/OpenMP in ``csrc/pool/pool_cpu.cpp``; the ``"torch"`` backend is a chunked
   plain-PyTorch path.
3. ``torch.library`` custom ops ``solar::masked_pool_fwd`` / ``solar::masked_pool_bwd`` with
   fake kernels (``torch.compile`` traces the op without running it), and the forward op's
   autograd formula (``register_autograd``): the one autograd path, eager and compiled.

The backward formulas (s = sum_l w_l, y = p / s the un-normalised mean, n = ||y||):

    dy      = normalize ? (n > eps ? (g - o (o.g)) / n : g / eps) : g
    dp      = dy / s                                  (0 when s == 0)
    c       = y . dp
    grad_x[b, l]    = sum_v w[v, b, l] dp[v, b]
    grad_w[v, b, l] = x[b, l] . dp[v, b] - c[v, b]
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

from .. import _checks, _dispatch, _ext

try:  # triton is optional on CPU-only installs; the native/torch paths do not need it
    import triton

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

__all__ = ["masked_pool", "pool_forward", "pool_backward", "grad_buffer_cache_mb", "CPU_SYMBOL_FWD", "CPU_SYMBOL_BWD",
           "MIN_WEIGHT_SUM"]

CPU_SYMBOL_FWD = "masked_pool_forward_cpu"
CPU_SYMBOL_BWD = "masked_pool_backward_cpu"
MASK_DTYPES = (torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64)

_dispatch.register_op("masked_pool", cuda="Triton", cpu_symbol=CPU_SYMBOL_FWD)

# Masks pooled together in one program.  With V above this, x is read once per group.
MAX_V_PER_PASS = 8
# A mask row whose weight sum is below this (the smallest normal float32, 2^-126; 0 included)
# is empty: its output row is 0 and its sum is stored as 0, on every backend.  1 / s of a
# subnormal sum overflows, and GPUs may flush subnormals to 0: below this no backend agrees.
MIN_WEIGHT_SUM = torch.finfo(torch.float32).tiny


# ----------------------------------------------------------------------------------------
# 1. Triton kernels: ops/masked_pool_kernels.py
# ----------------------------------------------------------------------------------------
if HAS_TRITON:
    from .masked_pool_kernels import pool_bwd_kernel, pool_bwd_prep_kernel, pool_fwd_kernel, pool_norm_kernel

# token rows per forward loop step (unrolled; a multiple of 4, the most mask elements in a word)
FWD_UNROLL = 8


def _bwd_blocks(V: int, D: int, x: torch.Tensor) -> tuple[int, int, int, int]:
    """The backward's (BLOCK_V, BLOCK_L, BLOCK_D, num_warps), in one visible place.

    On a GPU one warp owns a [BLOCK_L = 4, BLOCK_D = 128] tile: every thread reads 16 bytes
    of each fp32 dp row, and 4 elements of each x / grad_x row (16 bytes in fp32, 8 in
    bf16 / fp16), in the same layout, so no tile is converted between layouts (wider bf16
    accesses would put dp and x in different layouts: warp shuffles every D step; more warps
    spread the [1, BLOCK_D] dp rows over all of them: shared memory and barriers).  The
    interpreter gets large tiles.
    """
    bv = triton.next_power_of_2(min(V, MAX_V_PER_PASS))
    if _dispatch.target_for(x.device) != "cuda":
        return bv, 32, min(triton.next_power_of_2(D), 256), 4
    return bv, 4, min(triton.next_power_of_2(D), 128), 1


def _fwd_blocks(V: int, D: int, x: torch.Tensor) -> tuple[int, int, int]:
    """The forward's (BLOCK_V, BLOCK_D, num_warps), in one visible place.

    On a GPU one warp owns BLOCK_D = 32 x (16 / itemsize) features: each thread loads 16
    contiguous bytes of every x row (one vector load), and the [BLOCK_V, BLOCK_D] fp32
    accumulator stays at BLOCK_V x 16 / itemsize registers a thread.  The interpreter pays
    per tile operation, so it gets one wide tile.
    """
    bv = triton.next_power_of_2(min(V, MAX_V_PER_PASS))
    if _dispatch.target_for(x.device) != "cuda":
        return bv, min(triton.next_power_of_2(D), 256), 4
    return bv, min(triton.next_power_of_2(D), 32 * (16 // x.element_size())), 1


def _mask_for_triton(mask: torch.Tensor) -> torch.Tensor:
    # bool pointers are loaded as int1 inconsistently across triton versions: pass bytes
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _mask_word_elems(m: torch.Tensor) -> int:
    """Mask elements per 32-bit word when the forward may read `m` (uint8 / fp16 / bf16) as
    aligned words: L contiguous, and every aligned word holding a mask element lies inside the
    storage (the last row's last word may hold bytes past its end).  0: element loads (fp32
    masks are 4 bytes a load already; strided L)."""
    es = m.element_size()
    if es not in (1, 2) or m.numel() == 0 or (m.stride(2) != 1 and m.shape[2] > 1):
        return 0
    storage = m.untyped_storage()
    last = m.storage_offset() + sum((n - 1) * st for n, st in zip(m.shape, m.stride()))
    end_word = ((last + 1) * es + 3) // 4 * 4
    if storage.data_ptr() % 4 or end_word > storage.nbytes():
        return 0
    return 4 // es


def _forward_triton(x, mask, normalize, eps, out_dtype=torch.float32, keep_fp32=True):
    """One launch (two with normalize): (out in out_dtype, the fp32 out or None, aux).

    The fp32 out is also stored when out_dtype is lower and `keep_fp32` or `normalize` (the
    backward reads it then); out_dtype float32 returns out itself as the fp32 out."""
    V, B, L = mask.shape
    D = x.shape[2]
    lowp = out_dtype != torch.float32
    keep = (not lowp) or keep_fp32 or normalize
    out = torch.empty((V, B, D), device=x.device, dtype=out_dtype)
    out32 = torch.empty((V, B, D), device=x.device, dtype=torch.float32) if lowp and keep else None
    y = out if not lowp else (out32 if keep else out)
    if out.numel() == 0:
        return out, (out if not lowp else out32), torch.zeros((2, V, B), device=x.device, dtype=torch.float32)
    # every element of aux is written by the kernels: no fill launch
    aux = torch.empty((2, V, B), device=x.device, dtype=torch.float32)
    m = _mask_for_triton(mask)
    words = _mask_word_elems(m)
    bv, bd, nw = _fwd_blocks(V, D, x)
    grid = (B, triton.cdiv(V, bv), triton.cdiv(D, bd))
    pool_fwd_kernel[grid](
        x, m, y, out, aux[0], aux[1],
        L, D, V, m.data_ptr() % 4 if words else 0,
        x.stride(0), x.stride(1), x.stride(2),
        m.stride(0), m.stride(1), m.stride(2),
        out.stride(0), out.stride(1),
        aux.stride(1),
        BLOCK_V=bv, BLOCK_D=bd, UNROLL=FWD_UNROLL, WORD_ELEMS=words,
        STORE_Y=keep, STORE_O=lowp and not normalize, MIN_SUM=MIN_WEIGHT_SUM, num_warps=nw,
    )
    if normalize:  # without it, no launch beyond the forward kernel (aux[1] stays 0)
        pool_norm_kernel[(V * B,)](y, out, aux[1], D, float(eps), STORE_O=lowp,
                                    BLOCK_D=triton.next_power_of_2(D))
    return out, (out if not lowp else out32), aux


def _backward_triton(grad_out, x, mask, out, aux, normalize, eps, need_mask_grad):
    V, B, L = mask.shape
    D = x.shape[2]
    grad_out = grad_out.contiguous()
    dp = torch.empty((V, B, D), device=x.device, dtype=torch.float32)
    c = torch.empty((V, B), device=x.device, dtype=torch.float32)
    if V * B > 0 and D > 0:
        pool_bwd_prep_kernel[(V * B,)](grad_out, out.contiguous(), aux[0].contiguous(), aux[1].contiguous(),
                                        dp, c, D, float(eps), NORMALIZE=bool(normalize),
                                        BLOCK_D=triton.next_power_of_2(D))
    grad_mask = torch.empty((V, B, L), device=x.device, dtype=torch.float32) if need_mask_grad else None
    groups = [(v0, min(V, v0 + MAX_V_PER_PASS)) for v0 in range(0, V, MAX_V_PER_PASS)] or [(0, 0)]
    accumulate = len(groups) > 1
    # every (l, d) of grad_x is written by the kernel: zero-fill only what is accumulated into
    alloc = torch.zeros if (accumulate or V == 0) else torch.empty
    gx = alloc(x.shape, device=x.device, dtype=torch.float32 if accumulate else x.dtype)
    if x.numel() == 0 or V == 0:
        return gx.to(x.dtype), (grad_mask.zero_() if grad_mask is not None else None)
    m = _mask_for_triton(mask)
    _, bl, bd, nw = _bwd_blocks(min(V, MAX_V_PER_PASS), D, x)
    for v0, v1 in groups:
        nv = v1 - v0
        bv = triton.next_power_of_2(nv)
        mg, dpg, cg = m[v0:v1], dp[v0:v1], c[v0:v1]
        gmg = grad_mask[v0:v1] if need_mask_grad else dpg  # dummy pointer when unused
        pool_bwd_kernel[(B * triton.cdiv(L, bl),)](
            x, mg, dpg, cg, gx, gmg,
            L, D, nv,
            x.stride(0), x.stride(1), x.stride(2),
            mg.stride(0), mg.stride(1), mg.stride(2),
            gx.stride(0), gx.stride(1),
            dpg.stride(0), dpg.stride(1),
            cg.stride(0),
            gmg.stride(0), gmg.stride(1),
            NEED_MASK_GRAD=bool(need_mask_grad), ACCUMULATE=accumulate,
            BLOCK_V=bv, BLOCK_L=bl, BLOCK_D=bd, num_warps=nw,
        )
    return gx.to(x.dtype), grad_mask


# ----------------------------------------------------------------------------------------
# The chunked plain-PyTorch path ("torch" backend)
# ----------------------------------------------------------------------------------------
def _chunk_rows(B: int, L: int, D: int, budget_elems: int = 1 << 22) -> int:
    """Batch rows per chunk so that the fp32 copy of an x chunk stays near 16 MB."""
    return max(1, budget_elems // max(1, L * D))


def _forward_torch(x, mask, normalize, eps):
    V, B, L = mask.shape
    D = x.shape[2]
    w = mask.to(torch.float32)
    s = w.sum(-1)  # [V, B]
    s = torch.where(s >= MIN_WEIGHT_SUM, s, torch.zeros_like(s))  # empty rows (module docstring)
    out = torch.empty((V, B, D), device=x.device, dtype=torch.float32)
    step = _chunk_rows(B, L, D)
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        xc = x[b0:b1].to(torch.float32)
        p = torch.bmm(w[:, b0:b1].transpose(0, 1), xc)  # [b, V, D]
        out[:, b0:b1] = p.transpose(0, 1)
    _skip_zero_weight_terms(out, x, w)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    out = torch.where((s > 0)[..., None], out / safe[..., None], torch.zeros_like(out))
    n = out.norm(dim=-1)
    if normalize:
        out = out / n.clamp_min(eps)[..., None]
    return out, torch.stack([s, n])


def _skip_zero_weight_terms(p: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """Recompute, in place, the rows of the weighted sums p [V, B, D] that came out non-finite,
    with the terms under a zero weight left out (bmm computes 0 * NaN = NaN for them).

    Only such rows can hold a 0 * NaN / inf term, so clean inputs cost one isfinite over p
    (V*B*D, not x's B*L*D); rows whose non-finite x lies under a nonzero weight stay non-finite.
    """
    bad = ~torch.isfinite(p).all(-1)  # [V, B]
    if not bool(bad.any()):
        return
    vs, bs = bad.nonzero(as_tuple=True)
    L, D = x.shape[1], x.shape[2]
    step = _chunk_rows(len(vs), L, D)
    for i0 in range(0, len(vs), step):
        v, b = vs[i0:i0 + step], bs[i0:i0 + step]
        wr = w[v, b][..., None]  # [r, L, 1]
        terms = torch.where(wr != 0, wr * x[b].to(torch.float32), torch.zeros((), device=x.device))
        p[v, b] = terms.sum(1)


def _prep_torch(grad_out, out, aux, normalize, eps):
    g = grad_out.to(torch.float32)
    s, n = aux[0], aux[1]
    if normalize:
        denom = n.clamp_min(eps)[..., None]
        og = (out * g).sum(-1, keepdim=True)
        og = torch.where((n > eps)[..., None], og, torch.zeros_like(og))
        dy = (g - out * og) / denom
        y = out * denom
    else:
        dy, y = g, out
    inv_s = torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    dp = dy * inv_s[..., None]
    return dp, (y * dp).sum(-1)


def _backward_torch(grad_out, x, mask, out, aux, normalize, eps, need_mask_grad):
    V, B, L = mask.shape
    D = x.shape[2]
    dp, c = _prep_torch(grad_out, out, aux, normalize, eps)
    w = mask.to(torch.float32)
    grad_x = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    grad_mask = torch.empty((V, B, L), device=x.device, dtype=torch.float32) if need_mask_grad else None
    step = _chunk_rows(B, L, D)
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        dpc = dp[:, b0:b1].transpose(0, 1)  # [b, V, D]
        grad_x[b0:b1] = torch.bmm(w[:, b0:b1].permute(1, 2, 0), dpc).to(x.dtype)
        if need_mask_grad:
            t = torch.bmm(dpc, x[b0:b1].to(torch.float32).transpose(1, 2))  # [b, V, L]
            grad_mask[:, b0:b1] = t.transpose(0, 1) - c[:, b0:b1, None]
    return grad_x, grad_mask


# ----------------------------------------------------------------------------------------
# 2. Launchers (no autograd): the interface shared with pooled_contrastive_loss
# ----------------------------------------------------------------------------------------
def _backend(x: torch.Tensor) -> str:
    return _dispatch.backend_for(x.device, CPU_SYMBOL_FWD)


def pool_forward(x: torch.Tensor, mask: torch.Tensor, normalize: bool = False, eps: float = 1e-6
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool `x` under V masks in one pass; no autograd.

    Args:
        x:    [B, L, D] float32/float16/bfloat16, any strides.
        mask: [V, B, L] bool or floating (non-negative weights), any strides.
        normalize: divide each pooled row by max(||row||_2, eps).
        eps:  the floor of the norm when normalising.

    Returns:
        out: [V, B, D] float32, the (normalised) pooled rows; rows whose mask sums to less than
             MIN_WEIGHT_SUM are 0.  Non-finite x: as in the module docstring.
        aux: [2, V, B] float32: aux[0] = sum_l mask (the denominators; 0 for those empty
             rows, so that the backward treats them as empty too), aux[1] = the norm
             of the un-normalised mean row when normalize=True (the backward of the
             normalisation needs it; without normalize nothing reads it, and the Triton path
             leaves it 0 rather than spend launches on it).  Pass both unchanged to
             :func:`pool_backward`.

    Dispatch: CUDA -> Triton, CPU -> C++ (``solar_kernels._C``) or the chunked torch path
    (see ``solar_kernels.use_backend``).  Inputs are assumed validated (shapes, dtypes,
    devices); :func:`masked_pool` is the checked public entry point.
    """
    mask = mask.to(torch.float32) if mask.dtype == torch.float64 else mask
    backend = _backend(x)
    if backend == "triton":
        out, _, aux = _forward_triton(x, mask, normalize, eps)
        return out, aux
    if backend == "native":
        out, aux = _ext.require(CPU_SYMBOL_FWD)(x, mask, bool(normalize), float(eps))
        return out, aux
    return _forward_torch(x, mask, normalize, eps)


def pool_backward(grad_out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, out: torch.Tensor,
                  aux: torch.Tensor, normalize: bool, eps: float, need_mask_grad: bool
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of :func:`pool_forward`; no autograd.

    Args:
        grad_out: [V, B, D] gradient of `out` (float32, or any float dtype: upcast).
        x, mask, normalize, eps: as given to :func:`pool_forward`.
        out, aux: what :func:`pool_forward` returned.
        need_mask_grad: also compute the gradient of the (float) mask weights.

    Returns:
        grad_x:    [B, L, D] in x.dtype (contiguous; on the native CPU path it may live in a
            recycled buffer, see :func:`grad_buffer_cache_mb`).
        grad_mask: [V, B, L] float32, or None when `need_mask_grad` is False.
            grad_mask[v, b, l] = (x[b, l] - y[v, b]) . dy[v, b] / s[v, b]; 0 where s == 0.
    """
    mask = mask.to(torch.float32) if mask.dtype == torch.float64 else mask
    backend = _backend(x)
    if backend == "triton":
        return _backward_triton(grad_out, x, mask, out, aux, normalize, eps, need_mask_grad)
    if backend == "native":
        gx, gm = _ext.require(CPU_SYMBOL_BWD)(grad_out.to(torch.float32), x, mask, out, aux,
                                              bool(normalize), float(eps), bool(need_mask_grad))
        return gx, (gm if need_mask_grad else None)
    return _backward_torch(grad_out, x, mask, out, aux, normalize, eps, need_mask_grad)


def grad_buffer_cache_mb(max_mb: int | None = None) -> int:
    """Read (no argument) or set the cap, in MiB, of the native CPU backward's recycled grad_x buffers.

    The C++ backward keeps freed grad_x buffers of 4 MiB and more (up to this cap) and hands
    them to the next backward, which skips the kernel's page zeroing of a fresh allocation;
    default 256 MiB, or SOLAR_POOL_GRAD_CACHE_MB.  0 disables it and frees the kept buffers.
    Returns the previous cap.
    """
    fn = _ext.require("masked_pool_grad_cache_mb")
    return int(fn(-1 if max_mb is None else int(max_mb)))


# ----------------------------------------------------------------------------------------
# 3. torch.library registration (custom ops with fake kernels) and autograd
# ----------------------------------------------------------------------------------------
def check_weights(mask: torch.Tensor, name: str = "mask") -> None:
    """Float weights must be finite and non-negative; one min/max reduction when they are."""
    if not mask.is_floating_point() or mask.numel() == 0:
        return
    with torch.no_grad():
        lo, hi = torch.aminmax(mask)
        ok = torch.isfinite(torch.stack([lo, hi])).all() & (lo >= 0)
    if bool(ok):
        return
    _checks.check_finite(name, mask)
    bad = int((mask < 0).sum())
    raise ValueError(f"{name} must hold non-negative weights, got {bad} negative value(s) "
                     f"(min {float(mask.min()):.4g})")


def _fwd_impl(x: torch.Tensor, mask: torch.Tensor, normalize: bool, eps: float, keep_fp32: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # x is not scanned for NaN/inf: that would be a second full read of the largest tensor, and
    # this op exists to read it once.  Non-finite values under a nonzero weight propagate into the
    # output on every backend; terms under weight 0 are skipped on every backend (each one redoes
    # a weighted sum that came out non-finite without them: the contract in the module docstring).
    check_weights(mask)
    lowp = x.dtype != torch.float32
    keep = lowp and (keep_fp32 or normalize)
    if _backend(x) == "triton":  # one launch (two with normalize) writes out in x's dtype
        out, out32, aux = _forward_triton(x, mask.to(torch.float32) if mask.dtype == torch.float64 else mask,
                                          normalize, eps, x.dtype, keep)
    else:
        out32, aux = pool_forward(x, mask, normalize, eps)
        out = out32.to(x.dtype)
    # outputs may not alias: the fp32 copy is empty when out is fp32 itself or nobody reads it
    return out, (out32 if keep else x.new_empty((0,), dtype=torch.float32)), aux


def _bwd_impl(grad_out, x, mask, out, aux, normalize, eps, need_mask_grad) -> tuple[torch.Tensor, torch.Tensor]:
    gx, gm = pool_backward(grad_out, x, mask, out, aux, normalize, eps, need_mask_grad)
    if gm is None:
        gm = x.new_empty((0,), dtype=torch.float32)
    return gx, gm


@torch.library.custom_op("solar::masked_pool_fwd", mutates_args=())
def _masked_pool_fwd_op(x: torch.Tensor, mask: torch.Tensor, normalize: bool, eps: float, keep_fp32: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """masked_pool with mask [V, B, L]: (out [V, B, D] in x's dtype, out32, aux [2, V, B] as in
    :func:`pool_forward`).  out32 is the fp32 output when x is float16 / bfloat16 and
    `keep_fp32` or `normalize` (the backward reads it), else an empty tensor (out is fp32
    already, or nothing needs it).  Checks that the weights are finite and non-negative (x is
    not scanned: see :func:`_fwd_impl`)."""
    return _fwd_impl(x, mask, normalize, eps, keep_fp32)


@_masked_pool_fwd_op.register_fake
def _(x, mask, normalize, eps, keep_fp32):
    V, B, _ = mask.shape
    keep = x.dtype != torch.float32 and (keep_fp32 or normalize)
    f32 = dict(dtype=torch.float32)
    return (x.new_empty((V, B, x.shape[2])), x.new_empty((V, B, x.shape[2]) if keep else (0,), **f32),
            x.new_empty((2, V, B), **f32))


@torch.library.custom_op("solar::masked_pool_bwd", mutates_args=())
def _masked_pool_bwd_op(grad_out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, out: torch.Tensor,
                        aux: torch.Tensor, normalize: bool, eps: float, need_mask_grad: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Custom-op form of :func:`pool_backward`; grad_mask is an empty tensor when not needed."""
    return _bwd_impl(grad_out, x, mask, out, aux, normalize, eps, need_mask_grad)


@_masked_pool_bwd_op.register_fake
def _(grad_out, x, mask, out, aux, normalize, eps, need_mask_grad):
    gm = x.new_empty(mask.shape if need_mask_grad else (0,), dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), gm


def _plain_eager(*tensors) -> bool:
    """True when nothing traces or fakes these tensors: not compiling, no Python dispatch mode,
    plain torch.Tensor instances (not FakeTensor / FunctionalTensor / other subclasses)."""
    return (not torch.compiler.is_compiling() and _current_dispatch_mode() is None
            and all(type(t) is torch.Tensor for t in tensors))


def _setup_context(ctx, inputs, output):
    x, mask, normalize, eps, _keep = inputs
    out, out32, aux = output
    ctx.save_for_backward(x, mask, out, out32, aux)
    ctx.normalize, ctx.eps = normalize, eps
    ctx.mark_non_differentiable(out32, aux)


def _backward(ctx, grad_out, _grad_out32, _grad_aux):
    """Gradients of solar::masked_pool_fwd's out for x and a float mask, by solar::masked_pool_bwd."""
    x, mask, out, out32, aux = ctx.saved_tensors
    need_x, need_mask = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    # the fp32 output when it was kept; out itself when fp32 (or when a direct caller of the op
    # did not keep it: the reduced-precision output then stands in)
    o32 = out32 if out32.numel() else out.to(torch.float32)
    # eager backward on plain tensors calls the op's body directly (the dispatcher's custom-op
    # layers cost more than the CPU kernel at small shapes); traced / faked / under a dispatch
    # mode it goes through solar::masked_pool_bwd, which torch.compile and opcheck see
    bwd = _bwd_impl if _plain_eager(grad_out, x, mask) else torch.ops.solar.masked_pool_bwd
    gx, gm = bwd(grad_out.to(torch.float32), x, mask, o32, aux, ctx.normalize, ctx.eps, bool(need_mask))
    return (gx if need_x else None), (gm.to(mask.dtype) if need_mask else None), None, None, None


# The one autograd path: masked_pool, direct callers of torch.ops.solar.masked_pool_fwd, opcheck
# and torch.compile all differentiate the op through this.
torch.library.register_autograd("solar::masked_pool_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# The checked public entry point
# ----------------------------------------------------------------------------------------
def validate(x, mask, eps, names=("x", "mask")):
    """Check masked_pool's arguments (not their values: see :func:`_fwd_impl`).  `names`: how
    errors call x and mask (pooled_contrastive_loss passes xq/mask_q and xk/mask_k)."""
    xn, mn = names
    _checks.check_tensor(xn, x)
    _checks.check_tensor(mn, mask)
    if not x.is_floating_point() or x.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{xn} must be float32, float16 or bfloat16, got {str(x.dtype).replace('torch.', '')}")
    if mask.dtype not in MASK_DTYPES:
        raise TypeError(f"{mn} must be bool or floating (non-negative weights), got "
                        f"{str(mask.dtype).replace('torch.', '')}")
    _checks.check_tensor(xn, x, ndim=3)
    _checks.check_tensor(mn, mask, ndim=(2, 3))
    _checks.check_same_device(**{xn: x, mn: mask})
    if tuple(mask.shape[-2:]) != tuple(x.shape[:2]):
        raise ValueError(f"{mn} must have shape [B, L] or [V, B, L] matching {xn} [B, L, D] = {tuple(x.shape)}, "
                         f"got {mn} of shape {tuple(mask.shape)}")
    if _checks.as_float("eps", eps) <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if mask.dtype == torch.bool and mask.requires_grad:  # pragma: no cover - torch forbids it
        raise TypeError(f"{mn}: a bool mask cannot require grad")


def masked_pool(x: torch.Tensor, mask: torch.Tensor, *, normalize: bool = False, eps: float = 1e-6
                ) -> torch.Tensor:
    """Masked mean of token rows, for one mask or V masks in one pass over x.

    Args:
        x:    [B, L, D] float32 / float16 / bfloat16, any strides.
        mask: [B, L] or [V, B, L], bool, or floating non-negative weights (may require grad).
        normalize: divide each output row by max(||row||_2, eps).
        eps:  floor of the norm (> 0).

    Returns:
        [B, D] (2-D mask) or [V, B, D] (3-D mask) in x's dtype, accumulated in float32:
        ``out[v, b] = sum_l mask[v, b, l] x[b, l] / sum_l mask[v, b, l]``; a row whose mask
        sums to less than the smallest normal float32 (``torch.finfo(torch.float32).tiny``,
        about 1.18e-38; 0 included) is empty and gives zeros, as does its gradient.

    Non-finite x (the same on every backend; x is not scanned for them, which would cost a
    second read of it): a NaN or inf in ``x[b, l]`` under a nonzero weight propagates into
    ``out[v, b]`` (the features it is in, IEEE-style; with ``normalize=True`` through the norm
    into the whole row); under a zero weight it is ignored, as if it were 0.  (The backward is
    not covered: gradients through a non-finite output row may be NaN anywhere in batch row b.)

    Raises:
        TypeError: x not a float16/bfloat16/float32 tensor; mask not bool/floating.
        ValueError: wrong rank, mask's [B, L] not matching x, tensors on different devices,
            negative or non-finite mask weights, eps <= 0.
    """
    validate(x, mask, eps)
    squeeze = mask.dim() == 2
    mask3 = mask.unsqueeze(0) if squeeze else mask
    grad = torch.is_grad_enabled() and (x.requires_grad or mask.requires_grad)
    if not grad and _plain_eager(x, mask):
        # no autograd to record and nothing tracing: the op's body without the dispatcher's
        # custom-op layers (they cost more than the CPU kernel at small shapes)
        out = _fwd_impl(x, mask3, bool(normalize), float(eps), False)[0]
    else:
        # the backward reads the fp32 output for the normalisation and the mask gradient
        keep = bool(normalize) or (grad and mask.requires_grad)
        out, _, _ = torch.ops.solar.masked_pool_fwd(x, mask3, bool(normalize), float(eps), keep)
    return out.squeeze(0) if squeeze else out
