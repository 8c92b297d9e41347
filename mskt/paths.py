"""Where outputs go (repo-relative ``runs/`` and ``figures/``; the home directory holds only the
compiled-kernel cache, ``mskt.fast.build.kernel_cache``), and how they are written: whole, to a
temporary name, then renamed.

The project root is ``$MSKT_HOME`` if set, else the nearest folder at or above the working
directory that holds both ``pyproject.toml`` and ``mskt/`` (so notebooks run from ``notebooks/``
write to the same place as the CLI run from the root), else the working directory. A relative
folder or file a notebook is given (``figures_dir``, ``run_dir``, ``data``: :func:`resolve_data_source`)
is taken from the project root (:func:`resolve_path`), not from ``notebooks/`` where papermill and JupyterLab start its kernel;
``mskt notebooks`` makes its ``--param`` paths absolute first, from where it runs, like any command.
"""

from __future__ import annotations

import os
from pathlib import Path

from mskt.errors import ConfigError, MsktError


def project_root() -> Path:
    env = os.environ.get("MSKT_HOME")
    if env:
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "mskt").is_dir():
            return folder
    return here


def runs_dir() -> Path:
    return project_root() / "runs"


def figures_dir() -> Path:
    return project_root() / "figures"


# Where a notebook's figures go when it is not told (figures_dir empty) or runs under smoke: the
# tracked figures/ that the README shows are written only by the main job (``mskt notebooks``
# without --smoke passes figures/ explicitly) or by a figures_dir the user gives.
SCRATCH_FIGURES = "runs/scratch-figures"


def resolve_path(path) -> Path:
    """``path`` made absolute: a relative one is taken from the project root, not the working folder."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else project_root() / path


def resolve_data_source(source: str) -> str:
    """A data source as a notebook is given it, for the readers: a synthetic preset
    (``synthetic:mosi?audio_shared=0.5``) as it is; a file path made absolute, a relative one from
    the project root (:func:`resolve_path`), not from ``notebooks/`` where the kernel runs."""
    source = str(source)
    if not source or source.startswith("synthetic:"):
        return source
    return str(resolve_path(source))


def notebook_figures_dir(given: str = "", smoke: bool = False) -> Path:
    """The folder a notebook saves its figures to, from its ``figures_dir`` and ``smoke`` parameters.

    Empty: ``runs/scratch-figures/`` (only an explicit folder, such as the one the main job passes,
    writes the repository's figures/). Given: that folder (relative: from the project root). Under
    smoke, a folder that is the repository's figures/ is an error: tiny-model figures would replace
    the committed ones.
    """
    if not given:
        return project_root() / SCRATCH_FIGURES
    folder = resolve_path(given)
    if smoke and folder.resolve() == figures_dir().resolve():
        raise ConfigError(f"figures_dir={given!r} ({folder}): a smoke run never writes the repository's figures/; "
                          f"give another folder, or none (then {SCRATCH_FIGURES}/)")
    return folder


# What a finished run folder holds (mskt.train writes metrics.json last, after the best checkpoint).
RUN_FILES = ("config.json", "checkpoint.pt", "metrics.json")


def is_finished_run(folder) -> bool:
    return all((Path(folder) / name).is_file() for name in RUN_FILES)


def finished_run(run_dir, key: str = "run_dir") -> Path:
    """``run_dir`` resolved (:func:`resolve_path`) if it holds a finished run; otherwise a one-line
    error naming the path as resolved, so a wrong or relative path never trains a new model in silence."""
    folder = resolve_path(run_dir)
    if is_finished_run(folder):
        return folder
    if not folder.exists():
        why = "no such folder"
    elif not folder.is_dir():
        why = "not a folder"
    else:
        missing = [name for name in RUN_FILES if not (folder / name).is_file()]
        why = f"no finished run in it (missing {', '.join(missing)})"
    raise MsktError(f"{key}={str(run_dir)!r} resolved to {folder}: {why}; expected a run folder that `mskt train` or "
                    f"02_training wrote (relative paths are taken from the project root {project_root()})")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
