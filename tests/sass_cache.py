"""A disk cache of JSON values, one file per key, safe for concurrent writers and readers.

The compile checks (tests/aot_harness.py's SASS counts, test_search_cuda_sass.py's ptxas
report) cache what they parsed from a cubin under ~/.cache/solar, which every test run, CI job
and engineer on the machine shares.  Two runs at once must not corrupt the cache or read each
other's half-written files:

* every key has its own file, so runs that compile different kernels never touch the same
  file and none drops another's entries (a single JSON file rewritten at the end of a run
  keeps only the last writer's keys);
* a file is written to a fresh temporary file in the same directory (``mkstemp``: a unique
  name, so two writers never share it) and moved into place with ``os.replace``, which is
  atomic within one file system: a reader sees the old file, the new one, or none, never a
  partial one.  Two writers of one key write the same value (the key is a digest of what the
  value is computed from), so whichever rename lands last is right;
* a read that finds anything but a complete, well-formed entry for this key and this
  version (truncated or garbled bytes from a crash or a full disk, another format, another
  key, a value the caller's check rejects) recomputes the value and rewrites the file, so a
  bad entry costs one recompute, never a crash or a wrong count.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

__all__ = ["KeyedJsonCache", "atomic_write_json", "read_json", "valid_sass_counts", "SASS_COUNT_KEYS"]

# the SASS counts tests/aot_harness.py's _sass_counts returns (ints, and loop_ldg: width -> count)
SASS_COUNT_KEYS = frozenset({"hgmma", "mma", "atomics", "membar", "barriers", "local_ld", "local_st", "n_sass",
                             "loop_barriers", "loop_shfl", "loop_ldg"})


def atomic_write_json(path: str, obj: Any) -> None:
    """Write `obj` as JSON to `path` so that no reader ever sees a partial file: a uniquely
    named temporary file in the same directory, flushed to disk, then ``os.replace``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_json(path: str) -> Any | None:
    """The JSON value in `path`, or None when the file is missing, unreadable or not one
    complete JSON document (truncated, garbled, not UTF-8)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None


def valid_sass_counts(value: Any) -> bool:
    """Whether `value` has exactly the shape of the harness's SASS counts (non-negative ints,
    loop_ldg a dict of width -> non-negative int)."""
    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    return (isinstance(value, dict) and set(value) == SASS_COUNT_KEYS
            and all(count(v) for k, v in value.items() if k != "loop_ldg")
            and isinstance(value["loop_ldg"], dict)
            and all(isinstance(w, str) and count(n) for w, n in value["loop_ldg"].items()))


class KeyedJsonCache:
    """``get(key, compute)``: the cached value of `key` in `directory`, else ``compute()``
    (then stored).  `version` names the format and the code that computes values: an entry
    written under another version is recomputed.  `valid` checks a value read back (a value
    that fails it is recomputed).  Keys must be file-name safe (hex digests)."""

    def __init__(self, directory: str, version: str, valid: Callable[[Any], bool] | None = None):
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise ValueError(f"cache directory {directory!r} is an existing file; expected a directory (or a "
                             "path that does not exist yet)")
        self.directory = directory
        self.version = str(version)
        self.valid = valid
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> str:
        if not key or any(c in key for c in "/\\\0") or key.startswith("."):
            raise ValueError(f"cache key {key!r}: expected a file-name safe string (a hex digest)")
        return os.path.join(self.directory, key + ".json")

    def load(self, key: str) -> Any | None:
        """The stored value of `key`, or None when there is no complete, well-formed entry for
        this key and version."""
        entry = read_json(self.path(key))
        if not (isinstance(entry, dict) and set(entry) == {"key", "version", "value"}
                and entry["key"] == key and entry["version"] == self.version):
            return None
        value = entry["value"]
        if value is None or (self.valid is not None and not self.valid(value)):
            return None
        return value

    def store(self, key: str, value: Any) -> None:
        atomic_write_json(self.path(key), {"key": key, "version": self.version, "value": value})

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        value = self.load(key)
        if value is not None:
            self.hits += 1
            return value
        self.misses += 1
        value = compute()
        if self.valid is not None and not self.valid(value):
            raise ValueError(f"cache key {key!r}: the computed value fails the cache's check: {value!r}")
        self.store(key, value)
        return value
