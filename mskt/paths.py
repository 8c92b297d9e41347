"""Where outputs go (repo-relative ``runs/`` and ``figures/``, never the home directory), and how
they are written: whole, to a temporary name, then renamed.

The project root is ``$MSKT_HOME`` if set, else the nearest folder at or above the working
directory that holds both ``pyproject.toml`` and ``mskt/`` (so notebooks run from ``notebooks/``
write to the same place as the CLI run from the root), else the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path


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


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
