"""Device dispatch in one place.

Every op asks :func:`backend_for` which implementation serves a tensor:

* ``"triton"``  CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1`` when forced),
* ``"native"``  CPU tensors when the C++ extension provides the op,
* ``"torch"``   the chunked plain-PyTorch path (CPU fallback, and any other device).

Tests and benchmarks force a backend with ``with use_backend("triton"): ...``; nothing
is monkey-patched at import time.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

from . import _ext

BACKENDS = ("auto", "triton", "native", "torch")

_state = threading.local()

# op name -> {"cuda": description, "cpu_symbol": name in _C (or None), "cpu_fallback": description}
OPS: dict[str, dict] = {}


def register_op(name: str, *, cuda: str, cpu_symbol: str | None, cpu_fallback: str = "chunked PyTorch") -> None:
    """Declare an op for `solar_kernels.info` (which backends serve it on which device)."""
    OPS[name] = {"cuda": cuda, "cpu_symbol": cpu_symbol, "cpu_fallback": cpu_fallback}


def forced_backend() -> str:
    return getattr(_state, "backend", None) or os.environ.get("SOLAR_BACKEND", "auto")


@contextlib.contextmanager
def use_backend(name: str):
    """Force every op inside the ``with`` block onto one backend (thread-local; blocks nest).

    Args:
        name: one of

            * ``"auto"``: dispatch by device (overriding SOLAR_BACKEND): CUDA tensors -> Triton/CUDA
              kernels, CPU tensors -> the C++ extension where it provides the op, else the
              chunked PyTorch path.
            * ``"triton"``: the Triton kernels; on CPU tensors only under ``TRITON_INTERPRET=1``
              set before triton is imported (RuntimeError otherwise).
            * ``"native"``: the C++ extension on CPU tensors (RuntimeError when it is not built
              or lacks the op; ops without a C++ kernel use their CPU fallback); CUDA tensors
              still take the Triton/CUDA kernels, their native path.
            * ``"torch"``: the chunked plain-PyTorch path, on any device.

    It governs masked_pool, contrastive_loss and pooled_contrastive_loss; search
    (``Index``, ``topk_search``) always runs its C++ / CUDA kernels.  Outside any block the
    ``SOLAR_BACKEND`` environment variable (same names) applies.

    Raises:
        ValueError: `name` is not one of ``("auto", "triton", "native", "torch")``.

    Example::

        with solar_kernels.use_backend("torch"):
            loss = solar_kernels.contrastive_loss(q, k)
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    with _thread_setting("backend", name):
        yield


@contextlib.contextmanager
def _thread_setting(attr: str, value):
    """Set a thread-local dispatch setting for the duration of a ``with`` block (blocks nest)."""
    prev = getattr(_state, attr, None)
    setattr(_state, attr, value)
    try:
        yield
    finally:
        setattr(_state, attr, prev)


def triton_interpreted() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


KERNEL_TARGETS = ("cuda", "interpreter")


@contextlib.contextmanager
def kernel_target(name: str):
    """Make the Triton launchers choose the settings of `name` for CPU tensors (thread-local).

    Args:
        name: ``"cuda"`` -- block sizes, warps, stages and dot precision exactly as for a CUDA
            tensor; ``"interpreter"`` -- the interpreter's own (large blocks, fewer steps).

    Used by tests that run the CUDA settings under ``TRITON_INTERPRET=1`` (the numerics a GPU
    sees, at the interpreter's speed) and by the ahead-of-time compile harness
    (tests/aot_harness.py), which compiles those settings for sm_90 with a stand-in driver and
    launches nothing.  Under ``"cuda"``, backend ``"triton"`` is allowed on CPU tensors without
    the interpreter (the harness's case).  CUDA tensors always get the CUDA settings.
    """
    if name not in KERNEL_TARGETS:
        raise ValueError(f"kernel target must be one of {KERNEL_TARGETS}, got {name!r}")
    with _thread_setting("target", name):
        yield


def target_for(device: torch.device) -> str:
    """Whose settings a Triton launch on `device` uses: ``"cuda"`` or ``"interpreter"``."""
    if device.type == "cuda":
        return "cuda"
    return getattr(_state, "target", None) or "interpreter"


def backend_for(device: torch.device, cpu_symbol: str | None) -> str:
    """The backend that serves an op whose tensors live on `device`."""
    forced = forced_backend()
    if forced not in BACKENDS:
        raise ValueError(f"SOLAR_BACKEND must be one of {BACKENDS}, got {forced!r}")
    if forced == "triton":
        if device.type != "cuda" and not triton_interpreted() and target_for(device) != "cuda":
            raise RuntimeError(
                "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
            )
        return "triton"
    if forced == "native":
        if device.type == "cuda":
            return "triton"  # the Triton kernels are the native CUDA path
        _ext.require(cpu_symbol) if cpu_symbol else None
        return "native"
    if forced == "torch":
        return "torch"
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and cpu_symbol is not None and _ext.available(cpu_symbol):
        return "native"
    return "torch"
