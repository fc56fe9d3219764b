"""Test configuration.

* TRITON_INTERPRET=1 is set when no CUDA device is present, *before* triton is first
  imported, so every Triton kernel runs (slowly, in numpy) on CPU tensors.
* Hypothesis profiles: `ci` (default; small shapes, few examples, interpreter-friendly)
  and `gpu` (more and larger examples, no shrinking).  Pick with SOLAR_HYPOTHESIS_PROFILE=gpu.
* Tests marked `slow` run only with --runslow or SOLAR_RUN_SLOW=1.
* Layout: tests/kernels (solar_kernels: ops, search, compile and build checks), tests/method
  (solar: data, model, stages, trainer, benchmark, end to end), tests/distributed (everything
  that spawns gloo processes), tests/integrations (open_clip, sentence-transformers, FAISS, the
  index CLI); the shared modules (oracle.py, dist_harness.py, aot_harness.py, sass_cache.py)
  stay in tests/.  tests/ and its subfolders go on sys.path here, so a test file imports a
  shared module, or a helper of a test file in another folder, by its basename (basenames are
  unique: pytest's prepend import mode needs that), also in spawned worker processes.
"""
import os
import sys

_TESTS = os.path.dirname(os.path.abspath(__file__))
for _d in ("integrations", "distributed", "method", "kernels", ""):
    _p = os.path.join(_TESTS, _d) if _d else _TESTS
    if _p not in sys.path:
        sys.path.insert(0, _p)


def _has_cuda_device() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvidiactl"))


if not _has_cuda_device():
    assert "triton" not in sys.modules, "triton was imported before tests/conftest.py could set TRITON_INTERPRET"
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "gpu",
    max_examples=60,
    deadline=None,
    # no shrinking: on the GPU machine every minute counts, and a failing draw is reported as drawn
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("SOLAR_HYPOTHESIS_PROFILE", "gpu" if torch.cuda.is_available() else "ci"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow") or os.environ.get("SOLAR_RUN_SLOW") == "1"
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow or SOLAR_RUN_SLOW=1")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    """The device kernels are tested on: CUDA when present, else CPU (Triton interpreted)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
