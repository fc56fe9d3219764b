"""contrastive_loss(q, k, offset=...): N rows against M >= N columns, against the fp64 reference.

Both implementations are tested on every machine: the chunked PyTorch path ("torch"; the
"native" CPU backend of contrastive_loss is the same path) and the Triton kernels ("triton":
compiled on CUDA, interpreted on CPU tensors).  The reference's rectangular form is itself
pinned to plain ``F.cross_entropy`` on the [N, M] logits (test_reference_is_cross_entropy).
"""
import os

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import solar_kernels as sk
from solar_kernels import _dispatch
from solar_kernels import nn as snn
from solar_kernels.reference import contrastive_loss_reference

# tests/oracle.py (on sys.path: conftest.py)
from oracle import assert_close_to_fp64, assert_contrastive_loss_matches_reference, assert_mined_loss_matches_fp64

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

BACKENDS = ["torch", "triton"]


def _dev():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _offset(where: str, n: int, m: int) -> int:
    return {"start": 0, "middle": (m - n) // 2, "end": m - n}[where]


def _groups(kind: str, m: int, gen: torch.Generator):
    """[M] column groups: none, pairs of neighbouring columns, or few random groups."""
    if kind == "none":
        return None
    if kind == "pairs":
        return torch.arange(m) // 2
    if kind == "uneven":
        return torch.randint(0, max(1, m // 3), (m,), generator=gen)
    raise AssertionError(kind)


def _make(n, m, d, h, dtype, seed, gkind):
    gen = torch.Generator().manual_seed(seed)
    dev = _dev()
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    k = torch.nn.functional.normalize(torch.randn(m, d, generator=gen), dim=1)
    hn = torch.nn.functional.normalize(torch.randn(n, h, d, generator=gen), dim=2) if h else None
    g = _groups(gkind, m, gen)
    cast = lambda t: None if t is None else t.to(dev, dtype).requires_grad_()  # noqa: E731
    return cast(q), cast(k), cast(hn), (g.to(dev) if g is not None else None)


def _expected_error(n, m, off, h, groups, mine_k):
    """The ValueError the inputs must raise, or None (rows' groups are their columns')."""
    if groups is not None:
        counts = (groups[off:off + n, None] == groups[None, :]).sum(1)
    else:
        counts = torch.ones(n, dtype=torch.int64)
    neg = m - counts + h
    if int(neg.max()) == 0:
        return "no row has a negative"
    if mine_k > int(neg.min()):
        return "mine_k"
    return None


def _run_vs_reference(backend, n, extra, where, d, h, dtype, temperature, hardness, gkind, symmetric, mine_k,
                      seed):
    m = n + extra
    off = _offset(where, n, m)
    q, k, hn, groups = _make(n, m, d, h, dtype, seed, gkind)
    kw = dict(groups=groups, temperature=temperature, symmetric=symmetric, hardness=hardness, mine_k=mine_k,
              offset=off)
    assert_contrastive_loss_matches_reference(backend, q, k, hn, kw, _expected_error(n, m, off, h, groups, mine_k))


_strategy = dict(
    n=st.sampled_from([1, 2, 17, 65]), extra=st.sampled_from([0, 1, 5, 40]),
    where=st.sampled_from(["start", "middle", "end"]), d=st.sampled_from([1, 8, 33]), h=st.sampled_from([0, 2]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    temperature=st.sampled_from([0.05, 0.1, 1.0]), hardness=st.sampled_from([0.0, 0.5, 2.0]),
    gkind=st.sampled_from(["none", "pairs", "uneven"]), symmetric=st.booleans(),
    mine_k=st.sampled_from([0, 1, 3]), seed=st.integers(0, 2 ** 16))


@settings(max_examples=30)
@given(**_strategy)
@example(n=17, extra=40, where="middle", d=33, h=2, dtype=torch.float32, temperature=0.05, hardness=0.5,
         gkind="uneven", symmetric=True, mine_k=3, seed=0)
@example(n=65, extra=5, where="end", d=8, h=0, dtype=torch.float32, temperature=0.1, hardness=0.0,
         gkind="none", symmetric=True, mine_k=0, seed=1)
@example(n=2, extra=40, where="start", d=8, h=0, dtype=torch.bfloat16, temperature=0.1, hardness=2.0,
         gkind="pairs", symmetric=False, mine_k=1, seed=2)
def test_torch_backend_vs_reference(n, extra, where, d, h, dtype, temperature, hardness, gkind, symmetric, mine_k,
                                    seed):
    _run_vs_reference("torch", n, extra, where, d, h, dtype, temperature, hardness, gkind, symmetric, mine_k, seed)


@settings(max_examples=20 if torch.cuda.is_available() else 12)
@given(**_strategy)
@example(n=65, extra=40, where="middle", d=33, h=2, dtype=torch.bfloat16, temperature=0.05, hardness=2.0,
         gkind="pairs", symmetric=True, mine_k=3, seed=3)
@example(n=17, extra=5, where="end", d=8, h=0, dtype=torch.float32, temperature=0.1, hardness=0.0,
         gkind="none", symmetric=True, mine_k=1, seed=4)
@example(n=17, extra=40, where="start", d=8, h=2, dtype=torch.float16, temperature=0.1, hardness=0.5,
         gkind="none", symmetric=False, mine_k=3, seed=5)
def test_triton_backend_vs_reference(n, extra, where, d, h, dtype, temperature, hardness, gkind, symmetric, mine_k,
                                     seed):
    _run_vs_reference("triton", n, extra, where, d, h, dtype, temperature, hardness, gkind, symmetric, mine_k,
                      seed)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="needs the Triton interpreter (TRITON_INTERPRET=1) or a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_with_the_cuda_settings(dtype):
    """The rectangle under exactly the blocks, warps and rounding a CUDA device gets (64-row
    blocks: 70 rows and 200 columns straddle them; the offset is not a block multiple), with
    groups, hard negatives, hardness, mining and both directions."""
    n, m, off = 70, 200, 37
    q, k, hn, groups = _make(n, m, 16, 2, dtype, 13, "uneven")
    kw = dict(groups=groups, hard_negatives=hn, temperature=0.1, hardness=0.5, mine_k=4, offset=off)
    with _dispatch.kernel_target("cuda"), sk.use_backend("triton"):
        loss, mined = sk.contrastive_loss(q, k, **kw)
        got = torch.autograd.grad(loss, (q, k, hn))
    loss64, (idx64, _) = contrastive_loss_reference(q, k, dtype=torch.float64, **kw)
    ref = torch.autograd.grad(loss64, (q, k, hn))
    losslp = contrastive_loss_reference(q, k, dtype=dtype, **kw)[0]
    plain = torch.autograd.grad(losslp, (q, k, hn))
    assert_close_to_fp64("loss", loss.detach(), loss64.detach(), losslp.detach(), rel_atol=2e-3, ulp=False)
    gscale = max(float(r.abs().max()) for r in ref)
    for nm, a, b, c in zip(("dq", "dk", "dhn"), got, ref, plain):
        assert_close_to_fp64(nm, a, b, c, atol=2e-3 * gscale, rel_atol=2e-3, ulp=False)
    # low-precision logits can reorder near-ties: the mined scores must match, not every index
    agree = (mined.indices.cpu() == idx64.cpu()).float().mean()
    assert agree > 0.9, f"only {float(agree):.0%} of the mined indices agree with the reference"


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """Strided q, transposed k and hard negatives with a permuted layout."""
    gen = torch.Generator().manual_seed(14)
    dev = _dev()
    q = torch.randn(9, 2 * 12, generator=gen).to(dev)[:, ::2].requires_grad_()
    k = torch.randn(12, 30, generator=gen).to(dev).t().requires_grad_()
    hn = torch.randn(2, 9, 12, generator=gen).to(dev).transpose(0, 1).requires_grad_()
    groups = (torch.arange(30) // 3).to(dev)
    kw = dict(groups=groups, hard_negatives=hn, temperature=0.5, hardness=0.5, mine_k=2, offset=11)
    assert_mined_loss_matches_fp64(backend, q, k, hn, kw)


def test_opcheck_rectangle():
    """solar::contrastive_fwd / _bwd with n < M rows, an offset and both directions from one
    pass (schema, fake kernel, autograd registration)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 6, generator=gen, requires_grad=True)
    k = torch.randn(11, 6, generator=gen, requires_grad=True)
    hn = torch.randn(5, 2, 6, generator=gen, requires_grad=True)
    gk = torch.arange(11) // 3
    gq = gk[4:9]
    args = (q, k, gq, gk, hn, 4, 0.1, 0.5, False, True, 2, "torch", 3)
    torch.library.opcheck(torch.ops.solar.contrastive_fwd.default, args)
    row_loss, col_loss, rs, cs, _, _, cache = torch.ops.solar.contrastive_fwd(*args)
    assert row_loss.shape == (5,) and col_loss.shape == (11,) and cache.shape == (3, 11)
    bargs = (torch.ones_like(row_loss), torch.ones_like(col_loss), q.detach(), k.detach(), gq, gk, hn.detach(), rs,
             cs, 4, 0.1, 0.5, False, True, "torch", cache)
    torch.library.opcheck(torch.ops.solar.contrastive_bwd.default, bargs)


@pytest.mark.parametrize("where", ["start", "middle", "end"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_reference_is_cross_entropy(where, symmetric):
    """Without groups, hard negatives or hardness the rectangle is F.cross_entropy on the
    [N, M] logits with targets offset + i; its k->q direction that of the N paired columns
    against the rows (MultipleNegativesSymmetricRankingLoss's backward term).  Both the
    reference and each backend are held to it."""
    n, m, T = 7, 19, 0.1
    off = _offset(where, n, m)
    q, k, _, _ = _make(n, m, 8, 0, torch.float64, 7, "none")
    S = q @ k.t() / T
    tgt = torch.arange(n) + off
    want = torch.nn.functional.cross_entropy(S, tgt)
    if symmetric:
        want = 0.5 * (want + torch.nn.functional.cross_entropy(S.t()[off:off + n], torch.arange(n)))
    ref = contrastive_loss_reference(q, k, temperature=T, symmetric=symmetric, offset=off)
    torch.testing.assert_close(ref, want)
    for backend in BACKENDS + ["native"]:   # "native": contrastive_loss's CPU path is the chunked one
        with sk.use_backend(backend):
            got = sk.contrastive_loss(q.float(), k.float(), temperature=T, symmetric=symmetric, offset=off)
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_square_offset_zero_is_the_two_tower_loss(backend):
    """offset=0 with M == N is the square two-tower loss (value, gradients, mined indices)."""
    q, k, hn, groups = _make(20, 20, 8, 2, torch.float32, 8, "uneven")
    kw = dict(groups=groups, hard_negatives=hn, temperature=0.1, hardness=0.5, mine_k=2)
    with sk.use_backend(backend):
        a, ma = sk.contrastive_loss(q, k, **kw)
        b, mb = sk.contrastive_loss(q, k, offset=0, **kw)
    torch.testing.assert_close(a, b)
    assert torch.equal(ma.indices, mb.indices)
    for x, y in zip(torch.autograd.grad(a, (q, k, hn)), torch.autograd.grad(b, (q, k, hn))):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_columns_without_positive_rows_get_gradient_from_the_rows_only(backend):
    """The k->q direction skips columns without a positive row: the symmetric loss is the mean
    of the row direction and of the paired columns' direction, and the gradient of an unpaired
    column is half its row-direction gradient."""
    n, m, off = 6, 15, 4
    q, k, _, _ = _make(n, m, 8, 0, torch.float32, 9, "none")
    with sk.use_backend(backend):
        sym = sk.contrastive_loss(q, k, temperature=0.2, offset=off)
        rows = sk.contrastive_loss(q, k, temperature=0.2, offset=off, symmetric=False)
        paired = sk.contrastive_loss(k[off:off + n], q, temperature=0.2, symmetric=False)
    torch.testing.assert_close(sym, 0.5 * (rows + paired))
    dk_sym = torch.autograd.grad(sym, k)[0]
    dk_rows = torch.autograd.grad(rows, k)[0]
    unpaired = torch.ones(m, dtype=torch.bool)
    unpaired[off:off + n] = False
    torch.testing.assert_close(dk_sym[unpaired], 0.5 * dk_rows[unpaired])


def test_module_forwards_offset():
    q, k, _, _ = _make(5, 9, 8, 0, torch.float32, 10, "none")
    mod = snn.ContrastiveLoss(temperature=0.2, symmetric=False)
    torch.testing.assert_close(mod(q, k, offset=2), sk.contrastive_loss(q, k, temperature=0.2, symmetric=False,
                                                                      offset=2))


# -- bad inputs -------------------------------------------------------------------------
@pytest.mark.parametrize("case, exc, match", [
    (lambda q, k: sk.contrastive_loss(q, k), ValueError, r"k must have the shape of q .* pass offset"),
    (lambda q, k: sk.contrastive_loss(q, k[:3], offset=0), ValueError,
     r"k must have shape \[M, D\] with M >= N = 4 .* got \(3, 6\)"),
    (lambda q, k: sk.contrastive_loss(q, k[:, :5], offset=0), ValueError, r"D = 6, got \(9, 5\)"),
    (lambda q, k: sk.contrastive_loss(q, k, offset=6), ValueError,
     r"offset must be in \[0, M - N\] = \[0, 5\] .* got 6"),
    (lambda q, k: sk.contrastive_loss(q, k, offset=-1), ValueError, "offset must be an int >= 0, got -1"),
    (lambda q, k: sk.contrastive_loss(q, k, offset=1.5), ValueError, "offset must be an int >= 0, got 1.5"),
    (lambda q, k: sk.contrastive_loss(q, k, offset=True), ValueError, "offset must be an int >= 0, got True"),
    (lambda q, k: sk.contrastive_loss(q, groups=torch.arange(4), offset=0), ValueError,
     r"offset needs k: .* got offset = 0 \(expected None\)"),
    (lambda q, k: sk.contrastive_loss(q, k, offset=1, groups=torch.arange(4)), ValueError,
     r"groups must have length M = 9 \(rows of k: one group per column"),
    (lambda q, k: sk.contrastive_loss(q, k, offset=1, hard_negatives=torch.randn(9, 2, 6)), ValueError,
     r"hard_negatives must have shape \[N, H, D\] = \[4, H, 6\]"),
    (lambda q, k: sk.contrastive_loss(q, k, offset=1, mine_k=9), ValueError, r"mine_k = 9 is larger .* is 8\)"),
    (lambda q, k: sk.contrastive_loss(q, k, offset=1, groups=torch.zeros(9, dtype=torch.long)), ValueError,
     "no row has a negative"),
    (lambda q, k: sk.contrastive_loss(q, k.half(), offset=1), TypeError, "k must have q's dtype"),
])
def test_bad_inputs(case, exc, match):
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 6, generator=gen), torch.randn(9, 6, generator=gen)
    with pytest.raises(exc, match=match):
        case(q, k)


def test_mined_indices_count_columns_then_hard_negatives():
    """Mined ids: in-batch column j < M, hard negative h as M + h (integer logits, exact ties)."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])  # M = 5, offset 1
    hn = torch.tensor([[[3.0, 0.0]], [[0.0, -1.0]]])
    for backend in BACKENDS:
        with sk.use_backend(backend):
            _, mined = sk.contrastive_loss(q, k, hard_negatives=hn, temperature=1.0, offset=1, mine_k=3)
        # row 0 (positive column 1): hard 5 (3), column 4 (1), column 0 (0; ties 2, 3 -> lower)
        # row 1 (positive column 2): column 0 (1), column 4 (1), column 1 (0)
        assert mined.indices.tolist() == [[5, 4, 0], [0, 4, 1]], backend
