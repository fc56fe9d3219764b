"""Run `python -m solar.train` and SIGKILL the process at one injected point.

    python tests/crash_runner.py KILL_AT -- <solar.train arguments>

KILL_AT is one of
  ``replace:<n>:<suffix>``  just before the n-th ``os.replace`` (1-based) whose target path
                   ends with <suffix>: every file and folder rename of a checkpoint write
                   goes through it (model weights, model json, trainer tensors, trainer
                   json into ``ckpt.tmp``, then the rotation ``ckpt -> ckpt.old``,
                   ``ckpt.tmp -> ckpt``);
  ``write:<n>:<suffix>``    during the n-th safetensors write to a path ending with <suffix>,
                   once half of its bytes are on disk (a torn file under its temporary name);
  ``rmtree:<n>:<suffix>``   just before the n-th ``shutil.rmtree`` of such a path (e.g. the
                   removal of ``ckpt.old`` after a rotation);
  ``step:<n>``     after the n-th optimizer step of the run (between checkpoints);
  ``none``         no kill (the reference run); every rename target is printed.

SIGKILL is what an OOM killer or a preempted node does: no Python cleanup, no finally
blocks, no flushing.  Nothing in the library knows about this file: it wraps the standard
library calls from outside before the training module is imported.
"""
from __future__ import annotations

import os
import runpy
import shutil
import signal
import sys


def _die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _install(kill_at: str) -> None:
    kind, _, rest = kill_at.partition(":")
    n, _, suffix = rest.partition(":")
    target = int(n) if n else 0
    counts = {"replace": 0, "write": 0, "rmtree": 0, "step": 0}

    def hit(what: str, path) -> bool:
        """Count a call on a matching path; True when it is the one to die at."""
        if kind != what or not os.fspath(path).endswith(suffix):
            return False
        counts[what] += 1
        return counts[what] == target

    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        if kind == "none":
            print(f"[crash_runner] replace: {os.fspath(dst)}", flush=True)
        if hit("replace", dst):
            _die()
        return real_replace(src, dst, *a, **kw)
    os.replace = replace

    real_rmtree = shutil.rmtree

    def rmtree(path, *a, **kw):
        if hit("rmtree", path):
            _die()
        return real_rmtree(path, *a, **kw)
    shutil.rmtree = rmtree

    import safetensors.torch as st
    real_save_file = st.save_file

    def save_file(tensors, filename, *a, **kw):
        if hit("write", filename):
            real_save_file(tensors, filename, *a, **kw)
            size = os.path.getsize(filename)
            with open(filename, "r+b") as fh:
                fh.truncate(size // 2)
            _die()
        return real_save_file(tensors, filename, *a, **kw)
    st.save_file = save_file

    def post_step(opt, args, kwargs):
        if hit("step", ""):
            _die()
    from torch.optim.optimizer import register_optimizer_step_post_hook
    register_optimizer_step_post_hook(post_step)


def main() -> None:
    # the checkout this file belongs to, not whatever `solar` is installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    argv = sys.argv[1:]
    if len(argv) < 2 or argv[1] != "--":
        raise SystemExit("usage: crash_runner.py KILL_AT -- <solar.train args>")
    _install(argv[0])
    sys.argv = ["solar.train", *argv[2:]]
    runpy.run_module("solar.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
