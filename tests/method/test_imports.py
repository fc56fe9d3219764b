"""Imports go one way in solar/ and solar_kernels/: every module imports alone in a fresh
interpreter, the graph of package-internal imports (module-level and inside functions) has no
cycle, and no solar_kernels module imports another module's private (_-prefixed) names."""
import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.join(REPO, "solar")
PACKAGES = ("solar", "solar_kernels")


def _modules(package: str = "solar") -> dict:
    """Dotted module name -> file path, for every .py file under the package."""
    root = os.path.join(REPO, package)
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), REPO)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(d, f)
    return out


def _resolve(node: ast.ImportFrom, name: str, path: str) -> str:
    """The absolute module an ImportFrom names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    pkg = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    base = pkg.split(".")
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str, path: str, known: set) -> set:
    """The package's modules `name` imports anywhere in its file (relative imports resolved)."""
    top = name.split(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == top}
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(node, name, path)
            if mod.split(".")[0] != top:
                continue
            for a in node.names:   # `from . import benchmark`: a module; `from .x import f`: module x
                found.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
    return {m for m in found if m in known and m != name}


def _find_cycle(graph: dict):
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                cycle = visit(n)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package):
    mods = _modules(package)
    graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    # a package __init__ that imports its modules lazily (by name, importlib) is not an edge
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    # the check can fail: the graph it walks has the edges it should
    if package == "solar":
        assert "solar.config" in graph["solar.model"] and "solar.trainer" in graph["solar.stage1"]
        assert not any(n.startswith("solar") and n != "solar.options" for n in graph["solar.config"])
        assert graph["solar.options"] == set()
    else:
        assert {"solar_kernels.ops.contrastive_cpu", "solar_kernels.distributed"} <= graph["solar_kernels.ops.contrastive"]
        assert "solar_kernels.ops.contrastive" in graph["solar_kernels.ops.pooled_contrastive"]
    assert _find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def _private_imports(package: str) -> list:
    """`from M import _x` (an _-prefixed name that is not a module of its own) and `M._x`
    (attribute of a name bound to a package module) across the package's modules."""
    mods = _modules(package)
    bad = []
    for name, path in mods.items():
        tree = ast.parse(open(path).read(), path)
        module_aliases = set()  # local names bound to package modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = _resolve(node, name, path)
                if mod.split(".")[0] != package:
                    continue
                for a in node.names:
                    if f"{mod}.{a.name}" in mods:
                        module_aliases.add(a.asname or a.name)
                    elif a.name.startswith("_") and not a.name.startswith("__"):
                        bad.append(f"{name}:{node.lineno}: from {mod} import {a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == package and a.asname:
                        module_aliases.add(a.asname)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in module_aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                bad.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr}")
    return bad


def test_no_private_names_across_solar_kernels_modules():
    """Shared pieces are public-within-package names (an internal module like _checks may be
    imported: its names are public); a module's own _-names stay in it."""
    bad = _private_imports("solar_kernels")
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_private_name_scan_can_fail(tmp_path, monkeypatch):
    pkg = tmp_path / "fakepkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "_inner.py").write_text("def f():\n    pass\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from .. import _inner\nfrom ..sub.b import _g, h\nx = _inner._f\n")
    (pkg / "sub" / "b.py").write_text("def _g():\n    pass\n\n\ndef h():\n    pass\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", str(tmp_path))
    bad = _private_imports("fakepkg")
    assert bad == ["fakepkg.sub.a:2: from fakepkg.sub.b import _g", "fakepkg.sub.a:3: _inner._f"], bad


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


def test_each_solar_kernels_module_imports_alone():
    """One fresh interpreter per module (solar_kernels registers torch.library ops at import,
    which cannot be dropped and imported again in one interpreter)."""
    for m in sorted(_modules("solar_kernels")):
        if m.endswith("__main__"):
            continue
        r = subprocess.run([sys.executable, "-c", f"import importlib; importlib.import_module({m!r})"],
                           capture_output=True, text=True, timeout=300, cwd=REPO)
        assert r.returncode == 0, f"{m}: " + r.stderr[-2000:]


def test_unknown_preset_raises_everywhere():
    from solar.config import ModelConfig, Stage1Config, get_preset
    for fn in (get_preset, ModelConfig.preset_config, Stage1Config.preset):
        with pytest.raises(ValueError, match="unknown preset 'nope'"):
            fn("nope")
    from solar.cli import parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(["--preset", "nope"])
    assert e.value.code == 2
