"""`python -m solar_kernels.info`: versions, devices, which ops run natively where, and
why the native extension failed to load if it did."""
from __future__ import annotations

import importlib
import platform
import sys


def _version(mod: str) -> str:
    try:
        m = importlib.import_module(mod)
        return getattr(m, "__version__", "?")
    except Exception as e:  # not installed or broken
        return f"not available ({type(e).__name__})"


def report() -> str:
    import torch

    import solar_kernels
    from solar_kernels import _dispatch, _ext

    lines = [
        f"solar_kernels {solar_kernels.__version__}",
        f"python        {sys.version.split()[0]} ({platform.machine()})",
        f"torch         {torch.__version__} (cuda {torch.version.cuda})",
        f"triton        {_version('triton')}",
        f"numpy         {_version('numpy')}",
        f"faiss         {_version('faiss')}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}        {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    else:
        lines.append("cuda          no CUDA device")
    if _ext.available():
        C = _ext.extension()
        lines.append(
            f"extension     loaded ({C.__file__}); cuda kernels: {bool(C.with_cuda)}; "
            f"openmp threads: {C.omp_max_threads()}; cpu features: {' '.join(C.cpu_features()) or 'none'}"
        )
    else:
        lines.append(f"extension     NOT loaded: {_ext.load_error}")
    lines.append("")
    lines.append(f"{'op':<26}{'cpu':<34}cuda")
    for name, spec in sorted(_dispatch.OPS.items()):
        sym = spec["cpu_symbol"]
        if sym and _ext.available(sym):
            cpu = "native C++ (solar_kernels._C)"
        elif sym:
            cpu = f"{spec['cpu_fallback']} (native missing)"
        else:
            cpu = spec["cpu_fallback"]
        cuda = spec["cuda"] if torch.cuda.is_available() else f"{spec['cuda']} (no device)"
        lines.append(f"{name:<26}{cpu:<34}{cuda}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
