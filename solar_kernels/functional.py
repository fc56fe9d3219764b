"""The public functional layer (torch.nn.functional style)."""
from __future__ import annotations

__all__: list[str] = []
