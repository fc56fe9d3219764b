"""Every Triton kernel compiles for Hopper (sm_90), with the Triton of the GPU machine and with
the one installed here, and the compiled code has the properties the GPU needs.

tests/aot_harness.py runs the public ops' real launchers on CPU tensors with a stand-in sm_90
driver (nothing is launched), so exactly the specialisations a GPU would JIT are compiled to
cubins; this test asserts on its report:

* every case compiles (Triton 3.6 failed on masked_pool's float masks at BLOCK_L >= 256), and
  every config of the contrastive kernels' autotuning sets (the harness's stand-in benchmarker
  compiles each one the autotuner tries, at the D = 768 two-tower and all-features cases of each
  dtype; the other cases compile the default config; a config that fails is a failure);
* the hot variants (D = 768 losses of every mode and dtype, fp32 with hardness included, in
  the configs compiled; the pooled loss; every pooling variant) have no stack frame and no
  spill loads / stores;
* every bf16 / fp16 loss kernel's dots are warpgroup MMAs (HGMMA in the SASS);
* no atomics in any contrastive-loss kernel (the backward writes each output block from one
  program) and no GPU-scope fence anywhere;
* masked_pool's forward has no bar.sync inside its L loop, loads x 16 bytes at a time and a
  bool / half mask as 32-bit words (D = 768 cases).

The GPU machine's Triton (GPU_TRITON) is installed with ``pip install --target`` into
``$SOLAR_CACHE`` (default ~/.cache/solar) once and reused; Triton's own kernel cache and the
harness's SASS counts (one file a cubin, tests/sass_cache.py) live beside it, so a second run
only re-reads cubins; runs at once (two test sessions, CI and an engineer) share them safely.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HARNESS = os.path.join(ROOT, "tests", "aot_harness.py")
GPU_TRITON = "3.6.0"  # the GPU machine's (bench/gpu_check.sh runs there)
CACHE = os.environ.get("SOLAR_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "solar"))

HOT = ("D=768", "masked_pool", "pooled_contrastive")


def _installed_triton():
    try:
        import triton
        import triton.backends
    except ImportError:  # pragma: no cover
        return None
    return triton.__version__ if "nvidia" in triton.backends.backends else None


def _side_triton(version: str) -> str:
    """A folder holding Triton `version` (pip install --target, done once).  Installed into a
    uniquely named folder and renamed into place, so two test runs installing at once do not
    write into one folder; the one that renames second keeps the first's."""
    target = os.path.join(CACHE, f"triton-{version}")
    if os.path.exists(os.path.join(target, "triton", "__init__.py")):
        return target
    os.makedirs(CACHE, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=CACHE, prefix=f".triton-{version}.partial-")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", tmp,
                        f"triton=={version}"], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.fail(f"cannot install triton=={version} into {tmp} (PyPI needed once):\n{r.stderr[-2000:]}")
    try:
        os.rename(tmp, target)
    except OSError:  # another run installed it meanwhile (rename onto a non-empty folder fails)
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(os.path.join(target, "triton", "__init__.py")):
            raise
    return target


def _start_harness(tmp_path, side: str | None, tag: str):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = ([side] if side else []) + [ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["TRITON_CACHE_DIR"] = os.path.join(CACHE, f"triton-cache-{tag}")
    env["SOLAR_AOT_SASS_CACHE"] = os.path.join(CACHE, f"aot-sass-{tag}")  # one file a cubin
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.makedirs(CACHE, exist_ok=True)
    out = tmp_path / f"aot-{tag}.json"
    proc = subprocess.Popen([sys.executable, HARNESS, "--json", str(out), "--markdown", str(tmp_path / f"aot-{tag}.md"),
                             "--quick"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return proc, out


def _finish(proc, out) -> dict:
    stdout, stderr = proc.communicate(timeout=1500)
    assert proc.returncode == 0 and out.exists(), f"harness crashed (rc {proc.returncode}):\n{stderr[-4000:]}"
    print(stdout)  # the table, for the log (-s) and bench/RESULTS.md
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Both harness runs, started together (one core each on the 2-core CI machine)."""
    installed = _installed_triton()
    if installed is None:
        pytest.skip("no Triton with an NVIDIA backend installed")
    tmp = tmp_path_factory.mktemp("aot")
    runs = {installed: _start_harness(tmp, None, installed)}
    if installed != GPU_TRITON:
        runs[GPU_TRITON] = _start_harness(tmp, _side_triton(GPU_TRITON), GPU_TRITON)
    return {tag: _finish(*run) for tag, run in runs.items()}


def _check(report: dict):
    assert not report["failures"], "\n\n".join(f"{f['case']}: {f['error']}\n{f['traceback']}"
                                               for f in report["failures"])
    kernels = report["kernels"]
    assert {k["kernel"] for k in kernels} >= {"pool_fwd_kernel", "pool_bwd_kernel", "pool_norm_kernel",
                                              "pool_bwd_prep_kernel", "_cl_stats_kernel", "_cl_grad_kernel",
                                              "_cl_gemm_kernel"}
    problems = []
    for k in kernels:
        hot = any(h in k["case"] for h in HOT)
        where = f"{k['kernel']} [{k['case']}]"
        if hot and (k["stack"] or k["local_ld"] or k["local_st"]):
            problems.append(f"{where}: stack {k['stack']} B, spill ld/st {k['local_ld']}/{k['local_st']}")
        if k["kernel"].startswith("_cl_") and ("bfloat16" in k["case"] or "float16" in k["case"]
                                               or "bf16" in k["case"]) and not k["hgmma"]:
            problems.append(f"{where}: bf16/fp16 dots without HGMMA ({k['mma']} MMAs)")
        if k["kernel"].startswith("_cl_") and k["atomics"]:
            problems.append(f"{where}: {k['atomics']} atomic instruction(s) in a contrastive kernel")
        if k["membar"]:
            problems.append(f"{where}: {k['membar']} GPU-scope fence(s)")
        problems += _pool_fwd_problems(k, where)
    assert not problems, f"Triton {report['triton']}:\n" + "\n".join(problems)
    _check_every_config_compiled(kernels)


def _check_every_config_compiled(kernels: list):
    """The autotuners ran the stand-in benchmarker over their whole sets: at the first bf16
    D = 768 case every config of each contrastive kernel's set has its own compile."""
    import torch
    from solar_kernels.ops import contrastive_triton as ct

    case = "contrastive bfloat16 two-tower D=768"
    for kernel, name in (("stats", "_cl_stats_kernel"), ("grad", "_cl_grad_kernel"), ("gemm_dq", "_cl_gemm_kernel")):
        want = {"x".join(str(v) for v in c.kwargs.values()) + f" w{c.num_warps} s{c.num_stages}"
                for c in ct.kernel_configs(kernel, torch.bfloat16, 256, 256, 768, "cuda", cols=True)}
        got = {k.get("config") for k in kernels if k["kernel"] == name and k["case"] == case}
        assert len(want) > 1 and want <= got, f"{name}: configs not compiled {sorted(want - got)}"


def _pool_fwd_problems(k: dict, where: str) -> list[str]:
    """masked_pool's forward: no barrier and no warp shuffle inside any loop (the L loop
    accumulates in registers and reduces nothing across threads); at D = 768, 16-byte x loads and, for the V = 3 bool / half
    masks (rows start mid-word, the last word inside the storage), the mask read as 32-bit words
    (no byte or half-word loads in the loop).  (The V = 1 bool case at B x L = 150 bytes takes the
    element fallback: its last word would pass the storage's end.)"""
    if k["kernel"] != "pool_fwd_kernel":
        return []
    problems = []
    if k["loop_barriers"] or k["loop_shfl"]:
        problems.append(f"{where}: {k['loop_barriers']} bar.sync, {k['loop_shfl']} shuffles inside the L loop")
    if "D=768" in k["case"]:
        if not k["loop_ldg"].get("128"):
            problems.append(f"{where}: no 16-byte x loads in the L loop ({k['loop_ldg']})")
        if ("bool V=3" in k["case"] or "half-mask V=3" in k["case"]) and (
                {"U8", "S8", "U16", "S16"} & set(k["loop_ldg"]) or not k["loop_ldg"].get("32")):
            problems.append(f"{where}: mask loads narrower than 32 bits in the L loop ({k['loop_ldg']})")
    return problems


def test_kernels_compile_for_sm90_installed_triton(reports):
    _check(reports[_installed_triton()])


def test_kernels_compile_for_sm90_gpu_machine_triton(reports):
    if GPU_TRITON not in reports:
        pytest.skip(f"the installed Triton is already {GPU_TRITON}")
    assert reports[GPU_TRITON]["triton"] == GPU_TRITON
    _check(reports[GPU_TRITON])
