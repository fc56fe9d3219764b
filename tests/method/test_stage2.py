"""Stage 2: view construction, segments, mining, the loss; config CLI; metrics logger."""
import json
import os

import pytest
import torch

from solar.cli import build_parser, parse_args
from solar.config import Stage2Config, config_to_dict, get_preset
from solar.stage2 import (frequent_token_ids, image_views, low_norm_patches, segment_patches, step_generator,
                          text_views)


def _rand(seed, *shape):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed", range(5))
def test_text_views_positive_keeps_differences_negative_keeps_intersection(seed):
    B, T = 6, 12
    s = _rand(seed, B, T) * 2 - 1
    attn = torch.ones(B, T, dtype=torch.bool)
    attn[:, 9:] = False                       # padding
    valid = attn.clone()
    valid[:, 0] = False                       # BOS
    valid[:, 8] = False                       # EOS
    tau = 0.1
    u = _rand(seed + 100, B, T)
    pos, neg, changed = text_views(s, valid, attn, tau, drop=0.5, u=u)
    inter = valid & (s > tau)
    diff = valid & (s <= tau)
    # positive: every difference token and every special token stays; only intersection hidden
    assert (pos[diff]).all()
    assert (pos[attn & ~valid]).all()
    hidden_pos = attn & ~pos
    assert not (hidden_pos & ~inter).any()
    # at least one intersection token hidden when the pair has any
    for b in range(B):
        if inter[b].any():
            assert hidden_pos[b].any()
    # hard negative: all difference tokens hidden, the intersection and specials kept
    assert not (neg & diff).any()
    assert (neg[inter]).all() and (neg[attn & ~valid]).all()
    assert torch.equal(changed, diff.any(1))
    # padding never becomes visible
    assert not (pos & ~attn).any() and not (neg & ~attn).any()


def test_text_views_drop_rate_and_margin():
    B, T = 64, 40
    s = torch.full((B, T), 0.9)
    valid = torch.ones(B, T, dtype=torch.bool)
    u = _rand(3, B, T)
    pos, _, _ = text_views(s, valid, valid, 0.0, drop=0.3, u=u)
    rate = (~pos).float().mean().item()
    assert 0.2 < rate < 0.4
    # tokens inside the margin band are never hidden in either view
    s2 = torch.full((B, T), 0.05)
    pos2, neg2, ch2 = text_views(s2, valid, valid, 0.0, drop=1.0, u=u, margin=0.1)
    assert pos2.all() and neg2.all() and not ch2.any()


@pytest.mark.parametrize("seed", range(4))
def test_segments_are_whole_in_image_views(seed):
    B, P, W, k = 5, 64, 16, 4
    feats = torch.randn(B, P, W, generator=torch.Generator().manual_seed(seed))
    seg = segment_patches(feats, k, iters=4, position_weight=1.0)
    assert seg.shape == (B, P) and seg.dtype == torch.int64
    assert int(seg.min()) >= 0 and int(seg.max()) < k
    s_v = torch.randn(B, P, generator=torch.Generator().manual_seed(seed + 7)) * 0.3
    tau = 0.0
    u = _rand(seed + 9, B, k)
    pos, neg, changed = image_views(s_v, seg, k, tau, drop=0.5, u=u)
    for b in range(B):
        for c in seg[b].unique().tolist():
            m = seg[b] == c
            # a segment is kept or hidden as a whole, in both views
            assert pos[b, m].all() or (~pos[b, m]).all()
            assert neg[b, m].all() or (~neg[b, m]).all()
            score = s_v[b, m].mean()
            if score > tau:      # intersection segment: always kept by the hard negative
                assert neg[b, m].all()
            else:                # difference segment: always hidden by the hard negative, kept by the positive
                assert (~neg[b, m]).all() and pos[b, m].all()
        if ((torch.stack([s_v[b, seg[b] == c].mean() for c in seg[b].unique()]) > tau)).any():
            assert (~pos[b]).any()
    assert changed.dtype == torch.bool


@pytest.mark.parametrize("tau", [0.3, -0.3])
def test_image_views_score_a_segment_by_its_mean(tau):
    """A segment is intersection / difference by the mean s_v of its patches, not the sum: with
    tau != 0, segment 0 (four patches at |s| = 0.2) has its sum on the other side of tau than
    its mean.  Patch 7 is in no segment and never hidden."""
    seg = torch.tensor([[0, 0, 0, 0, 1, 1, 2, -1]])
    if tau > 0:   # seg 0: mean 0.2 <= tau < sum 0.8 -> difference; seg 1 intersection; seg 2 difference
        s_v = torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.5, 0.45, 0.1, 0.9]])
        u = torch.tensor([[0.9, 0.9, 0.9]])  # no draw below drop: the one intersection segment is forced
        want_pos = [True] * 4 + [False] * 2 + [True, True]
        want_neg = [False] * 4 + [True] * 2 + [False, True]
    else:         # seg 0: sum -0.8 <= tau < mean -0.2 -> intersection; seg 1 difference; seg 2 intersection
        s_v = torch.tensor([[-0.2, -0.2, -0.2, -0.2, -0.5, -0.4, 0.0, -0.9]])
        u = torch.tensor([[0.1, 0.9, 0.9]])  # seg 0 is drawn (0.1 < drop), seg 2 is not
        want_pos = [False] * 4 + [True] * 4
        want_neg = [True] * 4 + [False] * 2 + [True, True]
    pos, neg, changed = image_views(s_v, seg, 3, tau, drop=0.5, u=u)
    assert pos[0].tolist() == want_pos
    assert neg[0].tolist() == want_neg
    assert changed.tolist() == [True]


def test_segments_follow_feature_clusters():
    # two clearly different feature halves (left / right) -> with k=2 the segments split there
    P, W = 64, 8
    f = torch.zeros(1, P, W)
    cols = torch.arange(P) % 8
    f[0, cols < 4, 0] = 1.0
    f[0, cols >= 4, 1] = 1.0
    seg = segment_patches(f, 2, iters=5, position_weight=0.1)
    left, right = seg[0, cols < 4], seg[0, cols >= 4]
    assert (left == left[0]).all() and (right == right[0]).all() and left[0] != right[0]


def test_neutral_tokens_are_never_hidden():
    B, T = 16, 20
    s = _rand(11, B, T) * 2 - 1
    valid = torch.ones(B, T, dtype=torch.bool)
    neutral = _rand(12, B, T) < 0.3
    u = _rand(13, B, T)
    pos, neg, changed = text_views(s, valid, valid, 0.0, drop=1.0, u=u, neutral=neutral)
    assert pos[neutral].all() and neg[neutral].all()
    content = valid & ~neutral
    # the rest behaves as without neutral tokens: drop=1 hides every content intersection token
    assert torch.equal(~pos, content & (s > 0))
    assert torch.equal(~neg, content & (s <= 0))
    assert torch.equal(changed, (content & (s <= 0)).any(1))


def test_frequent_token_ids_is_document_frequency():
    ids = torch.tensor([[0, 5, 5, 7, 1, 1],      # 5 twice in one caption counts once
                        [0, 5, 8, 1, 1, 1],
                        [0, 5, 7, 9, 9, 1],
                        [0, 6, 7, 1, 1, 1]])
    valid = (ids > 1)
    assert frequent_token_ids(ids, valid, 0.5).tolist() == [5, 7]      # df 0.75 each
    assert frequent_token_ids(ids, valid, 0.75).tolist() == []         # strictly more than
    assert frequent_token_ids(ids, valid, 0.2).tolist() == [5, 6, 7, 8, 9]
    assert frequent_token_ids(ids, valid, 0.0).numel() == 0            # off
    # padding / special positions do not count, even when their id is frequent
    assert 1 not in frequent_token_ids(ids, valid, 0.1).tolist()
    with pytest.raises(ValueError, match="input_ids"):
        frequent_token_ids(ids, valid[:, :3], 0.5)


def test_low_norm_patches_and_segments_skip_them():
    B, P, W = 3, 16, 8
    g = torch.Generator().manual_seed(4)
    v = torch.randn(B, P, W, generator=g) * 0.01            # flat background
    obj = torch.zeros(B, P, dtype=torch.bool)
    obj[0, [1, 5, 6]] = True
    obj[1, [0, 15]] = True                                  # image 2: no object at all
    v[obj] = torch.randn(int(obj.sum()), W, generator=g) * 5
    low = low_norm_patches(v, 0.25)
    assert torch.equal(low[:2], ~obj[:2])
    assert not low_norm_patches(v, 0.0).any()
    seg = segment_patches(v, 4, active=~low)
    assert torch.equal(seg < 0, low)
    assert int(seg.max()) < 4
    # patches in no segment are never hidden, whatever their score
    s_v = torch.randn(B, P, generator=g)
    pos, neg, _ = image_views(s_v, seg, 4, 0.0, drop=1.0, u=_rand(5, B, 4))
    assert pos[low].all() and neg[low].all()
    with pytest.raises(ValueError, match="active"):
        segment_patches(v, 4, active=low[:, :3])


def test_step_generator_is_a_function_of_seed_and_step():
    a = torch.rand(5, generator=step_generator(1, 7))
    b = torch.rand(5, generator=step_generator(1, 7))
    c = torch.rand(5, generator=step_generator(1, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _tiny_model_and_batch(B=8, T=10):
    from solar.model import ModelConfig, SolarModel
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2, vision_mlp=64,
                      vocab_size=64, max_text_len=16, text_hidden=32, text_layers=1, text_heads=2, text_mlp=64,
                      width=32, adapter_hidden=64, fusion_layers=1, fusion_heads=2, fusion_mlp=64, embed_dim=16)
    m = SolarModel(cfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 64, (B, T), generator=g)
    ids[:, 0] = cfg.bos_token_id
    am = torch.ones(B, T, dtype=torch.bool)
    am[: B // 2, 7:] = False
    ids[: B // 2, 7:] = cfg.pad_token_id
    ids[: B // 2, 6] = cfg.eos_token_id
    ids[B // 2:, T - 1] = cfg.eos_token_id
    batch = {"pixel_values": torch.randn(B, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": am,
             "bank_index": torch.arange(B)}
    return m, batch


def test_build_views_and_loss_backward():
    import copy

    from solar.stage2 import Stage2Loss, build_views
    m, batch = _tiny_model_and_batch()
    teacher = copy.deepcopy(m).eval()
    m.tau_v.fill_(0.0)
    teacher.tau_v.fill_(0.0)
    teacher.tau_l.fill_(0.0)
    cfg = Stage2Config(n_segments=3, kmeans_iters=3, mine_k=0)
    v = build_views(teacher, batch, cfg, seed=0, step=0)
    valid = teacher.text_valid_mask(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(v.text_valid, valid)
    assert v.img_pos.shape == (8, 16) and v.text_pos.shape == (8, 10)
    # deterministic for (seed, step); a rank's slice equals the same rows of the global draw
    v2 = build_views(teacher, batch, cfg, seed=0, step=0)
    assert torch.equal(v.text_pos, v2.text_pos) and torch.equal(v.img_pos, v2.img_pos)
    half = {k: (x[4:] if torch.is_tensor(x) else x) for k, x in batch.items()}
    v3 = build_views(teacher, half, cfg, seed=0, step=0, row_offset=4, global_rows=8)
    assert torch.equal(v3.text_pos, v.text_pos[4:]) and torch.equal(v3.img_pos, v.img_pos[4:])
    # each positive / hard-negative view masks exactly one side of a pair
    pk, tk = v.positive(0)
    npk, ntk, changed = v.hard_negative(0)
    for b in range(8):
        assert pk[b].all() or torch.equal(tk[b], valid[b])
        assert npk[b].all() or torch.equal(ntk[b], valid[b])
        assert not (tk[b] & ~batch["attention_mask"][b]).any()
    assert torch.equal(changed, v.text_neg_changed | v.img_neg_changed)
    loss_mod = Stage2Loss(m, teacher, cfg, seed=0)
    loss, metrics = loss_mod(batch, 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert m.fusion[0].qkv.weight.grad is not None and m.fusion[0].qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert 0.0 <= metrics["img_pos_hidden"] <= 1.0


@pytest.mark.parametrize("exclude_top", [0, 1, 2])
def test_miner_excludes_self(exclude_top):
    pytest.importorskip("solar_kernels")
    import solar_kernels as sk
    if not hasattr(sk, "Index"):
        pytest.skip("solar_kernels.Index not available yet")
    from solar.stage2 import Miner
    bank = torch.nn.functional.normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    miner = Miner(pool=None, pool_ids=torch.arange(20), exclude_top=exclude_top)
    miner.set_bank(bank, step=0)
    rows = torch.arange(5)
    nb = miner.neighbours(bank[:5], rows, k=3)
    assert nb.shape == (5, 3, 8)
    for i in range(5):
        # the row itself (score 1) is never among its neighbours
        assert not any(torch.allclose(nb[i, j], bank[i]) for j in range(3))
        # and the neighbours are the best-scoring others after skipping the top `exclude_top`
        scores = bank @ bank[i]
        scores[i] = -9
        best = scores.topk(3 + exclude_top).indices[exclude_top:]
        assert torch.allclose(nb[i], bank[best])


def test_views_mask_the_side_that_hides_something():
    """Views.positive / hard_negative (via _one_side): a draw u < 0.5 picks the text side only
    when the text view hides something; otherwise the image side is masked and the text kept whole."""
    from solar.stage2 import Views
    text_valid = torch.tensor([[True, True, True, False], [True, True, True, True], [True, True, False, False]])
    text_pos = text_valid.clone()
    text_pos[1, 2] = False               # row 1's text view hides a token, rows 0 and 2 hide nothing
    img_pos = torch.tensor([[True, False, True], [False, True, True], [True, True, False]])
    u = torch.tensor([[0.2, 0.2, 0.7]])  # rows 0, 1 would pick text, row 2 image
    v = Views(text_pos=text_pos, text_neg=text_pos, text_neg_changed=torch.tensor([False, True, False]),
              img_pos=img_pos, img_neg=img_pos, img_neg_changed=torch.tensor([True, True, True]),
              text_valid=text_valid, segments=torch.zeros(3, 3, dtype=torch.long),
              text_pos_changed=torch.tensor([False, True, False]), img_pos_changed=torch.tensor([True, True, True]),
              pos_side_u=u, neg_side_u=u)
    for pk, tk in (v.positive(0), v.hard_negative(0)[:2]):
        # row 0: text has nothing to hide -> the image side is masked, the text kept whole
        assert pk[0].tolist() == [True, False, True] and torch.equal(tk[0], text_valid[0])
        # row 1: text side masked, image whole
        assert pk[1].all() and tk[1].tolist() == [True, True, False, True]
        # row 2: u >= 0.5 -> image side
        assert torch.equal(pk[2], img_pos[2]) and torch.equal(tk[2], text_valid[2])
    # neither side hides anything: the text side (whole) and an all-kept image
    v.img_pos_changed = torch.tensor([False, False, False])
    pk, tk = v.positive(0)
    assert pk[0].all() and torch.equal(tk[0], text_valid[0])


# --------------------------------------------------------------------------- config CLI

def test_cli_every_field_and_both_spellings():
    cfg = parse_args(["--stage1.lr", "3e-4", "--stage2-temperature", "0.07", "--data.cache_dir", "/tmp/x",
                      "--run-resume", "--eval.index_dtypes", "fp32,fp16", "--model.width", "64",
                      "--stage2.mine_k", "0", "--stage", "2"])
    assert cfg.stage1.lr == 3e-4 and cfg.stage2.temperature == 0.07 and cfg.data.cache_dir == "/tmp/x"
    assert cfg.run.resume is True and cfg.eval.index_dtypes == ("fp32", "fp16") and cfg.model.width == 64
    assert cfg.stage2.mine_k == 0 and cfg.run.stage == "2"
    # every leaf field has a flag
    p = build_parser()
    flags = {s for a in p._actions for s in a.option_strings}
    d = config_to_dict(get_preset("tiny"))
    for sect, fields in d.items():
        if isinstance(fields, dict):
            for name in fields:
                if name.endswith("tower_config"):      # resolved sub-configs, not user settings
                    continue
                assert f"--{sect}.{name}" in flags, f"--{sect}.{name}"
                assert f"--{sect}-{name.replace('_', '-')}" in flags


def test_cli_presets_config_file_and_errors(tmp_path, capsys):
    cfg = parse_args(["--preset", "clip-b16", "--data.train_shards", "x.tar", "--data.bench_dir", "b"])
    assert cfg.model.embed_dim == 768 and cfg.preset == "clip-b16"
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"stage2": {"steps": 7}, "run": {"seed": 3}}))
    cfg = parse_args(["--config", str(f), "--run.seed", "5"])
    assert cfg.stage2.steps == 7 and cfg.run.seed == 5
    with pytest.raises(SystemExit):
        parse_args(["--stage2.steps", "abc"])
    with pytest.raises(SystemExit):
        parse_args(["--no-such-flag", "1"])
    f.write_text(json.dumps({"stage2": {"nope": 1}}))
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(f)])
    assert e.value.code == 2 and "nope" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--stage1.rho_schedule", "cosin"],
     "--stage1.rho_schedule must be one of 'linear', 'cosine', 'step', got 'cosin'"),
    (["--stage1.qda_mode", "bogus"], "--stage1.qda_mode must be one of 'mixture', 'direct', got 'bogus'"),
    (["--stage1.teacher", "bogus"], "--stage1.teacher must be one of 'none', 'init', got 'bogus'"),
    (["--stage1.gd_weight", "1"], "--stage1.gd_weight needs teacher 'init'"),
    (["--stage1.lr", "-1"], "--stage1.lr must be > 0, got -1.0"),
    (["--stage2.steps", "-5"], "--stage2.steps must be >= 1, got -5"),
    (["--stage2.mine_dtype", "float32"], "--stage2.mine_dtype must be one of 'fp32', 'fp16', 'int8', got 'float32'"),
    (["--eval.index_dtypes", "fp32,fp64"], "--eval.index_dtypes must be one of"),
    (["--run.stage", "3"], "--run.stage must be one of '1', '2', 'all', got '3'"),
    (["--run.device", "gpu"], "--run.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    (["--preset", "clip-b16", "--stage1.teacher", "none"], "--stage1.gd_weight needs teacher 'init'"),
])
def test_cli_rejects_bad_values(argv, message, capsys):
    """Flags are checked like the dataclasses' own arguments: exit status 2, one error line naming the flag."""
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert f"error: {message}" in err.strip().splitlines()[-1]


def test_cli_checks_config_file_values(tmp_path, capsys):
    from solar.config import ConfigError, config_from_dict, validate_config
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"stage1": {"qda_mode": "bogus"}}))
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(f)])
    assert e.value.code == 2
    assert f"--config {f}: stage1.qda_mode must be one of 'mixture', 'direct', got 'bogus'" in capsys.readouterr().err
    f.write_text(json.dumps({"stage2": {"steps": "7"}}))
    with pytest.raises(SystemExit):
        parse_args(["--config", str(f)])
    assert "stage2.steps must be an int, got '7'" in capsys.readouterr().err
    # a flag may fix what the file sets; the final values are what is checked
    f.write_text(json.dumps({"stage1": {"gd_weight": 1.0}}))
    assert parse_args(["--config", str(f), "--stage1.teacher", "init"]).stage1.teacher == "init"
    # the library path: config_from_dict validates, validate_config names the section
    with pytest.raises(ConfigError, match="stage2.mine_dtype"):
        config_from_dict(get_preset("tiny"), {"stage2": {"mine_dtype": "float32"}})
    cfg = get_preset("tiny")
    cfg.run.stage = "3"
    with pytest.raises(ConfigError, match=r"^run\.stage must be one of"):
        validate_config(cfg)
    with pytest.raises(ValueError, match="mine_dtype"):
        Stage2Config(mine_dtype="float32")


def test_cli_help_gives_every_flag_a_meaning(capsys):
    from solar.cli import _leaf_fields
    cfg = get_preset("tiny")
    p = build_parser(cfg)
    helps = {a.dest: a.help for a in p._actions if a.help and a.option_strings and a.option_strings[0].count(".")}
    for name, _owner, f, value, _hint in _leaf_fields(cfg):
        if name == "preset" or name.endswith("tower_config"):
            continue
        h = helps[name]
        assert f.metadata.get("help") and h.startswith(f.metadata["help"].replace("%", "%%")), name
        for c in f.metadata.get("choices", ()):
            assert c in h, (name, c)
    assert "one of: mixture, direct" in helps["stage1.qda_mode"]
    assert "one of: fp32, fp16, int8" in helps["eval.index_dtypes"]
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())    # undo argparse's line wrapping
    assert e.value.code == 0 and "--stage1.rho_schedule" in out and "one of: linear, cosine, step" in out


def test_train_cli_bad_device_and_stage_exit_2(monkeypatch, capsys):
    from solar.train import main
    for argv in (["--run.device", "gpu"], ["--run.stage", "3"], ["--stage", "3"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert "error: " in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--run.device", "cuda", "--run.out_dir", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err
    assert "--run.device" in err and "no CUDA device" in err and "Traceback" not in err


def test_lr_schedule_warmup_peak_cosine_decay_and_floor():
    """trainer.lr_at (stage 2 and CLIP-SF): linear warm-up whose step s trains at lr * (s + 1) /
    warmup (the peak on the warm-up's last step), then cosine decay from the peak to lr * min_ratio
    at `steps`, and the floor after that."""
    import math

    from solar.trainer import lr_at
    kw = dict(lr=2.0, steps=110, warmup=10, min_ratio=0.1)
    lrs = [lr_at(s, **kw) for s in range(121)]
    assert lrs[:10] == pytest.approx([2.0 * (s + 1) / 10 for s in range(10)])
    assert lrs[0] == pytest.approx(0.2) and lrs[9] == pytest.approx(2.0)
    assert lrs[10] == pytest.approx(2.0)                                 # decay starts at the peak
    assert lrs[35] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))))
    assert lrs[60] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))            # halfway: between peak and floor
    assert all(a > b for a, b in zip(lrs[10:110], lrs[11:111]))          # decays, never rises
    assert lrs[110] == pytest.approx(0.2) and lrs[120] == pytest.approx(0.2)
    assert max(lrs) == pytest.approx(2.0)
    # no warm-up: the first step is at the peak; min_ratio 0 decays to 0
    assert lr_at(0, lr=1.0, steps=5, warmup=0, min_ratio=0.0) == pytest.approx(1.0)
    assert lr_at(5, lr=1.0, steps=5, warmup=0, min_ratio=0.0) == pytest.approx(0.0, abs=1e-12)


def test_metrics_logger_and_plot(tmp_path):
    from solar.logging import MetricsLogger, plot_metrics, read_metrics
    p = str(tmp_path / "m.jsonl")
    log = MetricsLogger(p)
    for s in range(1, 6):
        log({"loss": 1.0 / s, "iou_v": 0.1 * s}, stage="stage1", step=s)
        log({"loss": 2.0 / s}, stage="stage2", step=s)
    log({"loss": 0.123}, stage="stage2", step=5)          # a resumed run re-logs a step: last wins
    rows = read_metrics(p)
    assert len(rows) == 10
    assert [r["loss"] for r in rows if r["stage"] == "stage2" and r["step"] == 5] == [0.123]
    png = plot_metrics(p, str(tmp_path / "c.png"))
    assert png and os.path.getsize(png) > 1000
    MetricsLogger(str(tmp_path / "off.jsonl"), enabled=False)({"loss": 1}, stage="x", step=1)
    assert not os.path.exists(tmp_path / "off.jsonl")


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_eval_pair_scores_match_the_index(dtype):
    """Prec uses score(q, pos) / score(q, neg) computed as the index of that dtype scores."""
    import solar_kernels as sk
    if not hasattr(sk, "Index"):
        pytest.skip("solar_kernels.Index not available yet")
    from solar.evaluate import quantized_scores
    x = torch.nn.functional.normalize(torch.randn(30, 24, generator=torch.Generator().manual_seed(2)), dim=-1)
    index = sk.Index(24, dtype=dtype)
    index.add(x)
    scores, ids = index.search(x[:5], 30)
    for i in range(5):
        got = quantized_scores(x[i:i + 1].expand(30, -1), x, dtype)
        ref = torch.zeros(30, dtype=torch.float64)
        ref[ids[i].long()] = scores[i].double()
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_evaluate_embeddings_metrics_by_hand():
    """evaluate_embeddings on small synthetic embeddings: every metric (R@1/5/10, mR, Prec, Avg)
    of every index dtype equals the exhaustive solar.benchmark computation over the scores that
    dtype defines (reference.topk_search_reference), and for fp32 metrics_from_embeddings; Prec is
    also counted by hand as score(q, pos) > score(q, neg)."""
    import solar_kernels as sk
    if not hasattr(sk, "Index"):
        pytest.skip("solar_kernels.Index not available yet")
    from solar import benchmark as bm
    from solar.evaluate import evaluate_embeddings
    from solar_kernels.reference import topk_search_reference
    g = torch.Generator().manual_seed(3)
    N, E, Q = 48, 16, 16
    F = torch.nn.functional
    emb = F.normalize(torch.randn(N, E, generator=g), dim=-1)
    q = torch.arange(Q)
    p = Q + torch.arange(Q)
    n = 2 * Q + torch.arange(Q)
    emb[p] = F.normalize(emb[q] + 0.9 * torch.randn(Q, E, generator=g), dim=-1)  # noisy positives
    emb[n] = F.normalize(emb[p] + 0.5 * torch.randn(Q, E, generator=g), dim=-1)  # negatives near the positive
    perm = torch.randperm(N, generator=g)  # the collection order is not the triplet order
    keys = [f"k{int(i):03d}" for i in perm]
    where = {int(i): j for j, i in enumerate(perm)}
    emb = emb[perm]  # row j is the pair named keys[j]
    triplets = [{"query": f"k{int(a):03d}", "positive": f"k{int(b):03d}", "negative": f"k{int(c):03d}"}
                for a, b, c in zip(q, p, n)]
    bench = bm.Benchmark(root=".", shards=[], triplets=triplets, num_pairs=N, spec={})
    qi, pi, ni = (torch.tensor([where[int(i)] for i in t]) for t in (q, p, n))
    assert torch.equal(torch.stack(bench.indices(keys)), torch.stack([qi, pi, ni]))

    dtypes = ("fp32", "fp16", "int8")
    got = evaluate_embeddings(emb, keys, bench, dtypes)
    assert set(got) == set(dtypes)
    for dt in dtypes:
        s, ids = topk_search_reference(emb, emb, N, dt)
        full = torch.empty(N, N, dtype=torch.float64).scatter_(1, ids, s.double())  # [query, row] scores
        want = bm.metrics_from_scores(lambda b, full=full: full[b], N, qi, pi, ni)
        prec = 100.0 * float((full[qi, pi] > full[qi, ni]).double().mean())
        assert got[dt]["Prec"] == pytest.approx(prec, abs=1e-9), dt
        assert got[dt] == pytest.approx(want, abs=1e-9), dt
        # the data tell the metrics apart: neither trivial, and scoring neg against pos would differ
        assert 0 < want["R@1"] < want["R@10"] < 100 and 0 < prec < 100
        assert prec != 100.0 * float((full[qi, pi] > full[pi, ni]).double().mean())
    assert got["fp32"] == pytest.approx(bm.metrics_from_embeddings(emb, qi, pi, ni), abs=1e-9)


def test_progress_bar_is_quiet_in_logs(monkeypatch):
    import io
    import sys

    from solar.logging import progress_bar

    class _Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())          # a log file / CI
    bar = progress_bar(total=10, desc="x", file=io.StringIO())
    assert bar.mininterval >= 30
    bar.close()
    out = io.StringIO()                                          # per-step postfix/description updates
    bar = progress_bar(total=500, desc="x", file=out)            # must not redraw each step
    for i in range(500):
        bar.update(1)
        bar.set_postfix(loss=f"{1.0 / (i + 1):.3f}")
        bar.set_description(f"x{i % 3}")
    bar.close()
    assert out.getvalue().count("\r") <= 3, out.getvalue().count("\r")
    monkeypatch.setattr(sys, "stderr", _Tty())                  # a terminal
    bar = progress_bar(total=10, desc="x", file=io.StringIO(), mininterval=0.5)
    assert bar.mininterval == 0.5
    bar.close()
