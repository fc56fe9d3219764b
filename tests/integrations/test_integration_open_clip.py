"""solar_kernels.integrations.open_clip.ClipLoss against open_clip's own ClipLoss.

Oracle: open_clip's ClipLoss run in float64; the error of ours (fp32) against it must be at
most twice the error of open_clip's fp32 run plus a small atol, for the loss, both feature
gradients and the logit_scale gradient -- on 1 process and on 2 gloo processes in each of
open_clip's four distributed modes (local_loss x gather_with_grad), rank by rank.
"""
import math

import pytest
import torch

from integration_peers import open_clip_loss_module

N, D = 37, 16
ATOL = 2e-6


def _inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(n, D, generator=g), dim=1)
    return img, txt, math.log(1 / 0.07)


def _run(loss_cls, img, txt, log_scale, dtype, **kw):
    """(loss, d img, d txt, d log_scale) of loss_cls(**kw) on copies of the inputs in `dtype`."""
    i = img.detach().to(dtype).clone().requires_grad_()
    t = txt.detach().to(dtype).clone().requires_grad_()
    ls = torch.tensor(log_scale, dtype=dtype, requires_grad=True)
    out = loss_cls(**kw)(i, t, ls.exp(), output_dict=True)
    loss = out["contrastive_loss"]
    loss.backward()
    return [loss.detach().double(), i.grad.double(), t.grad.double(), ls.grad.double()]


def _errors(ours, peer, oracle):
    """[(name, our error, peer error)] against the fp64 oracle."""
    names = ("loss", "d_image", "d_text", "d_logit_scale")
    return [(nm, float((o - r).abs().max()), float((p - r).abs().max())) for nm, o, p, r in zip(names, ours, peer, oracle)]


def _assert_close(errs, where=""):
    for name, ours, peer in errs:
        assert ours <= 2 * peer + ATOL, f"{where}{name}: error {ours:.3g} vs open_clip fp32 {peer:.3g} (fp64 oracle)"


def test_single_process_matches_open_clip():
    from solar_kernels.integrations.open_clip import ClipLoss

    oc = open_clip_loss_module()
    img, txt, ls = _inputs(N, 0)
    ours = _run(ClipLoss, img, txt, ls, torch.float32, cache_labels=True)
    peer = _run(oc.ClipLoss, img, txt, ls, torch.float32, cache_labels=True)
    oracle = _run(oc.ClipLoss, img, txt, ls, torch.float64)
    _assert_close(_errors(ours, peer, oracle))
    assert float(ours[3].abs()) > 1e-3   # the logit_scale gradient is really compared


def test_plain_tensor_output_and_logit_bias():
    from solar_kernels.integrations.open_clip import ClipLoss

    oc = open_clip_loss_module()
    img, txt, _ = _inputs(9, 1)
    bias = torch.tensor(-3.0, requires_grad=True)
    ours = ClipLoss()(img, txt, torch.tensor(10.0), bias)
    ref = oc.ClipLoss()(img.double(), txt.double(), torch.tensor(10.0, dtype=torch.float64), bias.double())
    assert isinstance(ours, torch.Tensor) and ours.dim() == 0
    assert abs(float(ours.detach()) - float(ref)) < 1e-5
    ours.backward()
    assert bias.grad is not None and float(bias.grad) == 0.0


def test_bad_input_names_the_argument():
    from solar_kernels.integrations.open_clip import ClipLoss

    img, txt, _ = _inputs(4, 2)
    with pytest.raises(ValueError, match="text_features must have image_features' shape"):
        ClipLoss()(img, txt[:3], 10.0)
    with pytest.raises(ValueError, match="logit_scale must be"):
        ClipLoss()(img, txt, -1.0)
    with pytest.raises(ValueError, match="use_horovod"):
        ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="rank must be an int in"):
        ClipLoss(rank=2, world_size=2)
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        ClipLoss(rank=0, world_size=2)(img, txt, 10.0)


MODES = [(False, False), (False, True), (True, True), (True, False)]
WORLD, N_LOCAL = 2, 11


def _dist_worker(di, modes):
    import torch.distributed as dist

    from solar_kernels.integrations.open_clip import ClipLoss

    torch.set_num_threads(1)
    oc = open_clip_loss_module()
    rank = dist.get_rank()
    img, txt, ls = _inputs(N_LOCAL * WORLD, 3)
    sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    out = {}
    for local, gwg in modes:
        kw = dict(local_loss=local, gather_with_grad=gwg, rank=rank, world_size=WORLD)
        ours = _run(ClipLoss, img[sl], txt[sl], ls, torch.float32, **kw)
        peer = _run(oc.ClipLoss, img[sl], txt[sl], ls, torch.float32, **kw)
        oracle = _run(oc.ClipLoss, img[sl], txt[sl], ls, torch.float64, **kw)
        out[f"{local}-{gwg}"] = _errors(ours, peer, oracle) + [("loss_value", float(ours[0]), float(oracle[0])),
                                                               ("dscale", float(ours[3]), float(oracle[3]))]
    return out


@pytest.mark.dist
def test_two_gloo_processes_match_open_clip_in_every_mode(tmp_path):
    from dist_harness import run_ranks

    open_clip_loss_module()   # skip early when open_clip is missing
    ranks = run_ranks(_dist_worker, tmp_path, MODES, world=WORLD)
    for r, res in enumerate(ranks):
        for mode, errs in res.items():
            _assert_close([e for e in errs if e[0] not in ("loss_value", "dscale")], f"rank {r} mode {mode}: ")
    # the modes really differ from one another (the comparison is not vacuous)
    vals = {m: dict((e[0], e[1]) for e in ranks[0][m]) for m in ranks[0]}
    assert abs(vals["True-True"]["loss_value"] - vals["False-False"]["loss_value"]) > 1e-4
