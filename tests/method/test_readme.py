"""The README's ops example runs as written (so the front page cannot rot)."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_readme_ops_example_runs(tmp_path, monkeypatch):
    text = open(os.path.join(ROOT, "README.md")).read()
    m = re.search(r"## The ops.*?```python\n(.*?)```", text, re.S)
    assert m, "README lost its '## The ops' python example"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(m.group(1), "README.md", "exec"), scope)
    assert tuple(scope["pooled"].shape) == (3, 8, 256)
    assert tuple(scope["scores"].shape) == (16, 10) and tuple(scope["ids"].shape) == (16, 10)
    assert scope["q"].grad is not None
