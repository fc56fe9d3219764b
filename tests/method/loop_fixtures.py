"""Shared by the loop-feature tests: a phase's loss killed at a given step (a crash between checkpoints)."""
from __future__ import annotations

import contextlib

import pytest

from solar.distributed import DistInfo
from solar.trainer import LoopOptions, train_loop


class Killed(RuntimeError):
    """Raised by the phase's loss at the kill step (what a crash between checkpoints looks like)."""


@contextlib.contextmanager
def loss_killed_at(loss_cls, step: int):
    """Within the block, `loss_cls.forward` raises `Killed` at `step`, and the block must end by
    that `Killed` (pytest.raises); the original forward is back afterwards."""
    fwd = loss_cls.forward

    def killing(self, batch, at):
        if at == step:
            raise Killed(f"{loss_cls.__name__} killed at step {step}")
        return fwd(self, batch, at)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loss_cls, "forward", killing)
        with pytest.raises(Killed):
            yield


def train_killed_at(phase, out_dir: str, step: int) -> None:
    """Run `phase` (a fresh run into `out_dir`) until its loss raises `Killed` at `step`; the
    checkpoints written before that step are what a resumed run continues from."""
    with loss_killed_at(type(phase.loss), step):
        train_loop(phase, out_dir=out_dir, resume=False, log=None, dist_info=DistInfo(),
                   options=LoopOptions(progress=False))
