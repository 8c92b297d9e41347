"""The layout: no import circle among mskt's modules, the model package imports nothing of the
accelerators, and each package imports only what docs/architecture.md allows."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mskt"

# What each package (or top-level module) may import from mskt, as docs/architecture.md states it.
ALLOWED = {
    "errors": set(), "paths": {"errors"}, "plugins": {"errors", "paths"}, "modalities": set(), "console": set(),
    "model": {"errors", "modalities", "plugins"},
    "config": {"model", "errors", "paths", "plugins"},
    "metrics": {"errors", "data"},
    "stats": {"errors", "metrics"},
    "data": {"errors", "paths", "modalities", "console"},
    "fast": {"model", "errors", "paths", "console"},
    "train": {"config", "model", "fast", "data", "metrics", "errors", "paths", "modalities", "console"},
    "experiments": {"train", "model", "fast", "data", "metrics", "stats", "config", "errors", "paths", "modalities", "console"},
    "viz": {"train", "model", "data", "metrics", "stats", "experiments", "config", "errors", "paths", "modalities", "console"},
}


def _modules() -> dict:
    """{dotted module name: path} for every module of mskt."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, modules: dict) -> set:
    """The mskt modules ``path`` imports anywhere in it (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mskt")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mskt"):
            for a in node.names:  # ``from mskt.x import y``: y may be a submodule
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m in modules}


def test_no_import_circle():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    state = {}

    def visit(name, stack):
        state[name] = "open"
        for nxt in sorted(graph[name]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_each_package_imports_only_what_it_may():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        parts = name.split(".")
        if len(parts) < 2 or parts[1] not in ALLOWED:
            continue  # the package root, cli, notebooks, readers (re-export): anything
        own = parts[1]
        for imported in _imports(path, modules):
            target = imported.split(".")[1] if "." in imported else ""
            if target and target != own and target not in ALLOWED[own]:
                wrong.append(f"{name} imports {imported}")
    assert not wrong, wrong


def test_the_model_package_never_imports_the_accelerators():
    code = "import sys, mskt.model; bad = sorted(m for m in sys.modules if m.startswith('mskt.fast')); print(bad); sys.exit(bool(bad))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_kept_names_still_import():
    from mskt.config import Config  # noqa: F401
    from mskt.metrics import compute_metrics  # noqa: F401
    from mskt.model import TransformerLayer, build_model  # noqa: F401
    from mskt.readers import load_dataset  # noqa: F401
    from mskt.train import load_run, train  # noqa: F401
