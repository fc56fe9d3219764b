"""Autograd helpers shared by the integrations (open_clip, sentence-transformers)."""
from __future__ import annotations

import torch

__all__ = ["ScaleGrad"]


class ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by a constant (undoes a peer's mean
    over ranks where our loss already averages over the global batch)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None
