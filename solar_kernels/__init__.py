"""solar_kernels: drop-in torch ops behind SOLAR.

Public API (each op runs on CUDA through Triton/CUDA kernels and on CPU through the
C++ extension or a chunked PyTorch path; see `python -m solar_kernels.info`).
"""
from ._dispatch import use_backend
from .ops.masked_pool import masked_pool
from .ops.contrastive import Mined, contrastive_loss
from .ops.pooled_contrastive import pooled_contrastive_loss
from .search import Index, topk_search

__version__ = "0.1.0"

__all__ = ["use_backend", "__version__", "masked_pool", "contrastive_loss", "pooled_contrastive_loss", "Mined",
           "Index", "topk_search"]
