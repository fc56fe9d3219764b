"""The CUDA search's top-k logic (csrc/search/topk_merge.h), compiled for the CPU.

Nothing CUDA runs on the CI machine, so the __host__ __device__ functions that the kernels in
csrc/search/search_cuda.cu use for keys, candidate sorting, the merge-path merge and the warp
reduce-scatter are built by g++ into a small library (tests/native/topk_merge_shim.cpp, which
also replays the kernels' loops in their order) and checked against sorted references.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEADER = os.path.join(ROOT, "csrc", "search", "topk_merge.h")
SHIM = os.path.join(ROOT, "tests", "native", "topk_merge_shim.cpp")

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not on PATH")

u64p = np.ctypeslib.ndpointer(np.uint64, flags="C_CONTIGUOUS")
f32p = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
i64p = np.ctypeslib.ndpointer(np.int64, flags="C_CONTIGUOUS")
i32p = np.ctypeslib.ndpointer(np.int32, flags="C_CONTIGUOUS")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """The shim, built once per content (cached under ~/.cache/solar like the compile harness)."""
    digest = hashlib.sha256()
    for p in (HEADER, SHIM):
        with open(p, "rb") as f:
            digest.update(f.read())
    cache = os.path.join(os.path.expanduser("~"), ".cache", "solar", "topk_shim")
    os.makedirs(cache, exist_ok=True)
    so = os.path.join(cache, f"shim_{digest.hexdigest()[:16]}.so")
    if not os.path.exists(so):
        tmp = str(tmp_path_factory.mktemp("shim") / "shim.so")
        cmd = ["g++", "-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Werror", "-I", os.path.join(ROOT, "csrc"),
               SHIM, "-o", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        os.replace(tmp, so)
    L = ctypes.CDLL(so)
    L.shim_make_key.restype, L.shim_make_key.argtypes = ctypes.c_uint64, [ctypes.c_float, ctypes.c_uint32]
    L.shim_key_score.restype, L.shim_key_score.argtypes = ctypes.c_float, [ctypes.c_uint64]
    L.shim_key_id.restype, L.shim_key_id.argtypes = ctypes.c_int64, [ctypes.c_uint64]
    L.shim_merge.restype = None
    L.shim_merge.argtypes = [u64p, ctypes.c_int, u64p, ctypes.c_int, u64p, ctypes.c_int]
    L.shim_block_topk.restype = None
    L.shim_block_topk.argtypes = [f32p, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_uint64, u64p]
    L.shim_merge_splits.restype = None
    L.shim_merge_splits.argtypes = [u64p, ctypes.c_int, ctypes.c_int, u64p]
    L.shim_reduce_scatter.restype = None
    L.shim_reduce_scatter.argtypes = [i64p, ctypes.c_int, i64p, i32p]
    return L


def _admissible(s: float) -> bool:
    """The CPU path admits a score iff it beats a threshold that starts at -inf."""
    return not math.isnan(s) and s != -math.inf


def _reference_topk(scores, k):
    """(score, id) of the CPU contract: admissible scores, score desc then id asc, padded with None."""
    order = sorted((i for i, s in enumerate(scores) if _admissible(float(s))), key=lambda i: (-float(scores[i]), i))
    out = [(float(scores[i]), i) for i in order[:k]]
    return out + [None] * (k - len(out))


def _decode(lib, keys):
    return [None if int(key) == 0 else (lib.shim_key_score(int(key)), lib.shim_key_id(int(key))) for key in keys]


SPECIAL = [0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.0, 1e-45, -1e-45, 3.4e38, -3.4e38, 2.0]
scores_st = st.one_of(st.sampled_from(SPECIAL), st.integers(-4, 4).map(float),
                      st.floats(width=32, allow_nan=True, allow_infinity=True))


@settings(max_examples=200, deadline=None)
@given(a=scores_st, ia=st.integers(0, 2**32 - 2), b=scores_st, ib=st.integers(0, 2**32 - 2))
@example(a=-0.0, ia=3, b=0.0, ib=5)  # the CPU ties -0 with +0: the lower id wins
@example(a=math.nan, ia=0, b=-math.inf, ib=1)
def test_key_order_is_the_cpu_order(lib, a, ia, b, ib):
    ka, kb = lib.shim_make_key(a, ia), lib.shim_make_key(b, ib)
    assert (ka == 0) == (not _admissible(a)) and (kb == 0) == (not _admissible(b))
    if ka and kb and ia != ib:
        a32, b32 = float(np.float32(a)), float(np.float32(b))
        better = a32 > b32 or (a32 == b32 and ia < ib)
        assert (ka > kb) == better, (a, ia, b, ib, hex(ka), hex(kb))
    if ka:
        assert lib.shim_key_score(ka) == np.float32(a) and lib.shim_key_id(ka) == ia
    assert lib.shim_key_id(0) == -1


def _sorted_keys(lib, scores, ids):
    keys = [lib.shim_make_key(float(s), int(i)) for s, i in zip(scores, ids)]
    return np.array(sorted(keys, reverse=True), dtype=np.uint64)


@settings(max_examples=150, deadline=None)
@given(na=st.integers(1, 40), nb=st.integers(1, 40), kfrac=st.floats(0, 1), seed=st.integers(0, 2**31))
def test_merge_path_is_the_sorted_union(lib, na, nb, kfrac, seed):
    rng = np.random.default_rng(seed)
    ids = rng.permutation(na + nb)
    sc = rng.choice(np.array(SPECIAL + [0.5, -0.5, 1.0, 1.0], dtype=np.float32), na + nb)
    a = _sorted_keys(lib, sc[:na], ids[:na])  # empty slots (key 0) sort last, as in a list
    b = _sorted_keys(lib, sc[na:], ids[na:])
    k = max(1, round(kfrac * (na + nb)))
    out = np.zeros(k, dtype=np.uint64)
    lib.shim_merge(a, na, b, nb, out, k)
    want = np.array(sorted(np.concatenate([a, b]).tolist(), reverse=True)[:k], dtype=np.uint64)
    assert out.tolist() == want.tolist()


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 700), k=st.integers(1, 64), round_rows=st.sampled_from([1, 3, 128]),
       kind=st.sampled_from(["ties", "random", "special"]), seed=st.integers(0, 2**31))
@example(n=5, k=9, round_rows=128, kind="special", seed=0)  # k > admissible rows: empty slots
def test_block_pass_matches_the_cpu_contract(lib, n, k, round_rows, kind, seed):
    rng = np.random.default_rng(seed)
    if kind == "ties":
        scores = rng.integers(-2, 3, n).astype(np.float32)
    elif kind == "random":
        scores = rng.standard_normal(n).astype(np.float32)
    else:
        scores = rng.choice(np.array(SPECIAL, dtype=np.float32), n)
    out = np.zeros(k, dtype=np.uint64)
    lib.shim_block_topk(scores, n, k, round_rows, seed, out)
    assert _decode(lib, out) == _reference_topk(scores, k)


@settings(max_examples=100, deadline=None)
@given(splits=st.integers(1, 9), per=st.integers(1, 60), k=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_split_merge_matches_one_pass(lib, splits, per, k, seed):
    """Splitting the rows over blocks and merging their lists gives the one-pass result."""
    rng = np.random.default_rng(seed)
    n = splits * per
    scores = rng.integers(-3, 4, n).astype(np.float32)
    scores[rng.random(n) < 0.1] = np.nan
    lists = np.zeros((splits, k), dtype=np.uint64)
    for s in range(splits):
        part = np.full(n, np.nan, dtype=np.float32)  # rows outside the split: never admitted
        part[s * per:(s + 1) * per] = scores[s * per:(s + 1) * per]
        lib.shim_block_topk(part, n, k, 128, seed, lists[s])
    out = np.zeros(k, dtype=np.uint64)
    lib.shim_merge_splits(np.ascontiguousarray(lists), splits, k, out)
    assert _decode(lib, out) == _reference_topk(scores, k)


@pytest.mark.parametrize("log2p", range(0, 7))
def test_reduce_scatter_sums_every_value_over_the_warp(lib, log2p):
    P = 1 << log2p
    per = max(1, P // 32)
    v = np.random.default_rng(log2p).integers(-10**6, 10**6, (32, P)).astype(np.int64)
    out = np.zeros((32, per), dtype=np.int64)
    first = np.zeros(32, dtype=np.int32)
    lib.shim_reduce_scatter(np.ascontiguousarray(v), log2p, out, first)
    col = v.sum(axis=0)
    for lane in range(32):
        for u in range(per):
            assert out[lane, u] == col[first[lane] + u], (lane, u)
    # every value index is owned by some lane
    assert {int(first[l]) + u for l in range(32) for u in range(per)} == set(range(P))
