"""Training metrics: one JSONL line per logged step, and PNG curves of losses and mask IoU.

    log = MetricsLogger("runs/x/metrics.jsonl")          # rank 0 writes, other ranks no-op
    log.log({"loss": 1.2, "iou_v": 0.5}, stage="stage1", step=10)
    plot_metrics("runs/x/metrics.jsonl", "runs/x/curves.png")

Each line is a json object with at least "stage", "step" and "time" (seconds since the
logger was created); everything else is a metric.  Appending (not truncating) on
resume keeps one file per run; `read_metrics` keeps, for each (stage, step), the last
line, so a resumed run's curves have no duplicates.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Iterable, Optional

__all__ = ["MetricsLogger", "read_metrics", "plot_metrics", "progress_bar"]


def progress_bar(iterable=None, **kwargs):
    """A tqdm progress bar for the long jobs (kwargs as tqdm's).

    On a terminal it redraws as usual.  When stderr is not a terminal (a log file, CI) it
    refreshes at most every 30 s (``mininterval``), and ``set_postfix`` / ``set_description``
    do not force a redraw (tqdm's default, which would defeat the interval), so a log keeps a
    short readable trace instead of one carriage-return update per step."""
    import sys

    from tqdm.auto import tqdm
    isatty = getattr(sys.stderr, "isatty", None)
    if callable(isatty) and isatty():
        return tqdm(iterable, **kwargs)
    kwargs["mininterval"] = max(float(kwargs.get("mininterval", 0.1)), 30.0)

    class _LogBar(tqdm):
        def set_postfix(self, ordered_dict=None, refresh=False, **kw):
            return super().set_postfix(ordered_dict, refresh=False, **kw)

        def set_description(self, desc=None, refresh=False):
            return super().set_description(desc, refresh=False)

    return _LogBar(iterable, **kwargs)


def _jsonable(v):
    if hasattr(v, "item") and callable(v.item):
        try:
            v = v.item()
        except (ValueError, RuntimeError):
            v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsLogger:
    """Append metrics to a JSONL file (only when `enabled`, i.e. on rank 0).

    Also callable as ``log(metrics_dict, stage=..., step=...)`` so it can be passed
    straight to the training loops as their `log` argument.
    """

    def __init__(self, path: Optional[str], enabled: bool = True, truncate: bool = False):
        self.path = path
        self.enabled = bool(enabled and path)
        self.t0 = time.time()
        if self.enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if truncate and os.path.exists(path):
                os.remove(path)
            elif os.path.exists(path) and os.path.getsize(path) > 0:
                # a line cut by a kill would swallow the next line appended to it
                with open(path, "rb+") as fh:
                    fh.seek(-1, os.SEEK_END)
                    if fh.read(1) != b"\n":
                        fh.write(b"\n")

    def log(self, metrics: dict, stage: str = "", step: int = -1, **extra) -> None:
        """Write one line: {"stage", "step", "time", **metrics, **extra}."""
        if not self.enabled:
            return
        row = {"stage": stage, "step": int(step), "time": round(time.time() - self.t0, 3)}
        for k, v in {**metrics, **extra}.items():
            row[k] = _jsonable(v)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def __call__(self, metrics: dict, stage: str = "", step: int = -1, **extra) -> None:
        self.log(metrics, stage=stage, step=step, **extra)


def read_metrics(path: str) -> list:
    """Rows of a metrics JSONL file; for a repeated (stage, step) the last row wins.
    Malformed lines (e.g. a line cut by a crash) are skipped."""
    rows = {}
    order = []
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            key = (r.get("stage", ""), r.get("step", -1), r.get("kind", ""))
            if key not in rows:
                order.append(key)
            rows[key] = r
    return [rows[k] for k in order]


def _series(rows: Iterable[dict], stage: str, metric: str):
    xs, ys = [], []
    for r in rows:
        if r.get("stage") == stage and isinstance(r.get(metric), (int, float)) and r.get("step", -1) >= 0:
            xs.append(r["step"])
            ys.append(r[metric])
    if xs:
        xs, ys = zip(*sorted(zip(xs, ys)))
    return list(xs), list(ys)


def plot_metrics(jsonl_path: str, png_path: str) -> Optional[str]:
    """Draw loss curves (one panel per stage) and the stage-1 mask IoU into `png_path`.

    Returns the path written, or None when there is nothing to plot or matplotlib is
    missing (the JSONL stays the source of truth)."""
    rows = read_metrics(jsonl_path)
    if not rows:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    stages = []
    for r in rows:
        s = r.get("stage", "")
        if s and s not in stages and any(k.startswith("loss") for k in r):
            stages.append(s)
    iou_keys = sorted({k for r in rows for k in r if k.startswith("iou") and isinstance(r[k], (int, float))})
    n = len(stages) + (1 if iou_keys else 0)
    if n == 0:
        return None
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        keys = sorted({k for r in rows if r.get("stage") == stage for k in r
                       if k.startswith("loss") and isinstance(r[k], (int, float))})
        for k in keys:
            xs, ys = _series(rows, stage, k)
            if xs:
                ax.plot(xs, ys, label=k, lw=1.2)
        ax.set_title(f"{stage} losses")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if iou_keys:
        ax = axes[0][-1]
        for stage in sorted({r.get("stage", "") for r in rows}):
            for k in iou_keys:
                xs, ys = _series(rows, stage, k)
                if xs:
                    ax.plot(xs, ys, label=f"{stage}:{k}", lw=1.2, marker="." if len(xs) < 30 else None)
        ax.set_title("mask IoU vs ground truth")
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
