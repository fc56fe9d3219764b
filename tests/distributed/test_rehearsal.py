"""The rehearsal: `python -m solar.train --preset clip-b16` (CLIP's real BPE) and `--preset
dinov2-bge` (DINOv2 + XLM-R, the tower's own tokenizer) on tiny towers with the real
architectures and 224 px LAION-style JPEG shards, each on 2 gloo processes for 2 steps of every
phase, then one `solar.eval` over the models of both (the documented command: `python -m
solar.rehearsal --out DIR --run`)."""
import importlib.util
import json
import os
import subprocess
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
    rehearsal.prepare(r, presets=rehearsal.PRESETS)
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
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p))


def _train(root, preset):
    cmd = rehearsal.train_command(root, preset, nproc=2, steps=2)
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run = os.path.join(root, f"run-{preset}")
    return run, json.load(open(os.path.join(run, "results.json")))


@pytest.fixture(scope="module")
def clip_run(root):
    return _train(root, "clip-b16")


@pytest.fixture(scope="module")
def dinov2_run(root):
    return _train(root, "dinov2-bge")


def test_rehearsal_clip_b16_on_two_gloo_processes(clip_run):
    run, res = clip_run
    assert set(res["models"]) == {"SOLAR", "SOLAR stage 1 only", "CLIP-SF", "CLIP-SF zero-shot"}
    assert res["models"]["SOLAR"]["dim"] == 768 and res["models"]["CLIP-SF zero-shot"]["embedding"] == "clip_zs"
    # every model folder carries CLIP's tokenizer; saved models need no peft (LoRA folded in)
    from solar.data.tokenizer import clip_tokenizer, model_tokenizer
    for sub in ("stage1/stage1_model", "stage2/model", "clip_sf/model", "zero_shot/model", "stage2/ckpt"):
        tok = model_tokenizer(os.path.join(run, sub))
        assert tok is not None and tok("A photo of a cat")["input_ids"] == clip_tokenizer()("a photo of a cat")["input_ids"]
    cfg = json.load(open(os.path.join(run, "stage2/model/config.json")))["solar_model_config"]
    assert cfg["lora_rank"] == 0 and cfg["bos_token_id"] == 49406 and cfg["vision_tower_class"].startswith("CLIP")


def test_rehearsal_dinov2_bge_on_two_gloo_processes(root, dinov2_run):
    """SOLAR-B+D: DINOv2 at 224 px with 14 px patches (16 x 16 patches), XLM-R with its own
    tokenizer (<s> 0, <pad> 1, </s> 2) in every model folder, LoRA folded in on save, no zero-shot
    baseline (the towers have no shared projection heads), and the streamed pool's shares of
    both ranks in the stage-2 checkpoint."""
    from transformers import AutoTokenizer

    from solar.data.tokenizer import model_tokenizer
    run, res = dinov2_run
    assert set(res["models"]) == {"SOLAR", "SOLAR stage 1 only", "CLIP-SF"}
    assert res["models"]["SOLAR"]["dim"] == 768
    xlmr = AutoTokenizer.from_pretrained(os.path.join(root, "towers", "xlmr"))
    for sub in ("stage1/stage1_model", "stage2/model", "clip_sf/model", "stage2/ckpt"):
        tok = model_tokenizer(os.path.join(run, sub))
        assert tok is not None and tok("A photo of a red circle")["input_ids"] == xlmr("A photo of a red circle")["input_ids"]
    cfg = json.load(open(os.path.join(run, "stage2/model/config.json")))["solar_model_config"]
    assert cfg["lora_rank"] == 0 and cfg["vision_tower_class"] == "Dinov2Model"
    assert cfg["text_tower_class"] == "XLMRobertaModel" and cfg["patch_size"] == 14 and cfg["image_size"] == 224
    assert (cfg["bos_token_id"], cfg["pad_token_id"], cfg["eos_token_id"]) == (0, 1, 2)
    for r in (0, 1):
        assert os.path.isfile(os.path.join(run, "stage2", "ckpt", "ranks", str(r), "mining_pool.index"))


@pytest.mark.parametrize("preset", rehearsal.PRESETS)
def test_eval_of_the_written_models(root, preset, request, capsys):
    """`solar.eval` on the saved folders (in this process: the command's arguments to its main)."""
    from solar.eval import main
    run = request.getfixturevalue("clip_run" if preset == "clip-b16" else "dinov2_run")[0]
    args = rehearsal.eval_command(root, preset)[3:]
    if preset == "clip-b16":
        args += ["--ckpt", f"ZS={os.path.join(run, 'zero_shot/model')}"]
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    rows = {line.split("  ")[0] for line in capsys.readouterr().out.splitlines()}
    want = {"SOLAR", "CLIP-SF", "ZS"} if preset == "clip-b16" else {"SOLAR-B+D", "CLIP-SF (B+D towers)"}
    assert want <= rows, rows
