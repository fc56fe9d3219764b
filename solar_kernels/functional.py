"""The public functional layer (torch.nn.functional style)."""
from __future__ import annotations

from .ops.masked_pool import masked_pool

__all__: list[str] = []
__all__ += ["masked_pool"]

# --- contrastive_loss -------------------------------------------------------------------
from .ops.contrastive import Mined, contrastive_loss  # noqa: E402
from .ops.pooled_contrastive import pooled_contrastive_loss  # noqa: E402

__all__ += ["contrastive_loss", "pooled_contrastive_loss", "Mined"]
