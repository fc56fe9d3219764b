"""Compile every Triton kernel for Hopper (sm_90) on a machine without a GPU.

Run as a script in a fresh process *without* ``TRITON_INTERPRET`` (tests/test_aot_compile.py
does, once per Triton version; ``PYTHONPATH`` may put another Triton first)::

    python tests/aot_harness.py --json report.json [--markdown table.md] [--quick]

How: a stand-in Triton driver says the current device is an sm_90 GPU and turns every
launch into a no-op, and ``solar_kernels`` is told to pick its CUDA settings for CPU
tensors (``solar_kernels._dispatch.kernel_target("cuda")``).  The public ops and their
backward passes then run on CPU tensors through their real launchers, so exactly the
specialisations that a GPU would JIT (block sizes, dtypes, divisibility of strides and
sizes, constexpr flags) are compiled, down to a cubin by the ptxas that Triton ships.  The
outputs of the no-op launches are garbage; nothing reads them but shape logic.

For every compiled kernel the report gives: registers, stack frame and local (spill) bytes
(``cuobjdump -res-usage`` on the cubin), shared memory (Triton's metadata), whether the SASS
has warpgroup MMAs (HGMMA) or any MMA, atomics, and fences (MEMBAR) -- what the issue's
assertions are made of.  Compile failures are caught per case and reported, not raised.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "the AOT harness must run without TRITON_INTERPRET"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sass_cache

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402

H100_SMEM = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)

_current_case = {"name": "?", "config": "", "dtype": ""}
RECORDS: list[dict] = []
CONFIG_FAILURES: list[dict] = []  # configs that failed inside an autotuner (which skips them)
_SEEN: set[str] = set()


def _tool(name: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found in this Triton ({path})")
    return path


# SASS counts by cubin digest: disassembling takes ~0.8 s a kernel, the resource report ~0;
# a warm run (unchanged kernels) reads the counts from SOLAR_AOT_SASS_CACHE, a directory with one
# file per cubin (tests/sass_cache.py: safe when two runs share it); an entry counted by other
# code (the version is a digest of the counting functions' source) or unreadable is recounted
_SASS_MEMO: dict = {}


def _sass_cache():
    """The disk cache of SASS counts, or None without SOLAR_AOT_SASS_CACHE."""
    path = os.environ.get("SOLAR_AOT_SASS_CACHE")
    if not path:
        return None
    from sass_cache import KeyedJsonCache, valid_sass_counts

    if os.path.isfile(path):
        raise SystemExit(f"SOLAR_AOT_SASS_CACHE={path!r} is a file (the old single-file cache); expected a "
                         "directory: point it at a new path (or delete the file)")
    code = inspect.getsource(_sass_counts) + inspect.getsource(_loop_counts) + triton.__version__
    return KeyedJsonCache(path, hashlib.sha1(code.encode()).hexdigest()[:16], valid=valid_sass_counts)


def _sass_counts(path: str) -> dict:
    text = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", text, flags=re.M)
    names = [o.split(".")[0] for o in ops]
    # a fence around an atomic is MEMBAR at GPU or system scope; MEMBAR.ALL.CTA only orders
    # this block's shared-memory writes before the async (wgmma / TMA) proxy reads them
    wide_fences = [o for o in ops if o.startswith("MEMBAR") and (".GPU" in o or ".SYS" in o)]
    return dict(
        hgmma=sum(n == "HGMMA" for n in names),
        mma=sum(n in ("HMMA", "IMMA", "HGMMA", "IGMMA", "DMMA") for n in names),
        atomics=sum(n in ("RED", "ATOM", "ATOMG", "REDG") for n in names),
        membar=len(wide_fences),
        barriers=sum(o.startswith("BAR.SYNC") or o == "BAR" for o in ops),
        local_ld=sum(n == "LDL" for n in names), local_st=sum(n == "STL" for n in names),
        n_sass=len(names), **_loop_counts(text),
    )


def _loop_counts(text: str) -> dict:
    """Barriers, warp shuffles (a reduction across threads) and global-load widths inside loop
    bodies: the SASS between a backward branch's target and the branch (self-branches, the trap
    after EXIT, excluded).  loop_ldg maps a load's width suffix (U8, U16, 32 for plain LDG.E,
    64, 128) to its count."""
    ins = [(int(a, 16), op) for a, op in re.findall(r"^\s+/\*([0-9a-f]+)\*/\s+((?:@!?U?P\w+\s+)?[A-Z][^;]*);",
                                                    text, flags=re.M)]
    loops = []
    for addr, op in ins:
        m = re.search(r"\bBRA\s+0x([0-9a-f]+)", op)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    body = [op for addr, op in ins if any(lo <= addr <= hi for lo, hi in loops)]
    ldg: dict = {}
    for op in body:
        m = re.search(r"\bLDG\.E(?:\.(U8|S8|U16|S16|64|128))?\b", op)
        if m:
            ldg[m.group(1) or "32"] = ldg.get(m.group(1) or "32", 0) + 1
    return dict(loop_barriers=sum("BAR.SYNC" in op for op in body), loop_shfl=sum("SHFL" in op for op in body),
                loop_ldg=ldg)


_SASS_CACHE = _sass_cache()


def _res_usage(cubin: bytes, digest: str) -> dict:
    """REG / STACK / SHARED / LOCAL of the one function in a cubin (cuobjdump -res-usage) and
    counts of the SASS instructions the checks look at (cuobjdump -sass, cached by digest)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True)
        if digest not in _SASS_MEMO:
            _SASS_MEMO[digest] = (_SASS_CACHE.get(digest, lambda: _sass_counts(f.name)) if _SASS_CACHE is not None
                                  else _sass_counts(f.name))
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res.stdout)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output:\n{res.stdout}")
    reg, stack, shared, local = (int(v) for v in m.groups())
    return dict(regs=reg, stack=stack, static_shared=shared, local=local, **_SASS_MEMO[digest])


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        digest = hashlib.sha1(kernel).hexdigest()[:16]
        usage = _res_usage(kernel, digest)
        if digest not in _SEEN:
            _SEEN.add(digest)
            RECORDS.append(dict(case=_current_case["name"], kernel=name, config=_current_case["config"],
                                dtype=_current_case["dtype"], shared=int(shared), cubin=digest, **usage))
        max_threads = 1024 if usage["regs"] <= 64 else max(32, (65536 // max(usage["regs"], 1)) // 32 * 32)
        return None, None, usage["regs"], usage["local"] // 4, min(1024, max_threads)

    def get_device_properties(self, device):
        return {"max_shared_mem": H100_SMEM, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32,
                "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}


class _NoLaunch:
    def __init__(self, src, metadata):
        pass

    def __call__(self, *args, **kwargs):
        return None


class StandInSm90Driver(DriverBase):
    """A Triton driver for an sm_90 device that is not there: compile everything, launch nothing."""

    def __init__(self):
        super().__init__()
        self.utils = _Utils()
        self.launcher_cls = _NoLaunch

    @classmethod
    def is_active(cls):
        return False

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=None):
        return (9, 0)

    def get_device_interface(self):
        return torch.cuda

    def map_python_to_cpp_type(self, ty: str) -> str:
        return "void*" if ty.startswith("*") else ty

    def get_benchmarker(self):
        def bench(fn, quantiles=None, **kwargs):
            # an autotuner benchmarks each config: compile it, and report a failure that the
            # autotuner would otherwise swallow (it skips configs that run out of resources)
            try:
                fn()
            except Exception as e:
                CONFIG_FAILURES.append(dict(case=f"{_current_case['name']} [{_current_case['config']}]",
                                            error=f"{type(e).__name__}: {str(e)[:2000]}",
                                            traceback=traceback.format_exc()[-4000:]))
                raise
            return [1.0] * len(quantiles) if quantiles else 1.0
        return bench

    def get_empty_cache_for_benchmark(self):
        return torch.empty(1)

    def clear_cache(self, cache):
        pass


def _label_launches():
    """Label every compile with the launch's meta-parameters (BLOCK_*, warps, stages): with
    autotuning one kernel compiles once per config of its set."""
    from triton.runtime.jit import JITFunction

    real = JITFunction.run

    def run(self, *args, **kwargs):
        blocks = "x".join(str(v) for k, v in kwargs.items() if k.startswith("BLOCK_"))
        _current_case["config"] = f"{blocks} w{kwargs.get('num_warps', 4)} s{kwargs.get('num_stages', 3)}"
        _current_case["dtype"] = next((str(a.dtype)[6:] for a in args if isinstance(a, torch.Tensor)), "")
        return real(self, *args, **kwargs)

    JITFunction.run = run


@contextlib.contextmanager
def _default_configs(on: bool):
    """With `on`, the contrastive kernels launch their default config instead of autotuning
    (SOLAR_CL_AUTOTUNE=0): --quick compiles every config only at two D = 768 cases per dtype."""
    old = os.environ.get("SOLAR_CL_AUTOTUNE")
    if on:
        os.environ["SOLAR_CL_AUTOTUNE"] = "0"
    try:
        yield
    finally:
        if on and old is None:
            del os.environ["SOLAR_CL_AUTOTUNE"]
        elif on:
            os.environ["SOLAR_CL_AUTOTUNE"] = old


# ------------------------------------------------------------------------------------------
# The cases: every public op and its backward, at the variants a GPU user hits
# ------------------------------------------------------------------------------------------
def _pool_cases(quick: bool):
    import solar_kernels as sk

    def run(B, L, D, V, dtype, mask_kind, normalize, mask_grad):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, L, D, generator=g).to(dtype).requires_grad_()
        if mask_kind == "bool":
            m = torch.rand(V, B, L, generator=g) > 0.5
        else:
            m = torch.rand(V, B, L, generator=g).to(dtype if mask_kind == "same" else torch.float32)
            m.requires_grad_(mask_grad)
        out = sk.masked_pool(x, m, normalize=normalize)
        out.float().sum().backward()

    cases = []
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    for dt in dtypes:
        for mk in ("bool", "float"):
            cases.append((f"masked_pool {str(dt)[6:]} {mk} V=3 D=768 norm", lambda dt=dt, mk=mk: run(4, 77, 768, 3, dt, mk, True, mk != "bool")))
    # a half-precision mask (read as 32-bit words, two weights each), and a bool mask whose rows
    # start mid-word (L = 77) but whose last word lies inside the storage (B = 4)
    cases.append(("masked_pool bf16 half-mask V=3 D=768", lambda: run(4, 77, 768, 3, torch.bfloat16, "same", False, True)))
    vs = (1, 2, 3, 8, 9) if quick else tuple(range(1, 10))
    for V in vs:
        cases.append((f"masked_pool bf16 float V={V} D=64", lambda V=V: run(4, 77, 64, V, torch.bfloat16, "float", False, True)))
    for D in (1, 2, 17, 64, 768, 4096):
        for mk in ("bool", "float"):
            cases.append((f"masked_pool fp16 {mk} V=1 D={D}", lambda D=D, mk=mk: run(3, 50, D, 1, torch.float16, mk, D % 2 == 0, False)))
    return cases


def _loss_cases(quick: bool):
    import solar_kernels as sk
    from solar_kernels.ops.contrastive_triton import MAX_KERNEL_MINE_K

    def run(N, D, dtype, mode, hard_neg=0, hardness=0.0, mine_k=0):
        # --quick (the CI test, compiled cold on every fresh machine) tunes over every config at
        # the D = 768 two-tower case and the D = 768 case with every feature on, per dtype: the
        # smallest and the largest kernels of each set; the other cases compile the default
        # config (a full run compiles every config at every case)
        tune_all = D == 768 and (mode == "two-tower" or mine_k > 0)
        with _default_configs(quick and not tune_all):
            _run(N, D, dtype, mode, hard_neg, hardness, mine_k)

    def _run(N, D, dtype, mode, hard_neg, hardness, mine_k):
        g = torch.Generator().manual_seed(1)
        q = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1).to(dtype).requires_grad_()
        k = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1).to(dtype).requires_grad_()
        groups = torch.arange(N) // 2
        hn = torch.randn(N, hard_neg, D, generator=g).to(dtype) if hard_neg else None
        kw = dict(temperature=0.05, hardness=hardness, mine_k=mine_k, hard_negatives=hn)
        if mode == "two-tower":
            out = sk.contrastive_loss(q, k, **kw)
        elif mode == "groups":
            out = sk.contrastive_loss(q, k, groups=groups, **kw)
        elif mode == "one-sided":
            out = sk.contrastive_loss(q, k, symmetric=False, **kw)
        else:  # single-set
            out = sk.contrastive_loss(q, groups=groups, **kw)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()

    cases = []
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for mode in ("two-tower", "groups", "one-sided", "single-set"):
            cases.append((f"contrastive {str(dt)[6:]} {mode} D=768", lambda dt=dt, mode=mode: run(256, 768, dt, mode)))
        cases.append((f"contrastive {str(dt)[6:]} hard-neg+hardness+mine8 D=768",
                      lambda dt=dt: run(256, 768, dt, "groups", hard_neg=2, hardness=0.5, mine_k=8)))
    mks = (1, MAX_KERNEL_MINE_K) if quick else (1, 2, 8, MAX_KERNEL_MINE_K)
    for mk in mks:
        cases.append((f"contrastive bf16 mine_k={mk} D=128", lambda mk=mk: run(256, 128, torch.bfloat16, "two-tower", mine_k=mk)))
    cases.append((f"contrastive bf16 hardness+mine{MAX_KERNEL_MINE_K} D=128",
                  lambda: run(256, 128, torch.bfloat16, "single-set", hardness=1.0, mine_k=MAX_KERNEL_MINE_K)))
    for D in (1, 17, 4096):
        cases.append((f"contrastive bf16 two-tower D={D}", lambda D=D: run(130, D, torch.bfloat16, "two-tower")))
    return cases


def _pooled_cases(quick: bool):
    import solar_kernels as sk

    def run(dtype, mine_k):
        g = torch.Generator().manual_seed(2)
        N, L, D = 64, 77, 768
        xq = torch.randn(N, L, D, generator=g).to(dtype).requires_grad_()
        xk = torch.randn(N, 20, D, generator=g).to(dtype).requires_grad_()
        mq = torch.rand(N, L, generator=g) > 0.3
        mk = torch.rand(N, 20, generator=g) > 0.3
        out = sk.pooled_contrastive_loss(xq, mq, xk, mk, mine_k=mine_k, hardness=0.5 if mine_k else 0.0)
        (out[0] if isinstance(out, tuple) else out).backward()

    return [(f"pooled_contrastive {str(dt)[6:]}{' mine4+hardness' if mk else ''}", lambda dt=dt, mk=mk: run(dt, mk))
            for dt in (torch.bfloat16, torch.float32) for mk in (0, 4)]


def run_all(quick: bool, only: str | None = None) -> dict:
    triton.runtime.driver.set_active(StandInSm90Driver())
    _label_launches()
    import solar_kernels
    from solar_kernels import _dispatch

    failures = []
    cases = _pool_cases(quick) + _loss_cases(quick) + _pooled_cases(quick)
    if only:
        cases = [c for c in cases if only in c[0]]
    with _dispatch.kernel_target("cuda"), solar_kernels.use_backend("triton"):
        for name, fn in cases:
            _current_case["name"] = name
            try:
                fn()
            except Exception as e:  # a compile failure is a finding, not a crash of the harness
                tb = traceback.format_exc()
                failures.append(dict(case=name, error=f"{type(e).__name__}: {str(e)[:2000]}", traceback=tb[-4000:]))
    return dict(triton=triton.__version__, torch=torch.__version__, cases=[c[0] for c in cases],
                kernels=RECORDS, failures=failures + CONFIG_FAILURES)


def markdown(report: dict) -> str:
    lines = [f"Triton {report['triton']} (sm_90, compiled ahead of time; {len(report['cases'])} cases, "
             f"{len(report['kernels'])} specialisations, {len(report['failures'])} failures)", "",
             "| kernel | first case | config | regs | smem B | stack B | spill ld/st | wgmma | atomics | GPU fences | bar.sync "
             "| in loops: bar.sync | in loops: LDG by width |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["kernels"]:
        lines.append(f"| {r['kernel']} | {r['case']} | {r.get('config', '')} | {r['regs']} | {r['shared']} | {r['stack']} | "
                     f"{r['local_ld']}/{r['local_st']} | {'yes' if r['hgmma'] else 'no'} | {r['atomics']} | "
                     f"{r['membar']} | {r['barriers']} | {r['loop_barriers']} | "
                     f"{' '.join(f'{w}:{n}' for w, n in sorted(r['loop_ldg'].items()))} |")
    for f in report["failures"]:
        lines.append(f"\nFAILED {f['case']}: {f['error'][:300]}")
    return "\n".join(lines) + "\n"


def markdown_by_config(report: dict, prefix: str = "_cl_") -> str:
    """One row per (kernel, operand dtype, config) over every case that compiled it: the
    register range, shared memory, the largest stack frame and spill counts (with the case),
    whether every compile has HGMMA, and atomics / GPU fences summed."""
    rows: dict = {}
    for r in report["kernels"]:
        if r["kernel"].startswith(prefix):
            rows.setdefault((r["kernel"], r.get("dtype", ""), r.get("config", "")), []).append(r)
    lines = ["| kernel | dtype | config (BLOCKs, warps, stages) | compiles | regs | smem B | max stack B (case) | "
             "spill ld/st | HGMMA in all | atomics | GPU fences |", "|---|---|---|---:|---|---|---|---|---|---:|---:|"]
    for (kernel, dtype, config), rs in rows.items():
        worst = max(rs, key=lambda r: (r["stack"], r["local_ld"] + r["local_st"]))
        regs = sorted({r["regs"] for r in rs})
        smem = sorted({r["shared"] for r in rs})
        where = f" ({worst['case']})" if worst["stack"] else ""
        lines.append(f"| {kernel} | {dtype} | {config} | {len(rs)} | {regs[0]}-{regs[-1]} | "
                     f"{smem[0]}{'-' + str(smem[-1]) if len(smem) > 1 else ''} | {worst['stack']}{where} | "
                     f"{worst['local_ld']}/{worst['local_st']} | {'yes' if all(r['hgmma'] for r in rs) else 'NO'} | "
                     f"{sum(r['atomics'] for r in rs)} | {sum(r['membar'] for r in rs)} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="where to write the report (JSON)")
    ap.add_argument("--markdown", help="also write the table as markdown here")
    ap.add_argument("--by-config", help="also write the contrastive kernels' table by config here (markdown)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer V / mine_k variants; every contrastive config only at D = 768")
    ap.add_argument("--only", help="run only the cases whose name contains this string")
    args = ap.parse_args()
    report = run_all(args.quick, args.only)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(report))
    if args.by_config:
        with open(args.by_config, "w") as f:
            f.write(markdown_by_config(report))
    print(markdown(report))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
