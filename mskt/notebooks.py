"""Run the numbered notebooks headlessly with papermill: ``mskt notebooks [--smoke] [--only 03]``.

Each run executes ``notebooks/NN_*.ipynb`` in order into ``runs/notebooks-<time>/`` (the committed
notebooks stay clean), passes shared parameters (``smoke``, ``out_dir``, ``run_dir`` of the model
that 02_training trains into ``<out>/kt-run`` and 03/04 analyse, ``figures_dir``: ``figures/`` for
the main job, ``<out>/figures/`` under ``--smoke``, and any ``--param key=value``) to the notebooks
that declare them, and prints a summary. Parameters are checked before anything runs: a key no
notebook declares, or a value whose type differs from the declared default (``smoke=yes`` where the
notebook declares ``smoke = False``), is an error that says what is expected.

**A run never leaves figures that look complete from a notebook that failed.** Notebooks save
figures with ``mskt.viz.plots.save_figure``; while the runner executes a notebook it sets
``$MSKT_FIGURE_STAGING`` (the kernel inherits it) to ``<out>/.staging/<notebook>/``, and
save_figure writes there instead, recording each figure's final path in a manifest. Only when the
notebook has run to its last cell does the runner move the staged figures into place (``figures/``,
or the ``figures_dir`` the notebook was given), each by an atomic rename. When a notebook fails or
the run is interrupted, its staged figures are never moved: they are kept, for debugging, in
``<out>/<notebook>.failed-figures/`` beside a ``FAILED`` file saying why, and the final figures
folder holds only figures of notebooks that succeeded (in this run or an earlier one). Figures
written by other means than save_figure are not covered.

**Nobody watches a runner's kernels**: the runner sets ``$MSKT_PROGRESS=off`` for them, so no
progress bar, widget state or live curve goes into an executed notebook (plain papermill gets none
either: see :mod:`mskt.console`), and expected notes are plain stdout lines.

Every run folder gets a ``summary.json`` (rewritten atomically after each notebook): the run's
status (``running``, ``ok``, ``failed``, ``interrupted``) and, per notebook, its status, seconds,
error (the failing cell, as ``In [N]`` of the executed copy, with its first source line), executed
copy and the figures it put in place. A failing notebook stops the run; ``mskt notebooks`` then
exits with code 2, naming the notebook and the failing cell.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from mskt.console import PROGRESS_ENV
from mskt.errors import MsktError
from mskt.paths import atomic_write_text, figures_dir, is_finished_run, project_root, runs_dir
from mskt.viz.plots import STAGING_ENV, STAGING_MANIFEST


@dataclass
class NotebookResult:
    notebook: str
    seconds: float
    status: str  # "ok", "failed" or "interrupted"
    output: Path
    error: str = ""
    figures: list = field(default_factory=list)  # final paths of the figures moved into place

    def to_dict(self) -> dict:
        return {
            "notebook": self.notebook,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "output": str(self.output),
            "figures": [str(f) for f in self.figures],
        }


SMOKE_CELL_TIMEOUT_S = 300


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


_NO_DEFAULT = object()  # a parameter whose default is not a literal: any value is accepted


_ANNOTATIONS = {"bool": bool, "int": int, "float": float, "str": str, "list": list, "dict": dict}


def declared_defaults(path: Path) -> dict:
    """Name -> default value of each assignment in the notebook's cell tagged 'parameters'.

    Parameters follow papermill's typed convention, ``epochs: int = 10  # help``; the annotation,
    where it is one of bool/int/float/str/list/dict, is the parameter's type (``x: float = 1``
    declares a float), and a default that does not fit it is an error naming the parameter.
    """
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            tree = ast.parse("".join(cell["source"]))
            defaults = {}
            for node in tree.body:
                if isinstance(node, ast.Assign):
                    targets, value_node, annotation = node.targets, node.value, None
                elif isinstance(node, ast.AnnAssign) and node.value is not None:
                    targets, value_node = [node.target], node.value
                    annotation = node.annotation.id if isinstance(node.annotation, ast.Name) else None
                else:
                    continue
                try:
                    value = ast.literal_eval(value_node)
                except ValueError:
                    value = _NO_DEFAULT
                kind = _ANNOTATIONS.get(annotation)
                if kind is not None and value is not _NO_DEFAULT:
                    if kind is float and isinstance(value, int) and not isinstance(value, bool):
                        value = float(value)
                    elif not _KINDS[kind][0](value):
                        name = targets[0].id if isinstance(targets[0], ast.Name) else "?"
                        raise MsktError(f"{path.name}: parameter {name} is annotated {annotation} but its default is {value!r}")
                for t in targets:
                    if isinstance(t, ast.Name):
                        defaults[t.id] = value
            return defaults
    raise MsktError(f"{path.name}: no cell tagged 'parameters'")


def declared_parameters(path: Path) -> set:
    """Names assigned in the notebook's cell tagged 'parameters'."""
    return set(declared_defaults(path))


_KINDS = {  # declared default's type -> (accepts a value?, what to give)
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a finite number"),
    str: (lambda v: isinstance(v, str), "a string"),
    list: (lambda v: isinstance(v, (list, tuple)), "a JSON list such as [0, 1]"),
    tuple: (lambda v: isinstance(v, (list, tuple)), "a JSON list such as [0, 1]"),
    dict: (lambda v: isinstance(v, dict), 'a JSON object such as {"key": 1}'),
}


def check_params(params: dict, defaults_by_path: dict) -> None:
    """Every parameter is declared by some notebook, with a value of its declared default's type."""
    declared = set().union(*(set(d) for d in defaults_by_path.values()))
    unknown = sorted(set(params) - declared)
    if unknown:
        raise MsktError(f"--param {unknown}: no notebook declares it; parameters: {', '.join(sorted(declared))}")
    for key, value in params.items():
        for path, defaults in defaults_by_path.items():
            default = defaults.get(key, _NO_DEFAULT)
            if default is _NO_DEFAULT or default is None or type(default) not in _KINDS:
                continue
            accepts, wanted = _KINDS[type(default)]
            if not accepts(value):
                hint = ""
                if type(default) is str and not isinstance(value, str):
                    hint = f"; a value that parses as JSON is read as JSON, so quote it: --param '{key}=\"{value}\"'"
                raise MsktError(
                    f"--param {key}={value!r}: {path.name} declares {key} = {default!r}, so give {wanted}{hint}"
                )


# -- the run --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _environ(key: str, value: str):
    """``os.environ[key] = value`` for the block (papermill's kernel inherits the environment)."""
    before = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _move_into_place(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` atomically, also across file systems (copy beside dst, then rename)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        src.unlink()


def staged_figures(stage: Path) -> dict:
    """Final path -> staged file, from the stage's manifest (a figure saved twice: its last save)."""
    manifest = stage / STAGING_MANIFEST
    if not manifest.is_file():
        return {}
    staged = {}
    for line in manifest.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:  # a line cut short by a kill: that figure is not complete
            continue
        staged[Path(entry["final"])] = stage / entry["staged"]
    return staged


def commit_figures(stage: Path) -> list[Path]:
    """Move a succeeded notebook's staged figures into place; remove the stage. The final paths."""
    figures = staged_figures(stage)
    missing = [str(staged) for staged in figures.values() if not staged.is_file()]
    if missing:  # checked before anything moves: all of a notebook's figures go into place, or none
        raise MsktError(f"staged figure(s) {missing} are missing")
    moved = []
    for final, staged in figures.items():
        _move_into_place(staged, final)
        moved.append(final)
    shutil.rmtree(stage, ignore_errors=True)
    return moved


def quarantine_figures(stage: Path, dest: Path, notebook: str, reason: str) -> Path | None:
    """Keep a failed notebook's staged figures in ``dest`` with a FAILED file; None if it staged none."""
    if not staged_figures(stage):
        shutil.rmtree(stage, ignore_errors=True)
        return None
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(stage, dest)
    finals = sorted(str(f) for f in staged_figures(dest))
    (dest / "FAILED").write_text(
        f"{notebook} did not finish ({reason}).\n"
        f"These figures were saved before it stopped and were NOT moved into place; they may be stale or partial.\n"
        "They were meant for:\n" + "".join(f"  {f}\n" for f in finals)
    )
    return dest


def _cell_description(index, exec_count, source: str, ename: str, evalue: str) -> str:
    first = next((line.strip() for line in (source or "").splitlines() if line.strip()), "")
    first = first if len(first) <= 80 else first[:77] + "..."
    where = f"cell In [{exec_count}]" if exec_count is not None else f"cell {index}"
    return f"{where} `{first}` ({ename}: {_one_line(evalue)[:200]})"


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _failing_cell(output: Path) -> str:
    try:
        nb = json.loads(output.read_text())
    except (OSError, ValueError):
        return "unknown cell"
    for i, cell in enumerate(nb.get("cells", [])):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                source = "".join(cell.get("source", "")) if isinstance(cell.get("source"), list) else cell.get("source", "")
                return _cell_description(i, cell.get("execution_count"), source, out.get("ename"), out.get("evalue", ""))
    return "unknown cell"


def _absolute_paths(params: dict) -> dict:
    """Relative paths given by the caller, made absolute against the caller's working directory:
    the notebooks run in notebooks/, where ``figures_dir=figs`` or ``data=mosi_data.pkl`` would
    otherwise mean another place. A path is a ``*_dir`` value or a string naming an existing file."""
    absolute = {}
    for key, value in params.items():
        if isinstance(value, str) and value and not os.path.isabs(value) and (key.endswith("_dir") or Path(value).exists()):
            value = str(Path(value).resolve())
        elif key == "plugins" and isinstance(value, list):  # plugin files, as a shell would read them
            value = [str(Path(v).resolve()) if isinstance(v, str) and not os.path.isabs(v) and Path(v).is_file() else v for v in value]
        absolute[key] = value
    return absolute


def run_notebooks(smoke: bool = False, only=None, params: dict | None = None, out_dir=None, log=print) -> list[NotebookResult]:
    """Execute the numbered notebooks (or ``only`` those) in order; stop at the first failure.

    Returns one result per notebook that ran; ``<out_dir>/summary.json`` holds the same. See the
    module docstring for where figures go and what happens to those of a failing notebook.
    """
    if not isinstance(smoke, bool):
        raise MsktError(f"smoke must be true or false, found {smoke!r}")
    params = dict(params or {})
    paths = notebook_paths(only)
    defaults_by_path = {path: declared_defaults(path) for path in paths}
    check_params(params, defaults_by_path)

    import papermill as pm

    # Absolute: the notebooks run with notebooks/ as their working directory.
    out_dir = Path(out_dir).resolve() if out_dir else runs_dir() / f"notebooks-{datetime.now():%Y%m%d-%H%M%S}{'-smoke' if smoke else ''}"
    out_dir.mkdir(parents=True, exist_ok=True)
    # Smoke runs keep their figures beside the executed copies, so they never replace the real ones;
    # the main job is the one writer of figures/, and says so explicitly (a notebook not told where
    # writes to runs/scratch-figures/). run_dir, unless given, is set per notebook by _run_each.
    shared = {
        "smoke": smoke,
        "out_dir": str(out_dir),
        "figures_dir": str(out_dir / "figures") if smoke else str(figures_dir()),
        **_absolute_paths(params),
    }
    summary = {
        "status": "running",
        "smoke": smoke,
        "started": datetime.now().isoformat(timespec="seconds"),
        "out_dir": str(out_dir),
        "notebooks": [],
        "not_run": [p.name for p in paths],
    }
    summary_path = out_dir / "summary.json"

    def write_summary():
        atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")

    write_summary()
    with _quiet("papermill"), _kernel_sockets() as kernel_config:  # the runner prints one line per notebook; papermill's INFO lines repeat them
        results = _run_each(pm, paths, defaults_by_path, shared, out_dir, summary, write_summary, log, kernel_config)
    with contextlib.suppress(OSError):
        (out_dir / ".staging").rmdir()  # empty by now
    return results


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _kernel_sockets():
    """The kernel manager's config for this run: IPC sockets in a private temporary folder.

    Over TCP (jupyter's default) every kernel prints "Kernel is running over TCP without encryption"
    to the runner's stderr, once per notebook; over IPC (Unix sockets, which only this user can open)
    there is nothing to warn about, so the log holds only the notebooks and their times. The folder is
    short (a Unix socket path holds at most 107 bytes) and removed afterwards. Windows has no IPC
    transport: there the kernels keep TCP, and the warning.
    """
    from traitlets.config import Config

    if os.name == "nt":
        yield Config()
        return
    folder = tempfile.mkdtemp(prefix="mskt-kernel-")
    try:
        yield Config({"KernelManager": {"transport": "ipc", "ip": os.path.join(folder, "kernel")}})
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run_each(pm, paths, defaults_by_path, shared, out_dir, summary, write_summary, log, kernel_config) -> list[NotebookResult]:
    """The loop of run_notebooks: execute, then commit or quarantine the figures, then summarise."""
    results = []
    for path in paths:
        declared = defaults_by_path[path]
        given = {k: v for k, v in shared.items() if k in declared}
        if "run_dir" in declared and "run_dir" not in shared:
            # The first notebook that trains (02_training, or 03 run alone) writes <out>/kt-run; every
            # later one is handed that run. A run_dir with no run is an error in the notebooks.
            kt_run = out_dir / "kt-run"
            given["run_dir"] = str(kt_run) if is_finished_run(kt_run) else ""
        output = out_dir / path.name
        stage = out_dir / ".staging" / path.stem
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        start = time.perf_counter()
        figures = []
        interrupted = False
        try:
            # No bars: an executed notebook keeps no widget state and no progress output. Plain
            # papermill gets none either (mskt.console: nbclient's requests allow no stdin); the
            # runner says it too, so a kernel on any client, and a run's worker processes, agree.
            with _environ(STAGING_ENV, str(stage)), _environ(PROGRESS_ENV, "off"):
                pm.execute_notebook(
                    str(path), str(output), parameters=given, cwd=str(path.parent), progress_bar=False,
                    kernel_name="python3", log_output=False, config=kernel_config,
                    # A smoke cell takes seconds: one that hangs fails the run instead of stalling it.
                    execution_timeout=SMOKE_CELL_TIMEOUT_S if shared["smoke"] else None,
                )
            status, error = "ok", ""
        except pm.PapermillExecutionError as e:
            status, error = "failed", _cell_description(e.cell_index, e.exec_count, e.source, e.ename, e.evalue)
        except KeyboardInterrupt:
            status, error, interrupted = "interrupted", "interrupted", True
        except Exception as e:  # the kernel died, a timeout, a missing kernel
            status, error = "failed", f"{_failing_cell(output)}; {type(e).__name__}: {_one_line(e)[:300]}"
        if status == "ok":
            try:
                figures = commit_figures(stage)
            except (OSError, MsktError) as e:
                status, error = "failed", f"its figures could not be moved into place ({e})"
        if status != "ok":
            kept = quarantine_figures(stage, out_dir / f"{path.stem}.failed-figures", path.name, error)
            if kept is not None:
                error += f"; the figures it saved are in {kept}, not in place"
        seconds = time.perf_counter() - start
        result = NotebookResult(path.name, seconds, status, output, error, figures)
        results.append(result)
        summary["notebooks"].append(result.to_dict())
        summary["not_run"].remove(path.name)
        summary["status"] = "running" if status == "ok" else status
        write_summary()
        log(f"{path.name:<32} {seconds:7.1f}s  {status}{'  ' + error if error else ''}")
        if interrupted:
            raise KeyboardInterrupt
        if status != "ok":
            break
    if summary["status"] == "running":
        summary["status"] = "ok"
    summary["seconds"] = round(sum(r.seconds for r in results), 3)
    write_summary()
    return results


# ----------------------------------------------------------------------------------------------
# What the numbered notebooks call: the preamble they share, and the model 03 and 04 analyse.


def setup(figures_dir: str = "", smoke: bool = False, plugins=()) -> Path:
    """The preamble of every numbered notebook, run after its parameters cell; returns the folder
    its figures go to.

    - Log lines of WARNING and above print as plain lines (``mskt.fast``'s fallback note, a
      dataset's replaced non-finite values), with no logger-name prefix.
    - ``plugins`` (the notebook's parameter: module names or ``.py`` files that register variants of
      your own) are imported (:func:`mskt.plugins.load_plugins`), so ``variant=...`` may name their
      variants. A relative file is taken from the project root, like every path a notebook is given.
    - The figures folder is :func:`mskt.paths.notebook_figures_dir` of ``figures_dir`` and ``smoke``:
      empty, ``runs/scratch-figures/``; a smoke run never writes the repository's ``figures/``.
    """
    from mskt.paths import notebook_figures_dir
    from mskt.plugins import load_plugins

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    load_plugins(plugins)  # a relative file: from the working folder, else the project root (mskt.plugins.normalise)
    return notebook_figures_dir(figures_dir, smoke)


class AnalysedModel(NamedTuple):
    config: object  # mskt.config.Config: the run's, with the dataset's dims
    model: object  # the trained model, on its config's device
    dataset: object  # mskt.data.dataset.MultimodalDataset the run was trained on
    test: object  # mskt.data.batching.Tensors: its test split, on the model's device


def run_or_train(run_dir: str = "", *, variant: str = "kt", data: str = "synthetic:mosi", data_scale: float = 1.0,
                 epochs: int = 10, seed: int = 1111, smoke: bool = False, out_dir: str = "", plugins=()) -> AnalysedModel:
    """The model a notebook analyses (03, 04), with its dataset and test split on its device.

    ``run_dir`` given: the finished run in it (relative: from the project root), loaded as training
    left it; a folder with no finished run is a one-line error naming the folder as resolved (never
    a new model trained in silence). ``run_dir`` empty: a ``variant`` model trained here on ``data``
    (a relative file path: from the project root) for ``epochs`` with ``seed`` (``smoke``: the tiny
    model and data of :data:`mskt.config.SMOKE`), into ``<out_dir>/<variant>-run``, or
    ``runs/<dataset>-<variant>-seed<seed>-<time>/`` when ``out_dir`` is empty; its config records
    ``plugins`` (a loaded run's config.json names its own).
    """
    from mskt.config import SMOKE, Config
    from mskt.data.batching import Tensors
    from mskt.data.readers import load_dataset
    from mskt.paths import finished_run, resolve_data_source, resolve_path
    from mskt.train import load_run, resolve_device, train

    if run_dir:  # e.g. the run 02_training wrote (the runner passes its folder)
        cfg, model = load_run(finished_run(run_dir))
    else:
        cfg = Config.from_dict({"plugins": plugins, "data": resolve_data_source(data), "data_scale": data_scale, "variant": variant,
                                "epochs": epochs, "seed": seed, **(SMOKE if smoke else {})})
        result = train(cfg, out_dir=resolve_path(out_dir) / f"{variant}-run" if out_dir else None)
        cfg, model = result.config, result.model
    ds = load_dataset(cfg.data, scale=cfg.data_scale, seed=cfg.data_seed)
    device = resolve_device(cfg.device)
    model.to(device)
    return AnalysedModel(cfg, model, ds, Tensors.from_split(ds["test"], ds.meta.task, device))
