"""bench/gpu_check.sh cannot rot: its --dry-run runs the same control flow on CPU (tiny sizes,
Triton interpreted, no CUDA steps) and must produce every benchmark section's rows."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT_DRY=str(tmp_path), GPU_CHECK_BUDGET="300")
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry-run"], capture_output=True,
                       text=True, env=env, timeout=420)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(os.listdir(tmp_path))
    assert len(files) <= 8 and {"gpu_check.log", "gpu_suite.csv", "summary.md"} <= set(files), files
    with open(tmp_path / "gpu_suite.csv") as f:
        rows = list(csv.DictReader(f))
    failed = [r for r in rows if r["impl"] in ("FAILED", "skipped")]
    assert not failed, failed
    sections = {r["section"] for r in rows}
    assert sections == {"loss", "pooled", "sweep", "pool", "search", "kernels"}, sections
    timed = {(r["section"], r["impl"]) for r in rows if r.get("median_ms")}
    for needed in (("loss", "solar"), ("loss", "eager"), ("pooled", "solar fused"), ("sweep", "solar"),
                   ("pool", "solar fwd+bwd"), ("search", "solar"), ("search", "torch mm+topk")):
        assert needed in timed, needed
    summary = (tmp_path / "summary.md").read_text()
    assert "### loss" in summary and "### search" in summary
    # the summary is printed last: the device call returns only the end of the output
    assert r.stdout.rstrip().splitlines()[-1].startswith("gpu_check: done")
    assert "FAILED" not in (tmp_path / "gpu_check.log").read_text()
