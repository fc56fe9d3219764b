"""Plain-PyTorch references of every op, computed in the caller's dtype or (for test
oracles) in float64.  Slow and memory-hungry on purpose: they materialise everything.
Tests and benchmarks import them from here; nothing else should.
"""
from __future__ import annotations

import torch

__all__: list[str] = []


# --- masked_pool -----------------------------------------------------------------------
def masked_pool_reference(x: torch.Tensor, mask: torch.Tensor, *, normalize: bool = False, eps: float = 1e-6,
                          dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference of `solar_kernels.masked_pool`, computed entirely in `dtype` (default: x's).

    x [B, L, D]; mask [B, L] or [V, B, L] (bool or float weights); returns [B, D] or
    [V, B, D] in `dtype`.  The plain expression ``(x * m[..., None]).sum(1) / m.sum(1)``
    with zero-mask rows set to 0 and optional row L2 normalisation by max(||row||, eps).
    Differentiable (autograd through plain torch ops).
    """
    dtype = dtype or x.dtype
    xf = x.to(dtype)
    m = mask.to(dtype)
    squeeze = m.dim() == 2
    if squeeze:
        m = m.unsqueeze(0)
    num = (xf.unsqueeze(0) * m[..., None]).sum(2)  # [V, B, D]
    den = m.sum(-1, keepdim=True)  # [V, B, 1]
    safe = torch.where(den > 0, den, torch.ones_like(den))
    out = torch.where(den > 0, num / safe, torch.zeros_like(num))
    if normalize:
        out = out / out.norm(dim=-1, keepdim=True).clamp_min(eps)
    return out.squeeze(0) if squeeze else out


__all__ += ["masked_pool_reference"]
