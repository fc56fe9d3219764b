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
def model_dir(tmp_path_factory, tok):
    """A tiny untrained model folder as `solar.train` writes it (weights + solar_embedding.json)."""
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=SIZE, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2, vision_mlp=64,
                      max_text_len=40, text_hidden=32, text_layers=1, text_heads=2, text_mlp=64, width=32,
                      adapter_hidden=32, fusion_layers=1, fusion_heads=2, fusion_mlp=64,
                      embed_dim=16).with_tokenizer(tok)
    d = tmp_path_factory.mktemp("model") / "model"
    SolarModel(cfg).save_pretrained(d)
    with open(d / "solar_embedding.json", "w") as fh:
        json.dump({"embedding": "solar", "steps": 0}, fh)
    return str(d)


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
