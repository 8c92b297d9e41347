"""Figures: one seaborn theme, and saving as PDF (embedded TrueType fonts) and PNG.

Every plotting function returns a matplotlib Figure; notebooks display and save them. Importing this
module changes no global state: ``theme()`` is a context manager the notebooks enter.
"""

from __future__ import annotations

import contextlib
import json
import os
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


# Set by ``mskt notebooks`` for each notebook it runs (see mskt.notebooks): a folder where
# save_figure stages the figures instead of writing them in place. The runner moves them into place
# only after the whole notebook succeeded, so a failing notebook never leaves figures that look done.
STAGING_ENV = "MSKT_FIGURE_STAGING"
STAGING_MANIFEST = "manifest.jsonl"  # one {"staged": file name, "final": absolute path} per line


def save_figure(fig, name: str, folder=None) -> list[Path]:
    """Save ``fig`` as ``<folder>/<name>.pdf`` and ``.png`` (default folder: the repo's figures/).

    Each file is written to a temporary name and renamed into place, so no file is ever half a
    figure. Under ``mskt notebooks`` (``$MSKT_FIGURE_STAGING`` set) the files go to that staging
    folder instead, and the runner moves them to ``<folder>`` once the notebook has run to the end;
    the returned paths are always the final ones.
    """
    import matplotlib as mpl

    from mskt.paths import figures_dir

    folder = Path(folder) if folder is not None else figures_dir()
    staging = os.environ.get(STAGING_ENV)
    if not staging:
        folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with mpl.rc_context(_RC):
        for ext in ("pdf", "png"):
            path = folder / f"{name}.{ext}"
            target = _staged_path(Path(staging), path) if staging else path
            tmp = target.with_name(f".{target.name}.tmp.{ext}")  # renamed into place: never half a figure
            fig.savefig(tmp, format=ext)
            tmp.replace(target)
            if staging:
                with open(Path(staging) / STAGING_MANIFEST, "a") as manifest:
                    manifest.write(json.dumps({"staged": target.name, "final": str(path.resolve())}) + "\n")
            paths.append(path)
    return paths


def _staged_path(staging: Path, final: Path) -> Path:
    """Where the staged copy of ``final`` lives: one file per final path (a figure saved twice keeps
    its last version), named so that two folders' figures of the same name never collide."""
    import hashlib

    final = final.resolve()
    staging.mkdir(parents=True, exist_ok=True)
    return staging / f"{hashlib.sha1(str(final).encode()).hexdigest()[:12]}-{final.name}"


def _legend_below(fig, *axes, ncol=4):
    """One legend for the figure, below the axes, so it never covers data."""
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes:
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol, frameon=False)


def _fig(width=COLUMN_WIDTH, height=2.4, ncols=1, nrows=1, **kw):
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width, height), layout="constrained", **kw)


SYMBOL = {"text": "L", "vision": "V", "audio": "A"}


def _symbol(modality: str, reconstructed: bool) -> str:
    return "A′" if modality == "audio" and reconstructed else SYMBOL[modality]


# ----------------------------------------------------------------------------------------------
# 01 data exploration


def plot_label_distribution(dataset):
    """Histogram of sentiment per split (regression) or positive rate per emotion and split."""
    import numpy as np
    import pandas as pd
    import seaborn as sns

    from mskt.data.presets import EMOTIONS

    fig, ax = _fig()
    if dataset.meta.task == "regression":
        df = pd.concat([pd.DataFrame({"sentiment": np.asarray(sp.labels), "split": s}) for s, sp in dataset.splits.items()])
        from mskt.data.presets import label_range

        lo, hi = label_range(dataset.meta.name)
        half = (hi - lo) / 24  # 13 bins centred on lo, lo + (hi - lo) / 12, ..., hi: MOSI's half-points
        sns.histplot(df, x="sentiment", hue="split", stat="density", common_norm=False, element="step", bins=np.arange(lo - half, hi + 2 * half, 2 * half), ax=ax)
        ax.set_xlabel(f"sentiment label ({lo:g} … {hi:g})".replace("-", "−"))
        ax.set_ylabel("density")
    else:
        rows = [{"split": s, "emotion": e, "positive rate": float(np.asarray(sp.labels)[:, i].mean())} for s, sp in dataset.splits.items() for i, e in enumerate(EMOTIONS)]
        sns.barplot(pd.DataFrame(rows), x="emotion", y="positive rate", hue="split", ax=ax)
        ax.set_ylabel("fraction of samples with the emotion")
    kind = "synthetic " if dataset.meta.format == "synthetic" else ""
    ax.set_title(f"Labels: {kind}{dataset.meta.name} ({'aligned' if dataset.meta.aligned else 'unaligned'})")
    return fig


def plot_lengths(dataset):
    """Distribution of true (unpadded) sequence lengths, one panel per modality (training split):
    unaligned modalities have very different numbers of steps."""
    import numpy as np

    sp = dataset["train"]
    fig, axes = _fig(FULL_WIDTH, 2.0, ncols=len(sp.lengths))
    for ax, (m, lengths) in zip(np.atleast_1d(axes), sp.lengths.items()):
        lengths = np.asarray(lengths)
        steps = sp.features[m].shape[1]
        width = max(1, int(np.ceil(steps / 40)))  # integer-wide bins: lengths are whole steps
        ax.hist(lengths, bins=np.arange(0, steps + width + 1, width) - 0.5, color="C0")
        ax.set_xlabel(f"true length ({m} steps)")
        ax.set_ylabel("training samples")
        ax.set_title(f"{m}: up to {steps} steps")
    fig.suptitle("True sequence lengths (padding excluded)", fontsize=9)
    return fig


def plot_feature_statistics(dataset, max_dims: int = 40):
    """Mean and standard deviation of every feature over real steps (training split), per modality."""
    import numpy as np

    sp = dataset["train"]
    mods = list(sp.features)
    fig, axes = _fig(FULL_WIDTH, 2.2, ncols=len(mods))
    for ax, m in zip(np.atleast_1d(axes), mods):
        x = np.asarray(sp.features[m])
        mask = np.arange(x.shape[1])[None, :] >= (x.shape[1] - np.asarray(sp.lengths[m]))[:, None]
        real = x[mask][:, :max_dims]  # (n_real_steps, D)
        dims = np.arange(real.shape[1])
        ax.errorbar(dims, real.mean(axis=0), yerr=real.std(axis=0), fmt="o", ms=2, lw=0.6)
        ax.set_xlabel(f"{m} feature index" + (f" (first {max_dims})" if x.shape[2] > max_dims else ""))
        ax.set_ylabel("value (mean ± sd)")
        ax.set_title(f"{m}: {x.shape[2]} features")
    return fig


def plot_modality_correlation(dataset):
    """How the modalities and the label relate: correlations between time-pooled features' first
    principal components and the label (training split)."""
    import numpy as np
    import seaborn as sns

    sp = dataset["train"]
    cols, names = [], []
    for m in sp.features:
        x = np.asarray(sp.features[m])
        mask = (np.arange(x.shape[1])[None, :] >= (x.shape[1] - np.asarray(sp.lengths[m]))[:, None])[..., None]
        pooled = (x * mask).sum(1) / np.maximum(mask.sum(1), 1)  # (N, D): mean over real steps
        pooled = pooled - pooled.mean(0)
        _, _, vt = np.linalg.svd(pooled, full_matrices=False)
        for k in range(2):
            cols.append(pooled @ vt[k])
            names.append(f"{m} PC{k + 1}")
    labels = np.asarray(sp.labels, dtype=float)
    if labels.ndim == 1:
        cols.append(labels)
        names.append("label")
    corr = np.corrcoef(np.stack(cols))
    fig, ax = _fig(COLUMN_WIDTH, 3.0)
    sns.heatmap(corr, vmin=-1, vmax=1, cmap="vlag", annot=True, fmt=".2f", annot_kws={"size": 5}, xticklabels=names, yticklabels=names,
                cbar_kws={"label": "Pearson r"}, ax=ax)
    ax.set_title("Time-pooled features: principal components vs label")
    return fig


# ----------------------------------------------------------------------------------------------
# 02 training


def plot_history(history):
    """Every loss term per epoch, train (solid) and validation (dashed), and the selected epoch."""
    import matplotlib.pyplot as plt

    terms = [c.removeprefix("train_") for c in history.columns if c.startswith("train_") and c != "train_samples_per_s"]
    fig, axes = _fig(FULL_WIDTH, 2.3, ncols=2)
    ax = axes[0]
    for term in terms:
        if term in ("total",):
            continue
        ax.plot(history["epoch"], history[f"train_{term}"], label=f"train {term}")
    ax.plot(history["epoch"], history["valid_loss"], "k--", label="valid task")
    best = history.loc[history["valid_loss"].idxmin(), "epoch"] if "selected" not in history else history.loc[history["selected"], "epoch"].max()
    for a in axes:
        a.axvline(best, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("Loss terms (dotted line: selected epoch)")
    _legend_below(fig, ax, ncol=3)
    ax = axes[1]
    metric, label = ("valid_mae", "validation MAE") if "valid_mae" in history else ("valid_mean_f1", "validation mean F1")
    ax.plot(history["epoch"], history[metric], marker="o", ms=2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(label)
    ax.set_title("Validation metric")
    plt.close(fig)
    return fig


# ----------------------------------------------------------------------------------------------
# 03 reconstruction quality


def plot_quality_summary(summary):
    """R^2 and cosine similarity of A' (from V, from L, fused) against trivial baselines."""
    import seaborn as sns

    names = {"A' from vision": "A′ from V (θ)", "A' from text": "A′ from L (φ)", "A' from fused": "A′ fused (δ)"}
    summary = summary.assign(reconstruction=summary["reconstruction"].map(lambda r: names.get(r, r)))
    fig, axes = _fig(FULL_WIDTH, 2.2, ncols=2)
    order = list(summary["reconstruction"])
    sns.barplot(summary, y="reconstruction", x="r2", order=order, ax=axes[0])
    axes[0].axvline(0, color="k", lw=0.6)
    axes[0].set_xlabel("R² against real audio (0 = training mean)")
    axes[0].set_ylabel("")
    axes[0].set_title("Variance of audio explained")
    sns.barplot(summary.dropna(subset=["cosine"]), y="reconstruction", x="cosine", ax=axes[1])
    axes[1].axvline(0, color="k", lw=0.6)
    for ax in axes:  # values near 0 have no visible bar: print every value
        ax.bar_label(ax.containers[0], fmt="%.2f", fontsize=6, padding=2)
        ax.margins(x=0.15)
    axes[1].set_xlabel("mean cosine similarity per step")
    axes[1].set_ylabel("")
    axes[1].set_title("Direction of the audio vector")
    return fig


def plot_error_breakdown(per_dim, per_position):
    """Reconstruction MSE per audio feature and per relative position in the utterance."""
    import seaborn as sns

    fig, axes = _fig(FULL_WIDTH, 2.3, ncols=2)
    sns.barplot(per_dim, x="feature", y="mse", hue="source", ax=axes[0])
    axes[0].set_xlabel("audio feature")
    axes[0].set_ylabel("MSE (standardised units)")
    axes[0].set_title("Error per feature dimension")
    axes[0].tick_params(axis="x", rotation=90)
    sns.lineplot(per_position, x="position", y="mse", hue="source", marker="o", ax=axes[1])
    axes[1].set_xlabel("relative position in the utterance (0 = start, 1 = end)")
    axes[1].set_ylabel("MSE (standardised units)")
    axes[1].set_title("Error per time step")
    _legend_below(fig, axes[1], *axes, ncol=3)
    return fig


def plot_reconstruction_examples(rec, samples=(0, 1), feature: int = 0, feature_name: str | None = None):
    """Real audio and A' (from V, from L, fused) over time for a few samples, one feature."""
    import numpy as np

    fig, axes = _fig(FULL_WIDTH, 2.0, ncols=len(samples), squeeze=False)
    name = feature_name or f"audio feature {feature}"
    for ax, i in zip(axes[0], samples):
        r = rec["fused"]
        steps = np.flatnonzero(r["mask"][i])
        ax.plot(steps - steps[0], r["target"][i, steps, feature], "k-", lw=1.2, label="real A")
        for source, style in (("fused", "-"), ("text", "--"), ("vision", ":")):
            s = rec[source]
            st = np.flatnonzero(s["mask"][i])
            x = (st - st[0]) * (len(steps) / max(len(st), 1))  # on the text grid's step scale
            ax.plot(x, s["pred"][i, st, feature], style, lw=1, label=f"A' {source}")
        ax.set_xlabel("real step (text grid)")
        ax.set_ylabel(f"{name} (standardised)")
        ax.set_title(f"test sample {i}")
    _legend_below(fig, *axes[0])
    return fig


def plot_projection(rec, max_points: int = 3000, seed: int = 0):
    """A 2-D PCA projection (fitted on real audio) of real audio steps and A' steps."""
    import numpy as np

    r = rec["fused"]
    real, recon = r["target"][r["mask"]], r["pred"][r["mask"]]
    rng = np.random.default_rng(seed)
    take = rng.choice(len(real), size=min(max_points, len(real)), replace=False)
    mean = real.mean(0)
    _, _, vt = np.linalg.svd(real - mean, full_matrices=False)
    fig, ax = _fig(COLUMN_WIDTH, 2.8)
    for x, label, alpha in ((real[take], "real A", 0.35), (recon[take], "A' (fused)", 0.35)):
        p = (x - mean) @ vt[:2].T
        ax.scatter(p[:, 0], p[:, 1], s=2, alpha=alpha, label=label)
    ax.set_xlabel("PC 1 of real audio")
    ax.set_ylabel("PC 2 of real audio")
    ax.set_title("Audio steps, real and reconstructed")
    ax.legend(frameon=False, markerscale=4)
    return fig


def plot_error_relation(per_sample):
    """Per test sample: reconstruction MSE of A' against the absolute prediction error."""
    import numpy as np

    fig, ax = _fig(COLUMN_WIDTH, 2.6)
    ax.scatter(per_sample["reconstruction_mse"], per_sample["prediction_error"], s=4, alpha=0.5)
    r = np.corrcoef(per_sample["reconstruction_mse"], per_sample["prediction_error"])[0, 1]
    ax.set_xlabel("reconstruction MSE of A' (standardised units)")
    ax.set_ylabel("|prediction − label|")
    ax.set_title(f"Reconstruction vs prediction error (r = {r:.2f})")
    return fig


# ----------------------------------------------------------------------------------------------
# 04 attention maps


def plot_attention(maps: dict, sample: int = 0, layer: int = 0, head: int | None = None, directions=None,
                   lengths: dict | None = None, reconstructed_audio: bool = True, title: str | None = None,
                   relative: bool = False):
    """Cross-modal attention of one sample: a heatmap per direction (source → target) for one layer,
    one head or the mean over heads. ``maps``: {"source->target": list over layers of (B, h, T, S)}.
    With ``lengths`` ({modality: (B,)}: the real steps of each grid as the forward used it, as
    ``analysis.attention_maps`` gives them), each map is cropped to the sample's real steps.
    ``reconstructed_audio`` labels audio as A′ (reconstructed) rather than A (real).
    ``relative=True`` draws maps from ``mskt.viz.analysis.average_attention`` (relative positions, weight
    relative to uniform, centred on 1)."""
    import numpy as np

    directions = directions or [k for k in maps if k.split("->")[0] != k.split("->")[1]]
    ncols = min(3, len(directions))
    nrows = (len(directions) + ncols - 1) // ncols
    fig, axes = _fig(FULL_WIDTH, 2.0 * nrows + 0.3, ncols=ncols, nrows=nrows, squeeze=False)
    for ax in axes.flat[len(directions):]:
        ax.set_visible(False)

    def real_steps(modality, n):
        if lengths is None:
            return n
        return int(max(1, min(n, lengths[modality][sample])))

    for ax, key in zip(axes.flat, directions):
        w = np.asarray(maps[key][layer][sample])  # (h, T, S)
        w = w.mean(0) if head is None else w[head]  # (T, S)
        source, target = key.split("->")
        t, s = real_steps(target, w.shape[0]), real_steps(source, w.shape[1])
        w = w[-t:, -s:]  # left padding: the real steps are the last ones
        src, tgt = _symbol(source, reconstructed_audio), _symbol(target, reconstructed_audio)
        if relative:
            span = max(abs(w.max() - 1), abs(1 - w.min()), 1e-3)
            im = ax.imshow(w, aspect="auto", cmap="vlag", interpolation="nearest", vmin=1 - span, vmax=1 + span, extent=(0, 1, 1, 0))
            ax.set_xlabel(f"{src} relative position (key)")
            ax.set_ylabel(f"{tgt} relative position (query)")
            label = "weight / uniform"
        else:
            im = ax.imshow(w, aspect="auto", cmap="magma", interpolation="nearest", vmin=0)
            ax.set_xlabel(f"{src} step (key)")
            ax.set_ylabel(f"{tgt} step (query)")
            label = "weight"
        ax.set_title(f"{src} → {tgt}")
        fig.colorbar(im, ax=ax, label=label)
    which = "mean over heads" if head is None else f"head {head + 1}"
    fig.suptitle(title or f"Cross-modal attention, sample {sample}, layer {layer + 1}, {which}", fontsize=9)
    return fig


# ----------------------------------------------------------------------------------------------
# 05 ablations and results


def plot_results(table, metrics=None, paper: dict | None = None, title: str | None = None):
    """Mean ± std over seeds per row of ``table`` (mskt.experiments.grid.summarize), top to bottom in table order,
    for a few metrics; the paper's values as black diamonds. Dots, not bars: the axes do not start at
    zero, and a bar's length would exaggerate the differences. ``metrics`` defaults to Acc2, F1, MAE
    and Corr of the table's convention (MulT's non-zero Acc2/F1, or CH-SIMS's)."""
    import numpy as np

    if metrics is None:
        sims = "acc3" in table.columns.get_level_values(0)
        metrics = ("acc2", "f1", "mae", "corr") if sims else ("acc2_nonzero", "f1_nonzero", "mae", "corr")
    fig, axes = _fig(FULL_WIDTH, 0.5 + 0.28 * len(table), ncols=len(metrics), sharey=True)
    rows = list(table.index)
    y = np.arange(len(rows))
    for i, (ax, m) in enumerate(zip(np.atleast_1d(axes), metrics)):
        scale = 1 if m in ("mae", "corr") else 100
        ax.errorbar(table[(m, "mean")] * scale, y, xerr=table[(m, "std")] * scale, fmt="o", ms=3, capsize=2, label="ours (mean ± std)")
        if paper:
            px = [paper.get(r, {}).get(m, np.nan) * scale for r in rows]
            ax.plot(px, y, "kD", ms=3, label="paper")
        ax.set_yticks(y, rows)
        ax.set_ylim(len(rows) - 0.5, -0.5)  # first row on top
        ax.set_xlabel(m.replace("_", " ") + ("" if scale == 1 else " (%)") + (" ↓" if m == "mae" else " ↑"))
        ax.margins(x=0.15)
    seeds = sorted(set(int(n) for n in np.ravel(table["n_seeds"])))
    fig.suptitle(title or f"Test metrics, mean ± std over {'/'.join(map(str, seeds))} seed(s)", fontsize=9)
    if paper:
        _legend_below(fig, np.atleast_1d(axes)[0], ncol=2)
    return fig


# ----------------------------------------------------------------------------------------------
# 06 robustness to missing modalities


def _metric_axis(metric: str) -> tuple[float, str]:
    """(scale, axis label) of a metric: accuracies and F1 in percent; MAE, Corr and loss as they are."""
    scale = 1 if metric in ("mae", "corr", "loss") else 100
    arrow = " ↓" if metric in ("mae", "loss") else " ↑"
    return scale, metric.replace("_", " ") + ("" if scale == 1 else " (%)") + arrow


def _sweep_metrics(frame, metrics):
    from mskt.experiments.robustness import metric_columns

    return list(metrics) if metrics else [m for m in metric_columns(frame) if m != "loss" and frame[m].notna().any()]


def _seed_counts(frame) -> str:
    runs = frame.groupby("label")["run_seed"].nunique()
    masks = frame.loc[frame["mask_seed"] >= 0, "mask_seed"].nunique()
    text = f"{'/'.join(map(str, sorted(set(runs))))} training seed(s)"
    return text + (f" × {masks} mask seed(s)" if masks else "")


def plot_robustness(frame, metrics=None, labels=None, title: str | None = None):
    """Every metric against the missing rate (``mskt.experiments.robustness.sweep`` rows with protocol "rate"):
    one panel per metric, one line per label (variant), mean over training and mask seeds with a
    ±1 std band. The x-axis is the realised rate (``missing_rate_realised``, averaged over mask
    draws) where the frame has it: a nominal 0.7 leaves each sample at least one modality, so it
    removes 2/3 of the slots, and the curve is drawn where its points really are."""
    import math

    import seaborn as sns

    rates = frame[frame["protocol"] == "rate"]
    metrics = _sweep_metrics(rates, metrics)
    realised = "missing_rate_realised" in rates and rates["missing_rate_realised"].notna().all()
    rates = rates.assign(x=rates.groupby("rate")["missing_rate_realised"].transform("mean") if realised else rates["rate"])
    labels = labels or list(dict.fromkeys(rates["label"]))
    ncols = min(4, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = _fig(FULL_WIDTH, 1.75 * nrows + 0.6, ncols=ncols, nrows=nrows, squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, m in zip(axes.flat, metrics):
        scale, label = _metric_axis(m)
        sns.lineplot(rates.assign(value=rates[m] * scale), x="x", y="value", hue="label", hue_order=labels,
                     errorbar="sd", marker="o", markersize=3, linewidth=1, ax=ax)
        ax.set_xlabel("missing rate (realised)" if realised else "missing rate")
        ax.set_ylabel(label)
    _legend_below(fig, *axes.flat[: len(metrics)], ncol=len(labels))
    mode = "time step" if set(rates["mode"]) == {"step"} else "sample and modality"
    fig.suptitle(title or f"Test metrics against the missing rate (per {mode}), mean ± std over {_seed_counts(rates)}", fontsize=9)
    return fig


def _condition_name(condition: str) -> str:
    if condition in ("none", "rate 0"):
        return "nothing missing"
    return ", ".join(SYMBOL[m] for m in condition.split(",")) + " missing"


def plot_conditions(frame, metrics=None, labels=None, title: str | None = None):
    """Every metric under each fixed missing condition (MMIN's six; ``sweep`` rows with protocol
    "condition"), with "nothing missing" (rate 0) on top when the frame has it: one panel per metric,
    one dot per label, mean ± std over training seeds. Dots, not bars: the axes do not start at zero."""
    import math

    import seaborn as sns

    rows = frame[(frame["protocol"] == "condition") | ((frame["protocol"] == "rate") & (frame["rate"] == 0.0))]
    metrics = _sweep_metrics(rows, metrics)
    labels = labels or list(dict.fromkeys(rows["label"]))
    rows = rows.assign(where=rows["condition"].map(_condition_name))
    order = list(dict.fromkeys(rows.sort_values("protocol", ascending=False, kind="stable")["where"]))  # "rate 0" first
    ncols = min(4, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = _fig(FULL_WIDTH, (0.25 * len(order) + 0.7) * nrows + 0.5, ncols=ncols, nrows=nrows, squeeze=False, sharey=True)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, m in zip(axes.flat, metrics):
        scale, label = _metric_axis(m)
        sns.pointplot(rows.assign(value=rows[m] * scale), x="value", y="where", hue="label", hue_order=labels, order=order,
                      errorbar="sd", dodge=0.5, linestyle="none", markers="o", markersize=3, err_kws={"linewidth": 1}, capsize=0, ax=ax)
        ax.set_xlabel(label)
        ax.set_ylabel("")
        ax.margins(x=0.15)
    _legend_below(fig, *axes.flat[: len(metrics)], ncol=len(labels))
    fig.suptitle(title or f"Test metrics per fixed missing condition, mean ± std over {_seed_counts(rows)}", fontsize=9)
    return fig


def emotion_probabilities(logits):
    """P(emotion present) per emotion from (emotions, 2) logits (the IEMOCAP head)."""
    import numpy as np

    z = np.asarray(logits, dtype=float)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True))[:, 1]


def plot_sample_view(view: dict, max_features: int = 40):
    """One sample under one missing pattern (``mskt.viz.explorer.sample_view``): the prediction with the
    pattern and with nothing missing against the label; for each reconstructed modality its real and
    reconstructed standardised features (features × real steps; at most ``max_features`` rows, those
    of largest variance); and the cross-modal attention of the last layer, mean over heads."""
    import matplotlib.pyplot as plt
    import numpy as np

    views, attention, lengths, missing = view["views"], view["attention"], view["lengths"], set(view["missing"])

    def symbol(m):
        if m in views:
            return SYMBOL[m] + "′"
        return SYMBOL[m] + ("=0" if m in missing else "")

    fig = plt.figure(figsize=(FULL_WIDTH, 4.8), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.0, 1.0])
    ncols = 1 + 2 * len(views)
    axes = top.subplots(1, ncols, squeeze=False, gridspec_kw={"width_ratios": [1.3] + [1] * (ncols - 1)})[0]

    ax = axes[0]  # the prediction
    if view["task"] == "regression":
        values = [float(view["label"]), float(view["pred"]), float(view["pred_full"])]
        names = ["label", "prediction", "nothing missing"]
        ax.barh(range(3), values, color=["0.3", "C0", "C1"], height=0.6)
        ax.set_yticks(range(3), names)
        ax.set_xlim(*view.get("label_range", (-3, 3)))
        ax.axvline(0, color="k", lw=0.5)
        ax.invert_yaxis()
        ax.set_xlabel("sentiment")
    else:
        from mskt.data.presets import EMOTIONS

        prob = emotion_probabilities
        y = np.arange(len(EMOTIONS))
        ax.barh(y - 0.2, prob(view["pred"]), height=0.4, label="prediction")
        ax.barh(y + 0.2, prob(view["pred_full"]), height=0.4, label="nothing missing")
        ax.plot(np.asarray(view["label"], dtype=float), y, "kD", ms=3, label="label")
        ax.set_yticks(y, EMOTIONS)
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
        ax.set_xlabel("P(emotion)")
        ax.legend(frameon=False, fontsize=6)
    ax.set_title("Prediction")

    for i, (m, v) in enumerate(views.items()):
        real, rec = v["real"], v["reconstructed"]  # (n, D)
        keep = np.sort(np.argsort(-real.var(axis=0))[:max_features])
        span = float(np.percentile(np.abs(real[:, keep]), 99)) or 1.0
        for ax, x, what in ((axes[1 + 2 * i], real, f"{SYMBOL[m]} real"), (axes[2 + 2 * i], rec, f"{SYMBOL[m]}′ reconstructed, R² {v['r2']:.2f}")):
            ax.imshow(x[:, keep].T, aspect="auto", cmap="vlag", vmin=-span, vmax=span, interpolation="nearest")
            ax.grid(False)
            ax.set_title(what)
            ax.set_xlabel("real step")
            ax.set_ylabel(f"{m} feature" if x is real else "")
            ax.set_yticks([])

    directions = [k for k in attention if k.split("->")[0] != k.split("->")[1]]
    if directions:
        axes = bottom.subplots(1, len(directions), squeeze=False)[0]
        for ax, key in zip(axes, directions):
            s, t = key.split("->")
            w = attention[key].mean(axis=0)  # (T_t, S)
            nt, ns = max(1, min(w.shape[0], lengths[t])), max(1, min(w.shape[1], lengths[s]))
            ax.imshow(w[-nt:, -ns:], aspect="auto", cmap="magma", vmin=0, interpolation="nearest")
            ax.grid(False)
            ax.set_title(f"{symbol(s)} → {symbol(t)}")
            ax.set_xlabel(f"{symbol(s)} step")
            ax.set_ylabel(f"{symbol(t)} step" if ax is axes[0] else "")
        bottom.suptitle("Cross-modal attention (queries: target, keys: source), last layer, mean over heads", fontsize=8)
    gone = ", ".join(sorted(view["missing"], key=list(SYMBOL).index)) or "nothing"
    fig.suptitle(f"{view['variant']}, test sample {view['index']}, missing: {gone}", fontsize=9)
    return fig


# ----------------------------------------------------------------------------------------------
# 08 when knowledge transfer helps


def _fraction_label(f: float) -> str:
    return f"{100 * f:g}%"


def plot_phase_diagram(gain, knob: str = "audio_shared", metrics=None, title: str | None = None):
    """The gain of a method over its baseline (``mskt.experiments.label_efficiency.gains``) across
    label fraction (x) and a premise knob (y): one heat map per metric, diverging around 0 (blue:
    the method is better, red: worse), each cell annotated "mean ± std" over seeds and the wins."""
    import numpy as np

    metrics = list(metrics or dict.fromkeys(gain["metric"]))
    fig, axes = _fig(FULL_WIDTH, 2.3, ncols=len(metrics), squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        scale, label = _metric_axis(m)
        g = gain[gain["metric"] == m]
        fracs = sorted(set(g["label_fraction"]))
        values = sorted(set(g[knob]))
        mean = g.pivot(index=knob, columns="label_fraction", values="mean").loc[values, fracs].to_numpy() * scale
        std = g.pivot(index=knob, columns="label_fraction", values="std").loc[values, fracs].to_numpy() * scale
        wins = g.pivot(index=knob, columns="label_fraction", values="wins").loc[values, fracs].to_numpy()
        n = g.pivot(index=knob, columns="label_fraction", values="n_seeds").loc[values, fracs].to_numpy()
        lim = float(np.nanmax(np.abs(mean))) or 1.0
        im = ax.imshow(mean, cmap="RdBu", vmin=-lim, vmax=lim, origin="lower", aspect="auto")
        digits = 3 if scale == 1 else 1
        for i in range(len(values)):
            for j in range(len(fracs)):
                ax.text(j, i, f"{mean[i, j]:+.{digits}f}\n±{std[i, j]:.{digits}f}\n{int(wins[i, j])}/{int(n[i, j])}",
                        ha="center", va="center", fontsize=5.5, color="black")
        ax.set_xticks(range(len(fracs)), [_fraction_label(f) for f in fracs])
        ax.set_yticks(range(len(values)), [f"{v:g}" for v in values])
        ax.set_xlabel("training labels kept")
        ax.set_ylabel(knob)
        ax.grid(False)
        ax.set_title(f"Δ {label.replace(' ↓', '').replace(' ↑', '')} (+: {gain.attrs.get('method', 'method')} better)")
        fig.colorbar(im, ax=ax, shrink=0.85)
    method, baseline = gain.attrs.get("method", "method"), gain.attrs.get("baseline", "baseline")
    seeds = "/".join(map(str, sorted(set(gain["n_seeds"]))))
    fig.suptitle(title or f"{method} − {baseline} (MAE: {baseline} − {method}), mean ± std over {seeds} seeds; wins/seeds", fontsize=9)
    return fig


def plot_label_efficiency(summary, knob: str | None = "audio_shared", metrics=None, title: str | None = None):
    """Test metrics against the share of training labels kept (log x), from
    ``mskt.experiments.label_efficiency.summary``: one panel per metric, one colour per variant,
    one line style per knob value, mean with ±1 std error bars over seeds."""
    metrics = list(metrics or dict.fromkeys(summary["metric"]))
    fig, axes = _fig(FULL_WIDTH, 2.4, ncols=len(metrics), squeeze=False)
    import seaborn as sns

    variants = list(dict.fromkeys(summary["variant"]))
    colors = dict(zip(variants, sns.color_palette("colorblind", len(variants))))
    values = sorted(set(summary[knob])) if knob else [None]
    styles = ["-", "--", ":", "-."]
    for ax, m in zip(axes.flat, metrics):
        scale, label = _metric_axis(m)
        for v in variants:
            for k, value in enumerate(values):
                s = summary[(summary["metric"] == m) & (summary["variant"] == v)]
                if knob:
                    s = s[s[knob] == value]
                if s.empty:
                    continue
                s = s.sort_values("label_fraction")
                name = v if not knob or len(values) == 1 else f"{v}, {knob}={value:g}"
                ax.errorbar(s["label_fraction"], s["mean"] * scale, yerr=s["std"] * scale, color=colors[v],
                            linestyle=styles[k % len(styles)], marker="o", markersize=3, linewidth=1, capsize=2, label=name)
        fracs = sorted(set(summary["label_fraction"]))
        ax.set_xscale("log")
        ax.set_xticks(fracs, [_fraction_label(f) for f in fracs])
        ax.minorticks_off()
        ax.set_xlabel("training labels kept")
        ax.set_ylabel(label)
    _legend_below(fig, *axes.flat, ncol=min(4, len(variants) * len(values)))
    seeds = "/".join(map(str, sorted(set(summary["n_seeds"]))))
    fig.suptitle(title or f"Test metrics against the labels kept, mean ± std over {seeds} seeds", fontsize=9)
    return fig


# ----------------------------------------------------------------------------------------------
# Decisions: paired comparisons (mskt.stats.compare_frame)


def plot_comparisons(table, cells=(), metrics=None, title: str | None = None):
    """A forest plot of :func:`mskt.stats.compare_frame`'s rows: per metric panel, one row per (cell,
    A vs B) with the mean paired difference A − B and its 95% CI; filled markers where the adjusted p
    is below alpha (a decision), hollow where it is not; a dashed line at 0. Differences are drawn
    so that right is always "A better" (B − A for MAE), accuracies in points."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    from mskt.metrics import higher_is_better

    cells = list(cells)
    metrics = list(metrics or dict.fromkeys(table["metric"]))
    tested = table[table["p_adj"].notna()] if "p_adj" in table else table.iloc[0:0]
    keys = list(dict.fromkeys(tuple(r[c] for c in cells) + (r["a"], r["b"]) for _, r in tested.iterrows()))
    names = [" · ".join(str(k) for k in key[:-2]) + (": " if key[:-2] else "") + f"{key[-2]} vs {key[-1]}" for key in keys]
    fig, axes = _fig(FULL_WIDTH, 0.7 + 0.24 * max(len(keys), 1), ncols=len(metrics), sharey=True, squeeze=False)
    y = np.arange(len(keys))
    for ax, m in zip(axes[0], metrics):
        scale, label = _metric_axis(m)
        sign = scale if higher_is_better(m) else -scale
        rows = tested[tested["metric"] == m].set_index([*cells, "a", "b"])
        for i, key in enumerate(keys):
            if key not in rows.index:
                continue
            r = rows.loc[key]
            lo, hi = sorted((sign * r["ci_lo"], sign * r["ci_hi"]))
            decided = r["p_adj"] < r.get("alpha", 0.05)
            ax.errorbar(sign * r["delta"], i, xerr=[[sign * r["delta"] - lo], [hi - sign * r["delta"]]], fmt="o", ms=3.5, capsize=2,
                        color="C0" if decided else "0.45", mfc="C0" if decided else "white")
        ax.axvline(0, color="0.3", lw=0.8, ls="--")
        ax.set_xlabel(f"{label.rsplit(' ', 1)[0]}\n{'A − B' if sign > 0 else 'B − A'} (→ A better)")
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.set_yticks(y, names)
        ax.set_ylim(len(keys) - 0.5, -0.5)
        ax.margins(x=0.15)
    fig.suptitle(title or "Paired differences, 95% CI (filled: adjusted p < 0.05)", fontsize=9)
    return fig
