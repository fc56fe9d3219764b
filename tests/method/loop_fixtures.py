"""Shared by the loop-feature tests: a run of `solar.trainer.train_loop` killed at a given step."""
from __future__ import annotations

import pytest

from solar.distributed import DistInfo
from solar.trainer import LoopOptions, train_loop


class Killed(RuntimeError):
    """Raised by the phase's loss at the kill step (what a crash between checkpoints looks like)."""


def train_killed_at(phase, out_dir: str, step: int) -> None:
    """Run `phase` (a fresh run into `out_dir`) until its loss raises `Killed` at `step`; the
    checkpoints written before that step are what a resumed run continues from."""
    fwd = type(phase.loss).forward

    def killing(self, batch, at):
        if at == step:
            raise Killed
        return fwd(self, batch, at)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(phase.loss), "forward", killing)
        with pytest.raises(Killed):
            train_loop(phase, out_dir=out_dir, resume=False, log=None, dist_info=DistInfo(),
                       options=LoopOptions(progress=False))
