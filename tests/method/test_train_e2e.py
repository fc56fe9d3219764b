"""End to end: `python -m solar.train` (tiny sizes) -> checkpoints -> eval table; resume ==
uninterrupted; clear errors; solar.encode / Retriever."""
import json
import os

import pytest
import torch

import solar_kernels as sk

from loop_fixtures import loss_killed_at  # tests/method, on sys.path: conftest.py

pytestmark = pytest.mark.skipif(not hasattr(sk, "Index"), reason="solar_kernels.Index not available yet")

# a model and data small enough for a few seconds per phase on 2 CPU cores
TINY = ["--model.image_size", "32", "--model.patch_size", "8", "--model.vision_hidden", "32",
        "--model.vision_layers", "1", "--model.vision_heads", "2", "--model.vision_mlp", "64",
        "--model.text_hidden", "32", "--model.text_layers", "1", "--model.text_heads", "2", "--model.text_mlp", "64",
        "--model.max_text_len", "40", "--model.width", "32", "--model.adapter_hidden", "64",
        "--model.fusion_layers", "1", "--model.fusion_heads", "2", "--model.fusion_mlp", "64",
        "--model.embed_dim", "16",
        "--data.train_pairs", "192", "--data.shard_size", "64", "--data.batch_size", "32",
        "--data.bench_triplets", "8", "--data.bench_pool", "40",
        "--stage1.steps", "4", "--stage1.warmup_steps", "1", "--stage1.ckpt_every", "2", "--stage1.eval_every", "0",
        "--stage1.log_every", "1",
        "--stage2.steps", "4", "--stage2.batch_size", "32", "--stage2.warmup_steps", "1", "--stage2.mine_k", "2",
        "--stage2.refresh_every", "3", "--stage2.mine_pool_size", "64", "--stage2.n_segments", "3",
        "--baseline.clip_sf_steps", "5",
        "--run.ckpt_every", "2", "--run.log_every", "1", "--run.progress", "false", "--eval.batch_size", "64"]


def _argv(cache, out, *extra):
    return TINY + ["--data.cache_dir", str(cache), "--run.out_dir", str(out), *extra]


def _state(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("solar_cache")


@pytest.fixture(scope="module")
def full_run(cache, tmp_path_factory):
    from solar.train import main
    out = tmp_path_factory.mktemp("run_full")
    assert main(_argv(cache, out)) == 0
    return out


def test_train_then_eval_writes_table(full_run, cache, tmp_path, capsys):
    out = full_run
    res = json.load(open(out / "results.json"))
    assert set(res["models"]) == {"SOLAR", "SOLAR stage 1 only", "CLIP-SF"}
    for name, r in res["models"].items():
        for dt in ("fp32", "int8"):
            m = r[dt]
            assert set(m) >= {"R@1", "R@5", "R@10", "mR", "Prec", "Avg"}
            assert 0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 100
            assert m["Avg"] == pytest.approx((m["mR"] + m["Prec"]) / 2)
    assert res["models"]["CLIP-SF"]["embedding"] == "clip_sf"
    # the validation benchmark (model selection) is evaluated too and shares no item with the
    # test benchmark or the training data
    assert set(res["val"]["models"]) == set(res["models"])
    from solar import benchmark as bm
    val, test = bm.load_benchmark(res["val"]["benchmark"]["path"]), bm.load_benchmark(res["benchmark"]["path"])
    assert val.root != test.root and val.spec["seed"] != test.spec["seed"]
    (vlo, vhi), (tlo, thi) = val.spec["item_id_range"], test.spec["item_id_range"]
    assert vhi <= tlo or thi <= vlo
    assert bm.check_no_overlap(test.shards, val).ok
    train_dir = [p for p in cache.iterdir() if p.name.startswith("shapesworld-")][0]
    assert bm.check_no_overlap(str(train_dir), val).ok
    table = (out / "results.md").read_text()
    assert "SOLAR stage 1 only" in table and "R@10" in table and "[int8 index]" in table
    assert os.path.getsize(out / "curves.png") > 1000
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert {r["stage"] for r in rows} >= {"stage1", "stage2", "clip_sf"}
    assert any("iou_v" in r for r in rows)          # mask IoU is logged (stage-1 final evaluation)
    # python -m solar.eval on the same checkpoint reproduces the table's numbers
    from solar.eval import main as eval_main
    bench = res["benchmark"]["path"]
    js = tmp_path / "eval.json"
    assert eval_main(["--ckpt", f"SOLAR={out / 'stage2' / 'model'}", "--ckpt", f"CLIP-SF={out / 'clip_sf' / 'model'}",
                      "--bench", bench, "--out", str(js), "--no-progress"]) == 0
    ev = json.load(open(js))
    for name in ("SOLAR", "CLIP-SF"):
        for dt in ("fp32", "int8"):
            assert ev["models"][name][dt] == pytest.approx(res["models"][name][dt])
    assert "R@1" in capsys.readouterr().out


def test_fp32_search_metrics_match_exhaustive_reference(full_run):
    from solar import benchmark as bm
    from solar.data.tokenizer import load_tokenizer
    from solar.evaluate import embed_collection, evaluate_embeddings, load_for_eval
    res = json.load(open(full_run / "results.json"))
    model, kind = load_for_eval(str(full_run / "stage2" / "model"))
    bench = bm.load_benchmark(res["benchmark"]["path"])
    emb, keys = embed_collection(model, kind, bench.shards, load_tokenizer("shapesworld", 40), image_size=32,
                                 patch_size=8, max_length=40, progress=False)
    got = evaluate_embeddings(emb, keys, bench, ("fp32",))["fp32"]
    ref = bm.metrics_from_embeddings(emb, *bench.indices(keys))
    for k in ("R@1", "R@5", "R@10", "Prec"):
        assert got[k] == pytest.approx(ref[k], abs=100.0 / len(bench.triplets) + 1e-9)


def test_resume_equals_uninterrupted(full_run, cache, tmp_path):
    import solar.stage1 as s1
    import solar.stage2 as s2
    from solar.train import main
    out = tmp_path / "run_interrupted"
    # 1) killed during stage 1 (after its step-2 checkpoint)
    with loss_killed_at(s1.Stage1Loss, 3):
        main(_argv(cache, out))
    # 2) resumed, then killed during stage 2 (after its step-2 checkpoint)
    with loss_killed_at(s2.Stage2Loss, 3):
        main(_argv(cache, out, "--resume"))
    # 3) resumed to the end
    assert main(_argv(cache, out, "--resume")) == 0
    for sub in ("stage1/stage1_model", "stage2/model", "clip_sf/model"):
        a, b = _state(full_run / sub), _state(out / sub)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{sub}: {k} differs after resume"
    ra = json.load(open(full_run / "results.json"))["models"]
    rb = json.load(open(out / "results.json"))["models"]
    assert ra == rb


def test_clear_errors(full_run, cache, tmp_path, capsys):
    import shutil

    from solar.eval import main as eval_main
    from solar.train import main
    res = json.load(open(full_run / "results.json"))
    bench = res["benchmark"]["path"]
    assert eval_main(["--ckpt", str(tmp_path / "nope"), "--bench", bench]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad_model"
    shutil.copytree(full_run / "stage2" / "model", bad)
    with open(bad / "model.safetensors", "r+b") as fh:
        fh.truncate(100)
    assert eval_main(["--ckpt", str(bad), "--bench", bench]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    assert eval_main(["--ckpt", str(full_run / "stage2" / "model"), "--bench", str(tmp_path / "nobench")]) == 2
    assert "benchmark" in capsys.readouterr().err
    assert main(_argv(cache, tmp_path / "r", "--data.train_shards", str(tmp_path / "x-{000..001}.tar"))) == 2
    assert "train_shards" in capsys.readouterr().err
    # a corrupt training checkpoint is named, not silently restarted
    out = tmp_path / "corrupt"
    shutil.copytree(full_run, out)
    shutil.rmtree(out / "stage2" / "model")
    ck = out / "stage2" / "ckpt"
    with open(ck / "trainer.json", "w") as fh:
        fh.write("{not json")
    assert main(_argv(cache, out, "--resume")) == 2
    assert "trainer.json" in capsys.readouterr().err


def test_encode_and_retriever(full_run):
    import solar
    from solar import benchmark as bm
    res = json.load(open(full_run / "results.json"))
    bench = bm.load_benchmark(res["benchmark"]["path"])
    import tarfile
    from io import BytesIO

    from PIL import Image
    imgs, caps = [], []
    with tarfile.open(bench.shards[0]) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    keys = sorted({n.rsplit(".", 1)[0] for n in files})[:12]
    for k in keys:
        imgs.append(Image.open(BytesIO(files[k + ".png"])))
        caps.append(files[k + ".txt"].decode())
    path = str(full_run / "stage2" / "model")
    emb = solar.encode(imgs, caps, model=path)
    assert emb.shape == (12, 16)
    assert torch.allclose(emb.norm(dim=1), torch.ones(12), atol=1e-4)
    r = solar.Retriever(path)
    r.add(imgs, caps, ids=keys)
    scores, hits = r.search(imgs[:3], caps[:3], k=2)
    assert [h[0] for h in hits] == keys[:3]          # a pair's nearest neighbour is itself
    assert scores.shape == (3, 2) and bool((scores[:, 0] >= scores[:, 1]).all())
    with pytest.raises(ValueError, match="equal lengths"):
        solar.encode(imgs[:2], caps[:1], model=path)
    with pytest.raises(ValueError, match="k:"):
        r.search(imgs[:1], caps[:1], k=99)


@pytest.mark.slow
def test_streaming_training_data(cache, tmp_path):
    """--data.in_memory false: the reader streams the shards (split by rank and worker)."""
    from solar.train import main
    out = tmp_path / "stream"
    assert main(_argv(cache, out, "--data.in_memory", "false", "--data.num_workers", "1")) == 0
    res = json.load(open(out / "results.json"))
    assert set(res["models"]) == {"SOLAR", "SOLAR stage 1 only", "CLIP-SF"}


@pytest.mark.slow
def test_default_job_reproduces_the_papers_ordering(tmp_path):
    """The main job with no arguments (about 4-5 min on 2 cores, data included): SOLAR above
    CLIP-SF and above stage 1 alone on the test benchmark, by the margins the README states
    for seed 0 (+13.8 and +21.3 Avg there; asserted with room for float differences across
    machines)."""
    from solar.train import main
    cache = os.environ.get("SOLAR_TEST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["--data.cache_dir", cache, "--run.out_dir", str(out), "--run.progress", "false"]) == 0
    res = json.load(open(out / "results.json"))
    avg = {name: r["fp32"]["Avg"] for name, r in res["models"].items()}
    assert avg["SOLAR"] >= avg["CLIP-SF"] + 7, avg
    assert avg["SOLAR"] >= avg["SOLAR stage 1 only"] + 3, avg


@pytest.mark.slow
def test_loop_features_through_the_cli(cache, tmp_path):
    """The whole job with bf16 autocast, activation checkpointing and 2 GradCache micro-batches
    (every phase): it trains, evaluates and logs the interval metrics."""
    from solar.train import main
    out = tmp_path / "features"
    assert main(_argv(cache, out, "--run.precision", "bf16", "--run.activation_checkpointing", "true",
                      "--run.micro_batches", "2")) == 0
    res = json.load(open(out / "results.json"))
    assert set(res["models"]) == {"SOLAR", "SOLAR stage 1 only", "CLIP-SF"}
    assert res["config"]["run"]["precision"] == "bf16"
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    for stage in ("stage1", "stage2", "clip_sf"):
        r = [x for x in rows if x["stage"] == stage and "step_time_s" in x]
        assert r and all(x["pairs_per_s"] > 0 and x["data_wait_s"] >= 0 for x in r), stage
