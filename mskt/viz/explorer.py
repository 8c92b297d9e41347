"""An interactive robustness explorer: pick a sample, switch modalities off, and see the prediction,
the reconstructed features against the real ones, and the cross-modal attention, live.

``sample_view`` computes one view (numbers only); ``describe`` writes its predictions as a line of
text; ``mskt.viz.plots.plot_sample_view`` draws it; and ``explorer`` wires them into an ipywidgets
control for JupyterLab. Headless (papermill), notebooks draw ``plot_sample_view`` for a few samples
and patterns instead.

Reconstructions are shown for what the model reconstructs and reads out to the features
(``model.reconstructs``, ``model.read_out``: kt_any any missing modality, kt audio, always); for
other variants a missing modality is zero-filled and only the prediction and attention change. The real features of a missing modality are read here for display only: the
model's forward pass never sees them (``batch["missing"]``).
"""

from __future__ import annotations

import html

import numpy as np
import torch

from mskt.data.missing import parse_missing
from mskt.data.presets import label_range
from mskt.model import MODALITIES, MulT, resample
from mskt.train import Tensors


def _r2(pred: np.ndarray, target: np.ndarray) -> float:
    """1 - SSE / SST about zero (the training mean of standardised features)."""
    return float(1.0 - ((pred - target) ** 2).sum() / max(float((target**2).sum()), 1e-12))


@torch.inference_mode()
def sample_view(model: MulT, data: Tensors, index: int, missing=()) -> dict:
    """One sample of ``data`` with the modalities ``missing`` (names, or "audio,vision") missing.

    Returns {"index", "missing", "variant", "task", "label", "pred" (with the pattern), "pred_full"
    (nothing missing), "views" {modality: {"real", "reconstructed" (T, D) standardised features on
    the reconstruction's real steps, "r2"}}, "attention" {"s->t": (heads, T_t, S) of the last layer},
    "lengths" {modality: real steps of the grid its features live on}}.
    """
    model.eval()
    cfg = model.cfg
    missing = parse_missing(missing)
    # What the model rebuilds without ever reading it (kt's audio) is reconstructed whatever is given.
    always = tuple(m for m in model.reconstructs if m not in model.inputs)
    missing = tuple(m for m in MODALITIES if m in missing or m in always)
    idx = torch.as_tensor([int(index)], device=data.labels.device)
    batch = data.batch(idx)
    mask = torch.tensor([[m in missing for m in MODALITIES]], device=data.labels.device)
    # Attention maps where the model has them (MCTN's LSTMs have none: the view shows no maps).
    out = model({**batch, "missing": mask}, return_attention=model.has_attention, return_internals=True)
    full = model({**batch, "missing": torch.zeros_like(mask)})

    grid = {m: (out.lengths or {}).get(m, batch["lengths"][m]) for m in MODALITIES}  # as the forward used them
    views = {}
    for m in missing:
        key = f"{m}_reconstruction"
        rec = model.read_out(m, out.internals[key]) if m in model.reconstructs and key in out.internals else None
        if rec is None:  # zero-filled, or reconstructed in another space than the features
            continue
        real = model.standardised(m, batch[m], batch["lengths"][m])  # (1, T_raw, D_m): display only
        length = grid[m]
        T = rec.shape[1]
        if real.shape[1] != T:
            real = resample(real, batch["lengths"][m], T, length)
        n = int(length.clamp(min=1, max=T)[0])
        r, p = real[0, -n:].float().cpu().numpy(), rec[0, -n:].float().cpu().numpy()  # (n, D_m)
        views[m] = {"real": r, "reconstructed": p, "r2": _r2(p, r)}
    lengths = {m: int(grid[m][0]) for m in MODALITIES}
    attention = {k: w[-1][0].float().cpu().numpy() for k, w in (out.attention or {}).items()}
    label = batch["labels"][0].cpu().numpy()
    return {
        "index": int(index), "missing": missing, "variant": cfg.variant, "task": cfg.task,
        "label_range": label_range(getattr(cfg, "dataset", "auto")),
        "label": label, "pred": out.pred[0].float().cpu().numpy(), "pred_full": full.pred[0].float().cpu().numpy(),
        "views": views, "attention": attention, "lengths": lengths,
    }


def describe(view: dict) -> str:
    """One line of text for a ``sample_view``: what is missing (reconstructed or zero-filled), the
    prediction with that pattern, with nothing missing, and the label. The explorer shows it above the
    figure, so the numbers can be read (and copied) exactly."""
    from mskt.viz.plots import SYMBOL, emotion_probabilities

    missing = ", ".join(SYMBOL[m] + ("′ reconstructed" if m in view["views"] else " zero-filled") for m in view["missing"])
    if view["task"] == "regression":
        pred, full, label = (f"{float(view[k]):+.4f}" for k in ("pred", "pred_full", "label"))
    else:
        from mskt.data.presets import EMOTIONS

        def fmt(values):
            return " ".join(f"{e} {v:.4f}" for e, v in zip(EMOTIONS, values))

        pred, full = fmt(emotion_probabilities(view["pred"])), fmt(emotion_probabilities(view["pred_full"]))
        label = fmt(np.asarray(view["label"], dtype=float))
    return (
        f"test sample {view['index']} · missing: {missing or 'nothing'} · prediction {pred} · "
        f"nothing missing {full} · label {label}"
    )


def explorer(model: MulT, data: Tensors, samples=None):
    """An ipywidgets control: a sample picker and one toggle per modality; every change re-runs the
    model on that sample, rewrites the line of ``describe`` and redraws ``plot_sample_view``.
    ``samples``: indices to offer (default all). Its parts carry CSS classes ``mskt-explorer``,
    ``mskt-explorer-sample``, ``mskt-explorer-toggle-<modality>``, ``mskt-explorer-prediction`` and
    ``mskt-explorer-figure``."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    from mskt.viz import plots

    samples = list(range(len(data))) if samples is None else [int(s) for s in samples]
    picker = widgets.Dropdown(options=[(f"test sample {s}", s) for s in samples], description="sample")
    toggles = {m: widgets.ToggleButton(value=m != "audio", description=f"{plots.SYMBOL[m]} ({m})", tooltip=f"{m} present") for m in MODALITIES}
    text = widgets.HTML()
    out = widgets.Output()
    # Stable hooks for tests and user CSS (tests/test_browser.py clicks these in JupyterLab).
    picker.add_class("mskt-explorer-sample")
    for m, t in toggles.items():
        t.add_class(f"mskt-explorer-toggle-{m}")
    text.add_class("mskt-explorer-prediction")
    out.add_class("mskt-explorer-figure")

    def redraw(*_):
        missing = tuple(m for m in MODALITIES if not toggles[m].value)
        with out:
            out.clear_output(wait=True)
            if len(missing) == len(MODALITIES):
                text.value = "At least one modality must be present."
                return
            view = sample_view(model, data, picker.value, missing)
            text.value = html.escape(describe(view))
            with plots.theme():
                fig = plots.plot_sample_view(view)
            display(fig)
            plt.close(fig)

    picker.observe(redraw, names="value")
    for t in toggles.values():
        t.observe(redraw, names="value")
    redraw()
    box = widgets.VBox([widgets.HBox([picker, *toggles.values()]), text, out])
    box.add_class("mskt-explorer")
    return box
