"""masked_pool: forward and backward of every backend against an fp64 reference.

Oracle (STYLE.md): the kernel's max error against the fp64 reference must be at most
twice the max error of plain PyTorch computing the same thing in the input dtype, plus
a small atol; failures report how many elements fail and the worst one.
Backends: "native" (C++), "torch" (chunked PyTorch) and "triton" (interpreted on CPU,
compiled on CUDA).
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import solar_kernels
from solar_kernels import _ext, masked_pool, use_backend
from solar_kernels.nn import MaskedPool
from solar_kernels.ops import masked_pool as mp
from solar_kernels.ops.masked_pool import MAX_V_PER_PASS, pool_backward, pool_forward
from solar_kernels.reference import masked_pool_reference

from oracle import assert_close_to_fp64  # tests/oracle.py (on sys.path: conftest.py)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}

if DEVICE.type == "cuda":
    BACKENDS = ["triton", "torch"]
else:
    BACKENDS = ["native", "torch"]
    if os.environ.get("TRITON_INTERPRET") == "1":
        BACKENDS.append("triton")


def _backend_param(name):
    marks = []
    if name == "native" and not _ext.available("masked_pool_forward_cpu"):
        marks.append(pytest.mark.skip(reason=f"native extension unavailable: {_ext.load_error}"))
    return pytest.param(name, marks=marks, id=name)


BACKEND_PARAMS = [_backend_param(b) for b in BACKENDS]


def make_inputs(seed, B, L, D, V, dtype, *, mask_kind="float", mask_ndim=3, noncontig=False, zero_rows=False,
                device=DEVICE):
    """x [B, L, D] and mask ([V,] B, L) built from `seed` (hypothesis draws shapes, not tensors)."""
    g = torch.Generator().manual_seed(seed)
    if noncontig:  # D is not the innermost dimension in memory, and L rows are strided
        x = torch.randn(B, D, 2 * L, generator=g)[:, :, ::2].transpose(1, 2)
    else:
        x = torch.randn(B, L, D, generator=g)
    x = x.to(device=device, dtype=dtype)
    shape = (V, B, L) if mask_ndim == 3 else (B, L)
    keep = torch.rand(shape, generator=g) > 0.3
    if mask_kind == "bool":
        mask = keep
    else:
        mask = torch.rand(shape, generator=g) * keep
    if zero_rows:
        mask[..., 0, :] = 0  # batch row 0 is fully masked out in every view
    return x, mask.to(device)


def check_case(backend, x, mask, normalize, *, mask_grad, eps=1e-6):
    """Forward and backward of `backend` against the fp64 reference and plain PyTorch in x's dtype."""
    dtype = x.dtype
    atol = ATOL[dtype]
    x = x.detach().requires_grad_()
    mask = mask.detach()
    if mask_grad:
        mask = mask.requires_grad_()
    inputs = (x, mask) if mask_grad else (x,)

    with use_backend(backend):
        out = masked_pool(x, mask, normalize=normalize, eps=eps)
    assert out.dtype == dtype
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device)

    ref = masked_pool_reference(x, mask, normalize=normalize, eps=eps, dtype=torch.float64)
    plain = masked_pool_reference(x, mask, normalize=normalize, eps=eps)  # plain PyTorch in x's dtype
    assert_close_to_fp64("out", out, ref, plain, atol=atol)
    assert not torch.isnan(out).any()

    with use_backend(backend):
        grads = torch.autograd.grad(out, inputs, g.to(dtype))
    ref_grads = torch.autograd.grad(ref, inputs, g.to(torch.float64))
    plain_grads = torch.autograd.grad(plain, inputs, g.to(dtype))
    assert grads[0].dtype == dtype and grads[0].shape == x.shape
    assert_close_to_fp64("grad_x", grads[0], ref_grads[0], plain_grads[0], atol=atol)
    if mask_grad:
        assert grads[1].dtype == mask.dtype and grads[1].shape == mask.shape
        # the mask gradient sums D products: scale atol with sqrt(D)
        assert_close_to_fp64("grad_mask", grads[1], ref_grads[1], plain_grads[1], atol=atol * max(1.0, x.shape[2] ** 0.5))


SIZES_BL = st.sampled_from([1, 2, 17, 33, 63, 64, 65])
SIZES_D = st.sampled_from([1, 2, 17, 63, 64, 65, 127, 128, 129, 257])
SIZES_V = st.sampled_from([1, 2, 3, 5, MAX_V_PER_PASS + 1])
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
# the ci profile's 12 examples per backend cover too few of the ~10^5 shape combinations
N_EXAMPLES = 30 if settings.default.max_examples <= 12 else settings.default.max_examples


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@settings(max_examples=N_EXAMPLES)
@given(
    B=st.sampled_from([1, 2, 3, 17]), L=SIZES_BL, D=SIZES_D, V=SIZES_V, dtype=DTYPES,
    mask_kind=st.sampled_from(["bool", "float"]), mask_ndim=st.sampled_from([2, 3]),
    normalize=st.booleans(), noncontig=st.booleans(), zero_rows=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@example(B=2, L=65, D=129, V=MAX_V_PER_PASS + 1, dtype=torch.float32, mask_kind="float", mask_ndim=3,
         normalize=True, noncontig=True, zero_rows=True, seed=1)
@example(B=1, L=1, D=1, V=1, dtype=torch.bfloat16, mask_kind="bool", mask_ndim=2,
         normalize=False, noncontig=False, zero_rows=False, seed=2)
@example(B=3, L=64, D=64, V=3, dtype=torch.float16, mask_kind="float", mask_ndim=3,
         normalize=True, noncontig=False, zero_rows=False, seed=3)
def test_forward_backward(backend, B, L, D, V, dtype, mask_kind, mask_ndim, normalize, noncontig, zero_rows, seed):
    if backend == "triton" and DEVICE.type == "cpu":  # the interpreter is slow: keep the tiles few
        B, L, D = min(B, 3), min(L, 65), min(D, 129)
    x, mask = make_inputs(seed, B, L, D, V, dtype, mask_kind=mask_kind, mask_ndim=mask_ndim,
                          noncontig=noncontig, zero_rows=zero_rows)
    check_case(backend, x, mask, normalize, mask_grad=mask_kind == "float")


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend not available here")
@pytest.mark.parametrize("normalize", [False, True])
def test_triton_several_d_tiles(monkeypatch, normalize):
    """The forward grid's third axis splits D into BLOCK_D tiles.  Under the interpreter BLOCK_D
    is next_pow2(D) (one tile), so force BLOCK_D = 16 with D = 40: three tiles, the last partial."""
    import triton

    from solar_kernels.ops import masked_pool as mp

    real = mp._fwd_blocks

    def small_d_tiles(V, D, x):
        bv, _, nw = real(V, D, x)
        return bv, 16, nw

    monkeypatch.setattr(mp, "_fwd_blocks", small_d_tiles)
    D = 40
    assert triton.cdiv(D, mp._fwd_blocks(3, D, torch.empty(1))[1]) == 3
    x, mask = make_inputs(31, 3, 17, D, 3, torch.float32)
    check_case("triton", x, mask, normalize, mask_grad=True)
    xb, maskb = make_inputs(32, 2, 9, D, 2, torch.bfloat16, mask_kind="bool", noncontig=True)
    check_case("triton", xb, maskb, normalize, mask_grad=False)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("normalize", [False, True])
def test_all_zero_masks_give_zeros(backend, normalize):
    x, _ = make_inputs(0, 3, 17, 65, 2, torch.float32)
    mask = torch.zeros(2, 3, 17, device=DEVICE, requires_grad=True)
    xg = x.requires_grad_()
    with use_backend(backend):
        out = masked_pool(xg, mask, normalize=normalize)
        gx, gm = torch.autograd.grad(out.sum(), (xg, mask))
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(gx, torch.zeros_like(gx))
    assert torch.equal(gm, torch.zeros_like(gm))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_normalize_rows_with_norm_below_eps(backend):
    """normalize=True where pooled rows have a nonzero norm <= eps: the floor max(||row||, eps)
    is then a constant, so the gradient is grad_out / eps with no projection term (a backward
    that projects whenever the norm is merely > 0 is wrong by ~1e-4 relative here)."""
    x, mask = make_inputs(21, 3, 17, 33, 2, torch.float32)
    x = x * 1e-8  # pooled norms ~1e-8, far below eps = 1e-6 but not zero
    mask[1, 2] = 0  # and one zero-weight row
    check_case(backend, x, mask, True, mask_grad=True)
    # ordinary tokens under an eps above every pooled norm (outputs of order 1, not 1e-2)
    x2, mask2 = make_inputs(22, 3, 17, 33, 1, torch.float32)
    with torch.no_grad():
        n = masked_pool_reference(x2, mask2, dtype=torch.float64).norm(dim=-1)
    assert float(n.min()) > 0
    check_case(backend, x2, mask2, True, mask_grad=True, eps=float(n.max()) * 1.5)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("shape", [(2, 0, 4), (2, 3, 0), (0, 3, 4)], ids=str)
def test_empty_dimensions(backend, shape):
    x = torch.randn(*shape, device=DEVICE, requires_grad=True)
    mask = torch.rand(2, shape[0], shape[1], device=DEVICE, requires_grad=True)
    with use_backend(backend):
        out = masked_pool(x, mask, normalize=True)
        gx, gm = torch.autograd.grad(out.sum(), (x, mask))
    assert out.shape == (2, shape[0], shape[2]) and not out.any()
    assert gx.shape == x.shape and gm.shape == mask.shape and not gm.any()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_strided_mask_and_reduced_precision_weights(backend):
    x, _ = make_inputs(5, 3, 33, 40, 1, torch.float32)
    base = torch.rand(33, 3, 2, generator=torch.Generator().manual_seed(116)).to(DEVICE)
    mask = base.permute(2, 1, 0)  # [2, 3, 33] with no unit stride
    for m in (mask, mask.to(torch.bfloat16), mask.to(torch.float64)):
        check_case(backend, x, m, False, mask_grad=True)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_launcher_interface(backend):
    """The no-autograd launchers shared with pooled_contrastive_loss: shapes, dtypes, None grad."""
    x, mask = make_inputs(11, 3, 17, 33, 2, torch.bfloat16, mask_kind="bool")
    with use_backend(backend):
        out, aux = pool_forward(x, mask, True, 1e-6)
        assert out.shape == (2, 3, 33) and out.dtype == torch.float32
        assert aux.shape == (2, 2, 3) and aux.dtype == torch.float32
        assert torch.allclose(aux[0], mask.float().sum(-1))
        assert torch.allclose(out.norm(dim=-1), torch.ones(2, 3, device=DEVICE), atol=1e-5)
        gx, gm = pool_backward(torch.randn_like(out), x, mask, out, aux, True, 1e-6, False)
        assert gx.shape == x.shape and gx.dtype == x.dtype and gm is None
        gx, gm = pool_backward(torch.randn_like(out), x, mask.float(), out, aux, True, 1e-6, True)
        assert gm.shape == mask.shape and gm.dtype == torch.float32


def test_backends_agree_and_module():
    x, mask = make_inputs(3, 4, 40, 96, 3, torch.float32)
    outs = {}
    for b in BACKENDS:
        with use_backend(b):
            outs[b] = masked_pool(x, mask, normalize=True)
    for b, o in outs.items():
        torch.testing.assert_close(o, outs[BACKENDS[0]], rtol=1e-5, atol=1e-6, msg=f"backend {b}")
    mod = MaskedPool(normalize=True)
    torch.testing.assert_close(mod(x, mask), outs[BACKENDS[0]], rtol=1e-5, atol=1e-6)
    assert solar_kernels.functional.masked_pool is masked_pool
    assert "normalize=True" in repr(mod)


@pytest.mark.skipif(not _ext.available("masked_pool_grad_cache_mb"), reason="native extension unavailable")
def test_native_grad_buffer_recycling():
    """Recycled grad_x buffers (>= 4 MiB) are reused and never leak stale values."""
    from solar_kernels.ops.masked_pool import grad_buffer_cache_mb

    prev = grad_buffer_cache_mb(64)
    try:
        assert grad_buffer_cache_mb() == 64
        x, mask = make_inputs(4, 6, 256, 768, 2, torch.float32, device="cpu")  # 4.7 MB grad_x
        mask[:, :, 100:] = 0  # padded rows must come back as zeros, not as the previous grad
        x.requires_grad_()
        with use_backend("native"):
            g1 = torch.autograd.grad(masked_pool(x, mask).sum(), x)[0]
            ptr, want = g1.data_ptr(), g1.clone()
            g1.fill_(123.0)
            del g1
            g2 = torch.autograd.grad(masked_pool(x, mask).sum(), x)[0]
        assert g2.data_ptr() == ptr, "the freed buffer was not reused"
        torch.testing.assert_close(g2, want, rtol=0, atol=0)
        grad_buffer_cache_mb(0)  # frees the cache; later buffers come from torch's allocator
        del g2
        with use_backend("native"):
            g3 = torch.autograd.grad(masked_pool(x, mask).sum(), x)[0]
        torch.testing.assert_close(g3, want, rtol=0, atol=0)
    finally:
        grad_buffer_cache_mb(prev)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_opcheck(backend):
    """torch.library.opcheck on both custom ops (schema, fake kernels, dispatch, and the forward
    op's registered autograd with x and a float mask requiring grad), on every backend."""
    x, mask = make_inputs(1, 2, 17, 33, 2, torch.float32)
    with use_backend(backend):
        out, out32, aux = torch.ops.solar.masked_pool_fwd(x, mask, True, 1e-6, True)
        assert out32.numel() == 0  # fp32 x: out is the fp32 output
        xg, mg = x.clone().requires_grad_(), mask.clone().requires_grad_()
        torch.library.opcheck(torch.ops.solar.masked_pool_fwd.default, (xg, mg, True, 1e-6, True))
        xb = x.to(torch.bfloat16).requires_grad_()
        for normalize, keep in ((False, False), (False, True), (True, False)):
            torch.library.opcheck(torch.ops.solar.masked_pool_fwd.default, (xb, mask > 0.5, normalize, 1e-6, keep))
        torch.library.opcheck(torch.ops.solar.masked_pool_fwd.default, (xb, mg.to(torch.bfloat16), False, 1e-6, True))
        g = torch.randn_like(out)
        torch.library.opcheck(torch.ops.solar.masked_pool_bwd.default, (g, x, mask, out, aux, True, 1e-6, True))
        torch.library.opcheck(torch.ops.solar.masked_pool_bwd.default, (g, x, mask, out, aux, False, 1e-6, False))


def test_one_autograd_path():
    """masked_pool differentiates through the autograd registered on solar::masked_pool_fwd
    (no autograd.Function of its own): the output's grad_fn is the op's."""
    x, mask = make_inputs(2, 2, 5, 8, 1, torch.float32)
    out = masked_pool(x.requires_grad_(), mask.requires_grad_())
    assert "masked_pool_fwd" in type(out.grad_fn).__name__ or "masked_pool_fwd" in out.grad_fn.name()
    assert not hasattr(mp, "_MaskedPoolFunction")


def test_torch_compile_traces_it():
    """torch.compile (fullgraph) sees the custom ops through their fake kernels; grads match eager."""
    x, mask = make_inputs(2, 3, 17, 33, 2, torch.float32)
    x.requires_grad_()
    mask.requires_grad_()

    def f(a, m):
        return masked_pool(a, m, normalize=True).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    ge = torch.autograd.grad(f(x, mask), (x, mask))
    gc = torch.autograd.grad(compiled(x, mask), (x, mask))
    for a, b in zip(ge, gc):
        torch.testing.assert_close(a, b)


# ---- bad input ----------------------------------------------------------------------------
def _bad_cases():
    x = torch.randn(2, 5, 4)
    m = torch.ones(2, 5)
    return [
        ("x rank", torch.randn(2, 5), m, ValueError, "x must have 3 dimensions"),
        ("mask rank 1", x, torch.ones(5), ValueError, "mask must have 2 or 3 dimensions"),
        ("mask rank 4", x, torch.ones(1, 1, 2, 5), ValueError, "mask must have 2 or 3 dimensions"),
        ("B mismatch", x, torch.ones(3, 5), ValueError, "mask must have shape"),
        ("L mismatch", x, torch.ones(3, 2, 6), ValueError, "mask must have shape"),
        ("negative weight", x, torch.tensor([[1.0, -0.5, 1, 1, 1], [1, 1, 1, 1, 1]]), ValueError, "non-negative"),
        ("integer x", torch.ones(2, 5, 4, dtype=torch.int64), m, TypeError, "x must be float32"),
        ("float64 x", x.double(), m, TypeError, "x must be float32"),
        ("integer mask", x, torch.ones(2, 5, dtype=torch.int32), TypeError, "mask must be bool or floating"),
        ("not a tensor", x, [[1.0] * 5] * 2, TypeError, "mask must be a torch.Tensor"),
        ("mixed devices", x, torch.ones(2, 5, device="meta"), ValueError, "same device"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input(case):
    _, x, mask, exc, msg = case
    with pytest.raises(exc, match=msg):
        masked_pool(x, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_values_raise_on_every_backend(backend):
    """NaN/inf weights raise on every backend; NaN in x under a nonzero weight comes out as NaN
    on every backend (x is deliberately not scanned: a second full read of it)."""
    x = torch.randn(2, 5, 4, device=DEVICE)
    mask = torch.ones(2, 5, device=DEVICE)
    mask[:, 4] = 0
    inf_mask = mask.clone()
    inf_mask[1, 2] = float("inf")
    x_nan = x.clone()
    with use_backend(backend):
        with pytest.raises(ValueError, match=r"mask has 10 non-finite value\(s\)"):
            masked_pool(x, torch.full((2, 5), float("nan"), device=DEVICE))
        with pytest.raises(ValueError, match=r"mask has 3 non-finite value\(s\)"):
            masked_pool(x, inf_mask[None].expand(3, 2, 5))
        x_nan[1, 1, 2] = float("nan")  # under weight 1: row 1 of the result is NaN in column 2 only
        out = masked_pool(x_nan, mask)
        assert bool(torch.isnan(out[1, 2])) and bool(torch.isfinite(out[1, [0, 1, 3]]).all())


def test_numpy_eps_is_accepted():
    np = pytest.importorskip("numpy")
    x, m = torch.randn(2, 3, 4), torch.ones(2, 3)
    torch.testing.assert_close(masked_pool(x, m, normalize=True, eps=np.float32(1e-6)),
                               masked_pool(x, m, normalize=True, eps=1e-6))


def test_use_backend_documents_every_backend():
    from solar_kernels._dispatch import BACKENDS as NAMES

    doc = use_backend.__doc__
    for name in NAMES:
        assert f'``"{name}"``' in doc, name
    assert "Raises:" in doc and "SOLAR_BACKEND" in doc


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan")])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        masked_pool(torch.randn(2, 3, 4), torch.ones(2, 3), normalize=True, eps=eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_gradient_rounds_half_to_even(backend):
    """grad_x = grad_out * w / sum(w) = 1.0234375 * 0.75 = 0.767578125 lies exactly halfway
    between the bf16 neighbours 0.765625 and 0.76953125: the store must round to even (the
    tolerance of the other tests allows one bf16 ulp and cannot see this)."""
    x = torch.zeros(1, 2, 4, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    mask = torch.tensor([[1.0, 3.0]], device=DEVICE)
    with use_backend(backend):
        out = masked_pool(x, mask, normalize=False)
        out.backward(torch.full_like(out, 1.0234375))
    assert x.grad.dtype == torch.bfloat16
    assert x.grad[0, 1].tolist() == [0.765625] * 4
    assert x.grad[0, 0].tolist() == [0.255859375] * 4  # 1.0234375 / 4, exact in bf16


@pytest.mark.skipif(not (mp.HAS_TRITON and (DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")),
                    reason="needs Triton (CUDA or the interpreter)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("normalize", [False, True])
def test_triton_forward_launches_nothing_it_does_not_need(monkeypatch, normalize, dtype):
    """The public op's Triton forward (autograd on, bool mask) is one kernel launch without
    normalize (no fill of aux, no norm: nothing reads the norm then; no cast: the kernel stores
    x's dtype) and one more with it.  The kernels are replaced by recorders and every aten op
    the op runs is logged, so only its own work counts."""
    from torch.utils._python_dispatch import TorchDispatchMode

    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(self.name)

    for name in ("pool_fwd_kernel", "pool_norm_kernel"):
        monkeypatch.setattr(mp, name, Recorder(name))
    ops = []

    class LogOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    x, mask = make_inputs(3, 4, 9, 40, 2, dtype, mask_kind="bool")
    x.requires_grad_()
    free = ("aten.empty", "aten.select", "aten.view", "aten.detach", "aten.new_empty", "aten.alias")
    with LogOps(), use_backend("triton"):
        out = masked_pool(x, mask, normalize=normalize)
    assert out.dtype == dtype and out.requires_grad
    # the op is one dispatcher call (the mode does not see inside it: its body is logged below)
    assert [op for op in ops if op not in free] == ["solar.masked_pool_fwd"], ops
    assert launches == ["pool_fwd_kernel"] + (["pool_norm_kernel"] if normalize else [])
    ops.clear()
    with LogOps(), use_backend("triton"):
        mp._fwd_impl(x.detach(), mask, normalize, 1e-6, True)
    computing = [op for op in ops if op not in free]
    assert not computing, f"the forward runs torch ops (each a kernel launch on a GPU): {computing}"


@pytest.mark.skipif(not (mp.HAS_TRITON and (DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")),
                    reason="needs Triton (CUDA or the interpreter)")
def test_triton_forward_aux_without_normalize():
    """aux[0] holds the mask sums and aux[1] zeros (written by the forward kernel, not a fill)."""
    x, mask = make_inputs(5, 3, 11, 20, 2, torch.float32, mask_kind="float")
    with use_backend("triton"):
        out, aux = pool_forward(x, mask, False, 1e-6)
        low, low32, low_aux = mp._forward_triton(x.to(torch.bfloat16), mask, False, 1e-6, torch.bfloat16, False)
    assert low32 is None and low.dtype == torch.bfloat16
    assert torch.equal(low_aux[1], torch.zeros_like(low_aux[1]))
    torch.testing.assert_close(aux[0], mask.float().sum(-1))
    assert torch.equal(aux[1], torch.zeros_like(aux[1]))
    torch.testing.assert_close(out, masked_pool_reference(x, mask).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend not available here")
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float16, torch.bfloat16])
def test_triton_word_mask_loads_at_every_alignment(mask_dtype):
    """The forward reads byte / half-word masks as aligned 32-bit words and funnel-shifts rows
    that start mid-word into place: masks whose storage starts 0-3 elements into a buffer (so
    every row start alignment occurs), L not a multiple of the word, the last word inside the
    storage (word path) and past it (element fallback)."""
    es = torch.empty((), dtype=mask_dtype).element_size()
    for off in range(4):
        for L, pad in ((5, 4), (77, 4), (8, 0), (3, 0)):
            V, B, D = 3, 2, 24
            g = torch.Generator().manual_seed(100 * off + L)
            x = torch.randn(B, L, D, generator=g)
            flat = torch.rand(off + V * B * L + pad, generator=g)
            flat = (flat > 0.4) if mask_dtype == torch.bool else (flat * (flat > 0.4)).to(mask_dtype)
            mask = flat[off:off + V * B * L].view(V, B, L)
            end_byte = (off + V * B * L) * es
            expect_words = -(-end_byte // 4) * 4 <= flat.numel() * es
            assert (mp._mask_word_elems(mp._mask_for_triton(mask)) > 0) == expect_words, (off, L, pad)
            check_case("triton", x, mask, False, mask_grad=False)
    strided = torch.rand(2, 3, 10)[..., ::2] > 0.5  # L not contiguous: element loads
    assert mp._mask_word_elems(mp._mask_for_triton(strided)) == 0
    assert mp._mask_word_elems(torch.rand(2, 3, 8)) == 0  # fp32: 4 bytes a load already


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_no_grad_forward_skips_the_dispatcher(backend):
    """Without autograd to record, eager masked_pool calls the op's body directly (no
    solar::masked_pool_fwd dispatch: its custom-op layers cost more than small CPU kernels)
    and returns what the op returns; with grad it goes through the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    x, mask = make_inputs(4, 3, 9, 20, 2, torch.bfloat16, mask_kind="float")
    with use_backend(backend):
        with torch.no_grad():
            fast = masked_pool(x, mask, normalize=True)
        via_op = torch.ops.solar.masked_pool_fwd(x, mask, True, 1e-6, False)[0]
        assert torch.equal(fast, via_op)
        seen = []

        class Log(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                seen.append(str(func.overloadpacket))
                return func(*args, **(kwargs or {}))

        with Log():
            masked_pool(x.requires_grad_(), mask)
    assert "solar.masked_pool_fwd" in seen
