"""Collect every <op>.csv under a results folder into one markdown table per op.

    python bench/summarize.py bench/out/gpu > summary.md
"""
from __future__ import annotations

import csv
import glob
import os
import sys

SKIP = {"torch", "triton", "commit", "date", "device"}


def _table(rows: list[dict]) -> list[str]:
    cols = [c for c in rows[0].keys() if c not in SKIP and any(r.get(c, "") != "" for r in rows)]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return out


def summarize(folder: str) -> str:
    """One markdown table per CSV (per `section` where the CSV has that column), showing only the
    columns that hold a value in that table."""
    parts = []
    for path in sorted(glob.glob(os.path.join(folder, "*.csv"))):
        with open(path) as f:
            rows = list(csv.DictReader(f))
        if not rows:
            continue
        tag = rows[0]
        parts.append(f"## {os.path.basename(path)[:-4]}\n")
        parts.append(f"{tag.get('device', '?')}; torch {tag.get('torch', '?')}; triton {tag.get('triton', '?')}; "
                     f"commit {tag.get('commit', '?')}; {tag.get('date', '?')}\n")
        groups: dict[str, list[dict]] = {}
        for r in rows:
            groups.setdefault(r.get("section", ""), []).append(r)
        for name, group in groups.items():
            if name:
                parts.append(f"### {name}\n")
            parts += _table(group)
            parts.append("")
    return "\n".join(parts) if parts else "(no CSV results found)\n"


if __name__ == "__main__":
    print(summarize(sys.argv[1] if len(sys.argv) > 1 else "bench/out"))
