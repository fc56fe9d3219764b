"""Weight averaging for a training phase: an exponential moving average (EMA) of the parameters.

Stage 2's contrastive objective changes under the model every `refresh_every` steps (the mined
negatives are re-embedded with the current weights), and its raw weights wander from one
interval to the next; which point of that walk the last step lands on decides a good part of
the result.  An EMA of the weights is the model at the centre of the recent walk: the same
training, read out with less dependence on where the last step happened to end
(docs/EXPERIMENTS.md, "Stage 2: weight averaging").

`ParamEMA(model, decay)` keeps a float32 shadow of every floating-point parameter, starting at
the parameters' values when it is built (for stage 2: the stage-1 weights), and after each
optimizer step sets shadow <- decay * shadow + (1 - decay) * param.  Buffers are not averaged:
the model's own are kept.  `state_tensors()` / `load_state_tensors()` save and restore the
shadow (exact resume); `copy_to(model)` writes it into the model.  Every rank of a distributed
run holds the same parameters after a step, so every rank computes the same shadow.
"""
from __future__ import annotations

import torch
from torch import nn

from .checkpoint import CheckpointError

__all__ = ["ParamEMA", "attach_ema"]


class ParamEMA:
    """Exponential moving average of `model`'s floating-point parameters (see the module docstring)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay: expected a float in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.names = [n for n, p in model.named_parameters() if p.is_floating_point()]
        params = dict(model.named_parameters())
        self.shadow = {n: params[n].detach().float().clone() for n in self.names}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * param, for every averaged parameter."""
        params = dict(model.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise ValueError(f"model: lacks the averaged parameters {missing[:4]} (a different model than the "
                             f"one the average was built from)")
        for n in self.names:
            self.shadow[n].lerp_(params[n].detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged values into `model`'s parameters (in their own dtype)."""
        params = dict(model.named_parameters())
        for n in self.names:
            params[n].copy_(self.shadow[n].to(params[n].dtype))

    def state_tensors(self, prefix: str = "ema.") -> dict:
        """The shadow as {prefix + name: tensor} (for a checkpoint's tensors)."""
        return {prefix + n: t for n, t in self.shadow.items()}

    def load_state_tensors(self, tensors: dict, prefix: str = "ema.") -> bool:
        """Restore the shadow from `state_tensors`' output; False (nothing changed) when `tensors`
        holds none of it, ValueError when it holds only part of it or a shape differs."""
        found = {n: tensors[prefix + n] for n in self.names if prefix + n in tensors}
        if not found:
            return False
        if len(found) != len(self.names):
            lost = [n for n in self.names if n not in found]
            raise ValueError(f"tensors: the saved average lacks {len(lost)} parameters (e.g. {lost[:3]})")
        for n, t in found.items():
            if t.shape != self.shadow[n].shape:
                raise ValueError(f"tensors: {prefix + n} has shape {tuple(t.shape)}, expected "
                                 f"{tuple(self.shadow[n].shape)}")
            self.shadow[n] = t.detach().float().clone().to(self.shadow[n].device)
        return True


def attach_ema(phase, decay: float) -> ParamEMA:
    """Average `phase.model`'s parameters over its training (a `solar.trainer.Phase`, before
    `train_loop` runs it): the EMA is updated after every optimizer step (chained after the
    phase's own `after_step`) and saved with each checkpoint as extra tensors ``ema.<name>``
    (chained after its own `extra_state` / `restore_extra`), so a resumed run continues the same
    average.  Returns the ParamEMA; the caller copies it into the model when the loop is done."""
    ema = ParamEMA(phase.model, decay)
    after, extra, restore = phase.after_step, phase.extra_state, phase.restore_extra

    def after_step(done):
        ema.update(phase.model)
        return after(done) if after is not None else None

    def extra_state():
        js, tensors = extra() if extra is not None else ({}, {})
        return js, {**tensors, **ema.state_tensors()}

    def restore_extra(js, tensors):
        if restore is not None:
            restore(js, {k: v for k, v in tensors.items() if not k.startswith("ema.")})
        if not ema.load_state_tensors(tensors):
            raise CheckpointError("checkpoint: holds no weight average (ema.*) although this run averages "
                             "(stage2.ema_decay > 0): it was written by a run without one")

    phase.after_step, phase.extra_state, phase.restore_extra = after_step, extra_state, restore_extra
    return ema
