"""Experiments that decide (docs/results.md, "Decisions"): the headline comparisons, trained until
validation stops improving, on test splits large enough that test noise does not swamp a
1.5-point Acc2 difference, over paired seeds, and read with :mod:`mskt.stats`.

Parts, each a folder of runs (``run``) and a table of paired comparisons (``tables``):

- ``headline``: the paper's five variants (Table 1's rows) on the default synthetic world.
- ``robustness``: the fair robustness comparison. Every config selects its checkpoint on the mean
  of the six fixed missing conditions (``select_missing="conditions"``, one protocol for all);
  ``+drop`` configs train under kt_any's own missing protocol. Each run is then swept under the six
  conditions and random per-sample missing rates 0-0.7 (``robustness.sweep``).
- ``controls``: kt against language_vision in the positive and negative control worlds at 5%, 20%
  and 100% of the labels. Every run stops by patience, whatever its labels; ``steps_like_full_labels``
  only acts on a run that reaches the epoch cap (it would then go on to the steps a run with every
  label takes), and each run records its optimizer steps.
- ``baselines``: kt against MCTN (Pham et al. 2019, the paper's own missing-modality baseline: it
  reads only language at test time) and MCTN against the language-only MulT it improves on, on the
  headline's design. MCTN has its own recurrent widths (its options); the shared settings (lr 3e-3,
  batch, stopping rule, data) are the headline's.
- ``paper-size``: the headline pairs (full, language_vision, kt) again with the paper's model and
  optimiser (``Config``'s defaults: d_model 40, 5 heads, the paper's depths, lr 1e-3), to see whether
  the small model's decisions hold at the size the paper trains.

The first three parts share :data:`BASE`: the controls' small model (``controls.SMALL``: d_model 16, one layer
per stack, lr 3e-3), early stopping on validation loss (``patience`` 5, at most 40 epochs), a
1000-sample validation split and a 2000-sample test split (training data at the preset's size).
Seeds are paired: at seed s every config sees the same data, the same labelled subset, the same
initialisation seed and the same batch order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from mskt import stats
from mskt.config import Config
from mskt.errors import ConfigError
from mskt.experiments import controls, robustness
from mskt.experiments.grid import bootstrap_markdown, run_configs
from mskt.metrics import display_scale

PARTS = ("headline", "baselines", "robustness", "controls", "paper-size")
DATA = "synthetic:mosi?test_size=2000&valid_size=1000"
BASE = dict(epochs=40, patience=5)
SEEDS, CONTROL_SEEDS = 8, 6
# Controls: patience may stop a run only after 20 epochs. With patience alone (5 epochs from the
# first), kt stopped at epoch 6 on 2 of 6 positive-control seeds at 5% of the labels and 4 of 6 at
# 20%, its best epoch 1 or 2: the slow start before the fusion learns to use A' looked like a plateau
# (the runs that went on reached Corr 0.76-0.82; docs/results.md, "Controls").
CONTROL_MIN_EPOCHS = 20
FIVE = ("full", "vision", "language", "language_vision", "kt")
PAPER_SIZE = ("full", "language_vision", "kt")
BASELINES = ("kt", "language", "mctn")
FAIR = ("kt_any", "kt_any-nodrop", "full+drop", "full", "kt", "language_vision")
FRACTIONS = (0.05, 0.2, 1.0)
MASK_SEEDS = (0, 1)
# The comparisons the issue names as headline (A, B): A - B per metric, Holm-adjusted per table.
HEADLINE_PAIRS = (("kt", "language_vision"), ("kt", "full"), ("language_vision", "full"), ("kt", "language"))
BASELINE_PAIRS = (("kt", "mctn"), ("mctn", "language"))
ROBUST_PAIRS = (("kt_any", "full+drop"), ("kt_any", "kt_any-nodrop"), ("full+drop", "full"), ("kt_any", "kt"), ("kt", "language_vision"))
METRICS = ("mae", "acc2_nonzero", "corr")


def base_config(data: str = DATA, **overrides) -> Config:
    return controls.small_config(data, **{**BASE, **overrides})


def paper_size_config(data: str = DATA, **overrides) -> Config:
    """The paper's model and optimiser (Config's defaults), with the same stopping rule and splits."""
    return Config.from_dict({"data": data, "device": "cpu", "progress": "off", "threads": 1, "seed": 0, **BASE, **overrides})


def configs(part: str) -> dict:
    """{label: config overrides} of one part (not controls, which ``controls.run`` lays out)."""
    if part == "headline":
        return {v: {"variant": v} for v in FIVE}
    if part == "paper-size":
        return {v: {"variant": v} for v in PAPER_SIZE}
    if part == "baselines":
        return {v: {"variant": v} for v in BASELINES}
    if part == "robustness":
        fair = robustness.fair_configs(variants=("kt_any", "kt", "language_vision", "full"))
        return {label: fair[label] for label in FAIR}
    raise ConfigError(f"decide: part {part!r} has no config table; choose one of headline, baselines, robustness, paper-size")


def run(part: str, out, seeds: int = SEEDS, jobs: int = 1, on_run=None, base: Config | None = None) -> pd.DataFrame:
    """Train (or read back) one part into ``out/<part>`` and write its ``runs.csv`` (and, for
    robustness, ``sweep.csv``); returns the runs frame."""
    out = Path(out) / part
    if part == "controls":
        cfg = base or base_config(steps_like_full_labels=True, min_epochs=CONTROL_MIN_EPOCHS)
        controls.run(cfg, fractions=FRACTIONS, seeds=seeds, out_dir=out, jobs=jobs, on_run=on_run)
    elif part in ("headline", "baselines", "robustness", "paper-size"):
        base = base or (paper_size_config() if part == "paper-size" else base_config())
        run_configs(base, configs(part), seeds, out, on_run=on_run, jobs=jobs)
    else:
        raise ConfigError(f"decide: unknown part {part!r}; choose one of {', '.join(PARTS)}")
    runs = read_runs(out)
    runs.to_csv(out / "runs.csv", index=False)
    if part == "robustness":
        sweep_runs(out).to_csv(out / "sweep.csv", index=False)
    if part in ("headline", "baselines", "paper-size"):
        bootstrap(runs, out).to_csv(out / "bootstrap.csv", index=False)
    return runs


def bootstrap(runs: pd.DataFrame, folder, against: str = "kt", metrics=("mae", "acc2_nonzero"), n_boot: int = 2000) -> pd.DataFrame:
    """Every label against ``against`` with test-set noise counted once: ``grid.bootstrap_comparisons``
    over seeds x test samples of the runs' per-sample predictions (which must reproduce their metrics)."""
    from mskt.data.readers import load_dataset
    from mskt.experiments.grid import bootstrap_comparisons

    cfg = json.loads(next(Path(folder).glob("*/config.json")).read_text())
    dataset = load_dataset(cfg["data"], scale=cfg["data_scale"], seed=cfg["data_seed"])
    return bootstrap_comparisons(runs, folder, dataset, against, list(metrics), n_boot=n_boot)


def read_runs(folder) -> pd.DataFrame:
    """Every finished run under ``folder`` (any depth): label, control, label_fraction, variant,
    seed, convergence (converged, stopped_by, best_epoch, epochs_run, optimizer_steps), seconds and
    the test metrics."""
    rows = []
    folder = Path(folder)
    for done in sorted(folder.rglob("metrics.json")):
        run_dir = done.parent
        cfg = json.loads((run_dir / "config.json").read_text())
        m = json.loads(done.read_text())
        rel = run_dir.relative_to(folder).parts
        rows.append({"label": run_dir.name.rsplit("-seed", 1)[0], "control": rel[0] if len(rel) > 1 else "",
                     "label_fraction": cfg.get("label_fraction", 1.0), "variant": cfg["variant"], "seed": cfg["seed"],
                     "converged": m.get("converged"), "stopped_by": m.get("stopped_by"), "best_epoch": m["best_epoch"],
                     "epochs_run": m.get("epochs_run"), "optimizer_steps": m.get("optimizer_steps"), "seconds": m["seconds"],
                     **m["test"]})
    if not rows:
        raise ConfigError(f"{folder}: no finished runs (no metrics.json below it)")
    return pd.DataFrame(rows)


def sweep_runs(folder, rates=robustness.RATES, mask_seeds=MASK_SEEDS) -> pd.DataFrame:
    """``robustness.sweep`` of every finished run under ``folder``, one run at a time; each run's
    rows are kept in its folder (``sweep.csv``) and read back on the next call."""
    frames = []
    for done in sorted(Path(folder).glob("*/metrics.json")):
        run_dir = done.parent
        cached = run_dir / "sweep.csv"
        if cached.exists():
            frames.append(pd.read_csv(cached))
            continue
        label = run_dir.name.rsplit("-seed", 1)[0]
        rows = robustness.sweep({label: [run_dir]}, rates=rates, seeds=mask_seeds)
        rows.to_csv(cached, index=False)
        frames.append(rows)
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------------------------
# Reading: paired comparisons (mskt.stats), Holm-adjusted over the cells of one table.


def robustness_scores(sweep: pd.DataFrame, metrics=METRICS) -> pd.DataFrame:
    """One row per (run, score): label, seed, score and a column per metric. Scores: ``conditions``
    (the mean over the six fixed conditions), ``audio`` (the audio-missing condition, the paper's
    setting), ``rate 0`` (nothing missing) and ``AUC 0-0.7`` (the normalised area under the
    per-sample rate curve, mask seeds averaged first so that each run counts once)."""
    rows = []
    for (label, seed), g in sweep.groupby(["label", "run_seed"], sort=False):
        cond = g[g["protocol"] == "condition"]
        rate = g[g["protocol"] == "rate"].groupby("rate")[list(metrics)].mean().sort_index()
        scores = {"conditions": cond[list(metrics)].mean(), "audio": cond.loc[cond["condition"] == "audio", list(metrics)].mean(),
                  "rate 0": rate.loc[0.0],
                  "AUC 0-0.7": pd.Series({m: robustness.normalized_auc(rate.index.to_numpy(), rate[m].to_numpy()) for m in metrics})}
        for score, values in scores.items():
            rows.append({"label": label, "seed": int(seed), "score": score, **{m: float(values[m]) for m in metrics}})
    return pd.DataFrame(rows)


def compare(runs: pd.DataFrame, pairs, metrics=METRICS, cells=(), correction: str = "holm") -> pd.DataFrame:
    """``mskt.stats.compare_frame`` of ``pairs`` over ``metrics`` (a column per metric), with the
    p-values adjusted over every row of the table, per metric."""
    return stats.compare_frame(runs, pairs, metrics, cells=cells, method=correction)


def summary(runs: pd.DataFrame, metrics=METRICS, by=("label",)) -> pd.DataFrame:
    """Mean ± std over seeds per ``by``, with the share of runs that converged and their mean epochs."""
    g = runs.groupby(list(by), sort=False)
    out = g[list(metrics)].agg(["mean", "std"])
    out.columns = [f"{m}_{s}" for m, s in out.columns]
    out["seeds"] = g.size()
    out["converged"] = g["converged"].mean() if "converged" in runs else np.nan
    out["epochs_run"] = g["epochs_run"].mean() if "epochs_run" in runs else np.nan
    out["minutes"] = g["seconds"].sum() / 60
    return out.reset_index()


def summary_markdown(table: pd.DataFrame, metrics=METRICS, by=("label",)) -> str:
    head = [*by, "seeds", *metrics, "converged", "epochs run", "CPU min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        cells = [str(r[b]) for b in by] + [str(int(r["seeds"]))]
        for m in metrics:
            s, digits = display_scale(m)
            cells.append(f"{r[f'{m}_mean'] * s:.{digits}f} ± {r[f'{m}_std'] * s:.{digits}f}")
        cells += [f"{r['converged'] * r['seeds']:.0f}/{int(r['seeds'])}", f"{r['epochs_run']:.1f}", f"{r['minutes']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds_for(runs: pd.DataFrame, pairs, targets: dict, metrics=None) -> pd.DataFrame:
    """Per pair and metric: the paired sd observed, the minimal detectable effect at the seeds run,
    and the seeds ``mskt.stats.seeds_needed`` says the target MDE (``targets``: {metric: MDE in
    the metric's units}) needs."""
    rows = []
    for a, b in pairs:
        for m, target in targets.items():
            x = runs[runs["label"] == a].set_index("seed")[m]
            y = runs[runs["label"] == b].set_index("seed")[m]
            d = (x - y).dropna().to_numpy()
            if len(d) < 2:  # a cell still running: nothing to size yet
                continue
            sd = float(np.std(d, ddof=1))
            rows.append({"A": a, "B": b, "metric": m, "seeds": len(d), "sd": sd, "mde": stats.mde(sd, len(d)),
                         "target": target, "seeds_needed": stats.seeds_needed(target, sd)})
    return pd.DataFrame(rows)


TARGETS = {"mae": 0.03, "acc2_nonzero": 0.015}  # the minimal detectable effects for headline comparisons


def headline_report(runs: pd.DataFrame, pairs=HEADLINE_PAIRS) -> dict:
    """A table of variants: summary (mean ± std over seeds, convergence), the paired comparisons of
    ``pairs`` (Holm over the table, per metric) and the seeds the MDE targets need (its first two pairs)."""
    return {"summary": summary(runs), "comparisons": compare(runs, pairs), "power": seeds_for(runs, pairs[:2], TARGETS)}


def robustness_report(runs: pd.DataFrame, sweep: pd.DataFrame) -> dict:
    """The fair robustness comparison: per score (six-condition mean, audio missing, rate 0, AUC),
    mean ± std over seeds and the paired comparisons of :data:`ROBUST_PAIRS`, Holm over every
    (score, pair) per metric."""
    scores = robustness_scores(sweep)
    table = scores.groupby(["score", "label"], sort=False)[list(METRICS)].agg(["mean", "std"])
    table.columns = [f"{m}_{s}" for m, s in table.columns]
    table = table.reset_index()
    table["seeds"] = scores.groupby(["score", "label"], sort=False).size().to_numpy()
    conv = runs.groupby("label")[["converged", "epochs_run", "seconds"]].agg({"converged": "mean", "epochs_run": "mean", "seconds": "sum"})
    table = table.merge(conv.rename(columns={"seconds": "minutes"}).assign(minutes=lambda f: f["minutes"] / 60), on="label")
    head = scores[scores["score"] == "conditions"]
    power = seeds_for(head, ROBUST_PAIRS[:1], TARGETS)
    return {"scores": scores, "summary": table, "comparisons": compare(scores, ROBUST_PAIRS, cells=("score",)), "power": power}


def controls_report(runs: pd.DataFrame) -> dict:
    """kt against language_vision per (control, label fraction): summary and paired comparisons,
    Holm over the six cells per metric."""
    cells = ("control", "label_fraction")
    return {"summary": summary(runs, by=("control", "label_fraction", "variant")),
            "comparisons": compare(runs.assign(label=runs["variant"]), [("kt", "language_vision")], cells=cells),
            "power": pd.concat([seeds_for(g.assign(label=g["variant"]), [("kt", "language_vision")], TARGETS).assign(control=c, label_fraction=f)
                                for (c, f), g in runs.groupby(list(cells))], ignore_index=True)}


def power_markdown(power: pd.DataFrame, cells=()) -> str:
    """:func:`seeds_for`'s rows as Markdown: per pair and metric, the seeds run, the paired sd, the
    MDE they give, the target and the seeds the target needs (accuracies in points)."""
    head = [*cells, "A vs B", "metric", "seeds", "paired sd", "MDE", "target MDE", "seeds needed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in power.iterrows():
        scale, digits = display_scale(r["metric"])
        f = f".{digits}f"
        lines.append("| " + " | ".join([*(str(r[c]) for c in cells), f"{r['A']} vs {r['B']}", r["metric"], str(int(r["seeds"])),
                                         f"{scale * r['sd']:{f}}", f"{scale * r['mde']:{f}}", f"{scale * r['target']:{f}}",
                                         str(int(r["seeds_needed"]))]) + " |")
    return "\n".join(lines) + "\n"


TITLES = {"headline": "The five variants", "baselines": "kt against MCTN, the paper's own missing-modality baseline", "paper-size": "The headline pairs at the paper's model size",
          "robustness": "Fair robustness, one selection protocol", "controls": "Controls: kt against language_vision",
          "controls-patience5": "Controls with patience alone (a diagnosis: runs stopped on a slow start)"}
CELLS = {"headline": (), "baselines": (), "paper-size": (), "robustness": ("score",), "controls": ("control", "label_fraction"),
         "controls-patience5": ("control", "label_fraction")}


def results_dir():
    """Where docs/results.md's runs tables are committed (``docs/decide/<part>/``)."""
    from mskt.paths import project_root

    return project_root() / "docs" / "decide"


def part_report(part: str, folder=None) -> dict | None:
    """One part's reading from ``folder/<part>`` (default: the committed :func:`results_dir`), or None
    when it has no runs yet: ``markdown`` (summary, paired comparisons, power, bootstrap),
    ``comparisons`` (the ``mskt.stats.compare_frame`` rows) and ``cells`` (their cell columns)."""
    folder = Path(folder) if folder is not None else results_dir()
    where = folder / part
    if not (where / "runs.csv").exists() or (part == "robustness" and not (where / "sweep.csv").exists()):
        return None
    runs = pd.read_csv(where / "runs.csv")
    cells = CELLS[part]
    if part == "robustness":
        r = robustness_report(runs, pd.read_csv(where / "sweep.csv"))
        summary_text = summary_markdown(r["summary"], by=("score", "label"))
    elif part.startswith("controls"):
        r = controls_report(runs)
        summary_text = summary_markdown(r["summary"], by=("control", "label_fraction", "variant"))
    else:
        r = headline_report(runs, BASELINE_PAIRS if part == "baselines" else HEADLINE_PAIRS)
        summary_text = summary_markdown(r["summary"])
    text = [f"### {TITLES[part]}", summary_text, "", stats.comparisons_markdown(r["comparisons"], cells=cells),
            power_markdown(r["power"], cells=cells if part.startswith("controls") else ())]
    if (where / "bootstrap.csv").exists():
        text += [bootstrap_markdown(pd.read_csv(where / "bootstrap.csv"))]
    return {"markdown": "\n".join(text), "comparisons": r["comparisons"], "cells": cells}


def report(out=None) -> str:
    """docs/results.md's "Decisions" tables for whichever parts under ``out`` have runs."""
    reports = [part_report(p, out) for p in ("headline", "baselines", "paper-size", "controls", "controls-patience5", "robustness")]
    return "\n".join(r["markdown"] for r in reports if r is not None)


def report_document(folder=None) -> str:
    """The committed ``docs/decide/report.md``: a header naming the command, then :func:`report`."""
    head = ("# Decisions: every table, from the committed runs\n\n"
            "Generated by `mskt.experiments.decide.write_report()` from the runs tables beside this file (made by\n"
            "`scripts/decide.py`); docs/results.md quotes and reads them. Accuracies in points; Holm-adjusted p per\n"
            "metric over every row of a table.\n\n")
    return head + report(folder)


def write_report(folder=None) -> Path:
    path = (Path(folder) if folder is not None else results_dir()) / "report.md"
    path.write_text(report_document(folder))
    return path


__all__ = ["PARTS", "DATA", "BASE", "base_config", "configs", "run", "read_runs", "sweep_runs", "robustness_scores",
           "compare", "summary", "summary_markdown", "seeds_for", "headline_report", "robustness_report", "controls_report", "power_markdown", "part_report", "report", "report_document", "write_report", "results_dir"]
