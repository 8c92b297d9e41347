"""mskt.experiments.decide: the experiments that decide (docs/results.md, "Decisions"), read without
training: run folders and sweep frames are made up with known differences."""

import json

import numpy as np
import pandas as pd
import pytest

from mskt import stats
from mskt.errors import ConfigError
from mskt.experiments import decide


def test_every_part_converges_on_large_splits_and_one_selection_protocol():
    base = decide.base_config()
    assert base.patience > 0 and base.epochs > base.patience  # early stopping decides when a run ends
    assert "test_size=2000" in base.data and "valid_size=1000" in base.data
    fair = decide.configs("robustness")
    assert set(fair) == set(decide.FAIR)
    assert {c["select_missing"] for c in fair.values()} == {"conditions"}  # one protocol for every config
    assert fair["full+drop"]["train_missing"] == "patterns" and fair["full"]["train_missing"] == "none"
    assert [c["variant"] for c in decide.configs("headline").values()] == list(decide.FIVE)
    with pytest.raises(ConfigError, match="part 'nope'"):
        decide.run("nope", "unused")


def _write_run(folder, variant, seed, mae, label_fraction=1.0, converged=True):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"variant": variant, "seed": seed, "label_fraction": label_fraction}))
    test = {"mae": mae, "acc2_nonzero": 0.8, "corr": 0.7}
    (folder / "metrics.json").write_text(json.dumps({"test": test, "best_epoch": 3, "converged": converged, "stopped_by": "patience",
                                                     "epochs_run": 8, "optimizer_steps": 400, "seconds": 12.0}))


def test_read_runs_labels_runs_by_folder_and_control(tmp_path):
    _write_run(tmp_path / "headline" / "full+drop-seed3", "full", 3, 0.8)
    _write_run(tmp_path / "controls" / "positive" / "kt-lf0.05-seed0", "kt", 0, 0.9, label_fraction=0.05, converged=False)
    headline = decide.read_runs(tmp_path / "headline")
    assert headline[["label", "control", "variant", "seed"]].values.tolist() == [["full+drop", "", "full", 3]]
    ctl = decide.read_runs(tmp_path / "controls")
    assert ctl.loc[0, "control"] == "positive" and ctl.loc[0, "label_fraction"] == 0.05 and not ctl.loc[0, "converged"]
    with pytest.raises(ConfigError, match="no finished runs"):
        decide.read_runs(tmp_path / "empty")


def _sweep(shift: float, seeds=range(6)) -> pd.DataFrame:
    """A made-up sweep: label B's MAE is A's + shift under every protocol, plus seed noise."""
    rng = np.random.default_rng(0)
    rows = []
    for seed in seeds:
        noise = rng.normal(0, 0.01)
        for label, extra in (("A", 0.0), ("B", shift)):
            base = {"label": label, "variant": label, "run_seed": seed}
            for cond in ("text", "audio", "vision", "text,audio", "text,vision", "audio,vision"):
                rows.append({**base, "protocol": "condition", "condition": cond, "rate": np.nan, "mask_seed": -1,
                             "mae": 1.0 + extra + noise, "acc2_nonzero": 0.7, "corr": 0.5})
            for rate in (0.0, 0.35, 0.7):
                for mask in ((-1,) if rate == 0 else (0, 1)):
                    rows.append({**base, "protocol": "rate", "condition": f"rate {rate:g}", "rate": rate, "mask_seed": mask,
                                 "mae": 0.8 + rate + extra + noise + 0.001 * max(mask, 0), "acc2_nonzero": 0.7, "corr": 0.5})
    return pd.DataFrame(rows)


def test_robustness_scores_count_each_run_once_and_find_a_known_gap():
    scores = decide.robustness_scores(_sweep(0.05))
    assert len(scores) == 2 * 6 * 4  # labels x seeds x scores: mask seeds are averaged, not counted as seeds
    a = scores[(scores["label"] == "A") & (scores["seed"] == 0)].set_index("score")["mae"]
    assert a["rate 0"] == pytest.approx(0.8 + (a["audio"] - 1.0))
    r0 = a["rate 0"]  # the trapezoid over rates 0, 0.35, 0.7 with mask seeds averaged (+0.0005), normalised by 0.7
    assert a["AUC 0-0.7"] == pytest.approx(0.25 * (r0 + 2 * (r0 + 0.35 + 0.0005) + (r0 + 0.7 + 0.0005)))
    table = decide.compare(scores, [("A", "B")], cells=("score",))
    mae = table[table["metric"] == "mae"]
    assert len(mae) == 4 and (mae["better"] == "A").all()
    assert mae["delta"].to_numpy() == pytest.approx([-0.05] * 4)
    null = decide.compare(decide.robustness_scores(_sweep(0.0)), [("A", "B")], cells=("score",))
    assert (null["better"] == "").all() and null["reading"].str.startswith("no detectable difference").all()


def test_seeds_for_matches_the_power_calculation():
    rng = np.random.default_rng(1)
    a = rng.normal(0.8, 0.02, 8)
    runs = pd.DataFrame({"label": ["A"] * 8 + ["B"] * 8, "seed": list(range(8)) * 2,
                         "mae": np.r_[a, a + 0.01 + rng.normal(0, 0.015, 8)]})
    row = decide.seeds_for(runs, [("A", "B")], {"mae": 0.03}).iloc[0]
    sd = float(np.std(runs["mae"][:8].to_numpy() - runs["mae"][8:].to_numpy(), ddof=1))
    assert row["sd"] == pytest.approx(sd) and row["mde"] == pytest.approx(stats.mde(sd, 8))
    assert row["seeds_needed"] == stats.seeds_needed(0.03, sd)
    assert (row["mde"] <= 0.03) == (row["seeds_needed"] <= 8)
    one_seed = runs[runs["seed"] == 0]  # a cell still running: nothing to size, no error
    assert decide.seeds_for(one_seed, [("A", "B")], {"mae": 0.03}).empty


def test_report_reads_every_part_that_has_runs(tmp_path):
    rows = []
    for seed in range(4):
        for label, mae in (("full", 0.78), ("vision", 1.08), ("language", 0.88), ("language_vision", 0.83), ("kt", 0.83)):
            rows.append({"label": label, "variant": label, "seed": seed, "mae": mae + 0.01 * seed + (0.002 * seed if label == "kt" else 0),
                         "acc2_nonzero": 0.8 - mae / 10, "corr": 1 - mae / 2, "converged": True, "epochs_run": 10, "seconds": 10.0})
    (tmp_path / "headline").mkdir()
    pd.DataFrame(rows).to_csv(tmp_path / "headline" / "runs.csv", index=False)
    text = decide.report(tmp_path)
    assert "### The five variants" in text and "kt vs language_vision" in text and "(holm)" in text and "4/4" in text
    assert "### Controls" not in text  # no controls runs yet


def test_the_forest_plot_fills_only_decided_differences():
    from mskt.viz import plots

    scores = decide.robustness_scores(_sweep(0.05))
    table = decide.compare(scores, [("A", "B")], cells=("score",), ).query("metric in ['mae', 'corr']")
    fig = plots.plot_comparisons(table, cells=("score",))
    mae_ax, corr_ax = fig.axes
    assert [t.get_text() for t in mae_ax.get_yticklabels()][0] == "conditions: A vs B"
    filled = [line.get_markerfacecolor() for line in mae_ax.lines if line.get_marker() == "o"]
    hollow = [line.get_markerfacecolor() for line in corr_ax.lines if line.get_marker() == "o"]
    assert len(filled) == 4 and "white" not in filled  # A's lower MAE is decided in every score
    assert hollow == ["white"] * 4  # Corr is equal: nothing decided
    assert all(x > 0 for line in mae_ax.lines if line.get_marker() == "o" for x in line.get_xdata())  # right = A better


def test_a_bootstrap_table_read_back_from_csv_shows_its_numbers(tmp_path):
    from mskt.experiments.grid import bootstrap_markdown

    boot = pd.DataFrame([{"a": "full", "b": "kt", "metric": "mae", "delta": -0.05, "ci_lo": -0.07, "ci_hi": -0.04, "p": 0.001,
                          "n_seeds": 8, "n_samples": 2000, "n_boot": 2000, "note": ""}])
    boot.to_csv(tmp_path / "b.csv", index=False)
    text = bootstrap_markdown(pd.read_csv(tmp_path / "b.csv"))  # the empty note comes back as NaN
    assert "-0.050 [-0.070, -0.040]" in text and "nan" not in text


def test_the_committed_report_is_what_the_committed_runs_say():
    """docs/decide/report.md (the tables docs/results.md quotes) is decide.report() of the committed runs:
    regenerate it with `python -c "from mskt.experiments import decide; decide.write_report()"` after new runs."""
    committed = decide.results_dir() / "report.md"
    assert committed.read_text() == decide.report_document()
