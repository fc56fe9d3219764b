"""The public functional layer (torch.nn.functional style)."""
from __future__ import annotations

from .ops.masked_pool import masked_pool

__all__: list[str] = []
__all__ += ["masked_pool"]
