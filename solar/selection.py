"""Checkpoint selection on the validation benchmark: keep the best of a phase's snapshots.

Stage 2's validation Avg does not grow steadily with its steps: from one stage-1 model it rose
for the first 100-150 steps and then fell back by 5-12 points while the loss kept going down
(docs/EXPERIMENTS.md, "Stage 2: checkpoint selection"), and how far it fell differed from one
stage-1 model and one float rounding to the next.  Scoring snapshots on the validation benchmark
(`data.val_bench`, never the test one) and returning the best is early stopping: the result no
longer depends on where the last step happens to land.

`attach_selection(phase, score, every)` scores the model after every `every`-th optimizer step
and after the last one (`score(model) -> float`, higher is better; e.g. the validation Avg),
keeps a copy of the best-scoring weights (the first of equal scores) and logs each score as
``select_score`` (and ``select_best_step``).  The best weights, score and step are saved with each
checkpoint (extra tensors ``best.<name>``), so a resumed run selects what an uninterrupted one
does.  Under torch.distributed rank 0 scores and broadcasts the score, so every rank keeps the
same weights.  The caller writes the selection into the model when the loop is done
(`Selection.copy_to`).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .checkpoint import CheckpointError
from .distributed import DistInfo

__all__ = ["Selection", "attach_selection"]


class Selection:
    """The best-scoring weights of a run so far: `step`, `score` and a copy of the state dict."""

    def __init__(self):
        self.step = -1
        self.score = float("-inf")
        self.state: Optional[dict] = None

    def offer(self, model: nn.Module, step: int, score: float) -> bool:
        """Keep `model`'s weights when `score` beats the best so far; True when kept."""
        if not score > self.score:
            return False
        self.step, self.score = int(step), float(score)
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return True

    def copy_to(self, model: nn.Module) -> None:
        """Load the selected weights into `model` (nothing when nothing was scored)."""
        if self.state is not None:
            model.load_state_dict(self.state)


def attach_selection(phase, score: Callable[[nn.Module], float], every: int,
                     dist_info: Optional[DistInfo] = None) -> Selection:
    """Score `phase.model` every `every` steps and after the last, keeping the best (see the module
    docstring); chains after the phase's own after_step / extra_state / restore_extra hooks.
    Call before `solar.trainer.train_loop` runs the phase; returns the Selection."""
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every: expected an int >= 1, got {every!r}")
    di = dist_info or DistInfo()
    sel = Selection()
    after, extra, restore = phase.after_step, phase.extra_state, phase.restore_extra

    def scored(model):
        value = torch.tensor([float(score(model)) if di.is_main else 0.0], dtype=torch.float64)
        if di.enabled:
            import torch.distributed as dist
            value = value.to(di.device)
            dist.broadcast(value, 0, group=di.group)
        return float(value.item())

    def after_step(done):
        row = after(done) if after is not None else None
        if done % every == 0 or done == phase.steps:
            s = scored(phase.model)
            sel.offer(phase.model, done, s)
            row = {**(row or {}), "select_score": s, "select_best_step": sel.step}
        return row

    def extra_state():
        js, tensors = extra() if extra is not None else ({}, {})
        if sel.state is None:
            return js, tensors
        return ({**js, "select": {"step": sel.step, "score": sel.score}},
                {**tensors, **{"best." + k: v for k, v in sel.state.items()}})

    def restore_extra(js, tensors):
        if restore is not None:
            restore({k: v for k, v in js.items() if k != "select"},
                    {k: v for k, v in tensors.items() if not k.startswith("best.")})
        if "select" not in js:
            if any(k.startswith("best.") for k in tensors):
                raise CheckpointError("checkpoint: holds selected weights (best.*) but no selection record")
            return
        state = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
        want = set(phase.model.state_dict())
        if set(state) != want:
            raise CheckpointError(f"checkpoint: the selected weights (best.*) do not match the model: "
                                  f"missing {sorted(want - set(state))[:4]}, unexpected {sorted(set(state) - want)[:4]}")
        sel.step, sel.score = int(js["select"]["step"]), float(js["select"]["score"])
        sel.state = {k: v.clone() for k, v in state.items()}

    phase.after_step, phase.extra_state, phase.restore_extra = after_step, extra_state, restore_extra
    return sel
