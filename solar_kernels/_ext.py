"""Loads the native extension `solar_kernels._C` and remembers why it failed, if it did.

Nothing here raises at import time: ops that need the extension call :func:`require`,
which raises with the original load error; `python -m solar_kernels.info` prints it.
"""
from __future__ import annotations

import importlib

_C = None
load_error: str | None = None


def _load():
    global _C, load_error
    try:
        import torch  # noqa: F401  (the extension links against libtorch)

        _C = importlib.import_module("solar_kernels._C")
    except Exception as e:  # ImportError, OSError (bad .so), undefined symbols...
        _C = None
        load_error = f"{type(e).__name__}: {e}"


_load()


def available(symbol: str | None = None) -> bool:
    """True when the extension loaded (and, if given, exports `symbol`)."""
    return _C is not None and (symbol is None or hasattr(_C, symbol))


def extension():
    """The loaded extension module `solar_kernels._C`, or None (see `load_error`)."""
    return _C


def require(symbol: str):
    """Return `_C.<symbol>` or raise a RuntimeError that says why it is missing."""
    if _C is None:
        raise RuntimeError(
            f"solar_kernels native extension is not available ({load_error}); "
            "rebuild with `bash run.sh shell true` or `pip install --no-build-isolation -e .`"
        )
    fn = getattr(_C, symbol, None)
    if fn is None:
        raise RuntimeError(f"solar_kernels._C has no `{symbol}`: the extension is older than the Python code; rebuild it")
    return fn
