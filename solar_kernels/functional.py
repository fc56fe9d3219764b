"""The public functional layer (torch.nn.functional style).

Every function dispatches by device in one place (solar_kernels._dispatch): CUDA tensors
run the Triton/CUDA kernels, CPU tensors the C++ extension or the chunked PyTorch path.
"""
from __future__ import annotations

from .ops.contrastive import Mined, contrastive_loss
from .ops.masked_pool import masked_pool
from .ops.pooled_contrastive import pooled_contrastive_loss

__all__ = ["masked_pool", "contrastive_loss", "pooled_contrastive_loss", "Mined"]
