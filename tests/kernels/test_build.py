"""The package, the native extension and the CUDA sources build and report themselves."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CU_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))


def test_extension_loads():
    from solar_kernels import _ext

    assert _ext.available(), f"native extension failed to load: {_ext.load_error}"
    feats = _ext._C.cpu_features()
    assert isinstance(feats, list)
    assert _ext._C.omp_max_threads() >= 1


def test_info_runs_and_lists_ops():
    out = subprocess.run([sys.executable, "-m", "solar_kernels.info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout and "extension" in out.stdout
    assert "NOT loaded" not in out.stdout, out.stdout


def test_require_names_missing_symbol():
    from solar_kernels import _ext

    with pytest.raises(RuntimeError, match="no `definitely_not_an_op`"):
        _ext.require("definitely_not_an_op")


def _torch_include_flags():
    from torch.utils.cpp_extension import include_paths

    flags = []
    for p in include_paths():
        flags += ["-I", p]
    return flags


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("src", CU_SOURCES or [None], ids=lambda s: os.path.relpath(s, ROOT) if s else "none")
def test_cuda_sources_compile(src, tmp_path):
    """Every csrc/**/*.cu compiles to an object for sm_90, so CUDA code cannot rot unseen."""
    if src is None:
        pytest.skip("no .cu sources yet")
    import sysconfig

    cmd = [
        "nvcc", "-c", src, "-o", str(tmp_path / "out.o"),
        "-std=c++17", "-O1", "-gencode", "arch=compute_90,code=sm_90",
        "-DSOLAR_WITH_CUDA=1", "-I", os.path.join(ROOT, "csrc"),
        "-I", sysconfig.get_paths()["include"],
        "-D_GLIBCXX_USE_CXX11_ABI=1", "-Xcompiler", "-fPIC",
    ] + _torch_include_flags()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"nvcc failed for {src}:\n{r.stderr[-4000:]}"


def test_no_pointer_into_a_temporary():
    """`t.contiguous().data_ptr()` in one expression takes the address of a tensor that is freed
    at the end of the statement when t was not contiguous (the CUDA search's int8 query scales
    did this); the copy must be held by a named tensor until the kernel has run."""
    import re

    pattern = re.compile(r"(\.|->)(contiguous|to|clone|float|half)\([^;]*?\)\s*\.\s*(data_ptr|const_data_ptr|mutable_data_ptr)\b")
    bad = []
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.*"), recursive=True)):
        if not path.endswith((".cpp", ".cu", ".h", ".cuh")):
            continue
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if pattern.search(line):
                    bad.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}")
    assert not bad, "pointer into a temporary tensor:\n" + "\n".join(bad)
