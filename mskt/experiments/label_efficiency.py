"""When does knowledge transfer help? Label fraction x a premise knob of the generator x variants x seeds.

Knowledge transfer from a train-only modality is learning with privileged information: the audio
target adds supervision during training, not information at test time. Its benefit should depend on

- how many labels there are (``Config.label_fraction``: a seeded, stratified share of the training
  labels; the consistency terms still use every training sample's audio), and
- how much of audio's label information is reachable from language and vision (the synthetic
  generator's ``audio_shared``; ``audio_gain`` sets how non-linear audio's content is; see
  ``mskt.data.synthetic``).

``sweep`` trains every (knob value, label fraction, variant, seed) and returns one tidy row per run;
``summary`` gives mean ± std over seeds per cell (the label-efficiency curves, drawn by
``mskt.viz.plots.plot_label_efficiency``); ``gains`` pairs a method with its baseline seed by seed
(the phase diagram, ``mskt.viz.plots.plot_phase_diagram``; ``phase_table`` prints it).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mskt.config import Config
from mskt.console import outer_progress
from mskt.data.synthetic import with_knobs
from mskt.errors import ConfigError
from mskt.experiments.grid import run_configs
from mskt.metrics import LOWER_IS_BETTER

FRACTIONS = (0.05, 0.1, 0.25, 0.5, 1.0)  # the label fractions


def default_metrics(task: str) -> tuple:
    """The metrics the analysis reports: MAE and Acc2 (non-zero, the paper's) for regression; mean F1 for emotions."""
    return ("mae", "acc2_nonzero") if task == "regression" else ("mean_f1",)


def sweep(base: Config, fractions=FRACTIONS, knob: str | None = "audio_shared", values=(0.0,),
          variants=("kt", "language_vision"), seeds: int = 3, out_dir="runs/label_efficiency",
          jobs: int = 1, on_run=None) -> pd.DataFrame:
    """Train every variant at every label fraction on the data with ``knob`` at each of ``values``,
    with seeds base.seed, base.seed + 1, ... (``mskt.experiments.grid.run_configs``: runs already
    finished in ``out_dir`` are read back, so an interrupted sweep resumes).

    One row per run: label, variant, seed, label_fraction, the knob's value (column ``knob``), data,
    best_epoch, seconds and every test metric. ``knob=None`` trains on ``base.data`` as it is (one
    value). The labelled subset depends on the run's seed, not the variant: at a given seed every
    variant sees the same labels."""
    fractions = tuple(float(f) for f in fractions)
    for f in fractions:
        if not 0 < f <= 1:
            raise ConfigError(f"label fraction {f!r}: expected a number in (0, 1]")
    if not variants:
        raise ConfigError("sweep: give at least one variant")
    out_dir = Path(out_dir)
    frames = []
    configs = {f"{v}-lf{f:g}": {"variant": v, "label_fraction": f} for f in fractions for v in variants}
    knob_values = values if knob else (None,)
    # One bar over every run of the sweep; the grids inside it show none of their own.
    with outer_progress(len(knob_values) * len(configs) * seeds, desc="sweep runs", setting=base.progress) as bar:

        def counted(row):
            bar.update(1)
            if on_run is not None:
                on_run(row)

        for value in knob_values:
            data = with_knobs(base.data, **{knob: value}) if knob else base.data
            check_teachers(base.replace(data=data), configs, seeds)
            folder = out_dir / (f"{knob}={value:g}" if knob else "data")
            runs = run_configs(base.replace(data=data), configs, seeds, folder, on_run=counted, jobs=jobs)
            runs.insert(3, "label_fraction", runs["label"].map({k: c["label_fraction"] for k, c in configs.items()}))
            if knob:
                runs.insert(4, knob, value)
            runs.insert(5 if knob else 4, "data", data)
            frames.append(runs)
    return pd.concat(frames, ignore_index=True)


def check_teachers(base: Config, configs: dict, seeds: int) -> None:
    """Refuse a sweep before it trains anything when a run's teacher (``kt_target="teacher"``) did
    not train on that run's data and labelled subset: the same data fields, the same label_fraction
    and, below 1, the same seed (the subset is drawn from it). A teacher trained on every label
    would leak the labels a run with fewer hides. ``mskt.train`` checks each run again, subset by
    subset (``mskt.train.checkpoints.check_teacher``)."""
    from mskt.model import variant_class
    from mskt.train.checkpoints import DATA_FIELDS

    for label, overrides in configs.items():
        for i in range(seeds):
            cfg = base.replace(**overrides, seed=base.seed + i)
            if not variant_class(cfg.variant).uses_teacher(cfg):
                continue
            teacher = Config.load(Path(cfg.teacher_run) / "config.json")
            wanted = {k: getattr(cfg, k) for k in DATA_FIELDS if k != "dataset"} | {"label_fraction": cfg.label_fraction}
            if cfg.label_fraction < 1:
                wanted["seed"] = cfg.seed
            diff = [f"{k}={getattr(teacher, k)!r} (run {label} seed {cfg.seed}: {v!r})" for k, v in wanted.items() if getattr(teacher, k) != v]
            if diff:
                raise ConfigError(f"teacher_run {cfg.teacher_run}: trained on {diff[0]}; a teacher must train on its student's data and labelled subset")


def _keys(knob):
    return [knob, "label_fraction"] if knob else ["label_fraction"]


def summary(runs: pd.DataFrame, knob: str | None = "audio_shared", metrics=None) -> pd.DataFrame:
    """Mean, std and number of seeds of each metric per (variant, knob value, label fraction): tidy,
    one row per cell and metric (columns variant, knob, label_fraction, metric, mean, std, n_seeds)."""
    metrics = list(metrics or [m for m in ("mae", "acc2_nonzero", "mean_f1") if m in runs])
    keys = ["variant"] + _keys(knob)
    long = runs.melt(id_vars=keys + ["seed"], value_vars=metrics, var_name="metric")
    out = long.groupby(keys + ["metric"], sort=True)["value"].agg(mean="mean", std=lambda v: v.std(ddof=1), n_seeds="count")
    return out.reset_index().fillna({"std": 0.0})


def gains(runs: pd.DataFrame, knob: str | None = "audio_shared", method: str = "kt", baseline: str = "language_vision",
          metrics=None, correction: str = "holm") -> pd.DataFrame:
    """The gain of ``method`` over ``baseline``, paired seed by seed (same data, same labelled
    subset), oriented so that positive means ``method`` is better: baseline - method for MAE (and
    loss), method - baseline otherwise. One row per (knob value, label fraction, metric): mean, std
    over seeds, n_seeds, ``wins`` (the seeds where ``method`` was better) and the paired comparison of
    ``mskt.stats.compare_frame``: the gain's 95% CI (ci_lo, ci_hi, oriented like the gain), the paired
    t, Wilcoxon and sign tests' p, ``p_adj`` (adjusted by ``correction`` across the cells of one
    metric's phase diagram), the minimal detectable effect ``mde`` and the ``reading``."""
    from mskt import stats

    metrics = list(metrics or [m for m in ("mae", "acc2_nonzero", "mean_f1") if m in runs])
    keys = _keys(knob)
    for v in (method, baseline):
        if v not in set(runs["variant"]):
            raise ConfigError(f"gains: no runs of variant {v!r} (found {', '.join(sorted(set(runs['variant'])))})")
    a = runs[runs["variant"] == method].set_index(keys + ["seed"])[metrics]
    b = runs[runs["variant"] == baseline].set_index(keys + ["seed"])[metrics]
    a, b = a.align(b, join="inner")
    diff = a - b
    for m in metrics:
        if m in LOWER_IS_BETTER:
            diff[m] = -diff[m]
    long = diff.reset_index().melt(id_vars=keys + ["seed"], value_vars=metrics, var_name="metric", value_name="gain")
    out = long.groupby(keys + ["metric"], sort=True)["gain"].agg(
        mean="mean", std=lambda v: v.std(ddof=1), n_seeds="count", wins=lambda v: int((v > 0).sum()))
    out = out.reset_index().fillna({"std": 0.0})
    # one phase diagram per metric: its cells are corrected together
    pair = runs[runs["variant"].isin([method, baseline])]
    tests = pd.concat([stats.compare_frame(pair, [(method, baseline)], m, cells=keys, label="variant", method=correction)
                       for m in metrics], ignore_index=True)
    flip = tests["metric"].isin(LOWER_IS_BETTER)  # the CI of a - b, turned into the CI of the gain
    lo, hi = tests["ci_lo"].where(~flip, -tests["ci_hi"]), tests["ci_hi"].where(~flip, -tests["ci_lo"])
    tests = tests.assign(ci_lo=lo, ci_hi=hi)[keys + ["metric", "ci_lo", "ci_hi", "p_t", "p_wilcoxon", "p_sign", "p_adj", "mde", "reading"]]
    out = out.merge(tests, on=keys + ["metric"], how="left")
    out.attrs.update(method=method, baseline=baseline, knob=knob, correction=correction)
    return out


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def phase_table(gain: pd.DataFrame, metric: str, knob: str | None = "audio_shared") -> pd.DataFrame:
    """One metric's gains as a table: rows the knob's values, columns the label fractions, cells
    "mean [95% CI] p <adjusted p>" (paired over seeds, :func:`gains`); accuracies in points, MAE as it is."""
    scale = 1 if metric in LOWER_IS_BETTER or metric == "corr" else 100
    g = gain[gain["metric"] == metric]
    if g.empty:
        raise ConfigError(f"phase_table: no gains for metric {metric!r} (found {', '.join(sorted(set(gain['metric'])))})")
    digits = 3 if scale == 1 else 1

    def cell(r):
        if not r["n_seeds"] >= 2:
            return f"{scale * r['mean']:+.{digits}f} ({r['n_seeds']} seed: not tested)"
        return f"{scale * r['mean']:+.{digits}f} [{scale * r['ci_lo']:+.{digits}f}, {scale * r['ci_hi']:+.{digits}f}] p {_p(r['p_adj'])}"

    table = g.assign(cell=g.apply(cell, axis=1)).pivot(index=knob if knob else "metric", columns="label_fraction", values="cell")
    table.columns = [f"{100 * c:g}% labels" for c in table.columns]
    return table


def reading(gain: pd.DataFrame, metric: str, knob: str | None = "audio_shared") -> str:
    """One line per (knob value, label fraction) from one metric's gains (:func:`gains`): the paired
    comparison's reading, "kt better than language_vision (...)", "language_vision better than kt (...)"
    (mean difference, 95% CI, adjusted p) or "no detectable difference; the smallest effect this
    design detects is X". Says what the numbers say, wins and losses alike."""
    g = gain[gain["metric"] == metric]
    if g.empty:
        raise ConfigError(f"reading: no gains for metric {metric!r}")
    lines = []
    for _, r in g.sort_values(_keys(knob)).iterrows():
        head = f"{knob}={r[knob]:g}, " if knob else ""
        lines.append(f"{head}{100 * r['label_fraction']:g}% labels: {r['reading']}")
    return "\n".join(lines)


def premise_probes(data: str = "synthetic:mosi", knob: str = "audio_shared", values=(0.0, 1.0), scale: float = 1.0,
                   seed: int = 0) -> pd.DataFrame:
    """The premise, measured by ``mskt.data.synthetic.probe`` (closed-form ridge regressions) at each
    of the knob's values: one row per value with the label R^2 from L + V (``label_r2_lv``), from
    L + V + A (``label_r2_lva``), from audio alone, and per-step audio R^2 from L + V, linear and
    non-linear; plus ``audio_private`` = label_r2_lva - label_r2_lv (label information only audio
    holds) and ``nonlinear_gap`` = audio_r2_nonlinear - audio_r2_linear (how non-linear the map
    from L + V to audio is)."""
    from mskt.data.readers import load_dataset
    from mskt.data.synthetic import probe

    rows = []
    for value in values:
        source = with_knobs(data, **{knob: value})
        r = probe(load_dataset(source, scale=scale, seed=seed))
        rows.append({knob: value, **{k: r[k] for k in ("label_r2_audio", "label_r2_lv", "label_r2_lva", "audio_r2_linear", "audio_r2_nonlinear")}})
    out = pd.DataFrame(rows)
    out["audio_private"] = out["label_r2_lva"] - out["label_r2_lv"]
    out["nonlinear_gap"] = out["audio_r2_nonlinear"] - out["audio_r2_linear"]
    return out.set_index(knob)


def curves_table(summary_frame: pd.DataFrame, metric: str, knob: str | None = "audio_shared") -> pd.DataFrame:
    """One metric of :func:`summary` as a table: a row per (variant, knob value), a column per label
    fraction, cells "mean ± std" (accuracies in percent)."""
    scale = 1 if metric in LOWER_IS_BETTER or metric == "corr" else 100
    digits = 3 if scale == 1 else 1
    s = summary_frame[summary_frame["metric"] == metric]
    if s.empty:
        raise ConfigError(f"curves_table: no rows for metric {metric!r}")
    cell = s.apply(lambda r: f"{scale * r['mean']:.{digits}f} ± {scale * r['std']:.{digits}f}", axis=1)
    table = s.assign(cell=cell).pivot(index=["variant"] + ([knob] if knob else []), columns="label_fraction", values="cell")
    table.columns = [f"{100 * c:g}% labels" for c in table.columns]
    return table.fillna("")


def markdown(table: pd.DataFrame, digits: int = 3) -> str:
    """A Markdown table of a small DataFrame (the index as the first columns; floats to ``digits``)."""
    frame = table.reset_index()

    def fmt(v):
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def fair_robustness(base: Config, runs: pd.DataFrame, out_dir, knob: str | None = "audio_shared", value: float = 0.0,
                    variants=("kt", "language_vision", "full"), train_missing_rate: float = 0.5, seeds: int = 3,
                    rates=(0.0, 0.35, 0.7), mask_seeds: int = 1, jobs: int = 1) -> pd.DataFrame:
    """The fair robustness comparison on the data at ``knob=value``: each variant as published (its
    sweep runs with every label, read from ``runs``/``out_dir``) and trained under the same missing
    protocol (``robustness.fair_configs``, labelled ``<variant>+drop``, trained here into
    ``out_dir/robustness``), all swept under the six fixed conditions and the random ``rates``.

    Returns ``robustness.sweep``'s tidy frame (also written to ``out_dir/robustness/sweep.csv``);
    ``robustness.condition_summary`` and ``rate_summary`` summarise it."""
    from mskt.data.readers import load_dataset
    from mskt.experiments import robustness
    from mskt.train import resolve_device

    out_dir = Path(out_dir)
    fair = robustness.fair_configs(variants, rate=train_missing_rate, as_published=False)  # the "+drop" runs
    data = with_knobs(base.data, **{knob: value}) if knob else base.data
    fair_runs = run_configs(base.replace(data=data), fair, seeds, out_dir / "robustness", jobs=jobs)
    folder = out_dir / (f"{knob}={value:g}" if knob else "data")
    published = {v: [folder / f"{v}-lf1-seed{s}" for s in sorted(set(runs["seed"]))] for v in variants}
    dropped = {k: [out_dir / "robustness" / f"{k}-seed{s}" for s in sorted(set(fair_runs["seed"]))] for k in fair}
    dataset = load_dataset(data, scale=base.data_scale, seed=base.data_seed)
    frame = robustness.sweep({**published, **dropped}, dataset=dataset, rates=rates, seeds=range(mask_seeds),
                             device=str(resolve_device(base.device)))
    frame.to_csv(out_dir / "robustness" / "sweep.csv", index=False)
    return frame
