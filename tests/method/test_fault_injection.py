"""Fault injection: damaged benchmarks, training shards, model folders and index files.

Each case damages one thing the way a disk, a copy or a user does (truncation, garbage,
a missing file) and asserts the specific outcome: a clear error naming the file, or a
reported count.  Nothing may be scored or trained on silently.  Sizes are tiny: the whole
file runs in well under a minute on 2 cores.
"""
import json
import os
import shutil
import tarfile

import pytest
import torch

import solar_kernels as sk
from solar import benchmark as bm
from solar.checkpoint import CheckpointError
from solar.data import shapesworld as sw
from solar.data.reader import ReaderStats, make_loader
from solar.data.tokenizer import load_tokenizer
from solar.model import ModelConfig, SolarModel

from model_fixtures import tiny_model_folder

N_TRIPLETS, POOL, SHARD, SIZE = 6, 20, 10, 32   # 38 pairs in 4 shards
N_PAIRS = 3 * N_TRIPLETS + POOL


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("shapesworld", model_max_length=40)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bench"))
    bm.build_benchmark(out, seed=5, triplets=N_TRIPLETS, pool=POOL, image_size=SIZE, shard_size=SHARD,
                       progress=False)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("model") / "model", image_size=SIZE)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _eval(capsys, *argv):
    from solar.eval import main
    rc = main(["--no-progress", "--index-dtypes", "fp32", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------
# item 1: benchmark manifest
# ---------------------------------------------------------------------------------------
def test_build_writes_a_manifest_that_matches_the_shards(bench):
    spec = json.load(open(os.path.join(bench, "triplets.json")))
    entries = spec["manifest"]["shards"]
    assert [e["name"] for e in entries] == spec["shards"]
    assert sum(e["samples"] for e in entries) == spec["num_pairs"] == N_PAIRS
    assert [e["samples"] for e in entries] == [10, 10, 10, 8]
    import hashlib
    for e in entries:
        data = open(os.path.join(bench, e["name"]), "rb").read()
        assert e["bytes"] == len(data) and e["sha256"] == hashlib.sha256(data).hexdigest()
    b = bm.load_benchmark(bench, verify=True)
    assert b.verified and bm.benchmark_exists(bench)


def test_truncated_shard_is_refused_before_embedding(bench, model_dir, tmp_path, capsys):
    """Before the manifest, the reader skipped the cut samples and eval scored fewer
    distractors with exit 0 (a higher score)."""
    d = _copy(bench, tmp_path / "b")
    shard = os.path.join(d, "pool-000001.tar")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(bm.BenchmarkError, match=r"pool-000001.tar.*bytes.*truncated or replaced"):
        bm.load_benchmark(d, verify=True)
    assert not bm.benchmark_exists(d)
    rc, out, err = _eval(capsys, "--ckpt", model_dir, "--bench", d)
    line = _one_error_line(err)
    assert rc == 2 and "pool-000001.tar" in line and f"{size // 2} bytes" in line and "--allow-partial" in line
    assert "pairs searched" not in out


def test_same_size_garbage_shard_fails_the_checksum(bench, model_dir, tmp_path, capsys):
    d = _copy(bench, tmp_path / "b")
    shard = os.path.join(d, "pool-000002.tar")
    size = os.path.getsize(shard)
    with open(shard, "wb") as fh:
        fh.write(os.urandom(size))
    with pytest.raises(bm.BenchmarkError, match=r"pool-000002.tar.*does not match the manifest \(sha256"):
        bm.load_benchmark(d, verify=True)   # same size: the checksum catches it
    assert not bm.benchmark_exists(d)
    rc, out, err = _eval(capsys, "--ckpt", model_dir, "--bench", d)
    assert rc == 2 and "pool-000002.tar" in _one_error_line(err) and "sha256" in err
    # the evaluation inside solar.train (evaluate_models) refuses it as well
    from solar.evaluate import evaluate_models, load_for_eval
    m = load_for_eval(model_dir)
    with pytest.raises(bm.BenchmarkError, match="pool-000002.tar"):
        evaluate_models({"m": m}, d, tokenizer=load_tokenizer("shapesworld", 40), image_size=SIZE, patch_size=8,
                        max_length=40, index_dtypes=("fp32",), progress=False)


def test_allow_partial_scores_what_is_readable_and_says_how_much(bench, model_dir, tmp_path, capsys):
    d = _copy(bench, tmp_path / "b")
    with open(os.path.join(d, "pool-000003.tar"), "wb") as fh:   # the last shard: 8 pool pairs
        fh.write(b"not a tar file" * 100)
    rc, out, err = _eval(capsys, "--ckpt", model_dir, "--bench", d, "--allow-partial", "--out",
                         str(tmp_path / "r.json"))
    assert rc == 0, err
    readable = N_PAIRS - 8
    assert f"{readable} of {N_PAIRS} pairs searched" in out and out.startswith("PARTIAL")
    res = json.load(open(tmp_path / "r.json"))
    assert res["benchmark"]["partial"] and res["benchmark"]["pairs_searched"] == readable
    assert res["models"]["model"]["pairs_searched"] == readable
    assert res["benchmark"]["triplets_scored"] == N_TRIPLETS   # the lost shard held only pool pairs
    assert "warning" in err and "pool-000003.tar" in err


def test_unreadable_samples_under_a_good_checksum_are_caught_after_embedding(bench, model_dir, tmp_path, capsys):
    """A manifest written over already-damaged shards (or a remote shard, which is not
    hashed) passes the checksum; the pair count read back must still match."""
    d = _copy(bench, tmp_path / "b")
    shard = os.path.join(d, "pool-000000.tar")
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    victim = members[0][0].name                  # the first sample's image
    samples = {}
    for m, data in members:
        key, ext = m.name.split(".", 1)
        samples.setdefault(key, {})[ext] = data
    samples[victim.split(".")[0]]["png"] = b"\x89PNG\r\n\x1a\n not an image"
    sw.write_samples(shard, [(k, v["png"], v["txt"].decode(), json.loads(v["json"])) for k, v in samples.items()])
    bm.write_manifest(d)
    assert bm.benchmark_exists(d)
    rc, out, err = _eval(capsys, "--ckpt", model_dir, "--bench", d)
    line = _one_error_line(err)
    assert rc == 2 and f"only {N_PAIRS - 1} of its {N_PAIRS} pairs could be read" in line
    assert "corrupt image 1" in line


def test_benchmark_without_manifest_gets_a_rebuild_command(bench, model_dir, tmp_path, capsys):
    d = _copy(bench, tmp_path / "b")
    spec = json.load(open(os.path.join(d, "triplets.json")))
    del spec["manifest"]
    json.dump(spec, open(os.path.join(d, "triplets.json"), "w"))
    with pytest.raises(bm.BenchmarkError, match="no manifest") as e:
        bm.load_benchmark(d)
    assert f"python -m solar.benchmark --out {d} --seed 5 --triplets {N_TRIPLETS} --pool {POOL} " \
           f"--image-size {SIZE}" in str(e.value)
    assert not bm.benchmark_exists(d)      # solar.train rebuilds such a benchmark in its cache
    rc, _, err = _eval(capsys, "--ckpt", model_dir, "--bench", d)
    assert rc == 2 and "no manifest" in _one_error_line(err)
    # a converted benchmark whose shards are trusted gets one with --write-manifest
    assert bm.main(["--write-manifest", d]) == 0
    capsys.readouterr()
    assert json.load(open(os.path.join(d, "triplets.json")))["manifest"] == \
        json.load(open(os.path.join(bench, "triplets.json")))["manifest"]
    rc, out, err = _eval(capsys, "--ckpt", model_dir, "--bench", d)
    assert rc == 0 and f"{N_TRIPLETS} triplets, {N_PAIRS} pairs searched" in out


def test_interrupted_rebuild_leaves_no_loadable_benchmark(bench, tmp_path, monkeypatch):
    d = _copy(bench, tmp_path / "b")
    calls = []

    def dying_write(path, samples):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(path)
        return real(path, samples)
    real = bm.write_samples
    monkeypatch.setattr(bm, "write_samples", dying_write)
    with pytest.raises(KeyboardInterrupt):
        bm.build_benchmark(d, seed=6, triplets=N_TRIPLETS, pool=POOL, image_size=SIZE, shard_size=SHARD,
                           progress=False)
    assert not bm.benchmark_exists(d)   # the old spec would describe half-rewritten shards


# ---------------------------------------------------------------------------------------
# item 11: the solar.benchmark CLI checks everything before writing
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--triplets", "0"], "--triplets: expected an int >= 1, got 0"),
    (["--pool", "-1"], "--pool: expected an int >= 0, got -1"),
    (["--shard-size", "0"], "--shard-size: expected an int >= 1, got 0"),
    (["--image-size", "20"], "--image-size: expected a positive multiple of 16"),
    (["--check-train", "/nonexistent/train-{000..002}.tar"], "--check-train: train: urls: shard"),
])
def test_benchmark_cli_errors_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "new"
    with pytest.raises(SystemExit) as e:
        bm.main(["--out", str(out), "--triplets", "2", "--pool", "2", "--no-progress", *extra])
    assert e.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists()


def test_benchmark_cli_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(SystemExit) as e:
        bm.main(["--out", str(f), "--no-progress"])
    assert e.value.code == 2 and "--out: " in capsys.readouterr().err and f.read_text() == "x"


def test_benchmark_cli_overlap_is_found_before_writing(tmp_path, capsys):
    views, _ = bm._triplet(7, 0, sw.BENCHMARK_ITEM_BASE, SIZE)     # the first triplet of seed 7
    train = tmp_path / "leak-000000.tar"
    sw.write_samples(str(train), views[:1])
    out = tmp_path / "new"
    rc = bm.main(["--out", str(out), "--seed", "7", "--triplets", "2", "--pool", "2", "--image-size", str(SIZE),
                  "--check-train", str(train), "--no-progress"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "--check-train" in line and "1 shared item id" in line
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# item 2: the embedding kind is never guessed
# ---------------------------------------------------------------------------------------
def test_model_folder_without_kind_file_is_refused_or_told(bench, model_dir, tmp_path, capsys):
    import solar
    from solar.evaluate import load_for_eval
    d = _copy(model_dir, tmp_path / "ckpt")
    os.remove(os.path.join(d, "solar_embedding.json"))
    with pytest.raises(CheckpointError, match="has no solar_embedding.json.*--kind"):
        load_for_eval(d)
    rc, out, err = _eval(capsys, "--ckpt", d, "--bench", bench)
    assert rc == 2 and "solar_embedding.json" in _one_error_line(err)
    rc, out, err = _eval(capsys, "--ckpt", d, "--bench", bench, "--kind", "clip_sf", "--out", str(tmp_path / "r.json"))
    assert rc == 0, err
    assert json.load(open(tmp_path / "r.json"))["models"]["ckpt"]["embedding"] == "clip_sf"
    import numpy as np
    imgs, caps = [np.zeros((SIZE, SIZE, 3), np.uint8)], ["a red circle"]
    with pytest.raises(CheckpointError, match="solar_embedding.json"):
        solar.encode(imgs, caps, model=d)
    with pytest.raises(CheckpointError, match="solar_embedding.json"):
        solar.Retriever(d)
    m = SolarModel.from_pretrained(d)
    got = solar.encode(imgs, caps, model=d, kind="clip_sf")
    assert got.shape == (1, m.cfg.width)
    assert torch.allclose(got, solar.encode(imgs, caps, model=(m, "clip_sf")))
    assert solar.Retriever(d, kind="clip_sf").kind == "clip_sf"
    # an explicit kind that contradicts the folder's file is an error, not an override
    with pytest.raises(CheckpointError, match="is a 'solar' model"):
        load_for_eval(model_dir, kind="clip_sf")
    rc, _, err = _eval(capsys, "--ckpt", model_dir, "--bench", bench, "--kind", "clip_sf")
    assert rc == 2 and "is a 'solar' model" in _one_error_line(err)


def test_garbage_kind_file_is_named(model_dir, tmp_path):
    from solar.evaluate import load_for_eval
    d = _copy(model_dir, tmp_path / "m")
    with open(os.path.join(d, "solar_embedding.json"), "wb") as fh:
        fh.write(b"\xff\xfe[1, 2")
    with pytest.raises(CheckpointError, match="solar_embedding.json is not a json object"):
        load_for_eval(d)


# ---------------------------------------------------------------------------------------
# item 6: damaged training shards are skipped and counted, the batch format holds
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train"))
    sw.write_shards(out, 60, seed=2, shard_size=20, workers=1, image_size=SIZE, progress=False)
    return out


def _members(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def _write_members(path, members):
    import io
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _damaged_set(train_dir, tmp_path):
    """[json-less shard, good, truncated, good]: the damaged ones first, so that no reader
    can learn the format from the first shard it opens."""
    good = sorted(os.path.join(train_dir, n) for n in os.listdir(train_dir) if n.endswith(".tar"))
    nojson = str(tmp_path / "nojson-000000.tar")
    _write_members(nojson, [(n, d) for n, d in _members(good[0]) if not n.endswith(".json")])
    trunc = str(tmp_path / "trunc-000000.tar")
    data = open(good[1], "rb").read()
    with tarfile.open(good[1]) as tar:
        cut = [m for m in tar][-4]                   # inside the second-to-last sample
    with open(trunc, "wb") as fh:
        fh.write(data[: cut.offset_data + cut.size // 2])
    return [nojson, good[1], trunc, good[2]]


def _bank(loader):
    """What solar.train's in-memory loading does: concatenate every field over the batches."""
    from solar.data.batches import PairBank
    fields = {}
    for b in loader:
        for k, v in b.items():
            fields.setdefault(k, []).append(v)
    out = {k: torch.cat(v) if torch.is_tensor(v[0]) else [x for p in v for x in p] for k, v in fields.items()}
    return PairBank(out)


def test_jsonless_and_truncated_shards_keep_ground_truth_and_are_counted(train_dir, tmp_path, tok):
    """Before: the json-less samples made their batches drop the ground-truth fields, so
    in-memory loading died with "PairBank: field 'item_id' has N rows, expected M"."""
    urls = _damaged_set(train_dir, tmp_path)
    loader = make_loader(urls, tok, image_size=SIZE, patch_size=8, max_length=40, batch_size=16,
                         pad_to_max_length=True)
    assert loader.dataset.ground_truth == "require"
    bank = _bank(loader)
    t = loader.stats.totals()
    assert {"item_id", "gt_patch_mask", "gt_token_mask"} <= set(bank.fields)
    # the json-less shard's 20 samples and the truncated shard's last one (cut inside its json)
    assert t["missing_ground_truth"] == 21 and t["read_error"] >= 1
    assert len(bank) == t["yielded"] == 20 + 18 + 20
    assert "missing ground truth" in loader.last_report and "read error" in loader.last_report
    m = loader.stats.as_metrics()
    assert m["reader/missing_ground_truth"] == t["missing_ground_truth"] and m["reader/yielded"] == len(bank)
    assert m["reader/skipped"] == t["skipped"] and "reader/corrupt_image" not in m


def test_one_jsonless_sample_in_a_single_batch_keeps_ground_truth(train_dir, tmp_path, tok):
    """Fewer pairs than a batch: before, one json-less sample removed the mask ground truth
    (and so the mask-IoU metrics) of the whole training set without a word."""
    good = sorted(os.path.join(train_dir, n) for n in os.listdir(train_dir) if n.endswith(".tar"))[0]
    members = _members(good)
    first_json = next(n for n, _ in members if n.endswith(".json"))
    p = str(tmp_path / "one-000000.tar")
    _write_members(p, [(n, d) for n, d in members if n != first_json])
    loader = make_loader(p, tok, image_size=SIZE, patch_size=8, max_length=40, batch_size=500)
    batches = list(loader)
    assert len(batches) == 1 and "gt_patch_mask" in batches[0] and len(batches[0]["key"]) == 19
    assert loader.stats.totals()["missing_ground_truth"] == 1


def test_non_utf8_captions_are_counted_apart_from_empty_ones(train_dir, tmp_path, tok):
    good = sorted(os.path.join(train_dir, n) for n in os.listdir(train_dir) if n.endswith(".tar"))[0]
    members = _members(good)
    txt = [n for n, _ in members if n.endswith(".txt")]
    bad = {txt[0]: b"caf\xe9 \xff\xfe", txt[1]: b"  \n", txt[2]: b"\xc3\x28 broken"}
    p = str(tmp_path / "cap-000000.tar")
    _write_members(p, [(n, bad.get(n, d)) for n, d in members])
    loader = make_loader(p, tok, image_size=SIZE, patch_size=8, max_length=40, batch_size=8)
    n = sum(len(b["key"]) for b in loader)
    t = loader.stats.totals()
    assert t["non_utf8_caption"] == 2 and t["empty_caption"] == 1 and n == 17
    assert "non utf8 caption 2" in loader.last_report and "empty caption 1" in loader.last_report


def test_ground_truth_mode_none_and_bad_mode(train_dir, tok):
    urls = sorted(os.path.join(train_dir, n) for n in os.listdir(train_dir) if n.endswith(".tar"))
    loader = make_loader(urls, tok, image_size=SIZE, patch_size=8, max_length=40, batch_size=32, ground_truth="none")
    assert all("gt_patch_mask" not in b and "item_id" not in b for b in loader)
    with pytest.raises(ValueError, match="ground_truth: expected one of"):
        make_loader(urls, tok, image_size=SIZE, patch_size=8, ground_truth="yes")


def test_reader_stats_api():
    s = ReaderStats()
    s.add("yielded", 5)
    s.add("non_utf8_caption", 2)
    s.add("read_error")
    assert s.as_metrics("data/") == {"data/yielded": 5, "data/skipped": 3, "data/read_error": 1,
                                     "data/non_utf8_caption": 2}
    assert "non utf8 caption 2" in s.report() and "read error 1" in s.report()


# ---------------------------------------------------------------------------------------
# items 8 and 10: the int8 Index's dimension bound; index files are never written in place
# ---------------------------------------------------------------------------------------
def test_int8_index_rejects_dims_whose_dot_products_overflow_int32():
    from solar_kernels.search import INT8_MAX_DIM
    # every int8 kernel's int32 accumulator must hold 255 * 127 * dim (VNNI: (q + 128) * x)
    assert 255 * 127 * INT8_MAX_DIM <= 2**31 - 1 < 255 * 127 * (INT8_MAX_DIM + 1)
    with pytest.raises(ValueError, match=rf"dim must be <= {INT8_MAX_DIM} for dtype='int8'.*got {INT8_MAX_DIM + 1}"):
        sk.Index(INT8_MAX_DIM + 1, dtype="int8")
    assert sk.Index(INT8_MAX_DIM + 1, dtype="fp16").dim == INT8_MAX_DIM + 1
    # at the bound the largest possible dot product (all codes 127) is exact on every SIMD level
    d = INT8_MAX_DIM
    index = sk.Index(d, dtype="int8")
    rows = torch.ones(3, d)
    rows[1] = -1.0
    rows[2, : d // 2] = -1.0
    index.add(rows)
    for simd in (0, 1, 2):
        s, i = index.search(torch.ones(1, d), 3, simd=simd)
        assert i.tolist() == [[0, 2, 1]], f"simd {simd}: ranking {i.tolist()}"
        assert s[0, 0].item() == pytest.approx(d, rel=1e-5) and s[0, 2].item() == pytest.approx(-d, rel=1e-5)


def test_index_file_with_an_oversized_int8_dim_is_refused(tmp_path):
    from solar_kernels.search import INT8_MAX_DIM, IndexFileError, _pack_header
    p = tmp_path / "big.idx"
    p.write_bytes(_pack_header("int8", INT8_MAX_DIM + 1, 0, 0, 0))
    with pytest.raises(IndexFileError, match=f"big.idx: an int8 index of dim {INT8_MAX_DIM + 1}"):
        sk.Index.load(p)


def test_save_over_a_mapped_index_renames_a_new_file(tmp_path):
    p = tmp_path / "pool.idx"
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    first = sk.Index(8)
    first.add(a)
    first.save(p)
    mapped = sk.Index.load(p, mmap=True)
    q = torch.randn(4, 8, generator=g)
    before = mapped.search(q, 5)
    inode = os.stat(p).st_ino
    second = sk.Index(8)
    second.add(b)
    second.save(p)                                  # the path the first index is mapped from
    assert os.stat(p).st_ino != inode, "save wrote into the mapped file instead of renaming a new one"
    after = mapped.search(q, 5)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert torch.equal(sk.Index.load(p).reconstruct(), b)
    assert sorted(os.listdir(tmp_path)) == ["pool.idx"]


def test_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    p = tmp_path / "pool.idx"
    index = sk.Index(4)
    index.add(torch.eye(4))
    index.save(p)
    old = p.read_bytes()
    index.add(torch.ones(1, 4))

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        index.save(p)
    monkeypatch.undo()
    assert p.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["pool.idx"], "a failed save left its temporary file"


def test_load_pair_bank_reports_what_the_reader_skipped(train_dir, tmp_path, tok, capsys):
    """solar.train's in-memory loading prints the reader's skip counts by cause (they used to
    stay in the reader's logger, which solar.train never configured) and keeps them on the bank."""
    from solar.data.batches import load_pair_bank
    urls = _damaged_set(train_dir, tmp_path)
    bank = load_pair_bank(urls, tok, image_size=SIZE, patch_size=8, max_length=40, seed=0, progress=False)
    out = capsys.readouterr().out
    assert "[data] reader:" in out and "missing ground truth 21" in out and "read error" in out
    assert bank.reader_stats["missing_ground_truth"] == 21 and bank.reader_stats["yielded"] == len(bank)


def test_train_with_a_damaged_bench_dir_says_why(bench, tmp_path, capsys):
    """A user-given --data.bench_dir that is not a usable benchmark: one error line with the
    reason (here: a shard that does not match its checksum), exit 2, before any training."""
    from solar import train
    damaged = tmp_path / "bench"
    _copy(bench, damaged)
    shard = sorted(p for p in os.listdir(damaged) if p.endswith(".tar"))[0]
    with open(damaged / shard, "r+b") as fh:
        fh.seek(700)
        fh.write(b"\x00garbage\x00")
    rc = train.main(["--data.bench_dir", str(damaged), "--run.out_dir", str(tmp_path / "run"),
                     "--data.cache_dir", str(tmp_path / "cache"), "--stage", "2", "--run.progress", "false"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "data.bench_dir" in err and "not a usable benchmark" in err and "sha256" in err.lower()


def test_bit_flip_in_model_weights_is_detected(model_dir, tmp_path):
    """A flipped bit inside model.safetensors used to load (weights up to 1.7e38, exit 0); the
    sha256 recorded in config.json at save time now makes it a CheckpointError naming the file."""
    from solar.checkpoint import MODEL_FILE, load_model_files
    d = _copy(model_dir, tmp_path / "m")
    load_model_files(d)  # intact: loads
    path = os.path.join(d, MODEL_FILE)
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.seek(size - 7)
        b = fh.read(1)
        fh.seek(size - 7)
        fh.write(bytes([b[0] ^ 0x40]))
    with pytest.raises(CheckpointError, match="model.safetensors does not match the sha256"):
        load_model_files(d)


def test_bit_flip_in_optimizer_state_is_detected(tmp_path):
    from solar.checkpoint import TRAINER_TENSORS, load_training_state, save_training_state
    model = SolarModel(ModelConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    d = save_training_state(tmp_path / "ckpt", model, opt, {"step": 1})
    path = d / TRAINER_TENSORS
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="trainer.safetensors does not match the sha256"):
        fresh = SolarModel(ModelConfig())
        load_training_state(d, fresh, torch.optim.AdamW(fresh.parameters()))


@pytest.mark.parametrize("argv, flag", [
    (["--model.fusion_heads", "5"], "--model.fusion_heads must divide model.width"),
    (["--model.patch_size", "24"], "--model.patch_size must divide model.image_size"),
    (["--data.batch_size", "20000"], "--data.batch_size must be <= data.train_pairs"),
    (["--stage2.batch_size", "20000"], "--stage2.batch_size must be <= data.train_pairs"),
    (["--data.val_bench_seed", "12345"], "--data.val_bench_seed must differ from data.bench_seed"),
    (["--stage2.mine_k", "100", "--stage2.mine_pool_size", "50"], "--stage2.mine_k must be smaller than the mining pool"),
])
def test_train_cli_cross_checks_exit_2_before_any_data(argv, flag, tmp_path, capsys, monkeypatch):
    """These used to pass the command line and fail later with a traceback (after generating
    or loading the data); now one error line naming the flag, exit 2, nothing written."""
    from solar import train
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as ex:
        train.main(argv + ["--run.out_dir", str(tmp_path / "run"), "--data.cache_dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert ex.value.code == 2 and flag in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_train_cli_warns_about_warmup_and_stray_flags(capsys):
    from solar.cli import parse_args
    parse_args(["--stage1.warmup_steps", "5000", "--stage", "1", "--stage2.lr", "0.1"])
    err = capsys.readouterr().err
    assert "stage1.warmup_steps (5000) > stage1.steps" in err and "--stage2.lr has no effect with --stage 1" in err
    parse_args([])
    assert capsys.readouterr().err == ""
