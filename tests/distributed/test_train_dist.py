"""Distributed training (gloo, 2 CPU processes): stage 2 and CLIP-SF under DDP with the
contrastive losses over the global batch give the same losses and the same weights as
one process over the same global batch."""
import json
import os
import socket
import sys

import pytest
import torch

pytestmark = pytest.mark.dist

STEPS = 2
GLOBAL_BATCH = 8


def _bank():
    from solar.data.batches import PairBank
    g = torch.Generator().manual_seed(5)
    n, T = 32, 9
    ids = torch.randint(2, 60, (n, T), generator=g)
    ids[:, 0] = 0
    am = torch.ones(n, T, dtype=torch.bool)
    am[::2, 6:] = False
    ids[::2, 6:] = 1
    ids[::2, 5] = 1
    ids[1::2, T - 1] = 1
    return PairBank({"pixel_values": torch.randn(n, 3, 32, 32, generator=g), "input_ids": ids,
                     "attention_mask": am}, seed=3)


def _model():
    from solar.model import ModelConfig, SolarModel
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2, vision_mlp=64,
                      vocab_size=64, max_text_len=16, text_hidden=32, text_layers=1, text_heads=2, text_mlp=64,
                      width=32, adapter_hidden=64, fusion_layers=1, fusion_heads=2, fusion_mlp=64, embed_dim=16,
                      bos_token_id=0, eos_token_id=1, pad_token_id=1)
    m = SolarModel(cfg)
    m.tau_v.fill_(0.0)
    m.tau_l.fill_(0.0)
    return m


def _train(out_dir: str, di, mine_k: int, micro: int = 1) -> dict:
    import copy

    from solar.baselines import run_clip_sf
    from solar.config import Stage2Config
    from solar.stage2 import run_stage2
    from solar.trainer import LoopOptions
    torch.set_num_threads(1)
    opts = LoopOptions(micro_batches=micro, progress=False)
    bank = _bank()
    result = {}
    for phase in ("stage2", "clip_sf"):
        losses, grad_norms = [], []

        def log(m, stage="", step=-1, **_):
            losses.append(m["loss"])
            grad_norms.append(m["grad_norm"])
        model = _model()
        if phase == "stage2":
            cfg = Stage2Config(steps=STEPS, batch_size=GLOBAL_BATCH, warmup_steps=1, mine_k=mine_k, refresh_every=1,
                               mine_pool_size=16, n_segments=3, kmeans_iters=2)
            run_stage2(model, bank, cfg, out_dir=os.path.join(out_dir, phase), log=log, seed=1, dist_info=di,
                       teacher=copy.deepcopy(model), ckpt_every=0, log_every=1, progress=False, options=opts)
        else:
            run_clip_sf(model, bank, steps=STEPS, global_batch=GLOBAL_BATCH, lr=1e-3, temperature=0.1,
                        out_dir=os.path.join(out_dir, phase), log=log, dist_info=di, warmup=1, ckpt_every=0,
                        log_every=1, progress=False, options=opts)
        result[phase] = {"losses": losses, "grad_norms": grad_norms,
                         "params": {k: v.flatten()[:64].tolist() for k, v in model.state_dict().items()
                                    if v.is_floating_point()}}
    return result


def _dist_train(di, out_dir, mine_k, micro=1):
    return _train(out_dir, di, mine_k, micro)


def _free_port():
    """A free TCP port for torchrun's rendezvous (the torchrun test only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("micro", [1, 2])
def test_two_process_gloo_matches_single_process(tmp_path, micro):
    """micro=2: each rank splits its share into 2 GradCache micro-batches (the loop sums the
    gradients over ranks itself then) and still matches one process over whole batches."""
    import solar_kernels as sk
    from solar.distributed import DistInfo
    mine_k = 2 if hasattr(sk, "Index") else 0
    single = _train(str(tmp_path / "single"), DistInfo(), mine_k)
    from dist_harness import run_ranks
    ranks = run_ranks(_dist_train, tmp_path, str(tmp_path), mine_k, micro)
    for phase in ("stage2", "clip_sf"):
        ref = single[phase]
        assert len(ref["losses"]) == STEPS
        for r in ranks:
            # every rank reports the global-batch loss, equal to the single-process loss
            assert r[phase]["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6), phase
            # and the gradient of that loss, before clipping: AdamW and the clip hide a wrong
            # gradient scale (DDP averages the ranks' shares; the loop multiplies by the world
            # size to get their sum), the logged grad norm does not
            assert r[phase]["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-4, abs=1e-6), phase
            for k, v in ref["params"].items():
                assert r[phase]["params"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), f"{phase}: {k}"
        # and training moved the weights (the comparison is not vacuous)
        init = {k: v.flatten()[:64].tolist() for k, v in _model().state_dict().items() if v.is_floating_point()}
        assert any(init[k] != pytest.approx(v, abs=1e-6) for k, v in ref["params"].items())


@pytest.mark.slow
def test_torchrun_cli_two_processes(tmp_path):
    """`torchrun --nproc_per_node=2 -m solar.train ...` runs the whole job (tiny sizes)."""
    import subprocess
    from test_train_e2e import TINY
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node=2", f"--master_port={_free_port()}", "-m", "solar.train", *TINY,
           "--data.cache_dir", str(tmp_path / "cache"), "--run.out_dir", str(tmp_path / "run")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(tmp_path / "run" / "results.json"))
    assert set(res["models"]) == {"SOLAR", "SOLAR stage 1 only", "CLIP-SF"}
