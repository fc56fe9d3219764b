"""Shared benchmark harness: timing, peak memory, result rows, CSV and PNG.

Every bench_<op>.py builds its cases with a setup factory, measures our op and the
peers in the same process and run, and records rows through :class:`Recorder`.
Rows are tagged with the device, library versions and git commit so that a CSV can
be compared with another one later.

    from harness import bench, peak_memory, Recorder, env_tags
    rec = Recorder("masked_pool")
    st = bench(lambda: op(x, m), warmup=3, reps=10)
    rec.add(impl="solar", case={"B": 64, "L": 77}, stats=st, gbps=nbytes / st.median_s / 1e9)
    rec.print_table(); rec.write_csv("bench/out/pool.csv"); rec.plot("bench/out/pool.png", x="L", y="gbps")
"""
from __future__ import annotations

import csv
import dataclasses
import gc
import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch

__all__ = ["Stats", "bench", "peak_memory", "Recorder", "env_tags", "device_name", "copy_bandwidth"]


@dataclasses.dataclass
class Stats:
    """Timing of one case: median and the 20th/80th percentiles, in milliseconds."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int

    @property
    def median_s(self) -> float:
        return self.median_ms / 1e3

    def __str__(self) -> str:
        return f"{self.median_ms:.3f} ms [{self.p20_ms:.3f}, {self.p80_ms:.3f}]"


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[], object], *, warmup: int = 3, reps: int = 10, device=None,
          min_time_s: float = 0.0) -> Stats:
    """Time `fn()` (synchronising CUDA when `device` is a CUDA device).

    Runs `warmup` untimed calls, then at least `reps` timed ones (more while the total is
    below `min_time_s`), and returns the median with the 20th/80th percentiles.
    """
    if isinstance(device, str):
        device = torch.device(device)
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda")
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    t_start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - t_start) < min_time_s:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 10 * max(reps, 1):
            break
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return Stats(median_ms=statistics.median(times), p20_ms=q[0], p80_ms=q[3], reps=len(times))


def _rss_reset_and_read():
    """Reset the kernel's peak-RSS counter for this process (Linux) and return the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") * 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(fn: Callable[[], object], device=None) -> int:
    """Peak extra memory (bytes) used while running `fn()` once.

    CUDA: torch.cuda.max_memory_allocated above what was allocated before the call.
    CPU (Linux): peak resident set size (VmHWM, reset through /proc/self/clear_refs)
    above the RSS before the call; this counts every allocation, not only torch's.
    """
    if isinstance(device, str):
        device = torch.device(device)
    gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        del out
        return torch.cuda.max_memory_allocated(device) - base
    base = _rss_reset_and_read()
    out = fn()
    peak = _status_kb("VmHWM") * 1024
    del out
    return max(0, peak - base)


def device_name(device=None) -> str:
    if device is not None and torch.device(device).type == "cuda" or (device is None and torch.cuda.is_available()):
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cpus, {torch.get_num_threads()} torch threads)"


def _git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def env_tags(device=None) -> dict:
    """Device, versions and git commit, attached to every result row."""
    tags = {"device": device_name(device), "torch": torch.__version__, "commit": _git_commit(),
            "date": time.strftime("%Y-%m-%d")}
    try:
        import triton

        tags["triton"] = triton.__version__
    except Exception:
        tags["triton"] = "none"
    return tags


def copy_bandwidth(nbytes: int, device="cpu", dtype=torch.float32, reps: int = 10) -> float:
    """Achieved GB/s of a same-size tensor copy (read + write), the bandwidth reference."""
    n = max(1, nbytes // torch.tensor([], dtype=dtype).element_size())
    src = torch.randn(n, device=device).to(dtype)
    dst = torch.empty_like(src)
    st = bench(lambda: dst.copy_(src), warmup=2, reps=reps, device=torch.device(device))
    return 2 * src.numel() * src.element_size() / st.median_s / 1e9


class Recorder:
    """Collects result rows for one op and writes them as a table, a CSV and a PNG."""

    def __init__(self, op: str, device=None):
        self.op = op
        self.tags = env_tags(device)
        self.rows: list[dict] = []

    def add(self, *, impl: str, case: dict, stats: Stats | None = None, **extra) -> dict:
        row = {"op": self.op, "impl": impl, **case}
        if stats is not None:
            row.update(median_ms=round(stats.median_ms, 4), p20_ms=round(stats.p20_ms, 4),
                       p80_ms=round(stats.p80_ms, 4), reps=stats.reps)
        row.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in extra.items()})
        row.update(self.tags)
        self.rows.append(row)
        return row

    def columns(self) -> list[str]:
        cols: list[str] = []
        for r in self.rows:
            for k in r:
                if k not in cols:
                    cols.append(k)
        return cols

    def write_csv(self, path: str) -> str:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns())
            w.writeheader()
            w.writerows(self.rows)
        return path

    def print_table(self, skip=("device", "torch", "triton", "commit", "date")) -> str:
        cols = [c for c in self.columns() if c not in skip]
        cells = [[str(r.get(c, "")) for c in cols] for r in self.rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
        lines.append(f"({self.tags['device']}; torch {self.tags['torch']}; triton {self.tags['triton']}; "
                     f"commit {self.tags['commit']}; {self.tags['date']})")
        text = "\n".join(lines)
        print(text)
        return text

    def plot(self, path: str, *, x: str, y: str, group: str = "impl", where: dict | None = None,
             logx: bool = False, title: str | None = None) -> str | None:
        """Line plot of `y` against `x`, one line per value of `group` (rows filtered by `where`)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot (pip install '.[bench]')")
            return None
        rows = [r for r in self.rows if all(r.get(k) == v for k, v in (where or {}).items()) and y in r]
        fig, ax = plt.subplots(figsize=(6, 4))
        for g in dict.fromkeys(r[group] for r in rows):
            pts = sorted((r[x], r[y]) for r in rows if r[group] == g)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(g))
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        if logx:
            ax.set_xscale("log")
        ax.set_title(title or f"{self.op} ({self.tags['device'][:40]})", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
