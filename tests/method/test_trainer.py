"""The shared training loop (solar.trainer) on every phase: micro-batches (GradCache) equal one
batch, resume after a kill equals an uninterrupted run, bf16 autocast and activation
checkpointing run, per-group learning rates, interval metrics, atomic checkpoints."""
import copy
import os
import sys

import pytest
import torch

from test_train_dist import _bank, _model  # noqa: E402  (tests/distributed, on sys.path: conftest.py)

from solar.config import Stage1Config, Stage2Config  # noqa: E402
from solar.distributed import DistInfo  # noqa: E402
from solar.trainer import LoopOptions, OptimSpec, Phase, train_loop  # noqa: E402

PHASES = ("stage1", "stage2", "clip_sf")
BATCH = 8


def _loss(phase: str, model):
    """The phase's loss module over `model` (stage 2: a frozen copy as teacher, no mining)."""
    from solar.baselines import ClipSFLoss
    from solar.stage1 import Stage1Loss
    from solar.stage2 import Stage2Loss
    if phase == "stage1":
        return Stage1Loss(model, Stage1Config(steps=6, warmup_steps=1, rho_hold_frac=0.0, log_every=1))
    if phase == "stage2":
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        cfg = Stage2Config(steps=6, batch_size=BATCH, warmup_steps=1, mine_k=0, n_segments=3, kmeans_iters=2)
        return Stage2Loss(model, teacher, cfg, seed=1)
    return ClipSFLoss(model, temperature=0.1)


def _phase(name: str, model, *, steps=6, ckpt_every=0, log_every=1, lr_scales=None, loss=None) -> Phase:
    return Phase(name=name, model=model, loss=loss or _loss(name, model), data=_bank(), steps=steps,
                 global_batch=BATCH, optim=OptimSpec(lr=1e-3, warmup=1, weight_decay=0.05, grad_clip=1.0),
                 lr_scales=lr_scales or {}, ckpt_every=ckpt_every, log_every=log_every)


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("phase", PHASES)
def test_four_micro_batches_give_the_loss_and_gradients_of_one_batch(phase):
    """GradCache: 4 micro-batches of 2 pairs give the loss and every parameter gradient of one
    batch of 8 (tolerance: rel 1e-4, abs 1e-6 on gradients: only the summation order differs)."""
    from solar.trainer import _grad_cache_step
    from contextlib import nullcontext
    batch = _bank().batch(0, BATCH)
    ref_model = _model()
    loss_mod = _loss(phase, ref_model)
    ref_loss, _ = loss_mod(batch, 3)
    ref_loss.backward()
    ref = _grads(ref_model)
    model = _model()
    got_loss, _ = _grad_cache_step(_loss(phase, model), batch, 3, 4, nullcontext, torch.device("cpu"), 1.0)
    got = _grads(model)
    assert float(got_loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    assert got.keys() == ref.keys() and len(ref) > 10
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{phase} {k}: {m}")
    # the QDA statistics (stage 1) were updated once, from the whole batch
    if phase == "stage1":
        assert torch.equal(model.qda_v, ref_model.qda_v)


def test_micro_batches_must_divide_the_batch_and_need_the_split():
    from contextlib import nullcontext

    from solar.trainer import _grad_cache_step
    model = _model()
    with pytest.raises(ValueError, match="micro_batches: 3 does not divide"):
        _grad_cache_step(_loss("clip_sf", model), _bank().batch(0, BATCH), 0, 3, nullcontext, torch.device("cpu"), 1)
    with pytest.raises(ValueError, match="no embed / loss_from split"):
        _grad_cache_step(lambda b, s: None, _bank().batch(0, BATCH), 0, 2, nullcontext, torch.device("cpu"), 1)


@pytest.mark.parametrize("phase", PHASES)
def test_micro_batched_training_matches_plain_training(phase, tmp_path):
    """Three optimizer steps with micro_batches=4 end at the weights of plain steps."""
    states = []
    for mb in (1, 4):
        model = _model()
        train_loop(_phase(phase, model, steps=3), out_dir=str(tmp_path / f"mb{mb}"), resume=False, log=None,
                   dist_info=DistInfo(), options=LoopOptions(micro_batches=mb, progress=False))
        states.append(model.state_dict())
    for k, v in states[0].items():
        if v.is_floating_point():
            torch.testing.assert_close(states[1][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{phase} {k}: {m}")


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("ckpt_every,kill_at", [(2, 3), (1, 4)])
def test_resume_after_a_kill_equals_an_uninterrupted_run(phase, ckpt_every, kill_at, tmp_path):
    """Killed at step `kill_at` (after the last checkpoint), resumed: bit-identical weights,
    buffers (QDA statistics) and logged losses."""
    ref_model, ref_log = _model(), {}
    train_loop(_phase(phase, ref_model, ckpt_every=ckpt_every), out_dir=str(tmp_path / "ref"), resume=False,
               log=lambda r, stage, step: ref_log.__setitem__(step, r["loss"]), dist_info=DistInfo(),
               options=LoopOptions(progress=False))
    out = str(tmp_path / "killed")
    model = _model()
    loss = _loss(phase, model)
    fwd = type(loss).forward

    def boom(self, batch, step):
        if step == kill_at:
            raise _Boom
        return fwd(self, batch, step)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(loss), "forward", boom)
        with pytest.raises(_Boom):
            train_loop(_phase(phase, model, ckpt_every=ckpt_every, loss=loss), out_dir=out, resume=False, log=None,
                       dist_info=DistInfo(), options=LoopOptions(progress=False))
    torch.manual_seed(1234)   # the resumed run restores the RNG state from the checkpoint
    model, got_log = _model(), {}
    train_loop(_phase(phase, model, ckpt_every=ckpt_every), out_dir=out, resume=True,
               log=lambda r, stage, step: got_log.__setitem__(step, r["loss"]), dist_info=DistInfo(),
               options=LoopOptions(progress=False))
    assert min(got_log) == (kill_at // ckpt_every) * ckpt_every + 1   # it did resume, not restart
    for step, v in got_log.items():
        assert v == ref_log[step], (phase, step)
    for k, v in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), f"{phase}: {k} differs after resume"


@pytest.mark.parametrize("phase", PHASES)
def test_bf16_autocast_and_activation_checkpointing_run(phase, tmp_path):
    """bf16 autocast (CPU autocast exercises the code path) trains to finite losses near the
    fp32 ones; activation checkpointing recomputes E_VL / the towers and changes nothing."""
    logs = {}
    states = {}
    for name, opts in (("fp32", LoopOptions(progress=False)), ("bf16", LoopOptions(precision="bf16", progress=False)),
                       ("ckpt", LoopOptions(activation_checkpointing=True, progress=False))):
        model, rows = _model(), []
        train_loop(_phase(phase, model, steps=3), out_dir=str(tmp_path / name), resume=False,
                   log=lambda r, stage, step: rows.append(r["loss"]), dist_info=DistInfo(), options=opts)
        logs[name], states[name] = rows, model.state_dict()
        assert model.activation_checkpointing == (name == "ckpt")
    assert all(torch.isfinite(torch.tensor(logs["bf16"])))
    assert logs["bf16"] == pytest.approx(logs["fp32"], rel=0.05)
    assert logs["bf16"] != logs["fp32"]          # autocast did run in bf16
    assert logs["ckpt"] == pytest.approx(logs["fp32"], rel=1e-6)
    for k, v in states["fp32"].items():
        if v.is_floating_point():
            torch.testing.assert_close(states["ckpt"][k], v, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_recomputes_fusion_layers():
    """With checkpointing on, E_VL's layers run again during backward (counted)."""
    model = _model()
    calls = []
    for layer in model.fusion:   # (forward hooks do not fire on recomputation: wrap forward)
        def counted(*a, _f=layer.forward, **kw):
            calls.append(1)
            return _f(*a, **kw)
        layer.forward = counted
    batch = _bank().batch(0, BATCH)
    for on in (False, True):
        calls.clear()
        model.set_activation_checkpointing(on)
        model.train()
        f = model.fuse(model.patch_tokens(batch["pixel_values"]),
                       model.text_tokens(batch["input_ids"], batch["attention_mask"]))
        n_fwd = len(calls)
        f.sum().backward()
        assert len(calls) == (2 * n_fwd if on else n_fwd), on


def test_per_group_learning_rates(tmp_path):
    """lr_scales: a 0 scale freezes the towers' updates, the rest of the model moves."""
    model = _model()
    init = copy.deepcopy(model.state_dict())
    train_loop(_phase("clip_sf", model, steps=2, lr_scales={"vision.": 0.0, "text.": 0.0}),
               out_dir=str(tmp_path), resume=False, log=None, dist_info=DistInfo(), options=LoopOptions(progress=False))
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, init[k])}
    assert moved and not any(k.startswith(("vision.", "text.")) for k in moved)
    assert any(k.startswith("adapter_v.") for k in moved)
    with pytest.raises(ValueError, match="lr_scales: the scale of 'vision.'"):
        train_loop(_phase("clip_sf", _model(), lr_scales={"vision.": -1}), out_dir=str(tmp_path / "x"),
                   resume=False, log=None, dist_info=DistInfo(), options=LoopOptions(progress=False))


def test_interval_metrics_are_means_read_once_per_interval(tmp_path, monkeypatch):
    """log_every=3: one row per 3 steps whose loss is the mean of the 3 per-step losses, with
    step time, data-wait time, pairs/s and (count_flops) a TFLOP/s estimate; the loop reads
    the device once per interval (Tensor.tolist in solar/trainer.py), never per step."""
    per_step = []
    train_loop(_phase("clip_sf", _model(), steps=6), out_dir=str(tmp_path / "a"), resume=False,
               log=lambda r, stage, step: per_step.append(r["loss"]), dist_info=DistInfo(),
               options=LoopOptions(progress=False))
    rows = []
    calls = {"tolist": 0}
    orig = torch.Tensor.tolist

    def counting(self):
        # the loop's own reads (solar/trainer.py); the ops' input checks sync on their own
        # (solar_kernels' finiteness check reads its min / max) and are not the loop's business
        if sys._getframe(1).f_code.co_filename.endswith(os.path.join("solar", "trainer.py")):
            calls["tolist"] += 1
        return orig(self)
    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    train_loop(_phase("clip_sf", _model(), steps=6, log_every=3), out_dir=str(tmp_path / "b"), resume=False,
               log=lambda r, stage, step: rows.append((step, r)), dist_info=DistInfo(),
               options=LoopOptions(progress=False, count_flops=True))
    monkeypatch.setattr(torch.Tensor, "tolist", orig)
    assert [s for s, _ in rows] == [3, 6]
    assert rows[0][1]["loss"] == pytest.approx(sum(per_step[:3]) / 3, rel=1e-6)
    assert rows[1][1]["loss"] == pytest.approx(sum(per_step[3:]) / 3, rel=1e-6)
    for _, r in rows:
        assert r["step_time_s"] > 0 and 0 <= r["data_wait_s"] <= r["step_time_s"]
        assert r["pairs_per_s"] == pytest.approx(BATCH / r["step_time_s"], rel=0.05)
        assert r["tflops"] > 0 and "pos_sim" in r and "grad_norm" in r
    assert calls["tolist"] == len(rows)


def test_non_finite_loss_is_raised_at_the_end_of_its_interval(tmp_path):
    from solar.baselines import ClipSFLoss
    model = _model()
    loss = ClipSFLoss(model, temperature=0.1)
    fwd = ClipSFLoss.forward

    class Nan(ClipSFLoss):
        def forward(self, batch, step):
            out, m = fwd(self, batch, step)
            return (out * float("nan") if step == 1 else out), m
    loss.__class__ = Nan
    with pytest.raises(FloatingPointError, match=r"non-finite loss in steps 1\.\.2"):
        train_loop(_phase("clip_sf", model, steps=4, log_every=2, loss=loss), out_dir=str(tmp_path), resume=False,
                   log=None, dist_info=DistInfo(), options=LoopOptions(progress=False))


def test_checkpoint_is_written_to_a_temporary_name_then_renamed(tmp_path, monkeypatch):
    """A crash while writing checkpoint 2 leaves checkpoint 1 complete as the latest."""
    import solar.checkpoint as ck
    from solar.trainer import load_train_state, make_optimizer
    out = str(tmp_path)
    model = _model()
    orig = ck._atomic_json
    writes = {"n": 0}

    def crash(path, obj):
        if path.name == ck.TRAINER_JSON:
            writes["n"] += 1
            if writes["n"] == 2:
                raise OSError("disk full")
        return orig(path, obj)
    monkeypatch.setattr(ck, "_atomic_json", crash)
    with pytest.raises(OSError, match="disk full"):
        train_loop(_phase("clip_sf", model, steps=4, ckpt_every=1), out_dir=out, resume=False, log=None,
                   dist_info=DistInfo(), options=LoopOptions(progress=False))
    monkeypatch.setattr(ck, "_atomic_json", orig)
    fresh = _model()
    meta = load_train_state(os.path.join(out, "ckpt"), model=fresh, optimizer=make_optimizer(
        fresh, OptimSpec(lr=1e-3, warmup=1, weight_decay=0.05, grad_clip=1.0)), generators={})
    assert meta["step"] == 1


def test_run_flags_reach_the_loop():
    from solar.cli import parse_args
    from solar.train import loop_options
    cfg = parse_args(["--run.precision", "bf16", "--run.micro_batches", "4", "--run.activation_checkpointing"])
    o = loop_options(cfg)
    assert (o.precision, o.micro_batches, o.activation_checkpointing) == ("bf16", 4, True)
    assert loop_options(parse_args([])) == LoopOptions(progress=True)
    for bad in (["--run.precision", "fp16"], ["--run.micro_batches", "0"]):
        with pytest.raises(SystemExit) as e:
            parse_args(bad)
        assert e.value.code == 2
    with pytest.raises(ValueError, match="precision: expected 'fp32' or 'bf16', got 'fp8'"):
        LoopOptions(precision="fp8")


@pytest.mark.parametrize("crash_after", ["first_rename", "second_rename"])
def test_resume_after_a_kill_inside_the_checkpoint_rotation(tmp_path, monkeypatch, crash_after):
    """Killed between `ckpt -> ckpt.old` and `ckpt.tmp -> ckpt` (two complete checkpoints on
    disk, none named ckpt), resume used to start from step 0; now it finishes the rotation and
    resumes from the newer checkpoint.  Killed after the second rename, the stale .old goes."""
    import solar.checkpoint as ck
    out = str(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        rotating = os.path.exists(os.path.join(out, "ckpt.old"))
        real_replace(src, dst)
        # save 2 (step 2) is the first rotation: crash right after its first / second rename
        if crash_after == "first_rename" and str(dst).endswith("ckpt.old"):
            raise KeyboardInterrupt("killed")
        if crash_after == "second_rename" and rotating and str(src).endswith("ckpt.tmp"):
            raise KeyboardInterrupt("killed")
    monkeypatch.setattr(ck.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        train_loop(_phase("clip_sf", _model(), steps=4, ckpt_every=1), out_dir=out, resume=False, log=None,
                   dist_info=DistInfo(), options=LoopOptions(progress=False))
    monkeypatch.setattr(ck.os, "replace", real_replace)
    ckpt = os.path.join(out, "ckpt")
    assert os.path.isdir(ckpt + ".old") and os.path.isdir(ckpt + (".tmp" if crash_after == "first_rename" else ""))
    steps = []
    train_loop(_phase("clip_sf", _model(), steps=4, ckpt_every=1), out_dir=out, resume=True,
               log=lambda r, stage, step: steps.append(step), dist_info=DistInfo(),
               options=LoopOptions(progress=False))
    assert min(steps) == 3, steps     # resumed after step 2, not from step 0
    assert not os.path.exists(ckpt + ".old") and not os.path.exists(ckpt + ".tmp")


def test_resume_checks_the_checkpoint_against_the_run(tmp_path, capsys):
    """A checkpoint past the run's last step is refused (it used to write the step-4 model
    labelled 2 steps); a changed lr or batch resumes with a warning naming each change."""
    from solar.checkpoint import CheckpointError
    out = str(tmp_path)
    train_loop(_phase("clip_sf", _model(), steps=4, ckpt_every=2), out_dir=out, resume=False, log=None,
               dist_info=DistInfo(), options=LoopOptions(progress=False))
    with pytest.raises(CheckpointError, match="step 4, past this run's .*steps = 2"):
        train_loop(_phase("clip_sf", _model(), steps=2, ckpt_every=2), out_dir=out, resume=True, log=None,
                   dist_info=DistInfo(), options=LoopOptions(progress=False))
    phase = _phase("clip_sf", _model(), steps=6, ckpt_every=2)
    phase.optim = OptimSpec(lr=5e-4, warmup=phase.optim.warmup, weight_decay=phase.optim.weight_decay,
                            grad_clip=phase.optim.grad_clip)
    capsys.readouterr()
    train_loop(phase, out_dir=out, resume=True, log=None, dist_info=DistInfo(), options=LoopOptions(progress=False))
    err = capsys.readouterr().out
    assert "changed setting: optim.lr: 0.001 -> 0.0005" in err and "steps: 4 -> 6" in err


@pytest.fixture(scope="module")
def stream_urls(tmp_path_factory):
    from solar.data.shapesworld import write_shards
    out = tmp_path_factory.mktemp("stream_shards")
    man = write_shards(str(out), 48, seed=4, shard_size=16, workers=1, image_size=32, progress=False)
    return [str(out / n) for n in man["shards"]]


def _stream(urls):
    """A streamed phase's batches (ShapesWorld shards, in-process reader) and the loaders it made."""
    from solar.data.batches import ShardStreams
    from solar.data.tokenizer import shapesworld_tokenizer
    streams = ShardStreams(urls, shapesworld_tokenizer(16), image_size=32, patch_size=8, max_length=16,
                           num_workers=0, seed=0)
    made = []
    make = streams.make

    def keep(global_batch, salt, start=None):
        made.append(make(global_batch, salt, start))
        return made[-1]
    streams.make = keep
    return streams.phase(BATCH, 1), made


@pytest.mark.parametrize("phase", PHASES)
def test_streaming_resume_equals_an_uninterrupted_run_without_decoding_consumed_batches(phase, stream_urls,
                                                                                        tmp_path):
    """A streamed phase killed at step 5 (checkpoint at 4) and resumed: bit-identical logged
    losses and weights, and the resumed reader decodes only the batches of steps 4.. (none of
    the 4 consumed ones); the checkpoint holds the reader position."""
    from solar.data.tokenizer import shapesworld_tokenizer
    tok = shapesworld_tokenizer(16)
    steps, ckpt_every, kill_at = 7, 4, 5

    def run(out, resume, data, log=None, loss=None):
        from solar.model import ModelConfig, SolarModel
        torch.manual_seed(0)     # _model()'s tiny model, with the tokenizer's vocabulary and special ids
        model = SolarModel(ModelConfig(
            image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2, vision_mlp=64,
            max_text_len=16, text_hidden=32, text_layers=1, text_heads=2, text_mlp=64, width=32, adapter_hidden=64,
            fusion_layers=1, fusion_heads=2, fusion_mlp=64, embed_dim=16).with_tokenizer(tok))
        model.tau_v.fill_(0.0)
        model.tau_l.fill_(0.0)
        p = _phase(phase, model, steps=steps, ckpt_every=ckpt_every, loss=loss and loss(model))
        p.data = data
        train_loop(p, out_dir=out, resume=resume, log=log, dist_info=DistInfo(), options=LoopOptions(progress=False))
        return model
    ref_log = {}
    ref = run(str(tmp_path / "ref"), False, _stream(stream_urls)[0],
              log=lambda r, stage, step: ref_log.__setitem__(step, r["loss"]))

    def killing_loss(model):
        loss = _loss(phase, model)
        fwd = type(loss).forward

        def boom(batch, step):
            if step == kill_at:
                raise _Boom
            return fwd(loss, batch, step)
        loss.forward = boom
        return loss
    out = str(tmp_path / "killed")
    with pytest.raises(_Boom):
        run(out, False, _stream(stream_urls)[0], loss=killing_loss)
    import json
    saved = json.load(open(os.path.join(out, "ckpt", "trainer.json")))
    pos = saved["extra"]["data"][0]
    assert pos["step"] == ckpt_every and pos["stream"]["roles"][0] is not None
    torch.manual_seed(1234)
    data, made = _stream(stream_urls)
    got_log = {}
    model = run(out, True, data, log=lambda r, stage, step: got_log.__setitem__(step, r["loss"]))
    assert min(got_log) == ckpt_every + 1 and data.skipped == 0
    assert len(made) == 1 and made[0].stats.totals()["seen"] == (steps - ckpt_every) * BATCH
    for step, v in got_log.items():
        assert v == ref_log[step], (phase, step)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), f"{phase}: {k} differs after resume"
