"""Figures of an Optuna study that ``mskt tune`` ran (notebook 07): Optuna's own matplotlib views,
in the workspace's theme and font sizes, saved with ``save_figure``."""

from __future__ import annotations

import logging
import warnings

log = logging.getLogger(__name__)


def _paper_fonts(fig) -> None:
    """The workspace's font sizes on a figure that Optuna drew in its own (ggplot) style."""
    from matplotlib.ticker import NullFormatter

    if fig._suptitle is not None:
        fig._suptitle.set_fontsize(9)
    for ax in fig.axes:
        ax.title.set_fontsize(9)
        ax.xaxis.label.set_size(8)
        ax.yaxis.label.set_size(8)
        ax.tick_params(labelsize=7)
        for text in ax.texts:
            text.set_fontsize(7)
        if ax.get_legend() is not None:
            for text in ax.get_legend().get_texts():
                text.set_fontsize(7)
        if ax.get_xscale() == "log":  # the minor ticks' labels of a short log axis overlap
            ax.xaxis.set_minor_formatter(NullFormatter())


def plot_study(st, figures=None, prefix: str = "07") -> dict:
    """Optuna's matplotlib views of the study in the workspace's theme, each saved with
    save_figure: optimisation history, parameter importances (when at least two complete trials
    differ), and a slice plot of the most important parameters. Returns {name: figure}."""
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as ovm
    from optuna.trial import TrialState

    from mskt.viz.plots import save_figure, theme

    figs = {}
    complete = [t for t in st.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    with warnings.catch_warnings(), theme():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib views experimental
        ax = ovm.plot_optimization_history(st, target_name="validation loss")
        ax.figure.set_size_inches(5.5, 3.0)
        figs[f"{prefix}_optimization_history"] = ax.figure
        params = sorted({k for t in complete for k in t.params})
        importances = {}
        if len(complete) >= 2 and params:
            try:
                importances = optuna.importance.get_param_importances(st, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
            except (RuntimeError, ValueError) as e:  # e.g. every complete trial has the same parameters
                log.info("no parameter importances: %s", e)
        if importances:
            ax = ovm.plot_param_importances(st, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), target_name="validation loss")
            ax.figure.set_size_inches(5.5, max(2.5, 0.22 * len(importances)))
            figs[f"{prefix}_param_importances"] = ax.figure
        top = list(importances)[:3] or params[:3]
        if complete and top:
            axes = ovm.plot_slice(st, params=top, target_name="validation loss")
            fig = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            fig.set_size_inches(2.6 * len(top) + 0.8, 2.6)
            panels = list(axes.flat) if hasattr(axes, "flat") else [axes]
            fig.subplots_adjust(left=0.08, right=0.86, bottom=0.2, top=0.85, wspace=0.25)
            for cax in (a for a in fig.axes if a not in panels):  # Optuna's trial-number colour bar
                cax.set_position([0.89, 0.2, 0.015, 0.65])
            figs[f"{prefix}_slice"] = fig
        for name, fig in figs.items():
            _paper_fonts(fig)
            if name != f"{prefix}_slice":  # tight_layout would put the slice plot's colour bar over a panel
                fig.tight_layout()
            save_figure(fig, name, figures)
            plt.close(fig)
    return figs
