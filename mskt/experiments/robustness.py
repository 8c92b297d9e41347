"""Robustness to missing modalities: every trained run under every missing protocol, in one frame.

``sweep`` evaluates runs (folders or in-memory models) on a split under (1) the six fixed missing
conditions of MMIN (every sample misses the same one or two modalities) and (2) random missing rates
(each modality of each sample missing with probability r, ``mskt.data.missing``; or each time step, with
``mode="step"``), over several mask seeds. One row per (run, protocol, mask seed) with every metric;
``summarize`` gives mean and std over training seeds and mask seeds; ``mskt.viz.plots.plot_robustness``
and ``plot_conditions`` draw them.

Fair comparisons (issue 19): :func:`fair_configs` trains every variant under kt_any's own missing
protocol (and as published), :func:`matched_configs` / :func:`matched_sweep` the grid where the
training rate equals the test rate, :func:`train_runs` trains any of them; the literature's summaries,
mean ± std over training seeds: :func:`condition_summary` (MMIN's six conditions and their average),
:func:`rate_summary` (the normalised area under the rate curve, :func:`normalized_auc`) and
:func:`fair_table` (all of it in one Markdown table).

Everything is deterministic by seed: masks come from their own seeded generators and models are
evaluated in eval mode, so two calls with the same arguments return equal frames.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from mskt.console import outer_progress
from mskt.errors import MsktError
from mskt.metrics import display_scale
from mskt.data.missing import CONDITIONS, RATES, check_mode, check_rate, parse_missing
from mskt.model import MulT

ID_COLUMNS = ("label", "variant", "run_seed", "protocol", "condition", "rate", "missing_rate_realised", "mask_seed", "mode", "train_rate")


def _entries(runs) -> list[tuple[str, object]]:
    """(label, run folder or model) pairs from {label: [runs]} or a flat list (label = the variant)."""
    if isinstance(runs, dict):
        return [(label, r) for label, items in runs.items() for r in (items if isinstance(items, (list, tuple)) else [items])]
    return [(None, r) for r in runs]


def _load(entry) -> MulT:
    if isinstance(entry, MulT):
        return entry
    from mskt.train import load_run

    return load_run(Path(entry))[1]


def _check_fits(model: MulT, dataset, where: str) -> None:
    dims, cfg = dataset.dims, model.cfg
    wanted = {"text_dim": dims["text"], "audio_dim": dims["audio"], "vision_dim": dims["vision"], "task": dataset.meta.task}
    for key, value in wanted.items():
        if getattr(cfg, key) != value:
            raise MsktError(f"{where}: {key}={getattr(cfg, key)} does not fit the data {dataset.meta.source} ({key}={value})")


def sweep(runs, dataset=None, rates=RATES, conditions=CONDITIONS, seeds=(0, 1, 2), mode: str = "sample",
          split: str = "test", batch_size: int = 256, device: str = "cpu", on_eval=None, progress: str = "auto") -> pd.DataFrame:
    """Evaluate every run under every fixed condition and every missing rate; where a person watches
    (``progress``, :mod:`mskt.console`) a bar counts the evaluations.

    ``runs``: {label: [run folder or MulT, ...]} (one entry per training seed) or a flat list
    (labelled by variant). ``dataset``: the data the runs were trained on (default: the first run's
    ``cfg.data``). ``rates``: per-sample (``mode="sample"``) or per-step (``mode="step"``) missing
    rates in [0, 1), each evaluated with every mask seed in ``seeds`` (rate 0 once: nothing is random).
    ``conditions``: fixed patterns such as "audio" or "audio,vision", each evaluated once (not random).

    Returns one row per (run, protocol, mask seed): label, variant, run_seed, protocol ("rate" or
    "condition"), condition ("rate 0.3" or "audio,vision"), rate (NaN for conditions), mask_seed
    (-1 for conditions and rate 0) and every metric of ``mskt.metrics`` plus the task loss.
    """
    from mskt.train import Tensors

    check_mode(mode)
    rates = [check_rate(r) for r in rates]
    conditions = [",".join(parse_missing(c)) or "none" for c in conditions]
    seeds = [int(s) for s in seeds]
    entries = _entries(runs)
    if not entries:
        raise MsktError("sweep: no runs given")
    models = [(label, _load(entry), entry) for label, entry in entries]
    if dataset is None:
        from mskt.data.readers import load_dataset

        cfg = models[0][1].cfg
        dataset = load_dataset(cfg.data, scale=cfg.data_scale, seed=cfg.data_seed)
    data = Tensors.from_split(dataset[split], dataset.meta.task, device)
    plan = [("condition", c, math.nan, -1, {"missing": () if c == "none" else c}) for c in conditions]
    for rate in rates:
        for seed in (seeds if rate > 0 else [-1]):
            kw = {"missing": (), "missing_rate": rate, "missing_mode": mode, "missing_seed": max(seed, 0)}
            plan.append(("rate", f"rate {rate:g}", rate, seed, kw))
    rows = []
    with outer_progress(len(models) * len(plan), desc=f"robustness ({mode})", setting=progress, unit="eval") as bar:
        for label, model, entry in models:
            rows += _evaluate_plan(label, model, entry, plan, dataset, data, batch_size, device, mode, on_eval, bar)
    return pd.DataFrame(rows)


def _evaluate_plan(label, model, entry, plan, dataset, data, batch_size, device, mode, on_eval, bar) -> list:
    """The rows of one run under every (protocol, condition, rate, mask seed) of ``plan``."""
    from mskt.data.missing import evaluation_masks, realised_rate
    from mskt.train import evaluate

    _check_fits(model, dataset, str(entry) if not isinstance(entry, MulT) else f"model {label}")
    model.to(device)
    cfg = model.cfg
    base = {"label": label or cfg.variant, "variant": cfg.variant, "run_seed": int(getattr(cfg, "seed", 0))}
    rows = []
    for protocol, condition, rate, seed, kw in plan:
        metrics = evaluate(model, data, batch_size, **kw)
        masks = evaluation_masks(len(data), {m: x.shape[1] for m, x in data.features.items()}, kw["missing"], kw.get("missing_rate", 0.0), mode, kw.get("missing_seed", 0))
        realised = realised_rate(masks, kw["missing"]) if protocol == "rate" else math.nan  # the share of free slots removed
        row = {**base, "protocol": protocol, "condition": condition, "rate": rate, "missing_rate_realised": realised, "mask_seed": seed, "mode": mode, **metrics}
        rows.append(row)
        bar.update(1)
        if on_eval is not None:
            on_eval(row)
    return rows


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """The metric columns of a sweep frame, in reading order (the task loss last)."""
    return [c for c in frame.columns if c not in ID_COLUMNS]


def summarize(frame: pd.DataFrame, metrics=None) -> pd.DataFrame:
    """Mean and std (over training seeds and mask seeds) per label and condition: columns
    (metric, "mean" | "std") and ("n", "") (rows averaged), rows (label, protocol, condition) in the frame's order."""
    metrics = list(metrics or metric_columns(frame))
    keys = ["label", "protocol", "condition"]
    grouped = frame.groupby(keys, sort=False)[metrics]
    table = pd.concat({"mean": grouped.mean(), "std": grouped.std(ddof=1).fillna(0.0)}, axis=1)
    table = table.swaplevel(axis=1).sort_index(axis=1, level=0, sort_remaining=False)[metrics]
    table[("n", "")] = frame.groupby(keys, sort=False).size()
    return table


def gaps(frame: pd.DataFrame, reference: str = "kt_any", others=("kt", "language_vision"), metric: str = "mae",
         method: str = "holm") -> pd.DataFrame:
    """Per condition, ``reference`` against each of ``others`` on ``metric``, paired by training seed
    (``mskt.stats.compare_frame``): each run's value is first averaged over its mask seeds, so a run
    counts once however many masks it was evaluated under. One row per (protocol, condition, other):
    the mean difference reference - other with its 95% CI, the paired t, Wilcoxon and sign tests' p,
    the p adjusted by ``method`` across every row of the table, the minimal detectable effect and the
    reading; rows in the frame's condition order, labels absent from the frame skipped."""
    from mskt import stats

    present = set(frame["label"])
    per_run = frame.groupby(["protocol", "condition", "label", "run_seed"], sort=False)[metric].mean().reset_index()
    pairs = [(reference, o) for o in others if o in present and reference in present]
    return stats.compare_frame(per_run, pairs, metric, cells=("protocol", "condition"), seed="run_seed", method=method)


def to_markdown(frame: pd.DataFrame, metric: str = "mae", protocol: str = "rate") -> str:
    """A Markdown table of one metric, mean ± std: one row per label, one column per condition."""
    table = summarize(frame[frame["protocol"] == protocol], [metric])
    conditions = list(dict.fromkeys(frame.loc[frame["protocol"] == protocol, "condition"]))
    labels = list(dict.fromkeys(frame["label"]))
    scale, digits = display_scale(metric)
    lines = [f"| {metric} | " + " | ".join(conditions) + " |", "|---|" + "---|" * len(conditions)]
    for label in labels:
        cells = []
        for c in conditions:
            cells.append(_cell(table, (label, protocol, c), metric, scale, digits) if (label, protocol, c) in table.index else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def reading(frame: pd.DataFrame, reference: str = "kt_any", others=("kt", "language_vision"), metric: str = "mae",
            method: str = "holm") -> str:
    """One plain line per condition: ``reference``'s mean of ``metric`` over training seeds, then against
    each of ``others`` the reading of :func:`gaps` (paired by training seed, mask seeds averaged
    first, p adjusted across every condition and other of this reading): "A better than B (...)",
    "B better than A (...)" or "no detectable difference; the smallest effect this design detects is X"."""

    table = gaps(frame, reference, others, metric, method)
    per_run = frame[frame["label"] == reference].groupby(["condition", "run_seed"], sort=False)[metric].mean()
    scale, digits = display_scale(metric)
    lines = []
    for condition, rows in table.groupby("condition", sort=False):
        mean = scale * per_run.xs(condition, level="condition").mean()
        parts = [f"vs {r['b']}: {r['reading']}" for _, r in rows.iterrows()]
        lines.append(f"{condition:>14}: {reference} {metric} {mean:.{digits}f}; " + "; ".join(parts))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Fair protocols: like-for-like training, and the literature's summaries of a sweep.


# The validation protocol that selects every run of a robustness comparison (Config.select_missing):
# the mean over the six fixed conditions, the same for every variant, rather than each variant's own
# test protocol (audio missing for kt_any, nothing missing for full).
FAIR_SELECTION = "conditions"


def fair_configs(variants=("kt_any", "kt", "language_vision", "full"), rate: float = 0.5, as_published: bool = True,
                 select_missing: str = FAIR_SELECTION) -> dict:
    """{label: config overrides} of a like-for-like robustness comparison, for ``run_configs``.

    Every variant is trained under the same missing protocol as kt_any: one of the six missing
    patterns on a share ``rate`` of the training samples (``train_missing="patterns"``; kt_any's own
    recipe when ``rate`` equals its ``modality_dropout``, 0.5 by default). Baselines zero-impute the
    dropped modalities, kt_any reconstructs them (and kt always reconstructs audio, which it never
    reads). Labels: ``"<variant>+drop"``, except kt_any, whose own recipe this is (``"kt_any"``).
    ``as_published``: also each baseline as the paper trains it (nothing missing in training), under
    its plain name, and kt_any without modality dropout (``"kt_any-nodrop"``). Every config selects
    its checkpoint under the same validation protocol, ``select_missing``.
    """
    check_rate(rate)
    out = {}
    for v in variants:
        drop = {"variant": v, "train_missing": "patterns", "train_missing_rate": float(rate), "select_missing": select_missing}
        if v == "kt_any":
            out["kt_any"] = drop
            if as_published:
                out["kt_any-nodrop"] = {"variant": v, "train_missing": "none", "select_missing": select_missing}
        else:
            if as_published:
                out[v] = {"variant": v, "train_missing": "none", "select_missing": select_missing}
            out[f"{v}+drop"] = drop
    return out


def _per_run(frame: pd.DataFrame, metric: str, protocol: str) -> pd.DataFrame:
    """``metric`` per (label, run_seed, condition) of one protocol, averaged over mask seeds; the
    rate as a column (NaN for fixed conditions)."""
    rows = frame[frame["protocol"] == protocol]
    if rows.empty:
        raise MsktError(f"the sweep frame has no rows of protocol {protocol!r}; it has {sorted(set(frame['protocol']))}")
    return rows.groupby(["label", "run_seed", "condition"], sort=False).agg(rate=("rate", "first"), value=(metric, "mean")).reset_index()


def _over_seeds(per_seed: pd.DataFrame, order) -> pd.DataFrame:
    """Mean and std over training seeds (ddof 1; 0 for one seed) of each column of ``per_seed``
    (index: label, run_seed), rows in ``order``; columns (column, "mean" | "std") and ("n_seeds", "")."""
    grouped = per_seed.groupby(level="label", sort=False)
    table = pd.concat({"mean": grouped.mean(), "std": grouped.std(ddof=1).fillna(0.0)}, axis=1).swaplevel(axis=1)
    table = table[[(c, s) for c in per_seed.columns for s in ("mean", "std")]]
    table[("n_seeds", "")] = grouped.size()
    return table.loc[[label for label in order if label in table.index]]


def condition_summary(frame: pd.DataFrame, metric: str = "mae") -> pd.DataFrame:
    """MMIN's protocol: ``metric`` under each of the six fixed conditions and their average, mean
    and std over training seeds (the average is taken per run, then over seeds). Columns
    (condition | "average", "mean" | "std") and ("n_seeds", ""); one row per label."""
    runs = _per_run(frame, metric, "condition")
    conditions = list(dict.fromkeys(c for c in runs["condition"] if c != "none"))
    wide = runs.pivot_table(index=["label", "run_seed"], columns="condition", values="value", sort=False)
    wide = wide[conditions]
    wide["average"] = wide[conditions].mean(axis=1)
    return _over_seeds(wide, dict.fromkeys(frame["label"]))


def normalized_auc(rates, values) -> float:
    """The area under a curve of ``values`` against ``rates`` (trapezoids), divided by the width of
    the rate range: the mean of the metric over the missing rates, in the metric's own units
    (TFR-Net's AUILC and MultiBench's relative robustness, normalised so ranges of rates compare)."""
    import numpy as np

    rates, values = np.asarray(rates, dtype=float), np.asarray(values, dtype=float)
    order = np.argsort(rates)
    rates, values = rates[order], values[order]
    if len(rates) < 2 or rates[-1] == rates[0]:
        raise MsktError(f"an area under the curve needs at least two different rates, found {list(rates)}")
    area = float(np.sum((rates[1:] - rates[:-1]) * (values[1:] + values[:-1]) / 2))
    return area / float(rates[-1] - rates[0])


def rate_summary(frame: pd.DataFrame, metric: str = "mae", protocol: str = "rate") -> pd.DataFrame:
    """The rate curve of each run (``metric`` averaged over mask seeds at each rate) summarised by its
    normalised area under the curve (:func:`normalized_auc`), beside its value at the lowest and the
    highest rate; each mean and std over training seeds. Columns ("auc" | "rate <lo>" | "rate <hi>",
    "mean" | "std") and ("n_seeds", ""); one row per label. ``protocol``: "rate" (a sweep) or
    "matched" (:func:`matched_sweep`: training rate = test rate)."""
    runs = _per_run(frame, metric, protocol)
    lo, hi = runs["rate"].min(), runs["rate"].max()
    per_seed = {}
    for (label, seed), curve in runs.groupby(["label", "run_seed"], sort=False):
        at = dict(zip(curve["rate"], curve["value"]))
        per_seed[(label, seed)] = {"auc": normalized_auc(curve["rate"], curve["value"]), f"rate {lo:g}": at.get(lo, math.nan),
                                   f"rate {hi:g}": at.get(hi, math.nan)}
    wide = pd.DataFrame.from_dict(per_seed, orient="index")
    wide.index = pd.MultiIndex.from_tuples(wide.index, names=["label", "run_seed"])
    return _over_seeds(wide, dict.fromkeys(frame["label"]))


def matched_configs(variants=("kt_any", "full"), rates=(0.1, 0.4, 0.7), select_missing: str = FAIR_SELECTION) -> dict:
    """{label: config overrides} of the IMDer / DiCMoR grid (their rates: 0.1–0.7): each variant
    trained at each missing rate r per sample and modality (``train_missing="sample"``, which for
    kt_any replaces its own modality dropout), to be tested at the same r (:func:`matched_sweep`).
    Labels ``"<variant>@<r>"``; every config selects under ``select_missing``."""
    out = {}
    for v in variants:
        for r in rates:
            out[f"{v}@{check_rate(r):g}"] = {"variant": v, "train_missing": "sample", "train_missing_rate": float(r), "select_missing": select_missing}
    return out


def matched_sweep(run_dirs: dict, dataset=None, seeds=(0, 1, 2), split: str = "test", batch_size: int = 256,
                  device: str = "cpu") -> pd.DataFrame:
    """Evaluate each run at the missing rate it was trained at (the same rate in training and test).

    ``run_dirs``: {label: [run folder or model, ...]} of runs trained with ``train_missing="sample"``
    (e.g. :func:`matched_configs` through ``run_configs``); each run's training rate is read from its
    config. Returns :func:`sweep` rows with protocol "matched", label the variant (the training rate
    is the ``rate`` column and ``train_rate``), one per (run, mask seed)."""
    frames = []
    for label, entries in run_dirs.items():
        for entry in (entries if isinstance(entries, (list, tuple)) else [entries]):
            model = _load(entry)
            cfg = model.cfg
            if getattr(cfg, "train_missing", None) != "sample":
                raise MsktError(f"{entry}: trained with train_missing={getattr(cfg, 'train_missing', None)!r}; "
                                "the matched grid needs runs trained with train_missing='sample'")
            rate = cfg.train_missing_rate
            f = sweep({cfg.variant: [model]}, dataset, rates=[rate], conditions=(), seeds=seeds, split=split,
                      batch_size=batch_size, device=device)
            frames.append(f.assign(protocol="matched", train_rate=rate))
    if not frames:
        raise MsktError("matched_sweep: no runs given")
    return pd.concat(frames, ignore_index=True)


def _cell(table: pd.DataFrame, label, column, scale: float, digits: int) -> str:
    return f"{scale * table.loc[label, (column, 'mean')]:.{digits}f} ± {scale * table.loc[label, (column, 'std')]:.{digits}f}"


def summary_markdown(table: pd.DataFrame, metric: str = "mae") -> str:
    """A Markdown table of :func:`condition_summary` or :func:`rate_summary`: one row per label,
    mean ± std over training seeds (accuracies and F1 in percent)."""
    scale, digits = display_scale(metric)
    columns = [c for c in dict.fromkeys(table.columns.get_level_values(0)) if c != "n_seeds"]
    lines = [f"| {metric} | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for label in table.index:
        cells = [_cell(table, label, c, scale, digits) for c in columns]
        lines.append(f"| {label} | {int(table.loc[label, ('n_seeds', '')])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fair_table(frame: pd.DataFrame, metric: str = "mae") -> str:
    """The fair robustness table in Markdown, one row per label, mean ± std over training seeds:
    nothing missing (the lowest rate of the sweep, normally 0), the average of MMIN's six fixed
    conditions, audio missing (the paper's setting) and the normalised area under the rate curve.
    The grid where the training rate equals the test rate has its own table
    (``to_markdown(matched, metric, protocol="matched")`` and :func:`rate_summary`)."""
    scale, digits = display_scale(metric)
    rates = rate_summary(frame, metric)
    conditions = condition_summary(frame, metric)
    lo, hi = frame.loc[frame["protocol"] == "rate", "rate"].agg(["min", "max"])
    has_audio = ("audio", "mean") in conditions.columns
    header = [f"rate {lo:g}", "6 conditions avg"] + (["audio missing"] if has_audio else []) + [f"AUC rate {lo:g}–{hi:g}"]
    lines = [f"| {metric} | seeds | " + " | ".join(header) + " |", "|---|---|" + "---|" * len(header)]
    for label in rates.index:
        cells = [_cell(rates, label, f"rate {lo:g}", scale, digits), _cell(conditions, label, "average", scale, digits)]
        if has_audio:
            cells.append(_cell(conditions, label, "audio", scale, digits))
        cells.append(_cell(rates, label, "auc", scale, digits))
        lines.append(f"| {label} | {int(rates.loc[label, ('n_seeds', '')])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def train_runs(base, configs: dict, seeds: int, out_dir, jobs: int = 1, dataset=None) -> tuple[pd.DataFrame, dict]:
    """Train (or read back) every named config over ``seeds`` seeds with ``mskt.experiments.grid.run_configs``
    (``configs``: e.g. :func:`fair_configs` or :func:`matched_configs`); returns its runs frame and
    {label: [run folder, one per seed]}, what :func:`sweep` and :func:`matched_sweep` take."""
    from mskt.experiments.grid import run_configs, run_folder

    out_dir = Path(out_dir)
    runs = run_configs(base, configs, seeds, out_dir, jobs=jobs, dataset=dataset if jobs == 1 else None)
    dirs = {label: [run_folder(out_dir, label, s) for s in runs.loc[runs["label"] == label, "seed"]] for label in configs}
    return runs, dirs
