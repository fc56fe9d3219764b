"""Stage 1: QDA thresholds, GLA / distillation losses, rho schedule, IoU metrics, a short run."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from solar.losses import gla_hinge, global_distill_loss, local_distill_loss, pearson_rows
from solar.qda import RunningGaussian, batch_moments, mixture_threshold, qda_threshold
from solar.stage1 import Stage1Config, mask_iou, rho_at

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _logpdf(x, mu, var):
    return -0.5 * (x - mu) ** 2 / var - 0.5 * math.log(2 * math.pi * var)


# ----------------------------------------------------------------------------- QDA
def test_qda_equal_variances_is_the_midpoint():
    tau, case = qda_threshold(0.5, 0.04, 0.1, 0.04)
    assert case == "equal_var" and tau == pytest.approx(0.3, abs=1e-12)
    tau, case = qda_threshold(2.0, 1.0, -1.0, 1.0 * (1 + 1e-9))
    assert case == "equal_var" and tau == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("mu1,var1,mu0,var0", [(1.0, 0.25, 0.0, 1.0), (0.6, 0.02, 0.1, 0.01),
                                                (3.0, 4.0, 0.0, 1.0), (0.2, 0.001, -0.3, 0.05)])
def test_qda_root_between_means(mu1, var1, mu0, var0):
    tau, case = qda_threshold(mu1, var1, mu0, var0)
    assert case == "root" and mu0 <= tau <= mu1
    assert _logpdf(tau, mu1, var1) == pytest.approx(_logpdf(tau, mu0, var0), abs=1e-9)
    # closed form: roots of a x^2 + b x + c
    a = 0.5 / var0 - 0.5 / var1
    b = mu1 / var1 - mu0 / var0
    c = 0.5 * mu0 ** 2 / var0 - 0.5 * mu1 ** 2 / var1 + 0.5 * math.log(var0 / var1)
    roots = np.roots([a, b, c]).real
    assert min(abs(roots - tau)) < 1e-9


def test_qda_mixture_takes_the_upper_root():
    # true pairs: 90% like negatives, 10% high -> wide Gaussian whose mean is barely above
    mu0, var0 = 0.0, 0.01
    mu1 = 0.9 * 0.0 + 0.1 * 0.6
    var1 = 0.01 + 0.9 * 0.1 * 0.6 ** 2
    tau, case = qda_threshold(mu1, var1, mu0, var0)
    assert case == "upper_root" and tau > mu1
    assert _logpdf(tau, mu1, var1) == pytest.approx(_logpdf(tau, mu0, var0), abs=1e-9)
    # above tau the true-pair density wins, just below it the negative one does
    assert _logpdf(tau + 1e-3, mu1, var1) > _logpdf(tau + 1e-3, mu0, var0)
    assert _logpdf(tau - 1e-3, mu1, var1) < _logpdf(tau - 1e-3, mu0, var0)


def test_qda_no_crossing_and_not_separated():
    # narrow true-pair Gaussian inside a wide negative one, no root between the means
    tau, case = qda_threshold(0.05, 0.01, 0.0, 4.0)
    assert case == "no_crossing"
    assert tau == pytest.approx((0.0 * 0.1 + 0.05 * 2.0) / 2.1)
    assert qda_threshold(0.1, 0.1, 0.2, 0.1) == (math.inf, "not_separated")
    with pytest.raises(ValueError, match="variances"):
        qda_threshold(1.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        qda_threshold(float("nan"), 1.0, 0.0, 1.0)


def test_mixture_threshold_recovers_the_intersection_component():
    # true pairs: 20% intersection N(0.6, 0.01), 80% difference positions like the negatives N(0, 0.01)
    pi, mu_i, mu0, var0 = 0.2, 0.6, 0.0, 0.01
    mu1 = pi * mu_i + (1 - pi) * mu0
    var1 = var0 + pi * (1 - pi) * (mu_i - mu0) ** 2
    tau, case, pi_hat = mixture_threshold(mu1, var1, mu0, var0)
    assert case == "mixture" and tau == pytest.approx(0.3, abs=1e-12) and pi_hat == pytest.approx(0.2, abs=1e-12)
    # the direct QDA of the whole true-pair Gaussian lands elsewhere (below the midpoint here)
    assert qda_threshold(mu1, var1, mu0, var0)[0] < 0.25
    # from samples of the mixture
    g = torch.Generator().manual_seed(0)
    n = 200_000
    inter = torch.rand(n, generator=g) < pi
    x = torch.where(inter, mu_i, mu0) + 0.1 * torch.randn(n, generator=g)
    neg = mu0 + 0.1 * torch.randn(n, generator=g)
    _, m1, v1 = batch_moments(x, torch.ones(n, dtype=torch.bool))
    _, m0, v0 = batch_moments(neg, torch.ones(n, dtype=torch.bool))
    tau, case, pi_hat = mixture_threshold(m1, v1, m0, v0)
    assert case == "mixture" and tau == pytest.approx(0.3, abs=0.01) and pi_hat == pytest.approx(0.2, abs=0.01)
    # no mixture fits (var1 < var0): the direct QDA answers; not separated: nothing is kept
    assert mixture_threshold(0.1, 0.01, 0.0, 0.04)[:2] == qda_threshold(0.1, 0.01, 0.0, 0.04)
    assert mixture_threshold(0.0, 0.1, 0.1, 0.1)[:2] == (math.inf, "not_separated")
    with pytest.raises(ValueError, match="variances"):
        mixture_threshold(0.5, 0.0, 0.0, 0.1)
    with pytest.raises(ValueError, match="qda_mode"):
        Stage1Config(qda_mode="lda")


def test_running_gaussian_tracks_a_stream():
    g = torch.Generator().manual_seed(0)
    buf = torch.zeros(2)
    rg = RunningGaussian(buf, momentum=0.1)
    for i in range(300):
        x = 0.4 + 0.2 * torch.randn(256, generator=g)
        _, m, v = batch_moments(x, torch.ones(256, dtype=torch.bool))
        rg.update(m, v, first=(i == 0))
    assert rg.mean == pytest.approx(0.4, abs=0.02)
    assert rg.var == pytest.approx(0.04, rel=0.1)
    n, m, v = batch_moments(torch.tensor([1.0, 2.0, 100.0]), torch.tensor([True, True, False]))
    assert (n, m, v) == (2.0, 1.5, 0.25)


def test_running_gaussian_includes_the_spread_of_batch_means():
    """Closed form with a moving mean: at momentum 0.5 one update of two equal-size batches is
    their pooled population (law of total variance: the between-batch term (6 - 1)^2 / 4 is
    most of it); a third batch then weighs 1/2 against 1/4 each, i.e. the pool A, B, C, C."""
    every = torch.ones(2, dtype=torch.bool)
    a, b, c = torch.tensor([0.0, 2.0]), torch.tensor([5.0, 7.0]), torch.tensor([-3.0, -1.0])
    rg = RunningGaussian(torch.zeros(2), momentum=0.5)
    rg.update(*batch_moments(a, every)[1:], first=True)
    assert (rg.mean, rg.var) == (1.0, 1.0)
    rg.update(*batch_moments(b, every)[1:])
    assert rg.mean == pytest.approx(3.5, rel=1e-6)
    assert rg.var == pytest.approx(0.5 * (1 + 2.5**2) + 0.5 * (1 + 2.5**2), rel=1e-6)  # 7.25
    pool = torch.cat([a, b])
    assert rg.var == pytest.approx(float(pool.var(unbiased=False)), rel=1e-6)
    rg.update(*batch_moments(c, every)[1:])
    pool = torch.cat([a, b, c, c]).double()
    assert rg.mean == pytest.approx(float(pool.mean()), rel=1e-6)  # 0.75
    assert rg.var == pytest.approx(float(pool.var(unbiased=False)), rel=1e-6)


# ----------------------------------------------------------------------------- losses
def test_gla_hinge_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    B, L, W = 5, 7, 6
    tokens = torch.randn(B, L, W, generator=g, dtype=torch.float32, requires_grad=True)
    valid = torch.rand(B, L, generator=g) > 0.3
    valid[:, 0] = True
    other = F.normalize(torch.randn(B, W, generator=g), dim=-1)
    margin = 0.3
    loss = gla_hinge(tokens, valid, other, margin)
    ref = 0.0
    for i in range(B):
        def mean_sim(j):
            sims = [F.cosine_similarity(tokens[i, p], other[j], dim=0) for p in range(L) if valid[i, p]]
            return torch.stack(sims).mean()
        pos = mean_sim(i)
        neg = torch.stack([mean_sim(j) for j in range(B) if j != i]).mean()
        ref = ref + torch.clamp(neg + margin - pos, min=0)
    ref = ref / B
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    g1, = torch.autograd.grad(loss, tokens)
    g2, = torch.autograd.grad(ref, tokens)
    assert torch.allclose(g1, g2, atol=1e-5)
    # a large margin keeps every hinge active; B = 1 has no negatives
    assert gla_hinge(tokens, None, other, 10.0).item() > 9
    assert gla_hinge(tokens[:1], None, other[:1], 0.5).item() == 0.0


def _pearson_np(a, b):
    return float(np.corrcoef(a, b)[0, 1])


def test_distillation_losses_match_direct_formulas():
    g = torch.Generator().manual_seed(1)
    B, L = 4, 6
    s = torch.randn(B, L, 5, generator=g, dtype=torch.float64)
    t = torch.randn(B, L, 9, generator=g, dtype=torch.float64)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, 4:] = False
    valid[3, 1:] = False  # one valid token: the row is skipped
    ld = local_distill_loss(s, t, valid).item()
    terms = []
    for b in range(B):
        idx = [i for i in range(L) if valid[b, i]]
        if len(idx) < 2:
            continue
        sn = F.normalize(s[b, idx], dim=-1).numpy()
        tn = F.normalize(t[b, idx], dim=-1).numpy()
        ss, tt = sn @ sn.T, tn @ tn.T
        terms += [1 - _pearson_np(ss[r], tt[r]) for r in range(len(idx))]
    assert ld == pytest.approx(float(np.mean(terms)), abs=1e-9)

    gs = torch.randn(6, 5, generator=g, dtype=torch.float64)
    gt = torch.randn(6, 8, generator=g, dtype=torch.float64)
    gd = global_distill_loss(gs, gt).item()
    sn, tn = F.normalize(gs, dim=-1).numpy(), F.normalize(gt, dim=-1).numpy()
    S, T = sn @ sn.T, tn @ tn.T
    ref = np.mean([1 - _pearson_np(np.delete(S[i], i), np.delete(T[i], i)) for i in range(6)])
    assert gd == pytest.approx(float(ref), abs=1e-9)
    # identical geometry -> zero loss, even with a different width (a rotation)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    assert global_distill_loss(gs, gs @ q).item() == pytest.approx(0.0, abs=1e-9)
    assert local_distill_loss(s, s @ q).item() == pytest.approx(0.0, abs=1e-9)
    r = pearson_rows(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[2.0, 4.0, 7.0]]))
    assert r.item() == pytest.approx(_pearson_np([1, 2, 3], [2, 4, 7]), abs=1e-6)
    # the teachers are frozen: no gradient reaches them, only the students get one
    for fn, st, te, args in ((local_distill_loss, s, t, (valid,)), (global_distill_loss, gs, gt, ())):
        st, te = st.clone().requires_grad_(True), te.clone().requires_grad_(True)
        fn(st, te, *args).backward()
        assert te.grad is None, f"{fn.__name__}: the teacher received a gradient"
        assert st.grad is not None and bool(st.grad.abs().sum() > 0), fn.__name__


def test_rho_schedules():
    cfg = Stage1Config(steps=100, rho_hold_frac=0.1, rho_end_frac=0.6)
    assert rho_at(0, cfg) == 1.0 and rho_at(10, cfg) == 1.0
    assert rho_at(35, cfg) == pytest.approx(0.5)
    assert rho_at(60, cfg) == 0.0 and rho_at(99, cfg) == 0.0
    # "step": 1 until halfway between the hold end (step 10) and rho_end (step 60), then 0
    c3 = Stage1Config(steps=100, rho_schedule="step", rho_hold_frac=0.1, rho_end_frac=0.6)
    assert [rho_at(s, c3) for s in (0, 10, 11, 34, 35, 36, 59, 60, 99)] == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    c2 = Stage1Config(steps=100, rho_schedule="cosine", rho_hold_frac=0.0, rho_end_frac=1.0)
    assert rho_at(50, c2) == pytest.approx(0.5) and rho_at(25, c2) > 0.75
    with pytest.raises(ValueError, match="rho_schedule"):
        Stage1Config(rho_schedule="exp")
    with pytest.raises(ValueError, match="teacher"):
        Stage1Config(ld_weight=1.0)


def test_config_checks_and_no_silent_default_branch():
    """Every enumerated option is checked, and a value set after construction (bypassing
    __post_init__) raises where it is used instead of falling through to another branch."""
    from solar.config import ConfigError
    from solar.stage1 import _Stage1State
    for kw, msg in [(dict(rho_schedule="cosin"), "rho_schedule must be one of 'linear', 'cosine', 'step', got 'cosin'"),
                    (dict(qda_mode="bogus"), "qda_mode must be one of 'mixture', 'direct', got 'bogus'"),
                    (dict(teacher="bogus"), "teacher must be one of 'none', 'init', got 'bogus'"),
                    (dict(gd_weight=1.0), "gd_weight needs teacher 'init'"),
                    (dict(lr=-1.0), "lr must be > 0, got -1.0"), (dict(steps=0), "steps must be >= 1, got 0"),
                    (dict(steps="5"), "steps must be an int, got '5'"),
                    (dict(rho_hold_frac=0.8, rho_end_frac=0.5), "rho_hold_frac must be <= rho_end_frac")]:
        with pytest.raises(ConfigError) as e:
            Stage1Config(**kw)
        assert str(e.value).startswith(f"Stage1Config.{msg}")
    cfg = Stage1Config(steps=100, rho_hold_frac=0.0)
    cfg.rho_schedule = "cosin"
    with pytest.raises(ValueError, match="rho_schedule"):
        rho_at(50, cfg)
    from solar.model import ModelConfig, SolarModel
    model = SolarModel(ModelConfig(image_size=16, patch_size=8, vocab_size=20, max_text_len=8, vision_hidden=8,
                                   text_hidden=8, width=8, adapter_hidden=8, fusion_layers=1, fusion_heads=2,
                                   fusion_mlp=8, embed_dim=8))
    with pytest.raises(ValueError, match="qda_mode"):
        _Stage1State(model, 0.05, "bogus")
    state = _Stage1State(model, 0.05, "direct")
    state.mode = "bogus"
    s = torch.rand(2, 4)
    with pytest.raises(ValueError, match="qda_mode"):
        state.update(s, s, torch.ones(2, 4, dtype=torch.bool), torch.randn(2, 4, 8), torch.randn(2, 4, 8),
                     F.normalize(torch.randn(2, 8), dim=-1), F.normalize(torch.randn(2, 8), dim=-1))


def test_mask_iou_by_hand():
    pred = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    gt = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 1]], dtype=torch.bool)
    assert mask_iou(pred, gt).tolist() == [0.5, 1.0, 0.0]


def test_with_best_keeps_the_best_valid_position_of_empty_rows():
    from solar.stage1 import _with_best
    s = torch.tensor([[0.1, 0.9, 0.3, 0.2],    # a row with kept positions: unchanged (its best, 1, is not added)
                      [0.5, 0.1, 0.7, 0.2],    # empty: keeps its best, position 2
                      [0.9, 0.4, 0.1, 0.6],    # empty, best at invalid position 0: keeps the best valid one, 3
                      [0.3, 0.8, 0.2, 0.1]])   # empty and nothing valid: stays empty
    hard = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert _with_best(hard, s, valid).int().tolist() == [[0, 0, 1, 1], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    # no valid mask (the patch side): every position counts
    assert _with_best(hard, s, None).int().tolist() == [[0, 0, 1, 1], [0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0]]
    # random rows: kept rows unchanged, empty rows gain exactly their argmax over valid positions
    g = torch.Generator().manual_seed(0)
    s = torch.randn(64, 9, generator=g)
    valid = torch.rand(64, 9, generator=g) > 0.4
    hard = (torch.rand(64, 9, generator=g) > 0.8) & valid
    out = _with_best(hard, s, valid)
    assert not (out & ~valid).any()
    kept = hard.any(1)
    assert torch.equal(out[kept], hard[kept])
    for i in torch.nonzero(~kept).flatten().tolist():
        if valid[i].any():
            best = int(s[i].masked_fill(~valid[i], float("-inf")).argmax())
            assert torch.nonzero(out[i]).flatten().tolist() == [best], i
        else:
            assert not out[i].any()
    assert 0 < int((~kept & valid.any(1)).sum()) < 64  # both kinds of rows occur


def _unit_model_and_batch(B=4, T=8):
    """A layer-free model (4 patches, BOS 18, EOS = pad 19) and a batch with BOS / EOS / padding."""
    from solar.model import ModelConfig, SolarModel
    torch.manual_seed(0)
    model = SolarModel(ModelConfig(image_size=16, patch_size=8, vocab_size=20, max_text_len=T, vision_hidden=8,
                                   text_hidden=8, width=8, adapter_hidden=8, fusion_layers=1, fusion_heads=2,
                                   fusion_mlp=8, embed_dim=8, bos_token_id=18, eos_token_id=19,
                                   pad_token_id=19)).eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 18, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.bool)
    for i, n in enumerate([T, T - 2, 5, T - 1][:B]):
        ids[i, 0], ids[i, n - 1] = 18, 19
        ids[i, n:] = 19
        am[i, n:] = False
    return model, {"pixel_values": torch.randn(B, 3, 16, 16, generator=g), "input_ids": ids, "attention_mask": am}


def test_stage1_losses_mix_the_hard_masks_by_rho():
    """M = rho * 1 + (1 - rho) * M_hat: rho = 0 trains on the hard masks, rho = 1 on every
    (valid) position; both masked ITC losses against direct computations."""
    import solar_kernels as sk
    from solar.stage1 import _with_best, stage1_losses
    model, b = _unit_model_and_batch()
    pv, ids, am = b["pixel_values"], b["input_ids"], b["attention_mask"]
    with torch.no_grad():
        v, t = model.patch_tokens(pv), model.text_tokens(ids, am)
        valid = model.text_valid_mask(ids, am)
        s_v, s_l, _, _ = model.similarities_from_tokens(v, t, valid, model.text_segments(ids, am))
        model.tau_v.fill_(float(s_v.median()))
        model.tau_l.fill_(float(s_l[valid].median()))
        hv, hl = model.masks_from_similarities(s_v, s_l, valid)
        hv, hl = _with_best(hv, s_v, None).float(), _with_best(hl, s_l, valid).float()
    B, P = hv.shape
    T = hl.shape[1]
    assert 0 < hv.sum() < hv.numel() and 0 < hl.sum() < valid.sum()  # the hard masks drop something
    cfg = Stage1Config(temperature=0.1)
    no_v, no_l = torch.zeros(B, P, dtype=torch.bool), torch.zeros(B, T, dtype=torch.bool)

    def direct(m_v, m_l):
        itc = sk.pooled_contrastive_loss(v, m_v, t, m_l, normalize=True, temperature=cfg.temperature)
        fus = sk.contrastive_loss(model.fuse(v, t, m_v, no_l), model.fuse(v, t, no_v, m_l), temperature=cfg.temperature)
        return float(itc), float(fus)

    got = {}
    for rho, m_v, m_l in ((0.0, hv, hl * valid), (1.0, torch.ones(B, P), valid.float()),
                          (0.25, 0.25 + 0.75 * hv, (0.25 + 0.75 * hl) * valid)):
        with torch.no_grad():
            _, metrics = stage1_losses(model, b, cfg, rho)
        itc, fus = direct(m_v, m_l)
        assert float(metrics["loss_itc"]) == pytest.approx(itc, rel=1e-5, abs=1e-6), rho
        assert float(metrics["loss_fusion_itc"]) == pytest.approx(fus, rel=1e-5, abs=1e-6), rho
        got[rho] = (itc, fus)
    assert abs(got[0.0][0] - got[1.0][0]) > 1e-3 and abs(got[0.0][1] - got[1.0][1]) > 1e-3  # not vacuous


class _FakeTower:
    """A teacher tower returning fixed features (what stage1_losses reads: .last_hidden_state)."""

    def __init__(self, out):
        self.out = out

    def __call__(self, **_):
        from types import SimpleNamespace
        return SimpleNamespace(last_hidden_state=self.out)


# solar.towers reads a tower's conventions off its class name: these fakes follow DINOv2's
# (patch states = every state after [CLS], no register tokens) and BERT's (token states as
# returned), so the features given are exactly what the loss sees.
class Dinov2Model(_FakeTower):
    from types import SimpleNamespace as _NS
    config = _NS(num_register_tokens=0)


class BertModel(_FakeTower):
    pass


def test_gd_teacher_text_global_pools_content_tokens_only():
    """L_GD's teacher text global is the mean over content tokens: BOS, EOS and padding
    features of the teacher do not change it."""
    import solar_kernels as sk
    from solar.stage1 import stage1_losses
    model, b = _unit_model_and_batch()
    ids, am = b["input_ids"], b["attention_mask"]
    B, T = ids.shape
    g = torch.Generator().manual_seed(4)
    tv = torch.randn(B, 1 + 4, 6, generator=g)
    tl = torch.randn(B, T, 6, generator=g)
    cfg = Stage1Config(teacher="init", gd_weight=1.0, itc_weight=0.0, fusion_itc_weight=0.0)

    def loss_gd(tl_feats):
        with torch.no_grad():
            _, m = stage1_losses(model, b, cfg, 1.0, teacher=(Dinov2Model(tv), BertModel(tl_feats)))
        return float(m["loss_gd"])

    valid = model.text_valid_mask(ids, am)
    special = ~valid
    assert int((special & am).sum()) >= 2 * B and bool((special & ~am).any())  # BOS / EOS inside am, and padding
    base = loss_gd(tl)
    with torch.no_grad():
        v, t = model.patch_tokens(b["pixel_values"]), model.text_tokens(ids, am)
        _, _, g_i, g_t = model.similarities_from_tokens(v, t, valid, model.text_segments(ids, am))
        ref = global_distill_loss(g_i, sk.masked_pool(tv[:, 1:], torch.ones(B, 4), normalize=True)) \
            + global_distill_loss(g_t, sk.masked_pool(tl, valid, normalize=True))
    assert base == pytest.approx(float(ref), abs=1e-6)
    moved = tl.clone()
    moved[special] = 10 * torch.randn(int(special.sum()), 6, generator=g)
    assert loss_gd(moved) == pytest.approx(base, abs=1e-6)
    moved = tl.clone()
    moved[valid] += 3 * torch.randn(int(valid.sum()), 6, generator=g)
    assert abs(loss_gd(moved) - base) > 1e-3  # content features do matter


# ----------------------------------------------------------------------------- a short run
def _small_model(tok):
    from solar.model import ModelConfig, SolarModel
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=32, patch_size=8, vision_hidden=48, vision_layers=0, vision_heads=2, vision_mlp=96,
                      max_text_len=64, text_hidden=48, text_layers=0, text_heads=2, text_mlp=96, width=48,
                      adapter_hidden=96, fusion_layers=1, fusion_heads=2, fusion_mlp=96, embed_dim=32,
                      text_context_window=5, text_segment_words=["and", ",", ".", ";"])  # as the tiny preset
    return SolarModel(cfg.with_tokenizer(tok))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from solar.data.shapesworld import write_shards
    d = tmp_path_factory.mktemp("sw")
    write_shards(str(d / "train"), pairs=1024, seed=0, shard_size=512, workers=1, image_size=32, progress=False)
    write_shards(str(d / "eval"), pairs=128, seed=0, shard_size=128, workers=1, item_offset=100_000, image_size=32, progress=False)
    return d


def _loader(path, bs, shuffle):
    import glob
    from solar.data.reader import make_loader
    urls = sorted(glob.glob(str(path / "*.tar")))
    return make_loader(urls, image_size=32, patch_size=8, max_length=64, batch_size=bs, drop_last=shuffle,
                       shuffle_buffer=256 if shuffle else 0, seed=0)


def test_short_stage1_run_learns_masks(shards, tmp_path):
    from solar.stage1 import run_stage1
    from solar.data.tokenizer import shapesworld_tokenizer

    model = _small_model(shapesworld_tokenizer(64))
    train, ev = _loader(shards / "train", 32, True), _loader(shards / "eval", 64, False)
    logs = _Logs()
    # rho held at 1: a run this short learns the similarities, not yet stable masks to train on
    cfg = Stage1Config(steps=80, lr=3e-3, warmup_steps=5, log_every=5, eval_every=0, ckpt_every=0,
                       fusion_itc_weight=0.0, rho_hold_frac=1.0, rho_end_frac=1.0)
    t0 = time.perf_counter()
    final = run_stage1(model, train, cfg, out_dir=tmp_path, log=logs, eval_loader=ev, progress=False)
    wall = time.perf_counter() - t0
    train_logs = [m for m in logs if "event" not in m]
    first = np.mean([m["loss_itc"] for m in train_logs[:2]])
    last = np.mean([m["loss_itc"] for m in train_logs[-2:]])
    assert last < first - 0.3, (first, last)
    assert final["samples"] == 128
    print({k: round(v, 3) for k, v in final.items() if 'iou' in k})
    assert final["iou_v"] > final["iou_v_random"] + 0.1, final
    # the text side learns more slowly (see the issue report): in 80 steps it only has to beat chance
    assert final["iou_l"] > final["iou_l_random"], final
    assert (tmp_path / "stage1_model" / "model.safetensors").is_file()
    print(f"short stage-1 run: {wall:.1f}s; IoU V {final['iou_v']:.3f} (random {final['iou_v_random']:.3f}), "
          f"L {final['iou_l']:.3f} (random {final['iou_l_random']:.3f})")


def test_stage1_resume_equals_uninterrupted(shards, tmp_path):
    from solar.stage1 import run_stage1
    from solar.checkpoint import CheckpointError
    from solar.data.tokenizer import shapesworld_tokenizer

    tok = shapesworld_tokenizer(64)
    cfg = Stage1Config(steps=4, warmup_steps=1, log_every=1, eval_every=0, ckpt_every=2, rho_hold_frac=0.0,
                       rho_end_frac=0.5)
    a = _small_model(tok)
    run_stage1(a, _loader(shards / "eval", 16, False), cfg, out_dir=tmp_path / "a", progress=False)
    b = _small_model(tok)
    with pytest.raises(CheckpointError, match="no stage-1 checkpoint"):
        run_stage1(b, _loader(shards / "eval", 16, False), cfg, out_dir=tmp_path / "b", resume=True, progress=False)
    b = _small_model(tok)
    _run_interrupted(b, _loader(shards / "eval", 16, False), cfg, tmp_path / "b", stop_at=3)  # the checkpoint of step 2 is written, step 3 is lost
    c = _small_model(tok)
    run_stage1(c, _loader(shards / "eval", 16, False), cfg, out_dir=tmp_path / "b", resume=True, progress=False)
    for (n, p), (_, q) in zip(a.state_dict().items(), c.state_dict().items()):
        assert torch.allclose(p, q, atol=1e-6), n


class _Stop(Exception):
    pass


class _Logs(list):
    """A `log(row, stage=, step=)` callback that keeps the rows (with their step)."""

    def __call__(self, row, stage="", step=-1, **_):
        self.append({**row, "step": step})


def _stop_after(n):
    def log(m, stage="", step=-1, **_):
        if "event" not in m and step >= n:
            raise _Stop
    return log


def _run_interrupted(model, loader, cfg, out_dir, stop_at):
    from solar.stage1 import run_stage1
    with pytest.raises(_Stop):
        run_stage1(model, loader, cfg, out_dir=out_dir, log=_stop_after(stop_at), progress=False)
