"""What ptxas makes of the CUDA search (csrc/search/search_cuda.cu) for sm_90, without a GPU.

The kernels are compiled to a cubin with the build's flags (setup.py: -O3 --use_fast_math);
`ptxas -v` gives each instantiation's registers, stack frame and spills, `cuobjdump -sass` its
instructions.  Asserted: no spill stores / loads and no stack frame in any scoring kernel (the
QB x R accumulators stay in registers), and the vector paths of every dtype read the database
rows with 128-bit loads (LDG.E.128: 4 floats, 8 halves or 16 int8 codes per lane and row).
The compile takes minutes on the loaded CI box, so the parsed result is cached by the content
of the sources (~/.cache/solar/search_sass, like tests/aot_harness.py's caches).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess

import pytest
from sass_cache import atomic_write_json, read_json

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SRC = os.path.join(ROOT, "csrc", "search", "search_cuda.cu")
FLAGS = ["-std=c++17", "-O3", "--use_fast_math", "-gencode", "arch=compute_90,code=sm_90"]
KERNEL = re.compile(r"score_topk_kernelILi(\d)ELi(\d+)ELb([01])E")



def _cuobjdump():
    """cuobjdump from PATH, else the one Triton ships (the CUDA toolkit here has only nvcc)."""
    if shutil.which("cuobjdump"):
        return shutil.which("cuobjdump")
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


CUOBJDUMP = _cuobjdump()
pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None or CUOBJDUMP is None, reason="nvcc / cuobjdump not found")


def _compile(tmp_path) -> dict:
    """{mangled name: {regs, stack, spill_st, spill_ld, ldg128, ldg}} for every kernel."""
    digest = hashlib.sha256(" ".join(FLAGS).encode())
    for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "search", "*.cu*")) +
                    glob.glob(os.path.join(ROOT, "csrc", "search", "*.h"))):
        with open(p, "rb") as f:
            digest.update(f.read())
    cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "solar", "search_sass")
    cache = os.path.join(cache_dir, digest.hexdigest()[:20] + ".json")
    cached = read_json(cache)  # None when missing, truncated or garbled (then recompiled)
    if isinstance(cached, dict) and cached and all(isinstance(v, dict) for v in cached.values()):
        return cached
    cubin = str(tmp_path / "search.cubin")
    r = subprocess.run(["nvcc", "-cubin", SRC, "-o", cubin, "-I", os.path.join(ROOT, "csrc"), "-Xptxas", "-v"] + FLAGS,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    out: dict = {}
    name = None
    for line in r.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
            out[name] = {}
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            out[name].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            out[name]["regs"] = int(m.group(1))
    sass = subprocess.run([CUOBJDUMP, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        fname = block.split()[0]
        ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", block)
        rec = out.setdefault(fname, {})
        rec["ldg128"] = sum(o.startswith("LDG") and ".128" in o for o in ops)
        rec["ldg"] = sum(o.startswith("LDG") for o in ops)
    atomic_write_json(cache, out)  # a unique temporary file and os.replace: safe for runs at once
    return out


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    return _compile(tmp_path_factory.mktemp("search_sass"))


def test_every_instantiation_compiled(kernels):
    found = {KERNEL.search(n).groups() for n in kernels if KERNEL.search(n)}
    want = {(dt, qb, vec) for dt in "012" for qb in ("1", "2", "4", "8", "16") for vec in "01"}
    assert found == want, sorted(want - found)
    assert any("merge_kernel" in n for n in kernels)


def test_no_spills_no_stack(kernels):
    bad = {n: r for n, r in kernels.items() if r.get("spill_st") or r.get("spill_ld") or r.get("stack")}
    assert not bad, json.dumps(bad, indent=1)


def test_vector_paths_load_rows_128_bits_at_a_time(kernels):
    for n, r in kernels.items():
        m = KERNEL.search(n)
        if m and m.group(3) == "1":
            assert r["ldg128"] >= 1, f"{n}: no LDG.E.128 ({r['ldg']} global loads)"
