"""Robustness to missing modalities: every trained run under every missing protocol, in one frame.

``sweep`` evaluates runs (folders or in-memory models) on a split under (1) the six fixed missing
conditions of MMIN (every sample misses the same one or two modalities) and (2) random missing rates
(each modality of each sample missing with probability r, ``mskt.data.missing``; or each time step, with
``mode="step"``), over several mask seeds. One row per (run, protocol, mask seed) with every metric;
``summarize`` gives mean and std over training seeds and mask seeds; ``mskt.viz.plots.plot_robustness``
and ``plot_conditions`` draw them.

Everything is deterministic by seed: masks come from their own seeded generators and models are
evaluated in eval mode, so two calls with the same arguments return equal frames.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from mskt.errors import MsktError
from mskt.data.missing import CONDITIONS, RATES, check_mode, check_rate, parse_missing
from mskt.model import KTMulT

ID_COLUMNS = ("label", "variant", "run_seed", "protocol", "condition", "rate", "mask_seed", "mode")


def _entries(runs) -> list[tuple[str, object]]:
    """(label, run folder or model) pairs from {label: [runs]} or a flat list (label = the variant)."""
    if isinstance(runs, dict):
        return [(label, r) for label, items in runs.items() for r in (items if isinstance(items, (list, tuple)) else [items])]
    return [(None, r) for r in runs]


def _load(entry) -> KTMulT:
    if isinstance(entry, KTMulT):
        return entry
    from mskt.train import load_run

    return load_run(Path(entry))[1]


def _check_fits(model: KTMulT, dataset, where: str) -> None:
    dims, cfg = dataset.dims, model.cfg
    wanted = {"text_dim": dims["text"], "audio_dim": dims["audio"], "vision_dim": dims["vision"], "task": dataset.meta.task}
    for key, value in wanted.items():
        if getattr(cfg, key) != value:
            raise MsktError(f"{where}: {key}={getattr(cfg, key)} does not fit the data {dataset.meta.source} ({key}={value})")


def sweep(runs, dataset=None, rates=RATES, conditions=CONDITIONS, seeds=(0, 1, 2), mode: str = "sample",
          split: str = "test", batch_size: int = 256, device: str = "cpu", on_eval=None) -> pd.DataFrame:
    """Evaluate every run under every fixed condition and every missing rate.

    ``runs``: {label: [run folder or KTMulT, ...]} (one entry per training seed) or a flat list
    (labelled by variant). ``dataset``: the data the runs were trained on (default: the first run's
    ``cfg.data``). ``rates``: per-sample (``mode="sample"``) or per-step (``mode="step"``) missing
    rates in [0, 1), each evaluated with every mask seed in ``seeds`` (rate 0 once: nothing is random).
    ``conditions``: fixed patterns such as "audio" or "audio,vision", each evaluated once (not random).

    Returns one row per (run, protocol, mask seed): label, variant, run_seed, protocol ("rate" or
    "condition"), condition ("rate 0.3" or "audio,vision"), rate (NaN for conditions), mask_seed
    (-1 for conditions and rate 0) and every metric of ``mskt.metrics`` plus the task loss.
    """
    from mskt.train import Tensors, evaluate

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
    rows = []
    for label, model, entry in models:
        _check_fits(model, dataset, str(entry) if not isinstance(entry, KTMulT) else f"model {label}")
        model.to(device)
        cfg = model.cfg
        base = {"label": label or cfg.variant, "variant": cfg.variant, "run_seed": int(getattr(cfg, "seed", 0))}
        plan = [("condition", c, math.nan, -1, {"missing": () if c == "none" else c}) for c in conditions]
        for rate in rates:
            for seed in (seeds if rate > 0 else [-1]):
                kw = {"missing": (), "missing_rate": rate, "missing_mode": mode, "missing_seed": max(seed, 0)}
                plan.append(("rate", f"rate {rate:g}", rate, seed, kw))
        for protocol, condition, rate, seed, kw in plan:
            metrics = evaluate(model, data, batch_size, **kw)
            row = {**base, "protocol": protocol, "condition": condition, "rate": rate, "mask_seed": seed, "mode": mode, **metrics}
            rows.append(row)
            if on_eval is not None:
                on_eval(row)
    return pd.DataFrame(rows)


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


def gaps(frame: pd.DataFrame, reference: str = "kt_any", others=("kt", "language_vision"), metric: str = "mae") -> pd.DataFrame:
    """Per condition, ``reference`` minus each of ``others`` on ``metric``: the difference of the
    means over seeds and, beside it, the larger of the two stds (a difference smaller than that is
    within seed noise); n: the reference's evaluations per condition. Rows in the frame's condition
    order; labels absent from the frame are skipped."""
    table = summarize(frame, [metric])
    order = list(dict.fromkeys(frame["condition"]))
    rows = []
    for condition in order:
        sel = table.xs(condition, level="condition")
        if reference not in sel.index.get_level_values("label"):
            continue
        ref = sel.loc[reference].iloc[0]
        row = {"condition": condition, "n": int(ref[("n", "")]), f"{reference} {metric}": ref[(metric, "mean")]}
        for other in others:
            if other not in sel.index.get_level_values("label"):
                continue
            oth = sel.loc[other].iloc[0]
            row[f"- {other}"] = ref[(metric, "mean")] - oth[(metric, "mean")]
            row[f"noise vs {other}"] = max(ref[(metric, "std")], oth[(metric, "std")])
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(frame: pd.DataFrame, metric: str = "mae", protocol: str = "rate") -> str:
    """A Markdown table of one metric, mean ± std: one row per label, one column per condition."""
    table = summarize(frame[frame["protocol"] == protocol], [metric])
    conditions = list(dict.fromkeys(frame.loc[frame["protocol"] == protocol, "condition"]))
    labels = list(dict.fromkeys(frame["label"]))
    scale, digits = (1, 3) if metric in ("mae", "corr", "loss") else (100, 1)
    lines = [f"| {metric} | " + " | ".join(conditions) + " |", "|---|" + "---|" * len(conditions)]
    for label in labels:
        cells = []
        for c in conditions:
            if (label, protocol, c) in table.index:
                r = table.loc[(label, protocol, c)]
                cells.append(f"{scale * r[(metric, 'mean')]:.{digits}f} ± {scale * r[(metric, 'std')]:.{digits}f}")
            else:
                cells.append("")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def reading(frame: pd.DataFrame, reference: str = "kt_any", others=("kt", "language_vision"), metric: str = "mae") -> str:
    """One plain line per condition: where ``reference`` stands against each of ``others`` on
    ``metric``, and whether the gap exceeds seed noise (the larger std of the two). Lower is better
    for mae and loss, higher for the rest."""
    lower_better = metric in ("mae", "loss")
    table = gaps(frame, reference, others, metric)
    lines = []
    for _, row in table.iterrows():
        parts = []
        for other in others:
            if f"- {other}" not in row:
                continue
            diff, noise = row[f"- {other}"], row[f"noise vs {other}"]
            better = diff < 0 if lower_better else diff > 0
            if row["n"] < 2:
                size = "one evaluation per condition: no noise estimate"
            else:
                size = "within seed noise" if abs(diff) <= noise else ("better" if better else "worse")
            parts.append(f"{'+' if diff >= 0 else '−'}{abs(diff):.3f} vs {other} ({size}, std {noise:.3f})")
        lines.append(f"{row['condition']:>14}: {reference} {metric} {row[f'{reference} {metric}']:.3f}; " + "; ".join(parts))
    return "\n".join(lines)
