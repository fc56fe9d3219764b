"""The Triton kernels under exactly the settings a CUDA device gets, run by the interpreter.

The interpreter normally gets its own blocks (large, few steps); here
``solar_kernels._dispatch.kernel_target("cuda")`` makes the launchers choose the CUDA blocks,
warps, stages, grid and dtype path, and the kernels round where the GPU rounds (operands and
the backward's G cast to the storage dtype, then widened for the interpreter's dot).  So these
tests see the numerics a GPU would, e.g. the fp16 backward's G underflowing at large N.
"""
from __future__ import annotations

import os

import pytest
import torch

import solar_kernels as sk
from solar_kernels import _dispatch
from solar_kernels.ops import contrastive_triton as ct
from solar_kernels.ops import masked_pool as mp
from solar_kernels.reference import contrastive_loss_reference

from oracle import rel_err  # tests/oracle.py (on sys.path: conftest.py)

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                       reason="needs the Triton interpreter (TRITON_INTERPRET=1) or a GPU"),
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_settings_follow_the_target():
    """CPU tensors get the interpreter's blocks unless the CUDA target is asked for; CUDA tensors
    always get the CUDA ones (so the tests below really run the GPU's configuration)."""
    cpu = torch.device("cpu")
    assert _dispatch.target_for(cpu) == "interpreter"
    with _dispatch.kernel_target("cuda"):
        assert _dispatch.target_for(cpu) == "cuda"
        xb = torch.empty(1, dtype=torch.bfloat16)
        assert mp._fwd_blocks(3, 768, xb) == (4, 256, 1)
        assert mp._bwd_blocks(3, 768, xb) == (4, 4, 128, 1)
        cfg = ct.kernel_configs("stats", torch.bfloat16, 4096, 4096, 768, _dispatch.target_for(cpu))[0]
        assert (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_D"], cfg.num_warps) == (64, 64, 64, 4)
    assert _dispatch.target_for(cpu) == "interpreter"
    assert _dispatch.target_for(torch.device("cuda")) == "cuda"
    with pytest.raises(ValueError, match="kernel target"):
        with _dispatch.kernel_target("gpu"):
            pass


def test_fp16_backward_does_not_underflow_at_large_n():
    """N = 1024, temperature 32, fp16, symmetric mean: each negative's dL/dS / T is about
    1 / (2N) * 1 / N / 32 = 1.5e-8, under half of fp16's smallest subnormal (6e-8) -- what
    N = 65536 at temperature 1 gives, at a size the interpreter runs in seconds.  Cast to fp16
    as it is, every negative's contribution to dq / dk vanishes (about 3% of the gradient's
    scale here); scaled per row / column before the cast, the error stays at fp16's
    resolution."""
    n, d, temperature = 1024, 16, 32.0
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(DEV, torch.float16)
    k = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(DEV, torch.float16)
    q.requires_grad_()
    k.requires_grad_()
    with _dispatch.kernel_target("cuda"), sk.use_backend("triton"):
        loss = sk.contrastive_loss(q, k, temperature=temperature)
        dq, dk = torch.autograd.grad(loss, (q, k))
    ref = contrastive_loss_reference(q, k, temperature=temperature, dtype=torch.float64)
    rq, rk = torch.autograd.grad(ref, (q, k))
    assert abs(float(loss.detach()) - float(ref.detach())) < 1e-3
    # fp16 output rounding alone is 2^-11 = 4.9e-4 of the largest element
    assert rel_err(dq, rq) < 3e-3, f"dq relative error {rel_err(dq, rq):.3g}"
    assert rel_err(dk, rk) < 3e-3, f"dk relative error {rel_err(dk, rk):.3g}"


@pytest.mark.parametrize("case", [
    dict(dtype=torch.bfloat16, groups=False, single=False, hardness=0.0, mine_k=0, h=0),
    dict(dtype=torch.float16, groups=True, single=False, hardness=0.5, mine_k=4, h=2),
    dict(dtype=torch.bfloat16, groups=True, single=True, hardness=0.0, mine_k=3, h=0),
    dict(dtype=torch.float32, groups=False, single=False, hardness=1.0, mine_k=2, h=1),
], ids=["bf16-two-tower", "fp16-groups-hard-mined", "bf16-single-set", "fp32-hardness"])
def test_contrastive_cuda_settings_vs_reference(case):
    """Forward, backward and mining with the CUDA blocks (64 x 64 tiles, D chunks of 64 or 32,
    several row and column blocks, grouped tile order) against the fp64 reference."""
    n, d, dtype = 150, 80, case["dtype"]
    g = torch.Generator().manual_seed(3)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(DEV, dtype).requires_grad_()
    k = None if case["single"] else (
        torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(DEV, dtype).requires_grad_())
    hn = (torch.nn.functional.normalize(torch.randn(n, case["h"], d, generator=g), dim=2).to(DEV, dtype)
          .requires_grad_() if case["h"] else None)
    groups = (torch.arange(n, device=DEV) // 3) if case["groups"] else None
    kw = dict(groups=groups, hard_negatives=hn, temperature=0.1, hardness=case["hardness"], mine_k=case["mine_k"])
    with _dispatch.kernel_target("cuda"), sk.use_backend("triton"):
        out = sk.contrastive_loss(q, k, **kw)
    loss, mined = out if case["mine_k"] else (out, None)
    tensors = [t for t in (q, k, hn) if t is not None]
    with _dispatch.kernel_target("cuda"), sk.use_backend("triton"):
        got = torch.autograd.grad(loss, tensors)
    out64 = contrastive_loss_reference(q, k, dtype=torch.float64, **kw)
    loss64, mined64 = out64 if case["mine_k"] else (out64, None)
    ref = torch.autograd.grad(loss64, tensors)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert abs(float(loss.detach()) - float(loss64.detach())) <= tol * (1 + abs(float(loss64.detach())))
    for name, a, b in zip(("dq", "dk", "dhn"), got, ref):
        assert a.dtype == dtype
        assert rel_err(a, b) < (1e-4 if dtype == torch.float32 else 1.2e-2), f"{name}: {rel_err(a, b):.3g}"
    if mined is not None:
        assert torch.equal(mined.indices.cpu(), mined64[0].cpu())


def test_mine_k_above_the_kernel_bound():
    """mine_k > MAX_KERNEL_MINE_K mines in the chunked second pass: same indices and scores as
    the reference (ties to the lower index), on both targets' settings."""
    n, d, mk = 90, 24, ct.MAX_KERNEL_MINE_K + 9
    g = torch.Generator().manual_seed(5)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(DEV)
    k = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(DEV)
    hn = torch.nn.functional.normalize(torch.randn(n, 2, d, generator=g), dim=2).to(DEV)
    groups = torch.arange(n, device=DEV) // 2
    _, (idx64, sc64) = contrastive_loss_reference(q, k, groups=groups, hard_negatives=hn, temperature=0.1,
                                                 mine_k=mk, dtype=torch.float64)
    for target in ("interpreter", "cuda"):
        with _dispatch.kernel_target(target), sk.use_backend("triton"):
            _, mined = sk.contrastive_loss(q, k, groups=groups, hard_negatives=hn, temperature=0.1, mine_k=mk)
        assert torch.equal(mined.indices.cpu(), idx64.cpu()), target
        torch.testing.assert_close(mined.scores.double().cpu(), sc64.cpu(), rtol=1e-5, atol=1e-5)
    for single in (True,):
        _, (i64s, _) = contrastive_loss_reference(q, groups=groups, temperature=0.1, mine_k=mk, dtype=torch.float64)
        with _dispatch.kernel_target("cuda"), sk.use_backend("triton"):
            _, mined = sk.contrastive_loss(q, groups=groups, temperature=0.1, mine_k=mk)
        assert torch.equal(mined.indices.cpu(), i64s.cpu())


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("D", [2, 17, 300])
def test_masked_pool_cuda_blocks_vs_reference(mask_kind, D):
    """masked_pool forward + backward with the CUDA blocks: D = 300 two D tiles of 256 in the
    forward and backward (bf16: 16 bytes a thread), the second partial; D = 2 and 17 one."""
    import triton

    from test_masked_pool import check_case, make_inputs

    with _dispatch.kernel_target("cuda"):
        x, mask = make_inputs(11, 2, 70, D, 3, torch.bfloat16, mask_kind=mask_kind)
        assert mp._fwd_blocks(3, D, x)[1] == min(triton.next_power_of_2(D), 256)
        assert mp._bwd_blocks(3, D, x)[2] == min(triton.next_power_of_2(D), 128)
        check_case("triton", x, mask, True, mask_grad=mask_kind == "float")


def test_masked_pool_backward_offsets_past_2_31():
    """The backward's mask offset (v * stride_mv) passes 2^31 when (V - 1) * B * L does.  A
    bool mask [3, 1, L] whose v-stride is 2^30 (2 GiB of storage, stride fits int32, the
    product does not): with int32 offsets mask row 2 is read from the wrong address."""
    L, D = 8, 4
    stride_v = 1 << 30
    try:
        storage = torch.zeros(2 * stride_v + L, dtype=torch.bool)
    except RuntimeError:  # pragma: no cover - not enough memory on this machine
        pytest.skip("cannot allocate 2 GiB for the strided mask")
    mask = storage.as_strided((3, 1, L), (stride_v, L, 1))
    storage[:L] = True                      # view 0: every token
    storage[stride_v + 1:stride_v + 3] = True  # view 1: tokens 1, 2
    storage[2 * stride_v + 5] = True        # view 2: token 5
    x = torch.randn(1, L, D, requires_grad=True)
    with sk.use_backend("triton"):
        out = sk.masked_pool(x, mask)
        (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    dense = mask.clone()
    ref = sk.masked_pool(x, dense)
    (gref,) = torch.autograd.grad(ref, x, torch.ones_like(ref))
    del storage, mask
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, gref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backward_panels_cover_every_row(monkeypatch, dtype):
    """The backward materialises G = dL/dS for panels of rows (R x N <= MAX_PANEL_ELEMS): dq is
    written per panel, dk is stored by the first panel and added to by the later ones.  With the
    budget forced down to one 128-row panel's worth, n = 300 rows make three panels (the last
    of 44 rows): every row's dq and every column's dk must match the reference (groups, both
    directions and hardness, so every term of G is exercised)."""
    n, d = 300, 24
    step = ct.PANEL_STEP
    for kernel, side in (("grad", "BLOCK_M"), ("gemm_dq", "BLOCK_M"), ("gemm_dk", "BLOCK_K")):
        assert all(step % c.kwargs[side] == 0 for c in ct.kernel_configs(kernel, dtype, n, n, d, "cuda"))
    monkeypatch.setattr(ct, "MAX_PANEL_ELEMS", step * n)
    assert ct.panel_rows(n, n) == step < n
    g = torch.Generator().manual_seed(9)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(DEV, dtype).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(DEV, dtype).requires_grad_()
    groups = torch.arange(n, device=DEV) // 3
    kw = dict(groups=groups, temperature=0.1, hardness=0.5)
    with _dispatch.kernel_target("cuda"), sk.use_backend("triton"):
        dq, dk = torch.autograd.grad(sk.contrastive_loss(q, k, **kw), (q, k))
    rq, rk = torch.autograd.grad(contrastive_loss_reference(q, k, dtype=torch.float64, **kw), (q, k))
    tol = 1e-4 if dtype == torch.float32 else 1.2e-2
    assert rel_err(dq, rq) < tol and rel_err(dk, rk) < tol, (rel_err(dq, rq), rel_err(dk, rk))


@pytest.mark.parametrize("temperature", [0.1, 0.01], ids=["shared-exp", "wide-spread"])
def test_column_statistics_from_the_row_pass(monkeypatch, temperature):
    """The symmetric loss takes both directions' statistics from one pass over S: each program
    keeps one row of column partials, merged over its row blocks.  With MAX_COL_PARTIALS = 2
    for 3 row blocks one program merges two blocks.  Temperature 0.1 keeps every tile's spread
    small (the column sums reuse the row exponentials); 0.01 makes logits span about 200, so
    tiles take the per-column fallback.  Loss and gradients against the fp64 reference, with
    groups and hardness (all three statistics per direction)."""
    monkeypatch.setattr(ct, "MAX_COL_PARTIALS", 2)
    n, d = 150, 24
    g = torch.Generator().manual_seed(13)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(DEV).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(DEV).requires_grad_()
    groups = torch.arange(n, device=DEV) // 4
    for hardness in (0.0, 0.5):
        kw = dict(groups=groups, temperature=temperature, hardness=hardness)
        with _dispatch.kernel_target("cuda"), sk.use_backend("triton"):
            loss = sk.contrastive_loss(q, k, **kw)
            dq, dk = torch.autograd.grad(loss, (q, k))
        ref = contrastive_loss_reference(q, k, dtype=torch.float64, **kw)
        rq, rk = torch.autograd.grad(ref, (q, k))
        assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-5 * (1 + abs(float(ref.detach())))
        assert rel_err(dq, rq) < 1e-4 and rel_err(dk, rk) < 1e-4, (rel_err(dq, rq), rel_err(dk, rk))


def test_config_sets_hold_their_constraints():
    """The autotuning sets (ct.CONFIGS) keep the invariants the kernels rely on: fp16's GEMM
    chunks divide every grad tile side (one power-of-two scale per chunk), fp32 statistics /
    grad tiles stay at the spill-free 16-wide D chunks with 8 warps, every row block divides
    PANEL_STEP, the default comes first, the interpreter gets exactly one config, and the
    statistics kernel with both directions and hardness never runs 4 warps (it spilled)."""
    grad16 = ct.kernel_configs("grad", torch.float16, 4096, 4096, 768, "cuda")
    for kernel in ("gemm_dq", "gemm_dk"):
        for c in ct.kernel_configs(kernel, torch.float16, 4096, 4096, 768, "cuda"):
            assert all(g.kwargs["BLOCK_M"] % c.kwargs["BLOCK_K"] == 0 and g.kwargs["BLOCK_N"] % c.kwargs["BLOCK_K"] == 0
                       for g in grad16), (kernel, c)
            assert ct.PANEL_STEP % c.kwargs["BLOCK_M"] == 0 and ct.PANEL_STEP % c.kwargs["BLOCK_K"] == 0
    assert all(ct.PANEL_STEP % g.kwargs["BLOCK_M"] == 0 for g in grad16)
    # mining: 64 x 64 at 8 warps only; GEMMs: at most 64 accumulator values per thread
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in
            ct.kernel_configs("stats", torch.bfloat16, 4096, 4096, 768, "cuda", mine=True)] == [(64, 64, 8)]
    for dtype in (torch.bfloat16, torch.float32):
        for c in ct.kernel_configs("gemm_dk", dtype, 4096, 4096, 768, "cuda"):
            assert c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_D"] <= 64 * 32 * c.num_warps, c
    for kernel in ("stats", "grad"):
        for c in ct.kernel_configs(kernel, torch.float32, 4096, 4096, 768, "cuda"):
            assert c.kwargs["BLOCK_D"] == 16 and c.num_warps == 8, (kernel, c)
        first = ct.CONFIGS[kernel]["16bit"][0]
        c = ct.kernel_configs(kernel, torch.bfloat16, 4096, 4096, 768, "cuda")[0]
        assert (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_D"], c.num_warps, c.num_stages) == first
    assert all(c.num_warps == 8 for c in ct.kernel_configs("stats", torch.float16, 4096, 4096, 768, "cuda",
                                                           hard=True, cols=True))
    # a grad tile side of 16 would leave no GEMM whose BLOCK_K divides it: an error, not a wrong scale
    with pytest.raises(RuntimeError, match="no gemm_dq config"):
        ct.kernel_configs("gemm_dq", torch.float16, 4096, 4096, 768, "cuda", scale_block=16)
    # D chunks narrowed to D: D = 17 needs 32-wide chunks at most
    assert all(c.kwargs["BLOCK_D"] <= 32 for k in ("stats", "grad", "gemm_dq")
               for c in ct.kernel_configs(k, torch.bfloat16, 4096, 4096, 17, "cuda"))
    for kernel in ("stats", "grad", "gemm_dq", "gemm_dk"):
        assert len(ct.kernel_configs(kernel, torch.float16, 300, 300, 24, "interpreter")) == 1


def test_interpreter_never_autotunes():
    """Under TRITON_INTERPRET=1 every launch runs one config, chosen deterministically (the
    first of the set under the CUDA target): no autotuner is built, nothing is benchmarked."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreter only")
    assert not ct.autotuning()
    n, d = 70, 16
    g = torch.Generator().manual_seed(4)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(torch.float16).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(torch.float16).requires_grad_()
    before = len(ct._TUNERS)
    with _dispatch.kernel_target("cuda"), sk.use_backend("triton"):
        assert len(ct.kernel_configs("gemm_dq", torch.float16, n, n, d, "cuda")) > 1
        torch.autograd.grad(sk.contrastive_loss(q, k, hardness=0.5), (q, k))
    assert len(ct._TUNERS) == before


_CONFIG_CASES = ([(torch.float16, i, True) for i in range(3)] + [(torch.float16, i, False) for i in (2, 3)]
                 + [(torch.float32, i, True) for i in range(3)])


@pytest.mark.parametrize("dtype,index,hard", _CONFIG_CASES,
                         ids=[f"{str(d)[6:]}-config{i}-{'hard-mined' if h else 'plain'}" for d, i, h in _CONFIG_CASES])
def test_every_config_vs_reference(monkeypatch, dtype, index, hard):
    """Each config of the autotuning sets, forced on every kernel at once (the index-th of each
    set, wrapping), runs the symmetric loss with groups, with hardness and mining or without
    (mining narrows the statistics set to one config; fp16: the scaled G with that config's
    GEMM chunks against its grad tile) and matches the fp64
    reference: whichever config the GPU's autotuner picks computes the same loss and
    gradients."""
    real = ct.kernel_configs

    def forced(*args, **kwargs):
        configs = real(*args, **kwargs)
        return [configs[index % len(configs)]]

    monkeypatch.setattr(ct, "kernel_configs", forced)
    n, d = 150, 40
    g = torch.Generator().manual_seed(21)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(DEV, dtype).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(DEV, dtype).requires_grad_()
    kw = dict(groups=torch.arange(n, device=DEV) // 3, temperature=0.1, hardness=0.5 if hard else 0.0,
              mine_k=2 if hard else 0)
    with _dispatch.kernel_target("cuda"), sk.use_backend("triton"):
        out = sk.contrastive_loss(q, k, **kw)
        loss = out[0] if hard else out
        dq, dk = torch.autograd.grad(loss, (q, k))
    out64 = contrastive_loss_reference(q, k, dtype=torch.float64, **kw)
    ref = out64[0] if hard else out64
    rq, rk = torch.autograd.grad(ref, (q, k))
    tol = 1e-4 if dtype == torch.float32 else 1.2e-2
    assert abs(float(loss.detach()) - float(ref.detach())) <= tol * (1 + abs(float(ref.detach())))
    assert rel_err(dq, rq) < tol and rel_err(dk, rk) < tol, (rel_err(dq, rq), rel_err(dk, rk))
    if hard:
        assert torch.equal(out[1].indices.cpu(), out64[1][0].cpu())
