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


# --- contrastive_loss -------------------------------------------------------------------
class ContrastiveLoss(torch.nn.Module):
    """Multi-positive InfoNCE in O(N*D) memory: ``F.contrastive_loss(q, k, ...)``.

    Shapes: q [N, D]; k [N, D], [M, D] with ``offset`` (row i's positive is column offset + i;
    groups then [M]) or None (single-set mode, groups required); groups [N] int64;
    hard_negatives [N, H, D].  Returns the scalar loss, or (loss, Mined) when mine_k > 0.
    """

    def __init__(self, temperature: float = 0.05, symmetric: bool = True, hardness: float = 0.0,
                 mine_k: int = 0, process_group=None):
        super().__init__()
        self.temperature, self.symmetric, self.hardness = temperature, symmetric, hardness
        self.mine_k, self.process_group = mine_k, process_group

    def forward(self, q, k=None, groups=None, hard_negatives=None, offset=None):
        return F.contrastive_loss(q, k, groups=groups, hard_negatives=hard_negatives, temperature=self.temperature,
                                  symmetric=self.symmetric, hardness=self.hardness, mine_k=self.mine_k,
                                  offset=offset, process_group=self.process_group)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, symmetric={self.symmetric}, hardness={self.hardness}, "
                f"mine_k={self.mine_k}")


class PooledContrastiveLoss(torch.nn.Module):
    """Masked pooling of both towers fused with the loss: ``F.pooled_contrastive_loss``.

    Shapes: xq [N, Lq, D], mask_q [N, Lq], xk [N, Lk, D], mask_k [N, Lk]; scalar loss.
    """

    def __init__(self, temperature: float = 0.05, symmetric: bool = True, hardness: float = 0.0,
                 normalize: bool = True, eps: float = 1e-6):
        super().__init__()
        self.temperature, self.symmetric, self.hardness = temperature, symmetric, hardness
        self.normalize, self.eps = normalize, eps

    def forward(self, xq, mask_q, xk, mask_k, groups=None):
        return F.pooled_contrastive_loss(xq, mask_q, xk, mask_k, normalize=self.normalize, eps=self.eps,
                                         groups=groups, temperature=self.temperature, symmetric=self.symmetric,
                                         hardness=self.hardness)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, symmetric={self.symmetric}, hardness={self.hardness}"


__all__ += ["ContrastiveLoss", "PooledContrastiveLoss"]
