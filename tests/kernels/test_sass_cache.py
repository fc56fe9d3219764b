"""The compile checks' disk cache (tests/sass_cache.py, used by tests/aot_harness.py for its SASS
counts and by test_search_cuda_sass.py): runs at once share it safely, and a bad entry is
recomputed, never returned or fatal.

The value a key's `compute` returns is the uncached result every read is checked against.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import traceback

import pytest
from sass_cache import KeyedJsonCache, SASS_COUNT_KEYS, atomic_write_json, valid_sass_counts

VERSION = "v1"


def _counts(key: str) -> dict:
    """Deterministic SASS-count-shaped value of `key` (what a compute would return), with a
    loop_ldg large enough that writing the file takes many write calls."""
    h = int(hashlib.sha1(key.encode()).hexdigest(), 16)
    value = {k: (h >> (3 * i)) % 97 for i, k in enumerate(sorted(SASS_COUNT_KEYS - {"loop_ldg"}))}
    value["loop_ldg"] = {f"w{i}": (h >> (i % 120)) % 1000 for i in range(3000)}
    return value


def _cache(directory) -> KeyedJsonCache:
    return KeyedJsonCache(str(directory), VERSION, valid=valid_sass_counts)


def _uncached(key: str) -> dict:
    """The value as a fresh computation gives it (through JSON, as the cache stores it)."""
    return json.loads(json.dumps(_counts(key)))


def test_roundtrip_and_hit(tmp_path):
    cache = _cache(tmp_path)
    calls = []
    assert cache.get("abc123", lambda: calls.append(1) or _counts("abc123")) == _uncached("abc123")
    assert cache.get("abc123", lambda: calls.append(1) or _counts("abc123")) == _uncached("abc123")
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    assert os.listdir(tmp_path) == ["abc123.json"]  # no temporary file left behind


def _valid_bytes(key: str, version: str = VERSION) -> bytes:
    return json.dumps({"key": key, "version": version, "value": _counts(key)}).encode()


CORRUPTIONS = {
    "truncated": lambda key: _valid_bytes(key)[: len(_valid_bytes(key)) // 2],
    "truncated-to-one-byte-short": lambda key: _valid_bytes(key)[:-1],
    "empty": lambda key: b"",
    "not-utf8": lambda key: b"\xff\xfe\x00garbage",
    "nul-filled": lambda key: b"\0" * 4096,  # what a crash after the size update can leave
    "json-list": lambda key: b"[1, 2, 3]",
    "old-single-file-format": lambda key: json.dumps({key: _counts(key)}).encode(),
    "another-key": lambda key: _valid_bytes("ffff0000"),
    "another-version": lambda key: _valid_bytes(key, "v0"),
    "count-missing": lambda key: json.dumps({"key": key, "version": VERSION, "value": {
        k: v for k, v in _counts(key).items() if k != "loop_shfl"}}).encode(),
    "count-not-int": lambda key: json.dumps({"key": key, "version": VERSION, "value": {
        **_counts(key), "local_st": "0"}}).encode(),
    "wrong-count": lambda key: json.dumps({"key": key, "version": VERSION, "value": {
        **_counts(key), "loop_barriers": -1}}).encode(),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_bad_entry_is_recomputed_and_repaired(tmp_path, corruption):
    key = "0123456789abcdef"
    cache = _cache(tmp_path)
    with open(cache.path(key), "wb") as f:
        f.write(CORRUPTIONS[corruption](key))
    calls = []
    got = cache.get(key, lambda: calls.append(1) or _counts(key))
    assert got == _uncached(key) and calls == [1], corruption
    # the file now holds the good entry: read back without computing
    assert _cache(tmp_path).get(key, lambda: pytest.fail("recomputed a repaired entry")) == _uncached(key)


def _hammer(directory: str, keys: list, rounds: int, errors) -> None:
    """Read and rewrite every key `rounds` times, checking each value read against the uncached
    one; put any exception or wrong value on `errors`."""
    try:
        cache = _cache(directory)
        for r in range(rounds):
            for key in keys:
                got = cache.get(key, lambda: _counts(key))
                if got != _uncached(key):
                    errors.put(f"pid {os.getpid()} round {r}: wrong value for {key}")
                    return
                cache.store(key, _counts(key))  # every round rewrites: writers overlap readers
    except BaseException:
        errors.put(f"pid {os.getpid()}: {traceback.format_exc()}")


def test_concurrent_processes_share_keys(tmp_path):
    """Four processes read and rewrite the same keys at once: no process fails or reads a
    wrong value, and every file left is a complete entry with no temporary file left over."""
    keys = [hashlib.sha1(str(i).encode()).hexdigest()[:16] for i in range(3)]
    ctx = mp.get_context("fork")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), keys, 25, errors)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, "\n".join(found)
    assert [p.exitcode for p in procs] == [0] * 4
    assert sorted(os.listdir(tmp_path)) == sorted(k + ".json" for k in keys)
    check = _cache(tmp_path)
    for key in keys:
        assert check.load(key) == _uncached(key)


def test_atomic_write_leaves_old_file_when_the_write_fails(tmp_path):
    path = str(tmp_path / "k.json")
    atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})  # not JSON: fails mid-write
    with open(path) as f:
        assert json.load(f) == {"a": 1}
    assert os.listdir(tmp_path) == ["k.json"]


def test_bad_arguments_are_named(tmp_path):
    f = tmp_path / "cache.json"
    f.write_text("{}")
    with pytest.raises(ValueError, match="cache.json.*existing file; expected a directory"):
        KeyedJsonCache(str(f), VERSION)
    with pytest.raises(ValueError, match="cache key '../x'"):
        _cache(tmp_path).path("../x")
    with pytest.raises(ValueError, match="fails the cache's check"):
        _cache(tmp_path).get("abcd", lambda: {"regs": 1})
