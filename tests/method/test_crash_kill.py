"""Process-kill fault injection: SIGKILL a real `python -m solar.train` at injected points
inside checkpoint writes and between them, resume it, and assert the outcome each time.

Each case runs tests/crash_runner.py (which wraps os.replace, shutil.rmtree, the safetensors
writer and the optimizer step from outside the library), checks that the process really died
by SIGKILL, resumes with ``--resume``, and asserts the step the run resumed from and that the
final stage-1 model is bit-identical to an uninterrupted run (one thread, deterministic).
Stage 1 runs 6 steps with a checkpoint every 2 steps: checkpoint writes at steps 2, 4, 6.
"""
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_train_e2e import TINY  # noqa: E402

RUN = ["--run.stage", "1", "--stage1.steps", "6", "--stage1.ckpt_every", "2", "--run.num_threads", "1"]

# (kill point, step the resumed run must start from, what it simulates)
CASES = [
    ("step:3", 2, "killed between checkpoints (after the step-2 checkpoint)"),
    ("write:1:ckpt.tmp/model.safetensors.tmp", 0, "killed while the very first checkpoint's weights were being written"),
    ("write:2:ckpt.tmp/trainer.safetensors.tmp", 2, "torn optimizer state in ckpt.tmp of the step-4 checkpoint"),
    ("replace:1:ckpt.old", 2, "killed before the rotation (ckpt = step 2, ckpt.tmp = step 4 complete)"),
    ("replace:2:/ckpt", 4, "killed between the renames ckpt -> ckpt.old and ckpt.tmp -> ckpt"),
    ("rmtree:1:ckpt.old", 4, "killed before ckpt.old of a finished rotation was removed"),
]


def _run(kill_at, cache, out, *extra, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, os.path.join(HERE, "crash_runner.py"), kill_at, "--",
           *TINY, "--data.cache_dir", str(cache), "--run.out_dir", str(out), "--run.progress", "false", *RUN, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=os.path.dirname(os.path.dirname(HERE)))


def _weights(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "stage1", "stage1_model", "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cache = tmp_path_factory.mktemp("crash_cache")
    out = tmp_path_factory.mktemp("crash_ref")
    r = _run("none", cache, out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the rename sequence the kill points above rely on
    renames = re.findall(r"\[crash_runner\] replace: (\S+)", r.stdout)
    rot = [p for p in renames if p.endswith(("/ckpt", "ckpt.old"))]
    assert rot == [str(out / "stage1" / "ckpt"), str(out / "stage1" / "ckpt.old"), str(out / "stage1" / "ckpt"),
                   str(out / "stage1" / "ckpt.old"), str(out / "stage1" / "ckpt")], rot
    return cache, _weights(out)


def _kill_and_resume(case, cache, out):
    kill_at, _, _ = case
    killed = _run(kill_at, cache, out)
    resumed = _run("none", cache, out, "--resume") if killed.returncode == -signal.SIGKILL else None
    return killed, resumed


def test_kill_at_injected_points_then_resume(reference, tmp_path):
    cache, ref = reference
    with ThreadPoolExecutor(max_workers=2) as pool:   # two single-threaded runs at a time
        results = list(pool.map(lambda c: _kill_and_resume(c, cache, tmp_path / c[0].replace(":", "_").replace("/", "")),
                                CASES))
    for (kill_at, start, what), (killed, resumed) in zip(CASES, results):
        where = f"{kill_at} ({what})"
        assert killed.returncode == -signal.SIGKILL, f"{where}: not killed (rc {killed.returncode})\n{killed.stderr[-2000:]}"
        assert resumed.returncode == 0, f"{where}: resume failed\n{resumed.stdout[-2000:]}\n{resumed.stderr[-3000:]}"
        m = re.search(r"\[stage1\] resumed from step (\d+)", resumed.stdout)
        got = int(m.group(1)) if m else 0
        assert got == start, f"{where}: resumed from step {got}, expected {start}"
        out = tmp_path / kill_at.replace(":", "_").replace("/", "")
        leftovers = sorted(p.name for p in (out / "stage1").iterdir() if p.name.startswith("ckpt."))
        assert leftovers == [], f"{where}: {leftovers} left on disk after the resumed run"
        w = _weights(out)
        assert w.keys() == ref.keys()
        for k in ref:
            assert torch.equal(w[k], ref[k]), f"{where}: {k} differs from the uninterrupted run"


def test_metrics_line_cut_by_a_kill_does_not_swallow_the_next(tmp_path):
    from solar.logging import MetricsLogger, read_metrics
    path = tmp_path / "metrics.jsonl"
    MetricsLogger(str(path)).log({"loss": 1.0}, stage="stage1", step=1)
    with open(path, "a") as fh:          # the kill: half a line, no newline
        fh.write('{"stage": "stage1", "step": 2, "lo')
    MetricsLogger(str(path)).log({"loss": 0.5}, stage="stage1", step=2)   # the resumed run
    rows = read_metrics(str(path))
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5)]
