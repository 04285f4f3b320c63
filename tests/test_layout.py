"""The layout is the architecture: public names that no import can shadow, layers that only point down, no
private name used across modules, modules a person can read (about 600 lines at most, or a stated reason)."""
from __future__ import annotations

import ast
import json
import pathlib
import pkgutil
import subprocess
import sys

import netdiet

SRC = pathlib.Path(netdiet.__file__).parent

# lower layers first; a module may import from its own layer or any layer below it, never above
LAYERS = [
    {"errors", "units", "fileio", "environment", "progress", "optim", "checks", "documents", "launch"},
    {"models", "data"},
    {"analysis"},
    {"training"},
    {"compression"},
    {"incremental"},
    {"reporting"},
    {"api", "__init__"},
    {"cli", "__main__"},
]
RENDERERS = {"reporting"}


def _modules() -> dict[str, pathlib.Path]:
    return {".".join(("netdiet",) + p.with_suffix("").relative_to(SRC).parts): p for p in SRC.rglob("*.py")}


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(top: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if top in names)


def _imports(path: pathlib.Path):
    """(line, imported module, [names]) for every netdiet import in the file, wherever it stands."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("netdiet"):
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("netdiet"):
                    yield node.lineno, a.name, []


def test_every_public_name_survives_importing_every_subpackage():
    # netdiet.train(...) once became the subpackage netdiet.train after its first call; in a fresh interpreter,
    # take every public name, import every module of the package, and check each name is the same object
    code = (
        "import importlib, pkgutil, json, netdiet\n"
        "before = {n: id(getattr(netdiet, n)) for n in netdiet.__all__}\n"
        "for m in pkgutil.walk_packages(netdiet.__path__, 'netdiet.'):\n"
        "    if m.name != 'netdiet.__main__':\n"
        "        importlib.import_module(m.name)\n"
        "after = {n: id(getattr(netdiet, n)) for n in netdiet.__all__}\n"
        "print(json.dumps({'changed': sorted(n for n in before if before[n] != after[n]),\n"
        "                  'not_callable': sorted(n for n in netdiet.__all__ if not callable(getattr(netdiet, n)))}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"changed": [], "not_callable": []}


def test_no_public_name_is_also_a_module_of_the_package():
    modules = {m.name for m in pkgutil.iter_modules(netdiet.__path__)}
    assert not modules & set(netdiet.__all__)
    assert {"train", "compress", "continual", "report", "profile", "evaluate"} <= set(netdiet.__all__)


def test_layers_only_point_down_and_the_engine_imports_no_renderer():
    upward = []
    for module, path in _modules().items():
        top = _top(module)
        for line, target, names in _imports(path):
            targets = [f"netdiet.{n}" for n in names] if target == "netdiet" else [target]
            for t in targets:
                t_top = _top(t)
                if t_top in ("__version__", "__all__"):
                    continue
                if _layer(t_top) > _layer(top) or (t_top in RENDERERS and top not in RENDERERS | {"api", "cli"}):
                    upward.append(f"{module}:{line} imports {t}")
    assert upward == []


def test_no_private_name_is_imported_across_modules():
    crossings = []
    for module, path in _modules().items():
        for line, target, names in _imports(path):
            if target == module:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                crossings.append(f"{module}:{line} imports {', '.join(private)} from {target}")
    assert crossings == []


def test_modules_stay_readable_or_say_why_they_are_long():
    long = []
    for module, path in _modules().items():
        lines = path.read_text().count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > 620 and "Why this module is long" not in doc:
            long.append(f"{module}: {lines} lines")
    assert long == []


def test_imports_inside_the_package_stand_at_the_top_of_each_module():
    # the dependency graph is visible: the one lazy boundary is the CLI importing a command's module when that
    # command runs (and the package root resolving its public names on first use); optional dependencies
    # (onnx, onnxruntime, transformers, timm, matplotlib, ...) may still be imported where they are needed
    lazy_allowed = {"netdiet.cli", "netdiet.__init__", "netdiet.__main__"}
    local = []
    for module, path in _modules().items():
        if module in lazy_allowed:
            continue
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    if mod and mod.startswith("netdiet"):
                        local.append(f"{module}:{node.lineno} imports {mod}")
    assert sorted(set(local)) == []
