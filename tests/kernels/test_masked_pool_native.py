"""masked_pool's native CPU kernels: the exact arithmetic, bit for bit.

test_masked_pool.py checks every backend against an fp64 reference within a tolerance; this
file pins down what the C++ kernels compute to the last bit, so that a vectorisation change
(the vector width per ISA, the register blocking, the D chunks of the threads) cannot move a
result.  Every pooled sum is taken over the token rows in order, one multiply-add per row,
each rounded to fp32 once (FMA builds: every AVX2 / AVX-512 x86 CPU) or twice (mul then add:
builds without FMA, e.g. SOLAR_NATIVE_ISA=0) -- the same way in the register-blocked body, the
vector tail and the scalar tail of D.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from solar_kernels import _ext, use_backend
from solar_kernels.ops.masked_pool import pool_backward, pool_forward

pytestmark = pytest.mark.skipif(not _ext.available("masked_pool_forward_cpu"),
                                reason=f"native extension unavailable: {_ext.load_error}")

# D values that put columns in every part of the loops on every ISA: blocks of 16 to 64 floats,
# vector tails of 4 to 16, scalar tails.
DS = (5, 37, 85, 96, 200, 768)


def _inputs(seed, B, L, D, V):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=g)
    w = torch.rand(V, B, L, generator=g) * (torch.rand(V, B, L, generator=g) > 0.3)  # float weights, some 0
    return x, w


def _madd(acc, a, b, fused):
    """fp32 acc + a * b rounded once (fused) or twice, elementwise, as numpy float32.

    Fused: the fp64 product of two fp32 values is exact, so only the sum rounds (to fp64, then to
    fp32: a double rounding that differs from one fp32 rounding with probability ~2^-29 per
    element, never for these seeds)."""
    if fused:
        return (a.astype(np.float64) * b.astype(np.float64) + acc.astype(np.float64)).astype(np.float32)
    return (acc + (a * b).astype(np.float32)).astype(np.float32)


def _pool_emulated(x, w, s, fused):
    """out[v, b] = (1 / s) * sum_l w[v, b, l] x[b, l], the sum taken over l in order."""
    xn, wn = x.numpy(), w.numpy()
    acc = np.zeros((w.shape[0], x.shape[0], x.shape[2]), np.float32)
    for l in range(x.shape[1]):
        acc = _madd(acc, wn[:, :, l, None], np.broadcast_to(xn[None, :, l], acc.shape), fused)
    sn = s.numpy()
    inv = np.where(sn > 0, np.float32(1) / np.where(sn > 0, sn, 1), 0).astype(np.float32)
    return torch.from_numpy((inv[..., None] * acc).astype(np.float32))


def _assert_one_rounding_rule(got, fused_ref, split_ref, what):
    fused_ok, split_ok = torch.equal(got, fused_ref), torch.equal(got, split_ref)
    assert fused_ok or split_ok, (
        f"{what}: {int((got != fused_ref).sum())} elements differ from the fused-multiply-add sum and "
        f"{int((got != split_ref).sum())} from the mul-then-add sum (of {got.numel()}): the kernel rounds "
        "differently in different parts of D")


@pytest.mark.parametrize("V", [1, 2, 3, 5])
@pytest.mark.parametrize("D", DS)
def test_forward_is_the_in_order_sum_everywhere_in_d(D, V):
    x, w = _inputs(D * 10 + V, 3, 13, D, V)
    with use_backend("native"):
        out, aux = pool_forward(x, w, False, 1e-6)
    s = aux[0]
    _assert_one_rounding_rule(out, _pool_emulated(x, w, s, True), _pool_emulated(x, w, s, False),
                              f"forward D={D} V={V}")


@pytest.mark.parametrize("V", [1, 2, 3, 4])
@pytest.mark.parametrize("D", DS)
def test_grad_x_is_the_in_order_sum_everywhere_in_d(D, V):
    """grad_x[b, l] = w[0] dp[0] + w[1] dp[1] + ... in mask order, dp = grad_out * (1 / s)."""
    x, w = _inputs(D * 10 + V + 1, 3, 9, D, V)
    g = torch.randn(V, 3, D, generator=torch.Generator().manual_seed(D))
    with use_backend("native"):
        out, aux = pool_forward(x, w, False, 1e-6)
        gx, _ = pool_backward(g, x, w, out, aux, False, 1e-6, False)
    sn = aux[0].numpy()
    inv = np.where(sn > 0, np.float32(1) / np.where(sn > 0, sn, 1), 0).astype(np.float32)
    dp = (inv[..., None] * g.numpy()).astype(np.float32)  # [V, B, D]
    wn = w.numpy()  # [V, B, L]
    refs = []
    for fused in (True, False):
        acc = (wn[0][..., None] * dp[0][:, None, :]).astype(np.float32)
        for v in range(1, V):
            acc = _madd(acc, np.broadcast_to(wn[v][..., None], acc.shape), np.broadcast_to(dp[v][:, None, :], acc.shape),
                        fused)
        refs.append(torch.from_numpy(acc))
    _assert_one_rounding_rule(gx, *refs, f"grad_x D={D} V={V}")


@pytest.mark.parametrize("V", [1, 3, 6])
def test_results_do_not_depend_on_the_thread_count(V):
    """Two threads split D into chunks when B is small, and the backward's rows into tasks: the
    bits of out, aux, grad_x and grad_mask stay those of one thread."""
    x, w = _inputs(V, 2, 400, 200, V)  # large enough for the parallel regions
    g = torch.randn(V, 2, 200, generator=torch.Generator().manual_seed(V))
    prev = torch.get_num_threads()
    got = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with use_backend("native"):
                out, aux = pool_forward(x, w, True, 1e-6)
                gx, gm = pool_backward(g, x, w, out, aux, True, 1e-6, True)
            got.append((out, aux, gx, gm))
    finally:
        torch.set_num_threads(prev)
    for name, a, b in zip(("out", "aux", "grad_x", "grad_mask"), *got):
        assert torch.equal(a, b), f"{name} differs between 1 and 2 threads"
