"""Run every CPU micro-benchmark in turn (what `bash run.sh bench` runs).

Each bench_<op>.py writes <op>.csv and a PNG under --out (default bench/out/cpu) and
prints its table; bench/summarize.py then gathers the CSVs into one markdown summary.
Extra arguments are passed to every benchmark (e.g. --quick).
"""
from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHES = ["bench_pool.py", "bench_loss.py", "bench_search.py"]


def main(argv: list[str]) -> int:
    out = os.path.join(HERE, "out", "cpu")
    if "--out" in argv:
        out = argv[argv.index("--out") + 1]
    else:
        argv = argv + ["--out", out]
    os.makedirs(out, exist_ok=True)
    rc = 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    for b in BENCHES:
        print(f"\n=== {b}", flush=True)
        r = subprocess.run([sys.executable, os.path.join(HERE, b), "--device", "cpu", *argv], env=env)
        rc = rc or r.returncode
    summary = subprocess.run([sys.executable, os.path.join(HERE, "summarize.py"), out], capture_output=True, text=True)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary.stdout)
    print(f"\nsummary written to {os.path.join(out, 'summary.md')}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
