"""Input validation shared by every op: errors name the argument, what came, what was expected."""
from __future__ import annotations

import math
import numbers
import operator
from typing import Iterable

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, *, ndim: int | Iterable[int] | None = None, dtypes=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        dims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in dims:
            want = " or ".join(str(d) for d in dims)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_same_device(**tensors) -> torch.device:
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    first = next(iter(devs.values()))
    if any(d != first for d in devs.values()):
        desc = ", ".join(f"{n} on {d}" for n, d in devs.items())
        raise ValueError(f"all tensors must be on the same device, got {desc}")
    return first


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or inf)")


def check_finite_fast(name: str, t: torch.Tensor) -> float:
    """:func:`check_finite` in one min/max reduction (NaN and inf propagate into it) instead of an
    isfinite mask of t's size; the detailed count is only computed when something is wrong.
    Returns max |t| (0.0 for an empty or non-float tensor)."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0.0
    with torch.no_grad():
        lo, hi = torch.stack(torch.aminmax(t)).float().tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        check_finite(name, t)
    return max(-lo, hi)


def as_float(name: str, value) -> float:
    """`value` as a finite python float: python/numpy real numbers and 0-d tensors that need no
    gradient are accepted (the ops take these arguments as constants)."""
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            raise TypeError(f"{name} must be a number, got a torch.Tensor that requires grad ({name} is used as "
                            f"a constant and would get no gradient; pass {name}.detach() or a python float)")
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name} must be a finite number or a 0-d real tensor, got a "
                             f"{str(value.dtype).replace('torch.', '')} tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def as_int(name: str, value, minimum: int = 0) -> int:
    """`value` as a python int >= minimum: python/numpy integers and 0-d integer tensors (not bool)."""
    out = None
    if not isinstance(value, (bool, np.bool_)) and not (isinstance(value, torch.Tensor)
                                                         and (value.dtype == torch.bool or value.dim() != 0)):
        try:
            out = operator.index(value)
        except TypeError:
            pass
    if out is None or out < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return out


def check_positive(name: str, value: float) -> None:
    if not (value > 0):
        raise ValueError(f"{name} must be > 0, got {value}")
