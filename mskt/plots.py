"""Figures: one seaborn theme, and saving as PDF (embedded TrueType fonts) and PNG.

Every plotting function returns a matplotlib Figure; notebooks display and save them. Importing this
module changes no global state: ``theme()`` is a context manager the notebooks enter.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

# Column width of a two-column paper is ~3.4 in; full width ~7 in.
COLUMN_WIDTH = 3.4
FULL_WIDTH = 7.0

_RC = {
    "pdf.fonttype": 42,  # TrueType, embedded: editable text, accepted by publishers
    "ps.fonttype": 42,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "figure.dpi": 100,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
}


@contextlib.contextmanager
def theme():
    """The workspace's one look: seaborn's whitegrid, colorblind palette, paper-size fonts."""
    import matplotlib as mpl
    import seaborn as sns

    with mpl.rc_context():
        sns.set_theme(context="paper", style="whitegrid", palette="colorblind", rc=_RC)
        yield


def save_figure(fig, name: str, folder=None) -> list[Path]:
    """Save ``fig`` as ``<folder>/<name>.pdf`` and ``.png`` (default folder: the repo's figures/)."""
    import matplotlib as mpl

    from mskt.paths import figures_dir

    folder = Path(folder) if folder is not None else figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with mpl.rc_context(_RC):
        for ext in ("pdf", "png"):
            path = folder / f"{name}.{ext}"
            tmp = path.with_name(f".{path.name}.tmp.{ext}")  # renamed into place: never half a figure
            fig.savefig(tmp, format=ext)
            tmp.replace(path)
            paths.append(path)
    return paths
