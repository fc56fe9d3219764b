"""Exact top-k search (solar_kernels.search): CPU SIMD and scalar paths against the
brute-force reference, ties, recall of the compact dtypes, save/load, bad input, CUDA."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from solar_kernels import Index, topk_search
from solar_kernels import _ext
from solar_kernels.reference import topk_search_reference
from solar_kernels.search import IndexFileError, kernel_name, quantize_int8, simd_level

pytestmark = pytest.mark.skipif(not _ext.available("search_topk_cpu"), reason=f"native extension: {_ext.load_error}")

BEST = simd_level(-1) if _ext.available("search_topk_cpu") else 0
SIMDS = sorted({0, BEST})  # scalar and the best this CPU has (both exercised)
DIMS = [1, 2, 3, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 100, 129]


def _data(seed, n, m, d, integer, dup):
    g = torch.Generator().manual_seed(seed)
    if integer:  # small integers: every summation order gives the same exact result
        x = torch.randint(-3, 4, (n, d), generator=g).float()
        q = torch.randint(-3, 4, (m, d), generator=g).float()
    else:
        x = torch.randn(n, d, generator=g)
        q = torch.randn(m, d, generator=g)
    if dup and n > 1:  # duplicated rows: tied scores, must come back in id order
        src = torch.randint(0, n, (max(1, n // 3),), generator=g)
        dst = torch.randint(0, n, (max(1, n // 3),), generator=g)
        x[dst] = x[src]
    return q, x


def _check_against_reference(scores, ids, q, x, k, dtype, exact):
    ref_s, ref_i = topk_search_reference(q, x, k, dtype)
    assert scores.shape == ids.shape == (q.shape[0], k)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64
    if exact:
        bad = (ids != ref_i).nonzero()
        assert bad.numel() == 0, f"{len(bad)} ids differ; first at {bad[0].tolist()}: got {ids[tuple(bad[0])]}, want {ref_i[tuple(bad[0])]}"
        torch.testing.assert_close(scores.double(), ref_s.double(), rtol=0, atol=0)
        return
    # Float data: the reported scores are the reference's top-k scores (to fp32 accumulation
    # error), each returned id really has the score reported for it, ids are distinct, and
    # equal scores come in increasing id order.
    full = (q.double() @ (x.half() if dtype == "fp16" else x).double().T)
    tol = 1e-5 * (q.double().abs() @ x.double().abs().T).max().item() + 1e-6
    torch.testing.assert_close(scores.double(), ref_s.double(), rtol=0, atol=tol)
    torch.testing.assert_close(full.gather(1, ids), scores.double(), rtol=0, atol=tol)
    for r in range(ids.shape[0]):
        assert len(set(ids[r].tolist())) == k, f"duplicate ids in row {r}: {ids[r].tolist()}"
    same = scores[:, 1:] == scores[:, :-1]
    assert bool((ids[:, 1:] > ids[:, :-1])[same].all()), "tied scores must come in increasing id order"


@settings(max_examples=max(60, settings().max_examples))
@given(
    n=st.integers(1, 160),
    m=st.integers(1, 13),
    d=st.sampled_from(DIMS),
    kfrac=st.floats(0.0, 1.0),
    dtype=st.sampled_from(["fp32", "fp16", "int8"]),
    simd=st.sampled_from(SIMDS),
    strategy=st.sampled_from(["auto", "split_queries", "split_rows"]),
    integer=st.booleans(),
    dup=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(n=1, m=1, d=1, kfrac=1.0, dtype="fp32", simd=BEST, strategy="auto", integer=True, dup=False, seed=0)
@example(n=97, m=5, d=65, kfrac=1.0, dtype="int8", simd=BEST, strategy="split_rows", integer=False, dup=True, seed=1)
@example(n=150, m=13, d=129, kfrac=0.1, dtype="fp16", simd=BEST, strategy="split_queries", integer=True, dup=True, seed=2)
def test_search_matches_reference(n, m, d, kfrac, dtype, simd, strategy, integer, dup, seed):
    q, x = _data(seed, n, m, d, integer, dup)
    k = max(1, min(n, int(round(kfrac * n))))
    index = Index(d, dtype=dtype)
    index.add(x)
    scores, ids = index.search(q, k, simd=simd, strategy=strategy, num_threads=2)
    # int8 scores are exact by construction; fp32/fp16 on small integers are exact too.
    _check_against_reference(scores, ids, q, x, k, dtype, exact=(dtype == "int8" or integer))


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("m", [1, 2, 3, 40])
@pytest.mark.parametrize("d", [200, 33, 64, 129, 192])
def test_simd_and_scalar_paths_agree(dtype, m, d):
    """Every SIMD level the CPU has (scalar, AVX2, AVX-512) against the reference, with
    dimension tails of each kernel's width (8 / 16 / 32 / 64 / 128 lanes): the hypothesis test
    covers only the scalar and the best level."""
    q, x = _data(7 + d, 777, m, d, integer=False, dup=True)
    index = Index(d, dtype=dtype)
    index.add(x)
    out = {s: index.search(q, 25, simd=s) for s in sorted({0, *range(1, BEST + 1)})}
    for s in out:
        _check_against_reference(*out[s], q, x, 25, dtype, exact=dtype == "int8")
        if dtype == "int8":
            assert torch.equal(out[s][1], out[0][1]) and torch.equal(out[s][0], out[0][0])
        else:
            torch.testing.assert_close(out[s][0], out[0][0], rtol=0, atol=1e-4)
            assert (out[s][1] == out[0][1]).float().mean() > 0.98


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("m,n,d", [(48, 97, 33), (61, 300, 129), (130, 64, 7), (50, 301, 40)])
@pytest.mark.parametrize("integer", [False, True])
def test_many_queries_block_and_panel_paths(dtype, m, n, d, integer):
    """m >= 48 takes the packed-panel path on AVX-512 (fp32/fp16; int8 with VNNI, where d
    that is not a multiple of 4 pads the last dword): edges of 12-query tiles and 32-row
    panels, duplicates, every strategy; (50, 301, 40) is large enough for two threads, so the
    rows are split into parts of odd length and merged."""
    q, x = _data(m * n + d, n, m, d, integer=integer, dup=True)
    q[5] = q[0]
    index = Index(d, dtype=dtype)
    index.add(x)
    for strategy in ("auto", "split_queries", "split_rows"):
        for simd in SIMDS:
            k = min(n, 17)
            s, i = index.search(q, k, simd=simd, strategy=strategy)
            _check_against_reference(s, i, q, x, k, dtype, exact=(dtype == "int8" or integer))
            assert torch.equal(i[5], i[0]) and torch.equal(s[5], s[0])


def test_int8_panel_at_embedding_width_is_exact():
    """The int8 panel path at d = 768 (12 x 64-byte steps per 4 dims, long accumulations):
    ids and scores equal the integer reference, and equal the 4x6 dot-product tile's."""
    q, x = _data(768, 301, 100, 768, integer=False, dup=True)
    index = Index(768, dtype="int8")
    index.add(x)
    s, i = index.search(q, 10)
    _check_against_reference(s, i, q, x, 10, "int8", exact=True)
    s1, i1 = index.search(q, 10, simd=1)          # AVX2 tile (no panel)
    assert torch.equal(i, i1) and torch.equal(s, s1)


def test_kernel_dispatch_and_env(monkeypatch):
    assert "scalar" in kernel_name("fp32", 16, simd=0)
    assert "scalar" in kernel_name("int8", 1, simd="scalar")
    if BEST >= 1:
        assert kernel_name("int8", 16, simd=1).startswith("avx2")
    if BEST >= 2:
        assert "vnni" in kernel_name("int8", 16)
        assert "panel" in kernel_name("fp32", 1024) and "panel" in kernel_name("fp16", 48)
        assert "panel" in kernel_name("int8", 48) and "panel" not in kernel_name("int8", 47)
        assert "panel" not in kernel_name("fp32", 1024, simd=1)
    monkeypatch.setenv("SOLAR_SEARCH_SIMD", "0")
    assert simd_level() == 0 and "scalar" in kernel_name("fp16", 4)
    monkeypatch.setenv("SOLAR_SEARCH_SIMD", "bogus")
    with pytest.raises(ValueError, match="simd must be one of"):
        simd_level()


def test_large_k_and_all_rows():
    q, x = _data(3, 600, 4, 48, integer=False, dup=False)
    for dtype in ("fp32", "int8"):
        index = Index(48, dtype=dtype)
        index.add(x)
        for k in (300, 600):
            s, i = index.search(q, k)
            _check_against_reference(s, i, q, x, k, dtype, exact=dtype == "int8")
        assert sorted(i[0].tolist()) == list(range(600))


def test_all_identical_rows_tie_in_id_order():
    x = torch.ones(50, 9)
    q = torch.ones(3, 9)
    for dtype in ("fp32", "fp16", "int8"):
        for simd in SIMDS:
            index = Index(9, dtype=dtype)
            index.add(x)
            s, i = index.search(q, 10, simd=simd)
            assert i.tolist() == [list(range(10))] * 3
            assert torch.all(s == s[0, 0])


def _recall(a, b):
    return np.mean([len(set(r1) & set(r2)) / len(r1) for r1, r2 in zip(a.tolist(), b.tolist())])


def test_recall_int8_fp16_random_and_clustered():
    g = torch.Generator().manual_seed(0)
    n, d, m = 4000, 768, 40
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    q = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
    centers = torch.nn.functional.normalize(torch.randn(40, d, generator=g), dim=1)
    xc = torch.nn.functional.normalize(centers[torch.randint(0, 40, (n,), generator=g)] + 0.35 * torch.randn(n, d, generator=g) / d**0.5 * 4, dim=1)
    qc = torch.nn.functional.normalize(centers[torch.randint(0, 40, (m,), generator=g)] + 0.35 * torch.randn(m, d, generator=g) / d**0.5 * 4, dim=1)
    for (qq, xx, floor8) in ((q, x, 0.97), (qc, xc, 0.99)):
        _, exact = topk_search(qq, xx, 10)
        for dtype, floor in (("int8", floor8), ("fp16", 0.99)):
            index = Index(d, dtype=dtype)
            index.add(xx)
            r = _recall(index.search(qq, 10)[1], exact)
            assert r >= floor, f"{dtype} recall@10 {r:.3f} < {floor}"


def test_add_in_batches_ndarray_and_properties():
    q, x = _data(11, 300, 6, 33, integer=False, dup=False)
    a = Index(33, dtype="int8")
    ids = a.add(x[:100].numpy())
    assert ids.tolist() == list(range(100))
    assert a.add(x[100:250].double()).tolist() == list(range(100, 250))
    a.add(x[250:])
    b = Index(33, dtype="int8")
    b.add(x)
    assert len(a) == len(b) == 300 and a.dim == 33 and a.dtype == "int8" and a.metric == "ip"
    assert a.nbytes == 300 * (33 + 8)
    assert Index(33, "fp16").nbytes == 0
    for s1, s2 in zip(a.search(q, 7), b.search(q, 7)):
        assert torch.equal(s1, s2)
    s, i = a.search(q[0], 5)  # a single [dim] query
    assert s.shape == (1, 5)
    torch.testing.assert_close(a.reconstruct([3, 4]), x[3:5], atol=x[3:5].abs().max().item() / 127, rtol=0)


def test_topk_search_one_shot_and_noncontiguous():
    q, x = _data(5, 400, 9, 70, integer=False, dup=True)
    s1, i1 = topk_search(q, x, 12)
    s2, i2 = topk_search(q.T.contiguous().T, x.T.contiguous().T, 12)  # non-contiguous views
    assert torch.equal(i1, i2) and torch.equal(s1, s2)
    index = Index(70)
    index.add(x)
    s3, i3 = index.search(q, 12)
    assert torch.equal(i1, i3) and torch.equal(s1, s3)
    _check_against_reference(s1, i1, q, x, 12, "fp32", exact=False)
    s4, i4 = topk_search(q.numpy(), x.numpy(), 12)
    assert torch.equal(i1, i4)


def test_quantize_int8_symmetric_scale():
    x = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0]])
    codes, scales = quantize_int8(x)
    assert codes.dtype == torch.int8 and codes.tolist() == [[64, -127, 32], [0, 0, 0]]
    assert scales.tolist() == [pytest.approx(1 / 127), 0.0]


def _quantize_int8_torch(x):
    """The torch expression quantize_int8 is specified by (and runs on CUDA tensors)."""
    s = x.abs().amax(dim=1) / 127.0
    safe = torch.where(s > 0, s, torch.ones_like(s))
    c = torch.round(x / safe[:, None]).clamp(-127, 127)
    return torch.where(s[:, None] > 0, c, torch.zeros_like(c)).to(torch.int8), s


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), d=st.sampled_from(DIMS + [768]), seed=st.integers(0, 2**31 - 1),
       kind=st.sampled_from(["normal", "halves", "tiny", "huge", "zeros"]))
def test_native_quantize_int8_matches_the_torch_expression(n, d, seed, kind):
    """The CPU quantiser (one native pass) gives the torch expression's codes and scales bit for
    bit: true division by the scale and round-half-to-even included ("halves": values that sit
    exactly on k + 0.5 code steps), all-zero rows (scale 0), subnormal and huge magnitudes."""
    assert _ext.available("quantize_int8_cpu")
    g = torch.Generator().manual_seed(seed)
    if kind == "halves":  # max 127 -> scale exactly 1.0, then every x/scale is an exact half
        x = torch.randint(-127, 127, (n, d), generator=g).float() + 0.5
        x[:, 0] = 127.0
    else:
        x = torch.randn(n, d, generator=g) * {"normal": 1.0, "tiny": 1e-42, "huge": 1e37, "zeros": 1.0}[kind]
    if kind == "zeros" or n > 2:
        x[torch.randint(0, n, (max(1, n // 3),), generator=g)] = 0.0
    codes, scales = quantize_int8(x)
    want_c, want_s = _quantize_int8_torch(x)
    assert torch.equal(scales, want_s)
    assert torch.equal(codes, want_c)


def test_torch_quantize_int8_rounds_half_to_even(monkeypatch):
    """The torch branch of quantize_int8 (the one CUDA tensors take), forced on CPU by hiding the
    native quantiser: codes and scales on values exactly on k + 0.5 code steps must follow
    round-half-to-even, as the native pass and the reference do."""
    available = _ext.available
    monkeypatch.setattr(_ext, "available", lambda name: name != "quantize_int8_cpu" and available(name))
    assert not _ext.available("quantize_int8_cpu")
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.0],
                      [-127.0, 3.5, 4.5, -3.5, -4.5, 0.0, 0.25, 0.75, 100.5, 101.5],
                      [0.0] * 10])
    codes, scales = quantize_int8(x)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32
    assert scales.tolist() == [1.0, 1.0, 0.0]  # max 127 -> scale exactly 1: every x / scale is exact
    assert codes.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126, -126, 3],
                              [-127, 4, 4, -4, -4, 0, 0, 1, 100, 102],
                              [0] * 10]
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-127, 127, (9, 33), generator=g).float() + 0.5
    x[:, 0] = 127.0
    x[::2] *= -1
    codes, scales = quantize_int8(x)
    assert torch.equal(scales, torch.ones(9))
    assert torch.equal(codes, torch.from_numpy(np.rint(x.numpy())).clamp(-127, 127).to(torch.int8))
    monkeypatch.undo()
    native = quantize_int8(x)  # the native pass agrees bit for bit
    assert torch.equal(native[0], codes) and torch.equal(native[1], scales)


def test_native_quantize_int8_nan_row():
    x = torch.tensor([[1.0, float("nan"), -2.0], [1.0, -2.0, 0.5]])
    codes, scales = quantize_int8(x)
    assert torch.isnan(scales[0]) and codes[0].tolist() == [0, 0, 0]
    assert codes[1].tolist() == [64, -127, 32]


# ---- save / load -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_round_trip(tmp_path, dtype, mmap):
    q, x = _data(9, 333, 5, 45, integer=False, dup=True)
    index = Index(45, dtype=dtype)
    index.add(x)
    path = tmp_path / f"i.{dtype}.idx"
    index.save(path)
    with open(path, "rb") as f:
        assert f.read(8) == b"SOLARIDX"
    loaded = Index.load(path, mmap=mmap)
    assert (len(loaded), loaded.dim, loaded.dtype, loaded.nbytes) == (333, 45, dtype, index.nbytes)
    for a, b in zip(index.search(q, 9), loaded.search(q, 9)):
        assert torch.equal(a, b)
    loaded.add(x[:10])  # growing a mapped index copies it into memory
    assert len(loaded) == 343
    s, i = loaded.search(x[:1], 2)
    assert i[0].tolist() == [0, 333] or s[0, 0] == s[0, 1]
    empty = Index(4, dtype=dtype)
    empty.save(tmp_path / "e.idx")
    assert len(Index.load(tmp_path / "e.idx", mmap=mmap)) == 0


def _saved(tmp_path, dtype="fp32", n=20, d=6):
    index = Index(d, dtype=dtype)
    index.add(torch.randn(n, d))
    path = tmp_path / "x.idx"
    index.save(path)
    return path, bytearray(path.read_bytes())


def test_load_rejects_corrupt_truncated_and_foreign_files(tmp_path):
    path, raw = _saved(tmp_path, "int8")
    bad = tmp_path / "bad.idx"
    # payload corruption -> checksum
    b = bytearray(raw)
    b[70] ^= 0xFF
    bad.write_bytes(b)
    with pytest.raises(IndexFileError, match="checksum"):
        Index.load(bad)
    with pytest.raises(IndexFileError, match="checksum"):
        Index.load(bad, mmap=True)
    # the checksum covers the whole payload: the int8 scales and code sums after the padded
    # rows too (file format in the solar_kernels.search docstring)
    dim, count, payload = struct.unpack_from("<QQQ", raw, 24)
    assert (dim, count) == (6, 20)
    rows_padded = -(-count * dim // 64) * 64
    assert payload == rows_padded + 8 * count and len(raw) == 64 + payload
    for what, off in (("scales", 64 + rows_padded + 4 * 3 + 1), ("sums", 64 + rows_padded + 4 * count + 4 * 5)):
        b = bytearray(raw)
        b[off] ^= 0x01
        bad.write_bytes(b)
        for mmap in (False, True):
            with pytest.raises(IndexFileError, match="checksum"):
                Index.load(bad, mmap=mmap)
        assert len(Index.load(bad, verify=False)) == count, what  # only the checksum rejects it
    # truncated payload / header
    bad.write_bytes(raw[:-5])
    with pytest.raises(IndexFileError, match="truncated"):
        Index.load(bad)
    bad.write_bytes(raw[:30])
    with pytest.raises(IndexFileError, match="truncated"):
        Index.load(bad)
    # foreign file
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(IndexFileError, match="not a SOLAR index"):
        Index.load(bad)
    # header field corrupted (count) -> header checksum
    b = bytearray(raw)
    b[32] ^= 0x01
    bad.write_bytes(b)
    with pytest.raises(IndexFileError, match="header"):
        Index.load(bad)
    # a future version with a valid header checksum
    b = bytearray(raw)
    b[8:12] = struct.pack("<I", 99)
    b[52:56] = struct.pack("<I", zlib.crc32(bytes(b[:52])))
    bad.write_bytes(b)
    with pytest.raises(IndexFileError, match="version 99"):
        Index.load(bad)


# ---- bad input -----------------------------------------------------------------------
def test_bad_input_raises_clear_errors():
    index = Index(8)
    with pytest.raises(ValueError, match="empty"):
        index.search(torch.randn(2, 8), 1)
    index.add(torch.randn(5, 8))
    q = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"k must be in \[1, 5\].*got 0"):
        index.search(q, 0)
    with pytest.raises(ValueError, match=r"k must be in \[1, 5\].*got 6"):
        index.search(q, 6)
    with pytest.raises(TypeError, match="k must be an int"):
        index.search(q, 2.5)
    with pytest.raises(ValueError, match=r"q must have shape \[m, 8\]"):
        index.search(torch.randn(3, 7), 2)
    with pytest.raises(ValueError, match=r"x must have shape \[m, 8\]"):
        index.add(torch.randn(3, 9))
    with pytest.raises(ValueError, match="non-finite"):
        index.search(torch.tensor([[float("nan")] * 8]), 1)
    with pytest.raises(ValueError, match="non-finite"):
        index.add(torch.full((1, 8), float("inf")))
    with pytest.raises(TypeError, match="floating tensor"):
        index.search(torch.ones(2, 8, dtype=torch.int64), 1)
    with pytest.raises(TypeError, match="torch.Tensor or numpy.ndarray"):
        index.add([[1.0] * 8])
    with pytest.raises(ValueError, match="is on meta but the index lives on cpu"):
        index.search(torch.randn(2, 8, device="meta"), 1)
    with pytest.raises(ValueError, match="dtype must be one of"):
        Index(8, dtype="bf16")
    with pytest.raises(ValueError, match="metric must be one of"):
        Index(8, metric="l2")
    with pytest.raises(ValueError, match="dim must be a positive int"):
        Index(0)
    with pytest.raises(ValueError, match="strategy must be one of"):
        index.search(q, 2, strategy="random")
    with pytest.raises(ValueError, match="db must have shape"):
        topk_search(q, torch.randn(8), 1)
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
        topk_search(q, torch.randn(4, 8), 5)
    with pytest.raises(ValueError, match="non-finite"):
        topk_search(q, torch.tensor([[float("nan")] * 8]), 1)
    if not _ext.available("search_topk_cuda"):
        with pytest.raises(RuntimeError, match="CUDA"):
            Index(8, device="cuda")
    with pytest.raises(RuntimeError, match="process_group given"):
        index.search(q, 2, process_group=object())


def test_reconstruct_and_k_need_integers():
    index = Index(4)
    x = torch.randn(10, 4)
    index.add(x)
    with pytest.raises(TypeError, match="ids must be integers.*got bool values.*nonzero"):
        index.reconstruct(torch.arange(10) == 3)
    with pytest.raises(TypeError, match="ids must be integers.*got float32 values"):
        index.reconstruct([1.5])
    with pytest.raises(TypeError, match="ids must be integers.*got float64 values"):
        index.reconstruct(np.array([1.0]))
    with pytest.raises(TypeError, match="ids must be integers.*got str"):
        index.reconstruct("ab")
    torch.testing.assert_close(index.reconstruct(np.array([3, 1], dtype=np.int32)), x[[3, 1]])
    torch.testing.assert_close(index.reconstruct([2]), x[[2]])
    assert index.reconstruct([]).shape == (0, 4)
    with pytest.raises(TypeError, match="k must be an int, got a float32 tensor"):
        index.search(x, torch.tensor(2.7))
    with pytest.raises(TypeError, match="k must be an int, got a bool tensor"):
        index.search(x, torch.tensor(True))
    assert index.search(x, torch.tensor(2))[1].shape == (10, 2)


def test_fp16_index_refuses_values_beyond_float16():
    index = Index(4, "fp16")
    with pytest.raises(ValueError, match=r"x has 1 value\(s\) beyond float16's range \(\|x\| > 65504.*fp32"):
        index.add(torch.tensor([[1e6, 0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="beyond float16's range"):
        index.add(np.array([[0.0, -7e4, 0.0, 0.0]]))
    assert len(index) == 0
    index.add(torch.tensor([[65504.0, -65504.0, 0.0, 1.0]]))
    assert torch.isfinite(index.reconstruct()).all()
    Index(4, "fp32").add(torch.tensor([[1e6, 0.0, 0.0, 0.0]]))  # fp32 and int8 store it
    Index(4, "int8").add(torch.tensor([[1e6, 0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("device", ["gpu", "CPU", "cuda:x", "meta", torch.device("meta")],
                         ids=lambda d: f"device={d!r}")  # not "gpu": conftest skips that keyword without CUDA
def test_bad_device_names_the_argument(tmp_path, device):
    want = r"device must be 'cpu', 'cuda' or 'cuda:N' \(or a torch.device\), got '(gpu|CPU|cuda:x|meta)'"
    with pytest.raises(ValueError, match=want):
        Index(4, device=device)
    index = Index(4)
    index.add(torch.randn(3, 4))
    with pytest.raises(ValueError, match=want):
        index.to(device)
    index.save(tmp_path / "i.idx")
    with pytest.raises(ValueError, match=want):
        Index.load(tmp_path / "i.idx", device=device)


def test_device_type_and_missing_cuda():
    with pytest.raises(TypeError, match=r"device must be 'cpu', 'cuda' or 'cuda:N' .*got int 0"):
        Index(4, device=0)
    assert Index(4, device=torch.device("cpu")).device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"device 'cuda:1' needs CUDA.*torch.cuda.is_available\(\) is False"):
            Index(4, device="cuda:1")


def test_topk_search_errors_name_db():
    q = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"db is empty"):
        topk_search(q, torch.randn(0, 4), 1)
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\] \(the rows of db\), got 5"):
        topk_search(q, torch.randn(3, 4), 5)
    with pytest.raises(ValueError, match=r"q is on meta but db lives on cpu"):
        topk_search(torch.randn(2, 4, device="meta"), torch.randn(3, 4), 1)


def test_topk_search_is_documented():
    doc = topk_search.__doc__
    for word in ("Args:", "q:", "db:", "k:", "simd:", "strategy:", "num_threads:", "Returns:", "Raises:",
                 "numpy.ndarray", "[1, n]"):
        assert word in doc, word


# ---- CUDA ----------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("n,m,d,k", [(1000, 1, 768, 10), (5000, 37, 100, 64), (3000, 16, 33, 1024), (700, 300, 64, 5)])
def test_cuda_matches_cpu(dtype, n, m, d, k):
    if not _ext.available("search_topk_cuda"):
        pytest.skip("extension built without CUDA")
    q, x = _data(1, n, m, d, integer=False, dup=True)
    cpu = Index(d, dtype=dtype)
    cpu.add(x)
    gpu = cpu.to("cuda")
    s_c, i_c = cpu.search(q, k)
    s_g, i_g = gpu.search(q.cuda(), k)
    torch.testing.assert_close(s_g.cpu(), s_c, rtol=0, atol=1e-4)
    assert (i_g.cpu() == i_c).float().mean() > 0.99
    if dtype == "int8":
        assert torch.equal(i_g.cpu(), i_c)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("mmap", [False, True])
def test_reconstruct_ids_after_load(tmp_path, dtype, mmap):
    """A saved and re-loaded index reconstructs selected rows like the index it was saved from
    (a loaded fp32 / fp16 index has no per-row scales; reconstruct(ids) must not index them)."""
    x = torch.randn(20, 8)
    index = Index(8, dtype=dtype)
    index.add(x)
    index.save(tmp_path / "a.index")
    loaded = Index.load(tmp_path / "a.index", mmap=mmap)
    for ids in ([3, 0, 19], torch.tensor([5]), []):
        assert torch.equal(loaded.reconstruct(ids), index.reconstruct(ids))
    assert torch.equal(loaded.reconstruct(), index.reconstruct())
