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
