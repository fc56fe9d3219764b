"""Weight averaging (solar.averaging): the EMA formula, its checks, exact resume through the loop,
and stage 2 returning the averaged weights."""
import copy

import pytest
import torch
from torch import nn

from loop_fixtures import train_killed_at  # noqa: E402  (tests/method, on sys.path: conftest.py)
from test_train_dist import _bank, _model  # noqa: E402  (tests/distributed, on sys.path: conftest.py)

from solar.averaging import ParamEMA, attach_ema  # noqa: E402
from solar.checkpoint import CheckpointError  # noqa: E402
from solar.config import Stage2Config  # noqa: E402
from solar.distributed import DistInfo  # noqa: E402
from solar.trainer import LoopOptions, OptimSpec, Phase, train_loop  # noqa: E402

BATCH = 8


def test_ema_follows_the_formula():
    """After updates with weights w_1..w_n: shadow = d^n w_0 + sum_i (1 - d) d^(n - i) w_i."""
    lin = nn.Linear(3, 2)
    w0 = lin.weight.detach().clone()
    ema = ParamEMA(lin, 0.9)
    ws = [torch.randn(2, 3, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    for w in ws:
        with torch.no_grad():
            lin.weight.copy_(w)
        ema.update(lin)
    want = 0.9 ** 4 * w0 + sum(0.1 * 0.9 ** (3 - i) * w for i, w in enumerate(ws))
    torch.testing.assert_close(ema.shadow["weight"], want, rtol=1e-6, atol=1e-7)
    ema.copy_to(lin)
    torch.testing.assert_close(lin.weight.detach(), want, rtol=1e-6, atol=1e-7)


def test_bad_decay_and_bad_saved_state_are_refused():
    lin = nn.Linear(3, 2)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="decay: expected a float in"):
            ParamEMA(lin, bad)
    ema = ParamEMA(lin, 0.5)
    assert ema.load_state_tensors({}) is False
    with pytest.raises(ValueError, match="lacks 1 parameters"):
        ema.load_state_tensors({"ema.weight": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=r"ema.bias has shape \(3,\), expected \(2,\)"):
        ema.load_state_tensors({"ema.weight": torch.zeros(2, 3), "ema.bias": torch.zeros(3)})


def _stage2_phase(model, ckpt_every):
    from solar.stage2 import Stage2Loss
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    cfg = Stage2Config(steps=5, batch_size=BATCH, warmup_steps=1, mine_k=0, n_segments=3, kmeans_iters=2)
    return Phase(name="stage2", model=model, loss=Stage2Loss(model, teacher, cfg, seed=1), data=_bank(), steps=5,
                 global_batch=BATCH, optim=OptimSpec(lr=1e-3, warmup=1, weight_decay=0.05, grad_clip=1.0),
                 ckpt_every=ckpt_every, log_every=1)



def test_resumed_average_equals_the_uninterrupted_one(tmp_path):
    """Killed after the step-2 checkpoint and resumed: the same averaged weights, bit for bit;
    and the average is not the last step's weights."""
    ref = _model()
    phase = _stage2_phase(ref, ckpt_every=2)
    ref_ema = attach_ema(phase, 0.7)
    train_loop(phase, out_dir=str(tmp_path / "ref"), resume=False, log=None, dist_info=DistInfo(),
               options=LoopOptions(progress=False))
    model = _model()
    phase = _stage2_phase(model, ckpt_every=2)
    attach_ema(phase, 0.7)
    train_killed_at(phase, str(tmp_path / "killed"), 3)
    model = _model()
    phase = _stage2_phase(model, ckpt_every=2)
    ema = attach_ema(phase, 0.7)
    train_loop(phase, out_dir=str(tmp_path / "killed"), resume=True, log=None, dist_info=DistInfo(),
               options=LoopOptions(progress=False))
    assert ema.shadow.keys() == ref_ema.shadow.keys()
    for k, v in ref_ema.shadow.items():
        assert torch.equal(ema.shadow[k], v), f"{k} differs after resume"
    assert any(not torch.equal(ema.shadow[n], p.detach()) for n, p in model.named_parameters())
    # a checkpoint without an average cannot continue a run that averages
    plain = _model()
    train_loop(_stage2_phase(plain, ckpt_every=2), out_dir=str(tmp_path / "plain"), resume=False, log=None,
               dist_info=DistInfo(), options=LoopOptions(progress=False))
    phase = _stage2_phase(_model(), ckpt_every=2)
    attach_ema(phase, 0.7)
    with pytest.raises(CheckpointError, match="holds no weight average"):
        train_loop(phase, out_dir=str(tmp_path / "plain"), resume=True, log=None, dist_info=DistInfo(),
                   options=LoopOptions(progress=False))


def test_run_stage2_returns_the_averaged_weights(tmp_path):
    """run_stage2 with ema_decay leaves the EMA in the model: equal to averaging the raw run's
    per-step weights by hand (recorded with an after_step hook)."""
    from solar.stage2 import run_stage2
    import solar.stage2 as s2
    cfg = Stage2Config(steps=3, batch_size=BATCH, warmup_steps=1, mine_k=0, n_segments=3, kmeans_iters=2,
                       text_neutral_df=0.0)
    raw = _model()
    start = {n: p.detach().clone() for n, p in raw.named_parameters()}
    seen = []
    orig = s2.train_loop

    def spy(phase, **kw):
        after = phase.after_step

        def rec(done):
            seen.append({n: p.detach().clone() for n, p in phase.model.named_parameters()})
            return after(done) if after is not None else None
        phase.after_step = rec
        return orig(phase, **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(s2, "train_loop", spy)
        run_stage2(raw, _bank(), cfg, out_dir=str(tmp_path / "raw"), seed=1, progress=False, ckpt_every=0)
    avg = _model()
    run_stage2(avg, _bank(), Stage2Config(**{**cfg.__dict__, "ema_decay": 0.5}), out_dir=str(tmp_path / "avg"),
               seed=1, progress=False, ckpt_every=0)
    for n, p in avg.named_parameters():
        want = start[n]
        for w in seen:
            want = 0.5 * want + 0.5 * w[n]
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
