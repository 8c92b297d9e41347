"""What a person sees while mskt works: progress bars where someone watches, expected notes as plain lines.

**Who watches.** ``progress="auto"`` (the run config's default) shows tqdm bars when :func:`watched`
says so, by the first rule that applies:

1. ``$MSKT_PROGRESS`` is ``on`` or ``off``: it decides. ``mskt notebooks`` sets ``off`` for the
   kernels it starts, so its executed notebooks hold no progress output and no widget state.
2. In a Jupyter kernel (ipykernel): bars when the cell being run came from a frontend that takes
   input, that is, whose execute request allows stdin. JupyterLab, Jupyter Notebook and VS Code send
   that; papermill, ``jupyter nbconvert --execute`` and anything else on nbclient do not (nbclient
   sets ``allow_stdin = False``), so plain papermill shows no bars either. The bars are tqdm's
   notebook widgets (``tqdm.auto``).
3. Anywhere else (a script, the ``mskt`` command): bars when stderr is a terminal and ``$CI`` is
   not set, as before.

``progress="on"`` or ``"off"`` in the config overrides all of this for that run.

**Notes, not alarms.** :func:`note` is for what is expected and needs no action (non-finite values
replaced by 0, a one-time kernel build). It logs at INFO, which the ``mskt`` command shows as a plain
line; in a Jupyter kernel whose logging would not show INFO (the notebooks configure WARNING), it
also prints the line on stdout, so the notebook shows one plain line rather than a red stderr box.
What needs action stays a warning.

This module imports nothing of mskt: every package may use it.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys

PROGRESS_ENV = "MSKT_PROGRESS"

# How many outer bars (runs of a grid, a sweep's runs, a study's trials) are open around this code:
# an inner bar (a run's epochs) then goes away when done, so a grid leaves one bar, not one per run.
_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("mskt_progress_depth", default=0)


def jupyter_kernel():
    """The running ipykernel kernel object, or None outside a Jupyter kernel."""
    if "ipykernel" not in sys.modules:  # never import IPython just to ask
        return None
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    return getattr(shell, "kernel", None) if shell is not None else None


def frontend_takes_input(kernel) -> bool:
    """Whether the request the kernel is running allows stdin: a person's frontend, not nbclient."""
    try:
        request = kernel.get_parent("shell")  # ipykernel >= 6: the execute request being run
    except Exception:  # an older or foreign kernel: the flag ipykernel keeps for input()
        return bool(getattr(kernel, "_allow_stdin", False))
    return bool((request or {}).get("content", {}).get("allow_stdin", False))


def watched() -> bool:
    """Whether a person watches this process's output (the rules in the module docstring)."""
    setting = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if setting in ("on", "off"):
        return setting == "on"
    kernel = jupyter_kernel()
    if kernel is not None:
        return frontend_takes_input(kernel)
    return sys.stderr.isatty() and not os.environ.get("CI")


def progress_enabled(setting: str) -> bool:
    """A config's ``progress`` ("auto", "on", "off") for this process."""
    if setting != "auto":
        return setting == "on"
    return watched()


def progress_bar(iterable=None, *, desc: str, total=None, setting: str = "auto", unit: str = "it"):
    """A tqdm bar (notebook widgets in a Jupyter kernel, text on a terminal), disabled where nobody
    watches. Inside an :func:`outer_progress` it disappears when done."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not progress_enabled(setting), leave=_DEPTH.get() == 0)


@contextlib.contextmanager
def outer_progress(total: int, desc: str, setting: str = "auto", unit: str = "run"):
    """An outer bar (yielded) over the runs of a grid, a sweep or a study's trials; the runs' own
    epoch bars inside it go away when done. Inside another outer bar (a sweep's grids) it is
    disabled: only the outermost shows."""
    bar = progress_bar(desc=desc, total=total, setting=setting if _DEPTH.get() == 0 else "off", unit=unit)
    depth = _DEPTH.set(_DEPTH.get() + 1)
    try:
        yield bar
    finally:
        _DEPTH.reset(depth)
        bar.close()


def note(logger: logging.Logger, msg: str, *args) -> None:
    """An expected note (no action needed): INFO in the log; in a Jupyter kernel that would not show
    it, also one plain line on stdout."""
    logger.info(msg, *args)
    if jupyter_kernel() is not None and not logger.isEnabledFor(logging.INFO):
        print(msg % args if args else msg, file=sys.stdout, flush=True)
