"""Can the testbed show knowledge transfer helping at all? ``kt`` against ``language_vision`` in the
synthetic generator's two control worlds, across label fractions, over paired seeds.

- ``control=positive``: the label reaches L and V only through a second-order, entangled map
  (within-sample correlations of two latent coordinates in each modality), which audio shows
  linearly. Reconstructing audio from L and V (learnt from every training sample, labelled or not)
  then hands the fusion what the labels alone teach slowly: ``kt`` should be ahead at low label
  fractions. If it is not, the method (or its implementation) cannot show the effect even where it
  must exist.
- ``control=negative``: the default world, whose audio knows about the label only what L + V know
  plus its own private view; a reconstruction from L + V cannot carry the private part, so ``kt``
  should gain nothing.

Both are data sources (``synthetic:mosi?control=positive``); ``mskt.data.synthetic`` documents
them with their probe numbers. ``run`` trains the grid and returns a tidy frame; ``paired_ci``
gives the mean paired difference per cell with a 95% paired-t interval (the full
statistics live elsewhere; ``paired_ci`` adds a Holm-adjusted p and the minimal detectable
effect so that "no difference" says what it rules out). ``read_runs`` reads a measurement's
finished runs without training; ``markdown`` tabulates them. ``scripts/controls_small.py`` is the
small measurement of docs/results.md ("Controls"): there kt is ahead on every seed at 5% of the
labels in the positive control and shows no gain in the negative one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mskt.config import Config
from mskt.data.synthetic import with_knobs
from mskt.errors import ConfigError
from mskt.experiments.grid import run_configs
from mskt.metrics import display_scale, higher_is_better

CONTROLS = ("negative", "positive")
FRACTIONS = (0.05, 0.2, 1.0)


# The measurement's model and training (docs/results.md, "Controls"): a tiny MulT that both variants
# train in minutes on a 2-core CPU, lr 3e-3 for both (at 1e-3 neither learns the positive control's
# products within 8 epochs).
SMALL = dict(d_model=16, heads=2, encoder_layers=1, kt_layers=1, crossmodal_layers=1, memory_layers=1, epochs=8, lr=3e-3,
             batch_size=24, device="cpu", progress="off", threads=1, seed=0)


def small_config(data: str = "synthetic:mosi?test_size=2000", **overrides) -> Config:
    """The measurement's Config (:data:`SMALL`) on ``data``, with ``overrides`` (data_scale, epochs, ...)."""
    return Config.from_dict({**SMALL, "data": data, "data_scale": 1.0, **overrides})


def _metrics(runs: pd.DataFrame) -> list:
    return [m for m in ("mae", "corr", "acc2_nonzero", "acc7", "mean_f1") if m in runs]


def run(base: Config, controls=CONTROLS, fractions=FRACTIONS, seeds: int = 6, method: str = "kt",
        baseline: str = "language_vision", out_dir="runs/controls", jobs: int = 1, on_run=None) -> pd.DataFrame:
    """Train ``method`` and ``baseline`` at every label fraction in each control world of
    ``base.data`` (a synthetic source; its other knobs, such as ``test_size``, are kept), with seeds
    base.seed, base.seed + 1, ... (``run_configs``: finished runs in ``out_dir`` are read back).

    One row per run: control, label_fraction, variant, seed, data, best_epoch, seconds, the test
    metrics, and per metric ``diff_<metric>``: method minus baseline at the same (control, label
    fraction, seed), the same value on both rows of the pair (same data, same labelled subset, same
    initialisation seed). Positive ``diff_mae`` means the method's error is *higher*."""
    fractions = tuple(float(f) for f in fractions)
    for f in fractions:
        if not 0 < f <= 1:
            raise ConfigError(f"label fraction {f!r}: expected a number in (0, 1]")
    for c in controls:
        if c not in CONTROLS:
            raise ConfigError(f"control {c!r}: expected one of {', '.join(CONTROLS)}")
    if method == baseline:
        raise ConfigError(f"controls: method and baseline are both {method!r}")
    frames = []
    for control in controls:
        data = with_knobs(base.data, control=control)
        configs = {f"{v}-lf{f:g}": {"variant": v, "label_fraction": f} for f in fractions for v in (method, baseline)}
        runs = run_configs(base.replace(data=data), configs, seeds, Path(out_dir) / control, on_run=on_run, jobs=jobs)
        runs.insert(0, "control", control)
        runs.insert(1, "label_fraction", runs["label"].map({k: c["label_fraction"] for k, c in configs.items()}))
        runs.insert(2, "data", data)
        frames.append(runs)
    runs = pd.concat(frames, ignore_index=True).drop(columns="label")
    return add_differences(runs, method, baseline)


def read_runs(out_dir, method: str = "kt", baseline: str = "language_vision") -> pd.DataFrame:
    """The finished runs under ``out_dir`` (``<control>/<variant>-lf<fraction>-seed<seed>/metrics.json``,
    as ``run`` writes them) as ``run``'s frame, without training anything: read a measurement that
    is still running or was stopped early. Cells with one variant only get NaN differences."""
    import json

    rows = []
    for done in sorted(Path(out_dir).glob("*/*-lf*-seed*/metrics.json")):
        cfg = json.loads((done.parent / "config.json").read_text())
        metrics = json.loads(done.read_text())
        rows.append({"control": done.parent.parent.name, "label_fraction": cfg["label_fraction"], "data": cfg["data"],
                     "variant": cfg["variant"], "seed": cfg["seed"], "best_epoch": metrics["best_epoch"],
                     "seconds": metrics["seconds"], "converged": metrics.get("converged"), **metrics["test"]})
    if not rows:
        raise ConfigError(f"{out_dir}: no finished runs (<control>/<variant>-lf<fraction>-seed<seed>/metrics.json)")
    return add_differences(pd.DataFrame(rows), method, baseline)


def add_differences(runs: pd.DataFrame, method: str = "kt", baseline: str = "language_vision") -> pd.DataFrame:
    """``runs`` with ``diff_<metric>`` = method - baseline, paired by (control, label_fraction, seed)."""
    keys = ["control", "label_fraction", "seed"]
    metrics = _metrics(runs)
    for v in (method, baseline):
        if v not in set(runs["variant"]):
            raise ConfigError(f"controls: no runs of variant {v!r} (found {', '.join(sorted(set(runs['variant'])))})")
    a = runs[runs["variant"] == method].set_index(keys)[metrics]
    b = runs[runs["variant"] == baseline].set_index(keys)[metrics]
    diff = (a - b).add_prefix("diff_").reset_index()  # unpaired cells become NaN
    out = runs.merge(diff, on=keys, how="left")
    out.attrs.update(method=method, baseline=baseline)
    return out


def paired_ci(runs: pd.DataFrame, metric: str = "mae", level: float = 0.95) -> pd.DataFrame:
    """Per (control, label fraction), through :func:`mskt.stats.compare`: the number of paired
    seeds, the mean of ``diff_<metric>`` (method - baseline), its paired-t ``level`` interval, and
    ``wins`` (seeds where the method was better: lower MAE, higher otherwise). ``excludes_0`` says
    whether the interval excludes 0; ``p`` is the two-sided paired-t p-value, ``p_holm`` Holm's
    adjustment over the rows returned, and ``mde`` the smallest |difference| this many seeds would
    detect with 80% power (paired t, the observed sd): what "no difference" can rule out. A cell
    with fewer than 2 paired seeds gets NaN statistics."""
    from mskt import stats

    col = f"diff_{metric}"
    if col not in runs:
        raise ConfigError(f"paired_ci: no column {col!r} (metrics: {', '.join(c[5:] for c in runs if c.startswith('diff_'))})")
    method = runs.attrs.get("method", "kt")
    pairs = runs[runs["variant"] == method].dropna(subset=[col])
    rows = []
    for (control, fraction), g in pairs.groupby(["control", "label_fraction"], sort=True):
        d = g[col].to_numpy(dtype=np.float64)
        better = d > 0 if higher_is_better(metric) else d < 0
        row = {"control": control, "label_fraction": fraction, "metric": metric, "n": len(d), "mean_diff": float(d.mean()),
               "ci_low": np.nan, "ci_high": np.nan, "wins": int(better.sum()), "excludes_0": False, "p": np.nan, "mde": np.nan}
        if len(d) > 1:
            c = stats.compare(d, np.zeros_like(d), metric, (method, "baseline"), alpha=1 - level)
            row.update(ci_low=c.ci_lo, ci_high=c.ci_hi, excludes_0=bool(c.ci_lo > 0 or c.ci_hi < 0), p=c.p_t, mde=c.mde)
        rows.append(row)
    out = pd.DataFrame(rows)
    if len(out):
        tested = out["p"].notna().to_numpy()
        out["p_holm"] = np.nan
        out.loc[tested, "p_holm"] = stats.adjust(out.loc[tested, "p"].to_numpy(), "holm")
    return out


def markdown(runs: pd.DataFrame, metrics=("mae", "corr", "acc2_nonzero"), level: float = 0.95) -> str:
    """A Markdown table of ``paired_ci`` per metric: a row per (control, label fraction), cells
    "mean diff [CI] wins/n, p_holm, mde" (accuracies in points; MAE and Corr as they are)."""
    cells = {}
    for m in metrics:
        scale, digits = display_scale(m)
        for _, r in paired_ci(runs, m, level).iterrows():
            cells.setdefault((r["control"], r["label_fraction"]), {})[m] = (
                f"{scale * r['mean_diff']:+.{digits}f} [{scale * r['ci_low']:+.{digits}f}, {scale * r['ci_high']:+.{digits}f}] "
                f"{r['wins']}/{r['n']}, p_holm {r['p_holm']:.3g}, mde {scale * r['mde']:.{digits}f}")
    method, baseline = runs.attrs.get("method", "kt"), runs.attrs.get("baseline", "language_vision")
    lines = [f"| control | labels | " + " | ".join(f"{m}: {method} - {baseline}" for m in metrics) + " |",
             "|" + "---|" * (len(metrics) + 2)]
    for (control, fraction), row in sorted(cells.items()):
        lines.append(f"| {control} | {100 * fraction:g}% | " + " | ".join(row.get(m, "") for m in metrics) + " |")
    return "\n".join(lines) + "\n"
