"""A live training curve for a notebook: the loss terms and the validation metric, redrawn after
every epoch into one output while the run trains.

``train(cfg, on_epoch=live_history())`` in a notebook cell. Where nobody watches (papermill,
``mskt notebooks``, CI: the rule of :mod:`mskt.console`) ``live_history()`` is None, so an executed
notebook holds only the final figure the notebook draws and saves after training.
"""

from __future__ import annotations

import io

from mskt.console import progress_enabled
from mskt.viz import plots


class LiveHistory:
    """An ``on_epoch`` hook for :func:`mskt.train.train`: after each epoch it redraws
    :func:`mskt.viz.plots.plot_history` of the epochs so far into one display handle, so the
    notebook shows one figure that changes rather than one per epoch. ``history`` (a run's
    history.csv as a DataFrame, or rows) starts it with earlier epochs, for a resumed run."""

    def __init__(self, history=None):
        records = history.to_dict("records") if hasattr(history, "to_dict") else list(history or [])
        self.rows = {int(r["epoch"]): dict(r) for r in records}  # by epoch: a resumed epoch replaces the one it redoes
        self.handle = None
        self.draws = 0

    def figure(self):
        import pandas as pd

        with plots.theme():
            return plots.plot_history(pd.DataFrame([self.rows[e] for e in sorted(self.rows)]))

    def png(self) -> bytes:
        fig = self.figure()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")  # the size a notebook shows it at
        return buffer.getvalue()

    def __call__(self, epoch: int, row: dict) -> None:
        from IPython.display import Image, display

        self.rows[int(epoch)] = dict(row)
        image = Image(data=self.png(), format="png")
        if self.handle is None:
            self.handle = display(image, display_id=True)
        else:
            self.handle.update(image)
        self.draws += 1
        return None  # never asks train to stop


def live_history(setting: str = "auto", history=None) -> LiveHistory | None:
    """The ``on_epoch`` hook of a notebook's training cell: a :class:`LiveHistory` where a person
    watches (``setting`` is a config's ``progress``: "auto", "on", "off"), else None."""
    return LiveHistory(history) if progress_enabled(setting) else None
