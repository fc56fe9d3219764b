"""Checkpoint selection (solar.selection): the best-scoring snapshot is kept, the schedule of the
scores, exact resume, the config checks, and stage 2 through `solar.train` selecting on the
validation benchmark."""
import pytest
import torch

from loop_fixtures import train_killed_at  # noqa: E402  (tests/method, on sys.path: conftest.py)
from test_train_dist import _bank, _model  # noqa: E402  (tests/distributed, on sys.path: conftest.py)

from solar.checkpoint import CheckpointError  # noqa: E402
from solar.config import ConfigError, Stage2Config, get_preset  # noqa: E402
from solar.distributed import DistInfo  # noqa: E402
from solar.selection import Selection, attach_selection  # noqa: E402
from solar.trainer import LoopOptions, OptimSpec, Phase, train_loop  # noqa: E402

BATCH = 8
PEAK = 4   # the fake score peaks after this many steps


def _phase(model, steps=7, ckpt_every=0):
    from solar.baselines import ClipSFLoss
    return Phase(name="clip_sf", model=model, loss=ClipSFLoss(model, temperature=0.1), data=_bank(), steps=steps,
                 global_batch=BATCH, optim=OptimSpec(lr=1e-3, warmup=1, weight_decay=0.05, grad_clip=1.0),
                 ckpt_every=ckpt_every, log_every=1)


class _Scorer:
    """Score = -|steps taken - PEAK|, counting optimizer steps through the model's weights changing;
    records the weights it saw at each call."""

    def __init__(self, phase):
        self.phase, self.seen, self.calls = phase, {}, []

    def __call__(self, model):
        done = self.phase._done
        self.calls.append(done)
        self.seen[done] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return -abs(done - PEAK)


def _attach(phase, every):
    scorer = _Scorer(phase)
    phase._done = 0
    sel = attach_selection(phase, scorer, every)
    inner = phase.after_step

    def count(done):
        phase._done = done
        return inner(done)
    phase.after_step = count
    return sel, scorer


def test_the_best_snapshot_is_kept_and_scores_are_logged(tmp_path):
    model = _model()
    phase = _phase(model)
    sel, scorer = _attach(phase, every=2)
    rows = []
    train_loop(phase, out_dir=str(tmp_path), resume=False, dist_info=DistInfo(), options=LoopOptions(progress=False),
               log=lambda r, stage, step: rows.append((step, r)))
    assert scorer.calls == [2, 4, 6, 7]                  # every 2 steps and after the last
    assert (sel.step, sel.score) == (PEAK, 0.0)
    last = {k: v.clone() for k, v in model.state_dict().items()}
    sel.copy_to(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, scorer.seen[PEAK][k]), k
    assert any(not torch.equal(last[k], scorer.seen[PEAK][k]) for k in last)   # not the last step's weights
    logged = {step: r["select_score"] for step, r in rows if "select_score" in r}
    assert logged == {2: -2.0, 4: 0.0, 6: -2.0, 7: -3.0}


def test_a_resumed_run_selects_what_an_uninterrupted_one_does(tmp_path):
    ref = _model()
    phase = _phase(ref, ckpt_every=5)
    ref_sel, _ = _attach(phase, every=2)
    train_loop(phase, out_dir=str(tmp_path / "ref"), resume=False, log=None, dist_info=DistInfo(),
               options=LoopOptions(progress=False))
    model = _model()
    phase = _phase(model, ckpt_every=5)
    _attach(phase, every=2)
    train_killed_at(phase, str(tmp_path / "run"), 6)
    model = _model()
    phase = _phase(model, ckpt_every=5)
    sel, scorer = _attach(phase, every=2)
    train_loop(phase, out_dir=str(tmp_path / "run"), resume=True, log=None, dist_info=DistInfo(),
               options=LoopOptions(progress=False))
    assert scorer.calls == [6, 7]                           # resumed after the step-5 checkpoint
    assert (sel.step, sel.score) == (ref_sel.step, ref_sel.score) == (PEAK, 0.0)
    for k, v in ref_sel.state.items():
        assert torch.equal(sel.state[k], v), k


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="every: expected an int >= 1, got 0"):
        attach_selection(_phase(_model()), lambda m: 0.0, 0)
    with pytest.raises(ConfigError, match="select_every"):
        Stage2Config(select_every=50, ema_decay=0.99)
    cfg = get_preset("tiny")
    assert cfg.stage2.select_every == 50 and get_preset("clip-b16").stage2.select_every == 0
    from solar.cli import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--data.val_bench", "false"])            # tiny selects on the validation benchmark
    assert parse_args(["--data.val_bench", "false", "--stage2.select_every", "0"]).stage2.select_every == 0
    # a checkpoint with selected weights for another model is refused on resume
    sel = Selection()
    sel.offer(torch.nn.Linear(2, 2), 3, 1.0)
    phase = _phase(_model())
    attach_selection(phase, lambda m: 0.0, 2)
    with pytest.raises(CheckpointError, match="do not match the model"):
        phase.restore_extra({"select": {"step": 3, "score": 1.0}}, {"best." + k: v for k, v in sel.state.items()})
