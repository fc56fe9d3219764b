"""Builds csrc/ into the `solar_kernels._C` torch extension.  Metadata lives in pyproject.toml.

Environment:
  SOLAR_SKIP_CUDA_BUILD=1   never compile the .cu sources (CPU-only extension)
  SOLAR_CUDA_ARCHS="90"     semicolon/comma separated SM list for nvcc (default "90")
  SOLAR_NATIVE_ISA=0        compile without -march=native (portable wheels)
"""
import glob
import os
import shutil
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - message for people who skip run.sh
    sys.exit(
        "solar-kernels: torch must be installed before building the extension.\n"
        "  CPU machine: pip install torch==2.13.0 && pip install --no-build-isolation -e .\n"
        "  (or simply: bash run.sh test)"
    )


def _cuda_wanted():
    if os.environ.get("SOLAR_SKIP_CUDA_BUILD", "0") == "1":
        print("solar-kernels: SOLAR_SKIP_CUDA_BUILD=1, building the CPU extension only")
        return False
    if torch.version.cuda is None:
        print("solar-kernels: torch has no CUDA, building the CPU extension only")
        return False
    if CUDA_HOME is None or shutil.which("nvcc") is None and not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        print("solar-kernels: nvcc not found, building the CPU extension only")
        return False
    return True


def _extension():
    here = os.path.dirname(os.path.abspath(__file__))
    cpp = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cu = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]
    if os.environ.get("SOLAR_NATIVE_ISA", "1") == "1":
        cxx.append("-march=native")
    kwargs = dict(
        name="solar_kernels._C",
        include_dirs=[os.path.join(here, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if _cuda_wanted():
        archs = [a.strip() for a in os.environ.get("SOLAR_CUDA_ARCHS", "90").replace(",", ";").split(";") if a.strip()]
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
        for a in archs:
            nvcc += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        return CUDAExtension(
            sources=cpp + cu,
            define_macros=[("SOLAR_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            **kwargs,
        )
    return CppExtension(sources=cpp, extra_compile_args={"cxx": cxx}, **kwargs)


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
