"""Imports in solar/ go one way: every module imports alone in a fresh interpreter, and the
graph of solar-internal imports (module-level and inside functions) has no cycle."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "solar")


def _modules() -> dict:
    """Dotted module name -> file path, for every .py file under solar/."""
    out = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(d, f)
    return out


def _imports(name: str, path: str, known: set) -> set:
    """The solar modules `name` imports anywhere in its file (relative imports resolved)."""
    is_pkg = path.endswith("__init__.py")
    pkg = name if is_pkg else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "solar"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "solar":
                continue
            for a in node.names:   # `from . import benchmark`: a module; `from .x import f`: module x
                found.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
    return {m for m in found if m in known and m != name}


def test_no_import_cycle_in_solar():
    mods = _modules()
    graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    # a package __init__ that imports its modules lazily (by name, importlib) is not an edge
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    # the check can fail: the graph it walks has the edges it should
    assert "solar.config" in graph["solar.model"] and "solar.trainer" in graph["solar.stage1"]
    assert not any(n.startswith("solar") and n != "solar.options" for n in graph["solar.config"])
    assert graph["solar.options"] == set()


def test_each_module_imports_alone_in_a_fresh_interpreter():
    mods = sorted(m for m in _modules() if not m.endswith("__main__"))
    code = ("import importlib, sys\n"
            "failed = []\n"
            "for m in sys.argv[1:]:\n"
            "    for k in [k for k in sys.modules if k == 'solar' or k.startswith('solar.')]:\n"
            "        del sys.modules[k]\n"
            "    try:\n"
            "        importlib.import_module(m)\n"
            "    except Exception as e:\n"
            "        failed.append(f'{m}: {type(e).__name__}: {e}')\n"
            "print('\\n'.join(failed))\n"
            "sys.exit(1 if failed else 0)\n")
    # one interpreter; solar's modules are dropped before each import, so each one starts
    # from an empty solar (torch stays loaded: it cannot take part in a solar cycle)
    r = subprocess.run([sys.executable, "-c", code, *mods], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]


def test_unknown_preset_raises_everywhere():
    from solar.config import ModelConfig, Stage1Config, get_preset
    for fn in (get_preset, ModelConfig.preset_config, Stage1Config.preset):
        with pytest.raises(ValueError, match="unknown preset 'nope'"):
            fn("nope")
    from solar.cli import parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(["--preset", "nope"])
    assert e.value.code == 2
