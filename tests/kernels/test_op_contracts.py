"""Contracts of the ops on values at the edge of float32, the same on every backend.

* masked_pool: a NaN / inf in x under a zero weight never reaches the output; under a nonzero
  weight it propagates into that output row (the affected features); weight sums below the
  smallest normal float32 are empty rows (zeros, zero gradients).
* contrastive_loss / pooled_contrastive_loss: a temperature whose inverse overflows float32,
  and inputs whose logits can overflow the float32 loss, are refused with a ValueError naming
  the arguments; inputs inside the bound (logits up to about 1e38) give the loss without
  overflow on every backend.

Backends: "native" (C++) and "torch" everywhere, "triton" under the interpreter (on CPU) with
the interpreter's settings and with the CUDA settings (``kernel_target("cuda")``).
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

import solar_kernels as sk
from solar_kernels import _dispatch, _ext, use_backend
from solar_kernels.ops import contrastive_checks as cl_checks
from solar_kernels.ops import masked_pool as mp
from solar_kernels.reference import masked_pool_reference

# the Triton interpreter evaluates both sides of tl.where (log(0), exp overflow in unused lanes)
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_OK = DEV.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
TINY = torch.finfo(torch.float32).tiny


def _pool_backends():
    out = []
    if DEV.type == "cpu":
        out.append(pytest.param("native", marks=pytest.mark.skipif(
            not _ext.available(mp.CPU_SYMBOL_FWD), reason=f"native extension unavailable: {_ext.load_error}")))
    out.append("torch")
    if TRITON_OK:
        out += ["triton", "triton-cuda-settings"]
    return out


def _loss_backends():
    return ["torch"] + (["triton", "triton-cuda-settings"] if TRITON_OK else [])


@contextlib.contextmanager
def _backend(name):
    if name == "triton-cuda-settings":
        with use_backend("triton"), _dispatch.kernel_target("cuda"):
            yield
    else:
        with use_backend(name):
            yield


# ----------------------------------------------------------------------------------------
# masked_pool: non-finite x
# ----------------------------------------------------------------------------------------
def _nonfinite_case(V, seed, dtype):
    """x [3, 37, 5] (L straddles the interpreter's and the CPU kernel's blocks) with NaN, +inf and
    -inf at a few tokens, and float masks [V, 3, 37] that put weight 0 on some of those tokens
    and a nonzero weight on others (different per mask)."""
    g = torch.Generator().manual_seed(seed)
    B, L, D = 3, 37, 5
    x = torch.randn(B, L, D, generator=g)
    mask = torch.rand(V, B, L, generator=g) * (torch.rand(V, B, L, generator=g) > 0.3)
    bad = [(0, 3, 1, float("nan")), (0, 20, 4, float("inf")), (1, 0, 0, float("-inf")), (2, 36, 2, float("nan")),
           (2, 36, 3, float("nan"))]
    for b, l, d, val in bad:
        x[b, l, d] = val
        mask[:, b, l] = 0.0  # every mask ignores the bad tokens ...
    mask[V - 1, 0, 20] = 0.7  # ... except the last mask at one of them (V == 1: the only mask)
    mask[0, 2, 36] = 1.5
    return x.to(DEV, dtype), mask.to(DEV), bad


@pytest.mark.parametrize("backend", _pool_backends())
@pytest.mark.parametrize("V", [1, 3, 6])
@pytest.mark.parametrize("normalize", [False, True])
def test_nonfinite_x_under_zero_weight_is_ignored(backend, V, normalize):
    x, mask, bad = _nonfinite_case(V, seed=V, dtype=torch.float32)
    clean = x.clone()
    for b, l, d, _ in bad:
        clean[b, l, d] = 0.0
    with _backend(backend):
        out = sk.masked_pool(x, mask, normalize=normalize)
        ref = sk.masked_pool(clean, mask, normalize=normalize)
    # which output rows a bad token reaches: those whose mask has a nonzero weight on it
    hit = torch.zeros(V, 3, 5, dtype=torch.bool, device=DEV)
    for b, l, d, _ in bad:
        hit[:, b, d] |= mask[:, b, l] != 0
    row_hit = hit.any(-1, keepdim=True).expand_as(hit)
    assert bool(hit.any()), "the case must put some bad token under a nonzero weight"
    if normalize:  # the norm is non-finite: the row holds NaN (and zeros, for an inf)
        assert torch.equal((~torch.isfinite(out)).any(-1), hit.any(-1))
    else:
        assert torch.equal(~torch.isfinite(out), hit), f"non-finite at {(~torch.isfinite(out)).nonzero().tolist()}"
    torch.testing.assert_close(out[~row_hit], ref[~row_hit], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", _pool_backends())
def test_nonfinite_x_bf16_and_bool_mask(backend):
    """Same contract for bf16 x (the native kernel widens rows into a buffer) and a bool mask."""
    x, mask, bad = _nonfinite_case(4, seed=11, dtype=torch.bfloat16)
    mask = mask > 0
    clean = x.clone()
    for b, l, d, _ in bad:
        clean[b, l, d] = 0.0
    with _backend(backend):
        out = sk.masked_pool(x, mask)
        ref = sk.masked_pool(clean, mask)
    hit = torch.zeros(4, 3, 5, dtype=torch.bool, device=DEV)
    for b, l, d, _ in bad:
        hit[:, b, d] |= mask[:, b, l]
    assert torch.equal(~torch.isfinite(out), hit)
    torch.testing.assert_close(out[~hit], ref[~hit])


@pytest.mark.parametrize("backend", _pool_backends())
def test_nonfinite_x_in_an_empty_row_gives_zeros(backend):
    """A row whose mask is all 0 is 0 even when another mask keeps its NaN token (the C++ kernel
    used to scale the 0 * NaN sum by 1/s = 0)."""
    x = torch.randn(2, 4, 3, device=DEV)
    x[1, 2, 0] = float("nan")
    mask = torch.ones(2, 2, 4, device=DEV)
    mask[0, 1] = 0.0  # mask 0 of batch row 1: empty
    with _backend(backend):
        out = sk.masked_pool(x, mask)
    assert torch.equal(out[0, 1], torch.zeros(3, device=DEV))
    assert bool(torch.isnan(out[1, 1, 0])) and bool(torch.isfinite(out[1, 1, 1:]).all())


# ----------------------------------------------------------------------------------------
# masked_pool: tiny weight sums
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _pool_backends())
@pytest.mark.parametrize("normalize", [False, True])
def test_subnormal_weight_sums_are_empty_rows(backend, normalize):
    """Rows whose weights sum below the smallest normal float32 give zeros and zero gradients;
    a sum just at it is a proper (finite) mean; the fp64 reference follows the same rule."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, 8, generator=g).to(DEV).requires_grad_()
    mask = torch.rand(4, 6, generator=g)
    mask[0] = 1e-40  # sum 6e-40: subnormal
    mask[1] = 0.0
    mask[1, 2] = 1e-45  # the smallest subnormal, alone
    mask[2] = 0.0
    mask[2, :2] = TINY  # sum 2 * TINY: a normal number, a mean of two tokens
    mask = mask.to(DEV).requires_grad_()
    with _backend(backend):
        out = sk.masked_pool(x, mask, normalize=normalize)
        _, aux = mp.pool_forward(x.detach(), mask.detach()[None], normalize, 1e-6)
        out.backward(torch.ones_like(out))
    assert torch.equal(out[:2], torch.zeros(2, 8, device=DEV)), out[:2]
    assert torch.equal(aux[0, 0, :2], torch.zeros(2, device=DEV))
    assert torch.equal(x.grad[:2], torch.zeros_like(x.grad[:2]))
    assert torch.equal(mask.grad[:2], torch.zeros_like(mask.grad[:2]))
    want = masked_pool_reference(x.detach(), mask.detach(), normalize=normalize, dtype=torch.float64)
    assert torch.equal(want[:2], torch.zeros_like(want[:2]))
    torch.testing.assert_close(out.detach().double(), want, rtol=1e-5, atol=1e-6)
    assert bool(torch.isfinite(x.grad).all())  # (mask.grad of row 2 scales like 1 / s: about 1e38)


# ----------------------------------------------------------------------------------------
# contrastive_loss / pooled_contrastive_loss: temperature and logit range
# ----------------------------------------------------------------------------------------
def _unit_rows(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(DEV)


@pytest.mark.parametrize("backend", _loss_backends())
@pytest.mark.parametrize("temperature", [1e-45, 1e-39, 2.9e-39])
def test_temperature_whose_inverse_overflows_is_refused(backend, temperature):
    q, k = _unit_rows(6, 4, 0) * 1e-30, _unit_rows(6, 4, 1) * 1e-30
    x, m = (q * 1e-30)[:, None].expand(6, 3, 4), torch.ones(6, 3, device=DEV)
    with _backend(backend):
        with pytest.raises(ValueError, match=r"^temperature must be >= 2\.94e-39 .*got " + str(temperature)):
            sk.contrastive_loss(q, k, temperature=temperature)
        with pytest.raises(ValueError, match=r"^temperature must be >= "):
            sk.contrastive_loss(q, groups=torch.arange(6, device=DEV) // 2, temperature=temperature)
        with pytest.raises(ValueError, match=r"^temperature must be >= "):
            sk.pooled_contrastive_loss(x, m, x, m, temperature=temperature)
        # the smallest accepted temperature works when the logits stay small
        loss = sk.contrastive_loss(q, k, temperature=cl_checks.MIN_TEMPERATURE * 1.01)
    assert bool(torch.isfinite(loss))


def _fp64_loss(q, k, temperature, symmetric):
    S = q.double() @ k.double().T / temperature
    t = torch.arange(q.shape[0], device=q.device)
    ce = torch.nn.functional.cross_entropy
    return 0.5 * (ce(S, t) + ce(S.T, t)) if symmetric else ce(S, t)


@pytest.mark.parametrize("backend", _loss_backends())
@pytest.mark.parametrize("symmetric", [True, False])
def test_huge_logits_that_fit_give_the_true_loss(backend, symmetric):
    """The issue's case: row norms 1e18 at temperature 0.01 (logits up to 1e38, inside fp32):
    the mean loss fits (about 4e37) but the sum of 16 row losses did not, and came out inf."""
    q, k = _unit_rows(16, 16, 2) * 1e18, _unit_rows(16, 16, 3) * 1e18
    with _backend(backend):
        loss = sk.contrastive_loss(q, k, temperature=0.01, symmetric=symmetric)
    want = _fp64_loss(q, k, 0.01, symmetric)
    assert float(want) > 1e37
    assert bool(torch.isfinite(loss)), loss
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", _loss_backends())
def test_logits_that_can_overflow_are_refused(backend):
    """max|q_i| max|k_j| max(1, 1/T) (1 + hardness) above FLT_MAX / 3: a ValueError naming the
    tensors and temperature (it used to give inf, or an overflow error naming nothing)."""
    q, k = _unit_rows(8, 16, 2) * 1e18, _unit_rows(8, 16, 3) * 1e18
    with _backend(backend):
        with pytest.raises(ValueError, match=r"^q and k are too large for temperature = 0\.001: .* = 1e\+39"):
            sk.contrastive_loss(q, k, temperature=1e-3)
        with pytest.raises(ValueError, match=r"^q and k are too large for temperature = 0\.001: .* = 1e\+39"):
            sk.contrastive_loss(q, k, temperature=1e-3, symmetric=False)
        with pytest.raises(ValueError, match=r"^q and q are too large for temperature"):
            sk.contrastive_loss(q, groups=torch.arange(8, device=DEV) // 2, temperature=1e-3)
        # large hard negatives are named
        with pytest.raises(ValueError, match=r"^q and hard_negatives are too large .* hardness = 0\.5"):
            sk.contrastive_loss(q / 1e18, k / 1e18, hard_negatives=q[:, None] * 1e19, temperature=0.01,
                                hardness=0.5)
        # T > 1: the unscaled dot itself must fit too
        with pytest.raises(ValueError, match=r"^q and k are too large for temperature = 1e\+10"):
            sk.contrastive_loss(q * 1e3, k * 1e3, temperature=1e10)


@pytest.mark.parametrize("backend", _loss_backends())
@pytest.mark.parametrize("hardness", [0.0, 1.0])
def test_logits_at_the_bound_give_a_finite_loss(backend, hardness):
    """Rows scaled so that the bound max|q_i| max|k_j| (1 + hardness) / T is 0.99 of the limit
    (accepted; 1.2 times the limit is refused): the loss and its gradients are finite."""
    a = (0.99 * cl_checks.MAX_LOGIT_BOUND / (1.0 + hardness)) ** 0.5  # a^2 (1 + hardness) / T at T = 1
    q = (_unit_rows(8, 16, 4) * a).requires_grad_()
    k = (_unit_rows(8, 16, 5) * a).requires_grad_()
    with _backend(backend):
        loss = sk.contrastive_loss(q, k, temperature=1.0, hardness=hardness)
        loss.backward()
        with pytest.raises(ValueError, match="too large"):
            sk.contrastive_loss(q * 1.1, k * 1.1, temperature=1.0, hardness=hardness)
    assert bool(torch.isfinite(loss)), loss
    assert bool(torch.isfinite(q.grad).all()) and bool(torch.isfinite(k.grad).all())


@pytest.mark.parametrize("backend", _loss_backends())
def test_pooled_contrastive_loss_checks_the_pooled_rows_bound(backend):
    """Tokens of norm 1e18 at temperature 1e-3: refused without normalisation (the pooled rows can
    have that norm), accepted and finite with it (pooled rows have norm <= 1)."""
    g = torch.Generator().manual_seed(6)
    xq = torch.nn.functional.normalize(torch.randn(6, 3, 8, generator=g), dim=-1).to(DEV) * 1e18
    xk = torch.nn.functional.normalize(torch.randn(6, 3, 8, generator=g), dim=-1).to(DEV) * 1e18
    m = torch.ones(6, 3, device=DEV)
    with _backend(backend):
        with pytest.raises(ValueError, match=r"^xq and xk are too large for temperature = 0\.001"):
            sk.pooled_contrastive_loss(xq, m, xk, m, normalize=False, temperature=1e-3)
        loss = sk.pooled_contrastive_loss(xq, m, xk, m, normalize=True, temperature=1e-3)
    assert bool(torch.isfinite(loss))


@pytest.mark.parametrize("backend", _loss_backends())
def test_huge_aligned_logits_give_a_loss_near_zero(backend):
    """k close to q at norms 1e17, temperature 0.01 (logits up to 1e36, within the bound): the
    true loss is 0 (every diagonal wins by about 1e35).  The torch path used to take the diagonal logit from a
    separate elementwise product, whose rounding differs from the GEMM's, and returned losses
    like +1e28 or -1e30; now A and B come from the same logits and the loss is >= 0 and within
    the fp32 rounding of the logits (bound * 2^-23) of the truth."""
    q = _unit_rows(8, 16, 0)
    g = torch.Generator().manual_seed(1)
    k = torch.nn.functional.normalize(q + 0.3 * torch.randn(8, 16, generator=g).to(DEV), dim=1)
    q, k = q * 1e17, k * 1e17
    assert float(_fp64_loss(q, k, 0.01, True)) == 0.0
    for symmetric in (True, False):
        with _backend(backend):
            loss = float(sk.contrastive_loss(q, k, temperature=0.01, symmetric=symmetric))
        assert 0.0 <= loss <= 1e36 * 2.0 ** -23, (symmetric, loss)
