"""The accuracy oracle every kernel test uses (one copy, imported by the kernel test files).

A kernel result is judged against an fp64 reference of the same computation: its error may be
at most twice the error of plain PyTorch computing the same thing in the kernel's dtype, plus
a small absolute allowance (STYLE.md, "Tests").  Failure messages name the tensor, how many
elements fail and the worst one (index, value, reference, error).
"""
import torch

__all__ = ["assert_close_to_fp64", "rel_err"]


def assert_close_to_fp64(name: str, got: torch.Tensor, ref64: torch.Tensor, plain=None, *, atol: float = 0.0,
                         rel_atol: float = 0.0, ulp: bool = True) -> None:
    """Fail unless |got - ref64| <= 2 * max|plain - ref64| + atol + rel_atol * (1 + max|ref64|)
    element-wise (NaN in `got` always fails).

    plain: the same result from plain PyTorch in the kernel's dtype (None: no such allowance,
    e.g. for a scalar the reference computes exactly).  ulp: also allow one unit in the last
    place of got's dtype times |ref64| per element -- a result stored in a coarser dtype than
    it was computed in (a bf16 gradient) may round to the neighbour of the reference rounded
    the same way, which leaves the plain error at 0."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref64.shape)}"
    got64 = got.detach().to(torch.float64).cpu()
    ref64 = ref64.detach().to(torch.float64).cpu()
    if plain is not None:
        plain_err = (plain.detach().to(torch.float64).cpu() - ref64).abs()
        plain_max = float(plain_err.max()) if plain_err.numel() else 0.0
    else:
        plain_max = 0.0
    ref_max = float(ref64.abs().max()) if ref64.numel() else 0.0
    tol = 2 * plain_max + atol + rel_atol * (1.0 + ref_max)
    slack = torch.finfo(got.dtype).eps * ref64.abs() if ulp and got.is_floating_point() else 0.0
    err = (got64 - ref64).abs()
    err = torch.where(torch.isnan(got64), torch.full_like(err, float("inf")), err)
    bad = err > tol + slack
    if bool(bad.any()):
        i = int(err.flatten().argmax())
        idx = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), err.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{err.numel()} elements exceed tol {tol:.3g} "
            f"(2 x plain-{got.dtype} error {plain_max:.3g} + atol {atol:g} + rel_atol {rel_atol:g} x "
            f"(1 + max|ref| {ref_max:.3g})); worst at {idx}: got {float(got64[idx]):.6g}, "
            f"fp64 reference {float(ref64[idx]):.6g}, error {float(err[idx]):.3g}")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max|got - ref| / max|ref|, computed in fp64 (for bounds stated as a relative error)."""
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


def assert_contrastive_loss_matches_reference(backend: str, q, k, hard_negatives, kw: dict,
                                              expect_error: str | None = None) -> None:
    """`solar_kernels.contrastive_loss(q, k, hard_negatives=..., **kw)` under `backend` against
    `contrastive_loss_reference` in fp64: the loss, the gradients of q, k and the hard negatives,
    and with ``kw["mine_k"]`` the mined indices (exactly) and scores.

    Low-precision inputs are allowed twice the error of the same reference computed in their
    dtype (assert_close_to_fp64's `plain`).  A gradient is a sum of terms dL/dS_ij x_j / T that
    can cancel (d = 1: every logit +-1 / T, a dq of 3e-14 from terms ~20), so its absolute
    tolerance scales with the largest gradient entry of any input, not its own.
    `expect_error`: the ValueError message pattern the call must raise instead."""
    import pytest

    import solar_kernels as sk
    from solar_kernels.reference import contrastive_loss_reference

    kw = dict(kw, hard_negatives=hard_negatives)
    mine_k = kw.get("mine_k", 0)
    if expect_error is not None:
        with pytest.raises(ValueError, match=expect_error):
            with sk.use_backend(backend):
                sk.contrastive_loss(q, k, **kw)
        return
    with sk.use_backend(backend):
        out = sk.contrastive_loss(q, k, **kw)
    loss, mined = out if mine_k else (out, None)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    tensors = [t for t in (q, k, hard_negatives) if t is not None]
    got = torch.autograd.grad(loss, tensors)
    out64 = contrastive_loss_reference(q, k, dtype=torch.float64, **kw)
    loss64, mined64 = out64 if mine_k else (out64, None)
    ref64 = torch.autograd.grad(loss64, tensors)
    dtype = q.dtype
    lp = None
    if dtype != torch.float32:
        outlp = contrastive_loss_reference(q, k, dtype=dtype, **kw)
        losslp = outlp[0] if mine_k else outlp
        lp = (losslp, torch.autograd.grad(losslp, tensors))
    atol = 2e-5 if dtype == torch.float32 else 2e-3
    assert_close_to_fp64("loss", loss.detach(), loss64.detach(), None if lp is None else lp[0].detach(),
                         rel_atol=atol, ulp=False)
    gscale = max(float(r.abs().max()) for r in ref64)
    names = [nm for nm, t in zip(("dq", "dk", "dhn"), (q, k, hard_negatives)) if t is not None]
    for i, nm in enumerate(names):
        assert got[i].dtype == dtype and got[i].shape == tensors[i].shape, nm
        assert_close_to_fp64(nm, got[i], ref64[i], None if lp is None else lp[1][i], atol=atol * gscale,
                             rel_atol=atol, ulp=False)
    if mine_k:
        idx64, sc64 = mined64
        assert mined.indices.shape == (q.shape[0], mine_k) and mined.indices.dtype == torch.int64
        assert torch.equal(mined.indices.cpu(), idx64.cpu()), "mined indices differ from the reference"
        torch.testing.assert_close(mined.scores.double(), sc64, rtol=1e-4,
                                   atol=1e-3 if dtype != torch.float32 else 1e-4)


def assert_mined_loss_matches_fp64(backend: str, q, k, hard_negatives, kw: dict) -> None:
    """`solar_kernels.contrastive_loss(q, k, **kw)` with mining (``kw`` holds mine_k and
    ``hard_negatives``) under `backend`, fp32 inputs: the value and the gradients of q, k and
    `hard_negatives` against the fp64 reference (rtol 1e-4), and the mined indices exactly."""
    import solar_kernels as sk
    from solar_kernels.reference import contrastive_loss_reference

    with sk.use_backend(backend):
        loss, mined = sk.contrastive_loss(q, k, **kw)
    got = torch.autograd.grad(loss, (q, k, hard_negatives))
    loss64, (idx, _) = contrastive_loss_reference(q, k, dtype=torch.float64, **kw)
    ref = torch.autograd.grad(loss64, (q, k, hard_negatives))
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)
    assert torch.equal(mined.indices.cpu(), idx.cpu())
