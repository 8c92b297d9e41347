"""Grids of variants x seeds, and their results table (mean and std per metric per variant).

Single runs on these datasets differ by points across seeds, so every table reports the mean and
standard deviation over seeds, with the paper's numbers beside ours when the data are a real dataset.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from mskt.config import Config
from mskt.console import PROGRESS_ENV, outer_progress
from mskt.errors import ConfigError, MsktError
from mskt.experiments.paper import baseline_rows, paper_row
from mskt.data.readers import load_dataset
from mskt.train import atomic_write_text, train

REGRESSION_REPORT = ("acc7", "acc2_nonzero", "f1_nonzero", "acc2_haszero", "f1_haszero", "mae", "corr")
SIMS_REPORT = ("acc2", "acc3", "acc5", "f1", "mae", "corr")  # mskt.metrics.sims_regression_metrics (MMSA's)
EMOTION_REPORT = ("neutral_acc", "neutral_f1", "happy_acc", "happy_f1", "sad_acc", "sad_f1", "angry_acc", "angry_f1", "mean_f1")


def _run_one(cfg: Config, run_dir: Path, dataset=None) -> dict:
    done = run_dir / "metrics.json"
    if done.exists():  # finished earlier: an interrupted grid resumes where it stopped
        return json.loads(done.read_text())
    # Interrupted mid-run: continue from its last completed epoch rather than start over.
    return train(cfg, out_dir=run_dir, dataset=dataset, resume=(run_dir / "last.pt").exists()).metrics


def _run_in_worker(args) -> dict:
    cfg, run_dir = args
    import logging
    import os

    logging.disable(logging.WARNING)  # the data's one-line report was already shown by the parent
    os.environ[PROGRESS_ENV] = "off"  # the parent's bar counts the runs; a bar per worker would garble it
    return _run_one(cfg, run_dir)


def run_folder(out_dir, label: str, seed: int) -> Path:
    """The run folder of ``label`` at ``seed``: ``<out_dir>/<label>-seed<seed>``, with any blank in
    the label as ``-`` (a folder name a shell takes without quotes: finalize's "kt default")."""
    name = re.sub(r"\s+", "-", label.strip())
    return Path(out_dir) / f"{name}-seed{seed}"


def run_configs(base: Config, configs: dict, seeds: int, out_dir, on_run=None, jobs: int = 1, dataset=None) -> pd.DataFrame:
    """Train each named config (``{label: {config overrides}}``) with seeds base.seed, base.seed+1,
    ...; one row per run: label, variant, seed, best epoch, seconds and test metrics.

    ``jobs`` > 1 trains that many runs at once in separate processes of one torch thread each: on a
    small CPU, two single-threaded runs of this model's small matrices get more done than one run
    with two threads. Results do not depend on ``jobs``. Finished runs (a metrics.json in their
    folder) are read back rather than retrained and interrupted ones continue from their last
    completed epoch, so an interrupted grid resumes where it stopped and loses at most one epoch per run.
    ``dataset`` (optional) is ``base.data`` already loaded; worker processes load their own.
    Where a person watches (``base.progress``, :mod:`mskt.console`) a bar counts the runs.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = []
    for i in range(seeds):
        for label, overrides in configs.items():
            cfg = base.replace(**overrides, seed=base.seed + i)
            plan.append((label, cfg, run_folder(out_dir, label, cfg.seed)))
    with outer_progress(len(plan), desc=f"runs of {out_dir.name}", setting=base.progress) as bar:

        def done(label, cfg, metrics):
            bar.set_postfix_str(f"{label} seed {cfg.seed}: best epoch {metrics['best_epoch']}", refresh=False)
            bar.update(1)
            return _row(label, cfg, metrics, on_run)

        if jobs > 1:
            import multiprocessing as mp

            work = [(cfg.replace(threads=cfg.threads or 1), run_dir) for _, cfg, run_dir in plan]
            with mp.get_context("spawn").Pool(jobs) as pool:
                results = pool.imap(_run_in_worker, work)  # in plan order, each as soon as it and those before it are done
                rows = [done(label, cfg, metrics) for (label, cfg, _), metrics in zip(plan, results)]
        else:
            if dataset is None:
                dataset = load_dataset(base.data, scale=base.data_scale, seed=base.data_seed, dataset=base.dataset)
            rows = [done(label, cfg, _run_one(cfg, run_dir, dataset)) for label, cfg, run_dir in plan]
    return pd.DataFrame(rows)


def variant_options(variants, options: dict) -> dict:
    """``{variant: the options of ``options`` it owns}``; an option no variant of the grid owns is an error."""
    from mskt.model import variant_class
    from mskt.model.options import option_names

    owned = {}
    for v in variants:
        names = option_names(variant_class(v).Options)
        owned[v] = {names[k]: value for k, value in options.items() if k in names}
    orphans = [k for k in options if not any(k in option_names(variant_class(v).Options) for v in variants)]
    if orphans:
        raise ConfigError(f"{orphans[0]} is an option of none of the grid's variants ({', '.join(variants)})")
    return owned


def run_grid(base: Config, variants, seeds: int, out_dir, on_run=None, jobs: int = 1, against: str | None = None,
             correction: str = "holm", bootstrap: int = 0, options: dict | None = None) -> pd.DataFrame:
    """Every variant x seeds (see run_configs); writes runs.csv, results.csv and results.md, and with
    ``against`` (a variant of the grid) comparisons.csv and comparisons.md (:func:`comparisons`);
    ``bootstrap`` > 0 adds that many resamples of seeds x test samples (:func:`bootstrap_comparisons`).
    ``options``: variant options (``{"lambda_vision": 0.5}``), each applied to the variants that own it."""
    if against is not None and against not in variants:
        raise ConfigError(f"against={against!r}: not among the grid's variants {', '.join(variants)}")
    per_variant = variant_options(variants, options or {})
    out_dir = Path(out_dir)
    dataset = load_dataset(base.data, scale=base.data_scale, seed=base.data_seed, dataset=base.dataset)
    runs = run_configs(base, {v: {"variant": v, **per_variant[v]} for v in variants}, seeds, out_dir, on_run, jobs, dataset)
    atomic_write_text(out_dir / "runs.csv", runs.to_csv(index=False))
    table = summarize(runs, dataset.meta.task)
    atomic_write_text(out_dir / "results.csv", table.to_csv())
    real = dataset.meta.format != "synthetic"
    atomic_write_text(
        out_dir / "results.md",
        to_markdown(table, dataset.meta.name, dataset.meta.aligned, dataset.meta.task, with_paper=real, title=dataset.meta.source),
    )
    if against is not None:
        tests = comparisons(runs, dataset.meta.task, against, correction=correction)
        atomic_write_text(out_dir / "comparisons.csv", tests.to_csv(index=False))
        text = comparisons_markdown(tests)
        if bootstrap > 0:
            boot = bootstrap_comparisons(runs, out_dir, dataset, against, report_metrics(runs, dataset.meta.task), n_boot=bootstrap)
            atomic_write_text(out_dir / "bootstrap.csv", boot.to_csv(index=False))
            text += "\n" + bootstrap_markdown(boot)
        atomic_write_text(out_dir / "comparisons.md", text)
    return runs


def per_sample_predictions(run_dirs, dataset, batch_size: int = 256):
    """Per-sample test predictions of runs (one per seed) under the default test protocol (the model's
    ``test_missing`` modalities missing, as ``evaluate`` scores them): an array (runs, samples, ...).
    Each run's predictions must reproduce the test metrics it recorded, or it is an error."""
    import json

    import numpy as np

    from mskt.metrics import compute_metrics
    from mskt.train import Tensors, load_run, predict

    data, out = None, []
    for run_dir in run_dirs:
        cfg, model = load_run(Path(run_dir))
        if data is None:
            data = Tensors.from_split(dataset["test"], dataset.meta.task, "cpu")
        model.to("cpu")
        pred = predict(model, data, batch_size, missing=",".join(model.test_missing) or None)["pred"]
        recorded = json.loads((Path(run_dir) / "metrics.json").read_text())["test"]
        again = compute_metrics(dataset.meta.task, pred, data.labels.numpy(), dataset.meta.name)
        off = [k for k, v in again.items() if k in recorded and abs(v - recorded[k]) > 1e-4 and v == v]
        if off:
            raise MsktError(f"{run_dir}: its test predictions do not reproduce its metrics.json ({off[0]} {again[off[0]]:.4f} vs {recorded[off[0]]:.4f})")
        out.append(pred)
    return np.stack(out)  # (seeds, samples, ...)


def bootstrap_comparisons(runs: pd.DataFrame, out_dir, dataset, against: str, metrics, n_boot: int = 1000, by: str = "label",
                          seed: int = 0) -> pd.DataFrame:
    """Every other label against ``against`` with test-set noise counted: ``mskt.stats.bootstrap`` over
    seeds x test samples (the same resampled samples for both) of the runs' per-sample test
    predictions (:func:`per_sample_predictions`, runs in ``out_dir/<label>-seed<seed>``), at the seeds both
    have. One row per (label, metric): a, b, metric, delta, ci_lo, ci_hi, p, n_seeds, n_samples, n_boot."""
    import numpy as np

    from mskt import stats

    out_dir = Path(out_dir)
    labels = list(dict.fromkeys(runs[by]))
    seeds = {label: set(runs.loc[runs[by] == label, "seed"]) for label in labels}
    labels_y = dataset["test"].labels
    reference = dict(zip(sorted(seeds[against]), per_sample_predictions([run_folder(out_dir, against, s) for s in sorted(seeds[against])], dataset)))
    rows = []
    for label in labels:
        if label == against:
            continue
        common = sorted(seeds[label] & seeds[against])
        a = per_sample_predictions([run_folder(out_dir, label, s) for s in common], dataset)
        b = np.stack([reference[s] for s in common])  # (seeds, samples, ...)
        for m in metrics:
            fn = stats.metric_function(m, dataset.meta.task, dataset.meta.name)
            try:
                rows.append({"a": label, "b": against, "metric": m, **stats.bootstrap(a, b, labels_y, fn, n_boot=n_boot, seed=seed), "note": ""})
            except stats.StatsError as e:  # e.g. Corr of a constant prediction: said in the table, the others still shown
                rows.append({"a": label, "b": against, "metric": m, "n_seeds": len(common), "n_samples": len(labels_y), "n_boot": n_boot, "note": str(e)})
    return pd.DataFrame(rows)


def bootstrap_markdown(boot: pd.DataFrame) -> str:
    """:func:`bootstrap_comparisons` as Markdown (accuracies and F1 in points)."""
    from mskt.metrics import display_scale

    lines = ["| A vs B | metric | seeds × samples | A − B [95% bootstrap CI] | bootstrap p |", "|---|---|---|---|---|"]
    for _, r in boot.iterrows():
        if isinstance(r.get("note"), str) and r["note"]:  # read back from a CSV, an empty note is NaN
            lines.append(f"| {r['a']} vs {r['b']} | {r['metric']} | {r['n_seeds']} × {r['n_samples']} | {r['note']} | |")
            continue
        scale, digits = display_scale(r["metric"])
        f = f"+.{digits}f"
        lines.append(f"| {r['a']} vs {r['b']} | {r['metric']} | {r['n_seeds']} × {r['n_samples']} | "
                     f"{scale * r['delta']:{f}} [{scale * r['ci_lo']:{f}}, {scale * r['ci_hi']:{f}}] | {r['p']:.3f} |")
    lines += ["", f"Bootstrap over seeds and, within each seed, test samples ({int(boot['n_boot'].iloc[0])} resamples, the same "
              "samples for A and B): test-set noise counted once; not corrected across cells. With few seeds this "
              "interval is narrower than the paired t's (resampled seeds understate seed noise): decide with the table above."]
    return "\n".join(lines) + "\n"


def _row(label: str, cfg: Config, metrics: dict, on_run) -> dict:
    row = {"label": label, "variant": cfg.variant, "seed": cfg.seed, "best_epoch": metrics["best_epoch"], "seconds": metrics["seconds"],
           "converged": metrics.get("converged"), **metrics["test"]}  # converged: None for a run finished before it was recorded
    if on_run is not None:
        on_run(row)
    return row


def summarize(runs: pd.DataFrame, task: str, by: str = "label") -> pd.DataFrame:
    """Mean and std over seeds per label (variant): columns (metric, "mean" | "std"), in run order."""
    metrics = report_metrics(runs, task)
    order = list(dict.fromkeys(runs[by]))
    grouped = runs.groupby(by, sort=False)[metrics]
    table = pd.concat({"mean": grouped.mean(), "std": grouped.std(ddof=1).fillna(0.0)}, axis=1)
    table = table.swaplevel(axis=1).sort_index(axis=1, level=0, sort_remaining=False)[metrics]
    table[("n_seeds", "")] = runs.groupby(by, sort=False).size()
    return table.loc[order]


def report_metrics(runs: pd.DataFrame, task: str) -> list:
    """The metrics a results table shows, in its order: those of the task's report present in ``runs``."""
    report = EMOTION_REPORT if task != "regression" else SIMS_REPORT if "acc3" in runs else REGRESSION_REPORT
    return [m for m in report if m in runs]


def comparisons(runs: pd.DataFrame, task: str, against: str, metrics=None, by: str = "label",
                correction: str = "holm") -> pd.DataFrame:
    """Every other label of ``runs`` against ``against``, paired by seed, on every metric of the results
    table (or ``metrics``): ``mskt.stats.compare_frame``, the p-values corrected together across the
    table's cells (labels x metrics) by ``correction`` (Holm by default). One row per (label, metric)."""
    from mskt import stats

    labels = list(dict.fromkeys(runs[by]))
    if against not in labels:
        raise ConfigError(f"against={against!r}: no runs of it (found {', '.join(map(str, labels))})")
    metrics = list(metrics or report_metrics(runs, task))
    pairs = [(label, against) for label in labels if label != against]
    return stats.compare_frame(runs, pairs, metrics, label=by, seed="seed", method=correction)


def comparisons_markdown(tests: pd.DataFrame) -> str:
    """:func:`comparisons` as Markdown (``mskt.stats.comparisons_markdown``), with a line on how to read it."""
    from mskt import stats

    method = {"holm": "Holm", "bh": "Benjamini-Hochberg", "none": "no"}.get(str(tests["method"].dropna().iloc[0]) if tests["method"].notna().any() else "none")
    note = (f"Paired by seed: A − B with its t-based 95% CI; p of the paired t, Wilcoxon signed-rank and exact sign "
            f"tests; {method} correction across the table's {int(tests['p_t'].notna().sum())} tests (the decision uses the "
            "adjusted p of the t test); MDE: the difference these seeds detect with 80% power (alpha 0.05). "
            "Accuracies and F1 in points.")
    return stats.comparisons_markdown(tests) + "\n" + note + "\n"


def _fmt(metric: str, mean: float, std: float) -> str:
    if metric in ("mae", "corr"):
        return f"{mean:.3f} ± {std:.3f}"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def to_markdown(table: pd.DataFrame, dataset: str, aligned: bool, task: str, with_paper: bool, title: str = "") -> str:
    """A Markdown table: accuracies and F1 in percent, mean ± std over seeds; the paper's row under
    each of ours when ``with_paper``, then the paper's other baselines (RMFN, MFM, RAVEN, ...) as
    reference rows."""
    metrics = [m for m in table.columns.get_level_values(0).unique() if m != "n_seeds"]
    header = "| variant | seeds | " + " | ".join(metrics) + " |"
    lines = [f"Results on {title}" if title else "", "", header, "|" + "---|" * (len(metrics) + 2)]
    for variant, row in table.iterrows():
        cells = [_fmt(m, row[(m, "mean")], row[(m, "std")]) for m in metrics]
        lines.append(f"| {variant} | {int(row['n_seeds'].iloc[0] if hasattr(row['n_seeds'], 'iloc') else row['n_seeds'])} | " + " | ".join(cells) + " |")
        paper = paper_row(dataset, aligned, variant) if with_paper else None
        if paper:
            cells = [("" if m not in paper else (f"{paper[m]:.3f}" if m in ("mae", "corr") else f"{100 * paper[m]:.1f}")) for m in metrics]
            lines.append(f"| *{variant} (paper)* | | " + " | ".join(cells) + " |")
    for name, paper in (baseline_rows(dataset, aligned) if with_paper else {}).items():  # the paper's other baselines, for reference
        cells = [("" if m not in paper else (f"{paper[m]:.3f}" if m in ("mae", "corr") else f"{100 * paper[m]:.1f}")) for m in metrics]
        lines.append(f"| *{name} (paper)* | | " + " | ".join(cells) + " |")
    lines.append("")
    if "acc3" in metrics:
        lines.append("Accuracies and F1 in percent; CH-SIMS conventions (MMSA): labels and predictions clipped to [-1, 1], "
                     "Acc2/F1 over [-1, 0] vs (0, 1], Acc3 and Acc5 over MMSA's bins.")
    else:
        lines.append("Accuracies and F1 in percent; Acc2/F1 *nonzero*: samples with label ≠ 0 (MulT, the paper); "
                     "*haszero*: all samples, label ≥ 0 vs prediction ≥ 0 (MMSA).")
    return "\n".join(lines).lstrip("\n") + "\n"
