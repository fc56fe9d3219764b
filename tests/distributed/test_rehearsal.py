"""The rehearsal: `python -m solar.train --preset clip-b16` on tiny towers with the real
architectures, CLIP's real BPE and 224 px LAION-style JPEG shards, on 2 gloo processes, then
`solar.eval` (the documented command: `python -m solar.rehearsal --out DIR --run`)."""
import importlib.util
import json
import os
import subprocess
import sys
import tarfile

import pytest

from solar import rehearsal

if importlib.util.find_spec("open_clip") is None:   # located, never imported (its __init__ imports torchvision)
    pytest.skip("open_clip_torch ships CLIP's BPE file (pip install --no-deps open_clip_torch)", allow_module_level=True)
pytest.importorskip("peft")

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = str(tmp_path_factory.mktemp("rehearsal"))
    rehearsal.prepare(r, presets=("clip-b16",))
    return r


def test_laion_shards_look_like_laion(root):
    shards = sorted(os.listdir(os.path.join(root, "shards")))
    assert len(shards) == 4
    with tarfile.open(os.path.join(root, "shards", shards[0])) as tar:
        names = tar.getnames()
        exts = {n.split(".", 1)[1] for n in names}
        meta = json.loads(tar.extractfile(next(n for n in names if n.endswith(".json"))).read())
        txt = tar.extractfile(next(n for n in names if n.endswith(".txt"))).read().decode()
    assert exts == {"jpg", "txt", "json"} and meta["width"] == 224 and "item_id" not in meta
    assert txt[0].isupper() and txt.endswith(".") and meta["caption"] == txt


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())


def test_rehearsal_clip_b16_on_two_gloo_processes(root):
    cmd = rehearsal.train_command(root, "clip-b16", nproc=2, steps=2)
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run = os.path.join(root, "run-clip-b16")
    res = json.load(open(os.path.join(run, "results.json")))
    assert set(res["models"]) == {"SOLAR", "SOLAR stage 1 only", "CLIP-SF", "CLIP-SF zero-shot"}
    assert res["models"]["SOLAR"]["dim"] == 768 and res["models"]["CLIP-SF zero-shot"]["embedding"] == "clip_zs"
    # every model folder carries CLIP's tokenizer; saved models need no peft (LoRA folded in)
    from solar.data.tokenizer import clip_tokenizer, model_tokenizer
    for sub in ("stage1/stage1_model", "stage2/model", "clip_sf/model", "zero_shot/model", "stage2/ckpt"):
        tok = model_tokenizer(os.path.join(run, sub))
        assert tok is not None and tok("A photo of a cat")["input_ids"] == clip_tokenizer()("a photo of a cat")["input_ids"]
    cfg = json.load(open(os.path.join(run, "stage2/model/config.json")))["solar_model_config"]
    assert cfg["lora_rank"] == 0 and cfg["bos_token_id"] == 49406 and cfg["vision_tower_class"].startswith("CLIP")
    ev = subprocess.run([sys.executable, "-m", "solar.eval", "--bench", os.path.join(root, "bench"), "--device", "cpu",
                         "--no-progress", "--ckpt", f"SOLAR={os.path.join(run, 'stage2/model')}",
                         "--ckpt", f"ZS={os.path.join(run, 'zero_shot/model')}"],
                        env=_env(), capture_output=True, text=True, timeout=120)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert "ZS" in ev.stdout and "SOLAR" in ev.stdout
