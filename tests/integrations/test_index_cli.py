"""`python -m solar.index build|search` on a tiny benchmark and an untrained model folder:
one process, two gloo processes writing index shards (searched sharded and in one process),
and the one-line errors."""
import json
import os
import tarfile

import pytest
import torch

from solar import benchmark as bm
from solar.index import main

from model_fixtures import tiny_model_folder

SIZE = 32


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bench"))
    bm.build_benchmark(out, seed=3, triplets=4, pool=16, image_size=SIZE, shard_size=7, progress=False)
    return out   # 28 pairs in 4 shards


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("model") / "model", image_size=SIZE)


def _query(bench, tmp_path, shard=2, which=3):
    """(image file, caption, key) of one pair stored in the benchmark's shards."""
    spec = json.load(open(os.path.join(bench, "triplets.json")))
    with tarfile.open(os.path.join(bench, spec["shards"][shard])) as tar:
        names = sorted(m.name for m in tar if m.isfile())
        keys = sorted({n.split(".", 1)[0] for n in names})
        key = keys[which]
        img = next(n for n in names if n.startswith(key + ".") and n.endswith((".png", ".jpg", ".webp")))
        path = str(tmp_path / ("q" + os.path.splitext(img)[1]))
        with open(path, "wb") as fh:
            fh.write(tar.extractfile(img).read())
        text = tar.extractfile(key + ".txt").read().decode()
    return path, text, key


def _search_json(capsys, *argv):
    assert main(["search", *argv, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]


def test_build_and_search_one_process(bench, model_dir, tmp_path, capsys):
    out = str(tmp_path / "pool.idx")
    assert main(["build", "--model", model_dir, "--data", bench, "--out", out, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "embedded 28 pairs" in printed and "pairs/s" in printed
    meta = json.load(open(out + ".ids.json"))
    assert meta["count"] == 28 and len(set(meta["ids"])) == 28
    img, text, key = _query(bench, tmp_path)
    res = _search_json(capsys, "--model", model_dir, "--index", out, "--image", img, "--text", text, "-k", "5")
    assert res[0]["keys"][0] == key and len(res[0]["keys"]) == 5      # the pair itself is its own best match
    assert res[0]["scores"] == sorted(res[0]["scores"], reverse=True)
    # int8 storage, plain-text output
    assert main(["build", "--model", model_dir, "--data", os.path.join(bench, "pool-00000{0..3}.tar"),
                 "--out", out + "8", "--dtype", "int8", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["search", "--model", model_dir, "--index", out + "8", "--image", img, "--text", text, "-k", "3"]) == 0
    assert key in capsys.readouterr().out


def _dist_build_search(di, model_dir, bench, out, img, text):
    import io as _io
    from contextlib import redirect_stdout

    from solar.index import main as index_main
    assert index_main(["build", "--model", model_dir, "--data", bench, "--out", out, "--no-progress"]) == 0
    import torch.distributed as dist
    dist.barrier()
    buf = _io.StringIO()
    with redirect_stdout(buf):
        assert index_main(["search", "--model", model_dir, "--index", out, "--image", img, "--text", text,
                           "-k", "6", "--json"]) == 0
    return buf.getvalue()


@pytest.mark.dist
def test_torchrun_shards_build_and_sharded_search(bench, model_dir, tmp_path, capsys):
    from dist_harness import run_ranks

    img, text, _ = _query(bench, tmp_path, shard=1, which=0)
    single = str(tmp_path / "single.idx")
    assert main(["build", "--model", model_dir, "--data", bench, "--out", single, "--no-progress"]) == 0
    capsys.readouterr()
    ref = _search_json(capsys, "--model", model_dir, "--index", single, "--image", img, "--text", text, "-k", "6")
    out = str(tmp_path / "sharded.idx")
    printed = run_ranks(_dist_build_search, tmp_path, model_dir, bench, out, img, text, world=2)
    assert not os.path.exists(out)
    counts = [json.load(open(f"{out}-0000{r}-of-00002.ids.json"))["count"] for r in range(2)]
    assert counts == [14, 14]                                     # shards 0, 2 and 1, 3
    got = json.loads(printed[0].strip())                          # rank 0 prints, rank 1 does not
    assert printed[1] == ""
    assert got["keys"] == ref[0]["keys"]
    assert torch.allclose(torch.tensor(got["scores"]), torch.tensor(ref[0]["scores"]), atol=1e-6)
    # the same shards searched by one process
    again = _search_json(capsys, "--model", model_dir, "--index", out, "--image", img, "--text", text, "-k", "6")
    assert again[0]["keys"] == ref[0]["keys"]


def test_errors_are_one_line(bench, model_dir, tmp_path, capsys):
    img, text, _ = _query(bench, tmp_path)
    rc = main(["search", "--model", model_dir, "--index", str(tmp_path / "none.idx"), "--image", img, "--text", text])
    err = capsys.readouterr().err
    assert rc == 2 and "none.idx" in err and len(err.strip().splitlines()) == 1
    out = str(tmp_path / "p.idx")
    assert main(["build", "--model", model_dir, "--data", bench, "--out", out, "--no-progress"]) == 0
    os.remove(out + ".ids.json")
    capsys.readouterr()
    assert main(["search", "--model", model_dir, "--index", out, "--image", img, "--text", text]) == 2
    assert "ids.json" in capsys.readouterr().err
    assert main(["build", "--model", model_dir, "--data", str(tmp_path / "nothing"), "--out", out]) == 2
    with pytest.raises(SystemExit):
        main(["search", "--model", model_dir, "--index", out, "--image", img])
