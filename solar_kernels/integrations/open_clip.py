"""open_clip's ``ClipLoss``, computed by :func:`solar_kernels.contrastive_loss` in O(N x D) memory.

open_clip (``open_clip/loss.py``) builds the full logit matrices, N x N per rank (or n x N
with ``local_loss``), and keeps them for backward.  This module has the same constructor and
forward and returns the same value and the same gradients (with respect to both feature
tensors and ``logit_scale``, on every rank) without any N x N tensor: the logits
``logit_scale * image @ text.T`` are the contrastive loss of ``q = logit_scale * image`` and
``k = text`` at temperature 1, whose gradient reaches ``logit_scale`` through that product.

The swap in an open_clip training script (``open_clip_train/main.py`` creates the loss with
``create_loss(args)``)::

    from solar_kernels.integrations.open_clip import ClipLoss   # instead of open_clip.loss's
    loss = ClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad,
                    cache_labels=True, rank=args.rank, world_size=args.world_size)

How each distributed mode of open_clip is reproduced (n rows per rank, N = n * world):

* ``local_loss=False`` (open_clip's default): the value is the loss over all N pairs on every
  rank.  ``contrastive_loss(process_group=...)`` gives that value and exactly open_clip's
  feature gradients (each rank's own features, the others held constant) with n x N work per
  rank; the ``logit_scale`` gradient is all-reduced so that every rank gets the full
  derivative as open_clip does.  ``gather_with_grad=True`` multiplies the feature gradients by
  the world size, as open_clip's all-gather backward (a sum over ranks) does.
* ``local_loss=True, gather_with_grad=True``: the value is the mean over this rank's n rows
  against all N columns, in each direction: the rectangular
  :func:`solar_kernels.contrastive_loss` (``offset = rank * n``) of the local rows against the
  columns all-gathered with gradient, whose backward sums every rank's gradients into each
  rank's slice as open_clip's does (the feature gradients are world x those of the global
  loss; ``logit_scale`` gets the derivative of the local value).  n x N logits per direction.
* ``local_loss=True, gather_with_grad=False``: open_clip gathers all columns without gradient
  (this rank's own included), so the gradient flows only through the local rows; this is the
  rectangular :func:`solar_kernels.contrastive_loss` of the n local rows against the N
  gathered columns (``offset = rank * n``), in each direction: n x N logits per direction, as
  in the other modes (memory O(N x D)).

``cache_labels`` is accepted for compatibility: no label tensor is built, so there is nothing
to cache.  ``logit_bias`` (SigLIP-style models passing one to ClipLoss) shifts every logit by
the same constant, which a softmax cross-entropy ignores: the value is unchanged and its
gradient is zero, as in open_clip up to rounding.  Horovod is not supported.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

import solar_kernels as sk
from solar_kernels import distributed

from ._autograd import ScaleGrad

__all__ = ["ClipLoss"]


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group's ranks."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss`` (same arguments, same results) in O(N x D) memory.

    Args:
        local_loss: each rank's loss covers only its own rows (against all gathered columns).
        gather_with_grad: the gathered features carry gradient back to their ranks (summed).
        cache_labels: accepted for compatibility (no labels are built).
        rank, world_size: this process's rank and the number of ranks (as open_clip takes them;
            with world_size > 1, torch.distributed must be initialised with that world size).
        use_horovod: must be False (Horovod is not supported).
        process_group: the torch.distributed group to gather over (default: the world group).

    ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)``
    takes image / text features [n, D] (the same dtype; L2-normalised as open_clip's models
    return them), ``logit_scale`` (a 0-d tensor, usually ``model.logit_scale.exp()``, or a
    number) and returns the scalar loss, or ``{"contrastive_loss": loss}`` with output_dict.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, process_group=None):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod: Horovod is not supported by solar_kernels' ClipLoss; got True, "
                             "expected False (use torch.distributed)")
        if isinstance(world_size, bool) or not isinstance(world_size, numbers.Integral) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        self.local_loss = bool(local_loss)
        self.gather_with_grad = bool(gather_with_grad)
        self.cache_labels = bool(cache_labels)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.use_horovod = False
        self.process_group = process_group

    def _group(self):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"world_size = {self.world_size} needs torch.distributed initialised "
                               f"(dist.init_process_group) before the loss is called")
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if (world, rank) != (self.world_size, self.rank):
            raise ValueError(f"rank / world_size: the loss was built with rank {self.rank} of {self.world_size}, "
                             f"but the process group has this process as rank {rank} of {world}")
        return group

    @staticmethod
    def _check(image_features, text_features, logit_scale):
        for name, t in (("image_features", image_features), ("text_features", text_features)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a [n, D] tensor, got {got}")
        if image_features.shape != text_features.shape:
            raise ValueError(f"text_features must have image_features' shape {tuple(image_features.shape)}, "
                             f"got {tuple(text_features.shape)}")
        if isinstance(logit_scale, torch.Tensor):
            if logit_scale.numel() != 1:
                raise ValueError(f"logit_scale must be a number or a one-element tensor, got shape "
                                 f"{tuple(logit_scale.shape)}")
            return logit_scale.reshape(()).to(image_features.dtype)
        if isinstance(logit_scale, bool) or not isinstance(logit_scale, numbers.Real) \
                or not math.isfinite(logit_scale) or logit_scale <= 0:
            raise ValueError(f"logit_scale must be a positive finite number or a one-element tensor, "
                             f"got {logit_scale!r}")
        return torch.tensor(float(logit_scale), dtype=image_features.dtype, device=image_features.device)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias=None,
                output_dict: bool = False):
        """The CLIP loss of open_clip's ``ClipLoss.forward`` on the same inputs (see the class doc)."""
        scale = self._check(image_features, text_features, logit_scale)
        img, txt = image_features, text_features
        if self.world_size == 1:
            loss = sk.contrastive_loss(scale * img, txt, temperature=1.0, symmetric=True)
        else:
            group = self._group()
            world = self.world_size
            if not self.local_loss:
                if self.gather_with_grad:
                    img, txt = ScaleGrad.apply(img, float(world)), ScaleGrad.apply(txt, float(world))
                scale_all = _AllReduceGrad.apply(scale, group)
                loss = sk.contrastive_loss(scale_all * img, txt, temperature=1.0, symmetric=True,
                                           process_group=group)
            else:
                # this rank's n rows against all N columns (row i's positive: column rank * n + i);
                # open_clip gathers the columns with gradient, or without (its own rank's too)
                if self.gather_with_grad:
                    all_img = distributed.all_gather_rows_with_grad(img, group)
                    all_txt = distributed.all_gather_rows_with_grad(txt, group)
                else:
                    all_img = distributed.all_gather_rows(img.detach(), group)
                    all_txt = distributed.all_gather_rows(txt.detach(), group)
                rect = dict(offset=self.rank * img.shape[0], temperature=1.0, symmetric=False)
                loss = 0.5 * (sk.contrastive_loss(scale * img, all_txt, **rect)
                              + sk.contrastive_loss(scale * txt, all_img, **rect))
        if logit_bias is not None and isinstance(logit_bias, torch.Tensor):
            loss = loss + 0.0 * logit_bias.sum()   # a constant shift of every logit: no effect, zero gradient
        return {"contrastive_loss": loss} if output_dict else loss
