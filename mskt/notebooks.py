"""Run the numbered notebooks headlessly with papermill: ``mskt notebooks [--smoke] [--only 03]``.

Each run executes ``notebooks/NN_*.ipynb`` in order into ``runs/notebooks-<time>/`` (the committed
notebooks stay clean), passes shared parameters (``smoke``, ``run_dir`` of the model that
02_training trains and 03/04 analyse, ``figures_dir``, and any ``--param key=value``) to the
notebooks that declare them, and prints a summary. A
failing notebook stops the run with a non-zero exit naming the notebook and the failing cell.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from mskt.errors import MsktError
from mskt.paths import project_root, runs_dir


@dataclass
class NotebookResult:
    notebook: str
    seconds: float
    status: str  # "ok" or "failed"
    output: Path
    error: str = ""


def notebook_paths(only=None) -> list[Path]:
    folder = project_root() / "notebooks"
    paths = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise MsktError(f"{folder}: no numbered notebooks (NN_name.ipynb) found")
    if only:
        wanted = {str(o).zfill(2) for o in only}
        paths = [p for p in paths if p.name[:2] in wanted]
        if not paths:
            raise MsktError(f"--only {','.join(sorted(wanted))}: no such notebook in {folder}")
    return paths


def parse_params(items) -> dict:
    """``key=value`` strings; values are parsed as JSON where they parse (numbers, true/false, lists)."""
    params = {}
    for item in items or ():
        if "=" not in item:
            raise MsktError(f"--param {item!r}: expected key=value")
        key, value = item.split("=", 1)
        try:
            params[key.strip()] = json.loads(value)
        except ValueError:
            params[key.strip()] = value
    return params


def declared_parameters(path: Path) -> set:
    """Names assigned in the notebook's cell tagged 'parameters'."""
    import ast

    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            tree = ast.parse("".join(cell["source"]))
            return {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
    raise MsktError(f"{path.name}: no cell tagged 'parameters'")


def _failing_cell(output: Path) -> str:
    try:
        nb = json.loads(output.read_text())
    except (OSError, ValueError):
        return "unknown cell"
    for i, cell in enumerate(nb.get("cells", [])):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return f"cell {i} ({out.get('ename')}: {out.get('evalue', '')[:200]})"
    return "unknown cell"


def run_notebooks(smoke: bool = False, only=None, params: dict | None = None, out_dir=None, log=print) -> list[NotebookResult]:
    import papermill as pm

    # Absolute: the notebooks run with notebooks/ as their working directory.
    out_dir = Path(out_dir).resolve() if out_dir else runs_dir() / f"notebooks-{datetime.now():%Y%m%d-%H%M%S}{'-smoke' if smoke else ''}"
    out_dir.mkdir(parents=True, exist_ok=True)
    # Smoke runs keep their figures beside the executed copies, so they never replace the real ones.
    shared = {
        "smoke": smoke,
        "run_dir": str(out_dir / "kt-run"),
        "out_dir": str(out_dir),
        "figures_dir": str(out_dir / "figures") if smoke else "",
        **(params or {}),
    }
    paths = notebook_paths(only)
    declared_by = {path: declared_parameters(path) for path in paths}
    unknown = sorted(set(params or {}) - set().union(*declared_by.values()))
    if unknown:
        allowed = sorted(set().union(*declared_by.values()))
        raise MsktError(f"--param {unknown}: no notebook declares it; parameters: {', '.join(allowed)}")
    results = []
    for path in paths:
        declared = declared_by[path]
        given = {k: v for k, v in shared.items() if k in declared}
        output = out_dir / path.name
        start = time.perf_counter()
        try:
            pm.execute_notebook(
                str(path), str(output), parameters=given, cwd=str(path.parent), progress_bar=False,
                kernel_name="python3", log_output=False,
            )
            status, error = "ok", ""
        except pm.PapermillExecutionError as e:
            status, error = "failed", f"cell {e.exec_count} ({e.ename}: {str(e.evalue)[:200]})"
        except Exception as e:  # the kernel died, a timeout, a missing kernel
            status, error = "failed", f"{_failing_cell(output)}; {type(e).__name__}: {e}"
        seconds = time.perf_counter() - start
        results.append(NotebookResult(path.name, seconds, status, output, error))
        log(f"{path.name:<32} {seconds:7.1f}s  {status}{'  ' + error if error else ''}")
        if status != "ok":
            break
    return results
