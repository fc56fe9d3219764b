"""nn.Module wrappers: each forward only calls the matching function in `functional`."""
from __future__ import annotations

import torch

from . import functional as F

__all__: list[str] = []


# --- masked_pool ------------------------------------------------------------------------
class MaskedPool(torch.nn.Module):
    """Masked mean pooling of token rows: ``F.masked_pool(x, mask, normalize=..., eps=...)``.

    Shapes: x [B, L, D]; mask [B, L] or [V, B, L] (bool or non-negative float weights);
    output [B, D] or [V, B, D] in x's dtype.
    """

    def __init__(self, normalize: bool = False, eps: float = 1e-6):
        super().__init__()
        self.normalize = normalize
        self.eps = eps

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.masked_pool(x, mask, normalize=self.normalize, eps=self.eps)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}, eps={self.eps}"


__all__ += ["MaskedPool"]
