"""Your own variants without editing mskt: plugins.

A plugin is a Python module, named as it is imported (``my_lab.variants``) or as a file path
(``~/ideas/kt_gru.py``), that registers variants (``@register("kt_gru")``) when imported. A run's
config lists them (``plugins``; ``--plugin`` on the command line; the ``plugins`` parameter of
every notebook), ``config.json`` records them, and whatever reads that config imports them first:
``train``, ``load_run`` and ``mskt evaluate``, grid and tune workers, the bench, ``mskt notebooks``
and the explorer. File paths are recorded absolute, so a run can be read back from any folder.

Installed packages register variants through the entry-point group ``mskt.variants`` instead
(``[project.entry-points."mskt.variants"] kt_gru = "my_lab.kt_gru"``); those load with mskt's own.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from mskt.errors import ConfigError

ENTRY_POINT_GROUP = "mskt.variants"
_loaded_entry_points = False


def is_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def normalise(spec: str) -> str:
    """A module name as given; a file path made absolute, so that the recorded config imports the
    same file from anywhere. A relative path is taken from the working folder, as a shell reads it,
    and where no such file is there, from the project root: a notebook's kernel runs in notebooks/,
    and every other path a notebook is given is taken from the project root."""
    spec = spec.strip()
    if not spec:
        raise ConfigError("plugins: an empty entry; give a module name (my_lab.variants) or a .py file path")
    if not is_path(spec):
        return spec
    path = Path(spec).expanduser()
    if not path.is_absolute() and not path.exists():
        from_root = _project_root() / path
        if from_root.exists():
            return str(from_root.resolve())
    return str(path.resolve())


def _project_root() -> Path:
    """mskt.paths.project_root, read lazily: plugins imports nothing of mskt but its errors at load."""
    import mskt.paths

    return mskt.paths.project_root()


def module_name_for(path: Path) -> str:
    """A stable module name for a plugin file: its stem and a digest of its absolute path (two
    files with one stem in different folders stay two modules)."""
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    return f"mskt_plugin_{path.stem}_{digest}"


def load_plugin(spec: str) -> str:
    """Import one plugin (once per process); returns its module name."""
    spec = normalise(spec)
    if not is_path(spec):
        try:
            importlib.import_module(spec)
        except Exception as e:  # the plugin's own error, in one line
            raise ConfigError(f"plugins: cannot import {spec!r} ({type(e).__name__}: {e})") from None
        return spec
    path = Path(spec)
    name = module_name_for(path)
    if name in sys.modules:
        return name
    if not path.is_file():
        raise ConfigError(f"plugins: {path}: no such file (a plugin is a module name or a .py file)")
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before exec: dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except ConfigError:
        del sys.modules[name]
        raise
    except Exception as e:
        del sys.modules[name]
        raise ConfigError(f"plugins: {path}: cannot import ({type(e).__name__}: {e})") from None
    return name


def load_plugins(specs) -> tuple:
    """Import each plugin of ``specs`` (a list, or a comma-separated string); returns them normalised."""
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    out = tuple(normalise(s) for s in specs)
    for spec in out:
        load_plugin(spec)
    return out


def load_entry_points() -> list:
    """Import every installed package's ``mskt.variants`` entry point (once per process)."""
    global _loaded_entry_points
    if _loaded_entry_points:
        return []
    _loaded_entry_points = True
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"entry point {ep.name} = {ep.value!r} (group {ENTRY_POINT_GROUP}): cannot import ({type(e).__name__}: {e})") from None
        loaded.append(ep.value)
    return loaded
