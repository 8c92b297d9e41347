"""mskt.stats: calibration on simulated experiments (no training), the corrections against hand-computed
examples, the MDE against the power function, the bootstrap's pairing, and the edge cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mskt import stats
from mskt.errors import MsktError

N_SIM = 2000


def _binomial_bound(p: float, n: int = N_SIM, z: float = 3.0) -> float:
    """z binomial standard errors of a rate p estimated from n experiments."""
    return z * math.sqrt(p * (1 - p) / n)


# ----------------------------------------------------------------------------------------------
# Calibration


def test_false_positive_rate_on_null_pairs_is_at_most_alpha():
    rng = np.random.default_rng(0)
    n = 6
    rejected = {"t": 0, "wilcoxon": 0, "sign": 0, "reading": 0}
    for _ in range(N_SIM):
        shared = rng.normal(0.9, 0.05, n)  # seed effects common to A and B: pairing removes them
        a, b = shared + rng.normal(0, 0.02, n), shared + rng.normal(0, 0.02, n)
        c = stats.compare(a, b, "mae", ("A", "B"))
        rejected["t"] += c.p_t < 0.05
        rejected["wilcoxon"] += c.p_wilcoxon < 0.05
        rejected["sign"] += c.p_sign < 0.05
        rejected["reading"] += not c.reading().startswith("no detectable difference")
    bound = 0.05 + _binomial_bound(0.05)
    rates = {k: v / N_SIM for k, v in rejected.items()}
    assert all(r <= bound for r in rates.values()), rates
    assert rates["t"] > 0.05 - _binomial_bound(0.05), rates  # and not trivially conservative: the t test is exact here
    assert rates["reading"] == rates["t"]  # one comparison alone: the reading decides on the t test's p


def _t_pvalues(a, b):
    """The paired t test's p-value of each row of (experiments, seeds) arrays; compare's p_t is this test."""
    from scipy.stats import ttest_rel

    return ttest_rel(a, b, axis=1).pvalue


def test_holm_keeps_the_family_wise_error_rate_of_a_table():
    rng = np.random.default_rng(1)
    cells, n = 5, 4
    p = np.stack([_t_pvalues(rng.normal(0, 1, (N_SIM, n)), rng.normal(0, 1, (N_SIM, n))) for _ in range(cells)], axis=1)
    any_rejected = np.array([(stats.adjust(row, "holm") < 0.05).any() for row in p])
    unadjusted = (p < 0.05).any(axis=1)
    assert any_rejected.mean() <= 0.05 + _binomial_bound(0.05) < unadjusted.mean()  # uncorrected, 5 cells: ~23%


@pytest.mark.parametrize("n, effect", [(2, 0.12), (3, 0.03), (5, 0.015), (10, 0.01)])
def test_empirical_power_matches_the_computed_power(n, effect):
    rng = np.random.default_rng(n)
    sd = 0.012  # std of the per-seed differences
    expected = stats.power(effect, sd, n)
    assert 0.2 < expected < 0.95  # a regime where a wrong power would show
    b = rng.normal(0.8, 0.05, (N_SIM, n))
    a = b + effect + rng.normal(0, sd, (N_SIM, n))
    p = _t_pvalues(a, b)
    assert stats.compare(a[0], b[0], "acc2_nonzero").p_t == pytest.approx(p[0], rel=1e-9)
    assert abs((p < 0.05).mean() - expected) <= _binomial_bound(expected), ((p < 0.05).mean(), expected)


def test_the_mde_round_trips_with_the_power_function():
    for n in (2, 3, 5, 20):
        for sd in (0.001, 0.02, 1.5):
            d = stats.mde(sd, n)
            assert stats.power(d, sd, n) == pytest.approx(0.8, abs=1e-6)
            assert stats.power(0.9 * d, sd, n) < 0.8 < stats.power(1.1 * d, sd, n)
    assert stats.mde(0.02, 3, target_power=0.9) > stats.mde(0.02, 3) > stats.mde(0.02, 10)
    assert stats.power(0.0, 0.02, 5) == pytest.approx(0.05)  # no effect: rejects at the test's level
    # large samples: the normal approximation, (z_0.975 + z_0.8) * sd / sqrt(n)
    assert stats.mde(1.0, 5000) == pytest.approx((1.959964 + 0.841621) / math.sqrt(5000), rel=2e-3)


def test_seeds_needed_is_the_first_design_that_reaches_the_target():
    sd, target = 0.02, 0.015
    n = stats.seeds_needed(target, sd)
    assert stats.mde(sd, n) <= target < stats.mde(sd, n - 1)
    assert stats.power(target, sd, n) >= 0.8 > stats.power(target, sd, n - 1)
    assert stats.seeds_needed(target, 0.0) == 2
    with pytest.raises(MsktError, match="target_mde"):
        stats.seeds_needed(0.0, sd)


# ----------------------------------------------------------------------------------------------
# Corrections: hand-computed examples


def test_holm_and_bh_against_hand_computed_examples():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    assert stats.adjust(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: sorted times 4/1, 4/2, 4/3, 4/4 = 0.02, 0.02, 0.04, 0.04 -> running minimum from the top: the same
    assert stats.adjust(p, "bh") == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert stats.adjust(p, "none") == pytest.approx(p)
    assert stats.adjust([0.5, 0.6], "holm") == pytest.approx([1.0, 1.0])  # capped at 1
    assert stats.adjust([0.02, 0.02, 0.9], "bh") == pytest.approx([0.03, 0.03, 0.9])
    assert len(stats.adjust([], "holm")) == 0
    with pytest.raises(MsktError, match="expected one of holm, bh, none"):
        stats.adjust(p, "bonferroni")
    with pytest.raises(MsktError, match=r"\[0, 1\]"):
        stats.adjust([0.1, float("nan")])


# ----------------------------------------------------------------------------------------------
# One comparison: values, direction, the three sentences


def test_compare_values_and_the_three_readings():
    a = np.array([0.90, 0.88, 0.91, 0.89])
    b = np.array([0.95, 0.92, 0.97, 0.93])
    c = stats.compare(a, b, "mae", ("kt", "lv"))
    d = a - b
    se = d.std(ddof=1) / 2
    assert c.delta == pytest.approx(d.mean()) and c.n == 4 and c.sd == pytest.approx(d.std(ddof=1))
    assert (c.ci_lo, c.ci_hi) == pytest.approx((d.mean() - 3.182446 * se, d.mean() + 3.182446 * se), rel=1e-5)
    assert c.p_sign == pytest.approx(2 / 16) and c.p_wilcoxon == pytest.approx(2 / 16)  # exact, all four negative
    assert c.better == "kt"  # lower MAE
    assert c.reading() == "kt better than lv (mae kt − lv -0.047, 95% CI [-0.063, -0.032], adjusted p 0.002)"
    # accuracies: higher is better, so the same numbers read the other way
    acc = stats.compare(a, b, "acc2_nonzero", ("kt", "lv"))
    assert acc.better == "lv" and acc.reading().startswith("lv better than kt (acc2_nonzero kt − lv -4.7 points")
    null = stats.compare(a, a + np.array([0.01, -0.01, 0.02, -0.015]), "mae", ("kt", "lv"))
    assert null.better is None
    assert null.reading() == f"no detectable difference; the smallest effect this design detects is {null.mde:.3f} of mae"


def test_compare_frame_pairs_by_seed_and_adjusts_across_cells():
    rows = []
    for cond, shift in (("audio", -0.05), ("vision", 0.0)):
        for s, noise in zip((3, 1, 2), (0.01, -0.012, 0.004)):
            rows.append({"condition": cond, "label": "ref", "seed": s, "mae": 1.0 + noise + shift})
            rows.append({"condition": cond, "label": "other", "seed": s, "mae": 1.0 + noise + 0.003 * s})
    frame = pd.DataFrame(rows).sample(frac=1, random_state=0)  # order must not matter: pairing is by seed
    t = stats.compare_frame(frame, [("ref", "other")], "mae", cells=("condition",))
    assert list(t["condition"]) == list(dict.fromkeys(frame["condition"])) and set(t["n"]) == {3}
    audio = t.set_index("condition").loc["audio"]
    assert audio["delta"] == pytest.approx(-0.05 - 0.003 * 2)  # mean of -0.05 - 0.003 s over seeds 1, 2, 3
    assert audio["p_adj"] == pytest.approx(min(1.0, 2 * audio["p_t"]))  # Holm: the smaller of two p-values, times 2
    assert audio["better"] == "ref" and audio["reading"].startswith("ref better than other")
    bh = stats.compare_frame(frame, [("ref", "other")], "mae", cells=("condition",), method="bh")
    assert (bh["p_adj"] <= t["p_adj"] + 1e-12).all()
    md = stats.comparisons_markdown(t, cells=("condition",))
    assert md.count("\n") == 4 and "ref vs other" in md and "(holm)" in md
    # a run counted twice (e.g. mask seeds not averaged) is refused, not taken as two seeds
    with pytest.raises(MsktError, match="appears more than once"):
        stats.compare_frame(pd.concat([frame, frame]), [("ref", "other")], "mae", cells=("condition",))


# ----------------------------------------------------------------------------------------------
# Edge cases: a clear result or a one-line error, never NaN silently


def test_one_seed_is_a_one_line_error_and_an_untested_row():
    with pytest.raises(MsktError, match="at least 2 seeds, got 1") as e:
        stats.compare([0.9], [0.8], "mae")
    assert "\n" not in str(e.value)
    frame = pd.DataFrame({"label": ["a", "b"], "seed": [0, 0], "mae": [0.9, 0.8]})
    t = stats.compare_frame(frame, [("a", "b")], "mae")
    assert t.loc[0, "reading"].startswith("not tested: 1 common seed") and t.loc[0, "better"] != t.loc[0, "better"]
    assert "not tested" in stats.comparisons_markdown(t)
    with pytest.raises(MsktError, match="at least 2 seeds"):
        stats.mde(0.1, 1)
    with pytest.raises(MsktError, match="non-finite"):
        stats.compare([0.9, float("nan")], [0.8, 0.7], "mae")
    with pytest.raises(MsktError, match="same length"):
        stats.compare([0.9, 0.8, 0.7], [0.8, 0.7], "mae")


def test_zero_variance_gives_a_clear_result():
    same = stats.compare([0.8, 0.8, 0.8], [0.8, 0.8, 0.8], "acc2_nonzero")
    assert (same.p_t, same.p_wilcoxon, same.p_sign, same.mde, same.sd) == (1.0, 1.0, 1.0, 0.0, 0.0)
    assert same.reading().startswith("no detectable difference")
    shifted = stats.compare([0.9, 0.8, 0.7], [0.8, 0.7, 0.6], "acc2_nonzero")  # A - B = 0.1 at every seed
    assert shifted.sd == 0.0 and shifted.p_t == 0.0 and shifted.ci_lo == shifted.ci_hi == pytest.approx(0.1)
    assert shifted.better == "A"
    values = [v for v in vars(shifted).values() if isinstance(v, float)]
    assert not any(math.isnan(v) for v in values)


# ----------------------------------------------------------------------------------------------
# The bootstrap over seeds x test samples


def test_bootstrap_resamples_the_same_samples_for_a_and_b():
    rng = np.random.default_rng(0)
    err_a = np.abs(rng.normal(0, 1, (3, 80)))  # per-sample absolute errors, (seeds, samples)
    # B's errors are A's plus 0.1 on every sample: paired resampling keeps the difference exactly 0.1
    out = stats.bootstrap(err_a, err_a + 0.1, None, np.mean, n_boot=300)
    assert out["delta"] == pytest.approx(-0.1) and out["ci_lo"] == pytest.approx(-0.1) and out["ci_hi"] == pytest.approx(-0.1)
    assert out["p"] < 0.01 and (out["n_seeds"], out["n_samples"]) == (3, 80)
    same = stats.bootstrap(err_a, err_a, None, np.mean, n_boot=100)
    assert same["delta"] == 0 and same["ci_lo"] == same["ci_hi"] == 0 and same["p"] == 1.0


def test_bootstrap_on_predictions_with_a_metric_name():
    rng = np.random.default_rng(1)
    y = rng.uniform(-3, 3, 60)
    good = y + rng.normal(0, 0.3, (2, 60))  # (seeds, samples)
    bad = y + rng.normal(0, 1.5, (2, 60))
    out = stats.bootstrap(good, bad, y, "mae", n_boot=200)
    full = np.mean([np.abs(good[s] - y).mean() - np.abs(bad[s] - y).mean() for s in range(2)])
    assert out["delta"] == pytest.approx(full) and out["ci_hi"] < 0 and out["p"] < 0.05
    acc = stats.bootstrap(good, bad, np.tile(y, (2, 1)), stats.metric_function("acc2_nonzero"), n_boot=100)
    assert acc["delta"] > 0
    with pytest.raises(MsktError, match="same shape"):
        stats.bootstrap(good, bad[:, :10], y, "mae")
    with pytest.raises(MsktError, match="not among"):
        stats.bootstrap(good, bad, y, "accuracy", n_boot=2)


# ----------------------------------------------------------------------------------------------
# The readings of the experiments (hand-made frames: no training)


def _sweep_frame():
    """A robustness sweep's rows: 4 training seeds x (one fixed condition, one rate with 3 mask seeds)."""
    rng = np.random.default_rng(3)
    rows = []
    for run_seed in range(4):
        base = 0.9 + 0.05 * rng.normal()  # a seed effect shared by every label: pairing removes it
        for label, shift in (("kt_any", 0.0), ("kt", 0.06), ("full", 0.0)):
            mae = base + shift + 0.005 * rng.normal()
            rows.append(dict(label=label, variant=label, run_seed=run_seed, protocol="condition", condition="audio",
                             rate=math.nan, mask_seed=-1, mode="sample", mae=mae, acc2_nonzero=0.8 - mae / 10))
            for mask_seed in range(3):
                m = base + 0.3 + 0.005 * rng.normal() + 0.01 * mask_seed
                rows.append(dict(label=label, variant=label, run_seed=run_seed, protocol="rate", condition="rate 0.5",
                                 rate=0.5, mask_seed=mask_seed, mode="sample", mae=m, acc2_nonzero=0.8 - m / 10))
    return pd.DataFrame(rows)


def test_robustness_reading_pairs_by_training_seed_after_averaging_mask_seeds():
    from mskt.experiments import robustness

    frame = _sweep_frame()
    g = robustness.gaps(frame, "kt_any", ("kt", "full"), "mae")
    assert list(zip(g["condition"], g["b"])) == [("audio", "kt"), ("audio", "full"), ("rate 0.5", "kt"), ("rate 0.5", "full")]
    assert set(g["n"]) == {4}  # four training seeds, not 4 x 3 mask seeds
    per_run = frame[frame["condition"] == "rate 0.5"].groupby(["label", "run_seed"])["mae"].mean()
    assert g.iloc[2]["delta"] == pytest.approx((per_run["kt_any"] - per_run["kt"]).mean())
    assert g["p_adj"].tolist() == pytest.approx(stats.adjust(g["p_t"], "holm").tolist())  # one family: the whole reading
    lines = robustness.reading(frame, "kt_any", ("kt", "full"), "mae").splitlines()
    assert len(lines) == 2 and lines[0].startswith("         audio: kt_any mae ")
    assert "vs kt: kt_any better than kt (mae kt_any − kt -0.0" in lines[0]
    assert "vs full: no detectable difference; the smallest effect this design detects is" in lines[0]
    assert "vs kt: no detectable difference" in lines[1]
    # higher is better for accuracy: the same runs, read the same way round
    acc = robustness.reading(frame, "kt_any", ("kt",), "acc2_nonzero").splitlines()[0]
    assert "vs kt: kt_any better than kt (acc2_nonzero kt_any − kt +0." in acc


def test_grid_comparisons_against_a_reference_variant():
    from mskt.experiments import grid

    rng = np.random.default_rng(4)
    rows = []
    for seed in (1111, 1112, 1113, 1114):
        shared = 0.02 * rng.normal()
        for label, shift in (("full", -0.08), ("language", 0.002), ("kt", 0.0)):
            mae = 0.9 + shared + shift + 0.004 * rng.normal()
            rows.append(dict(label=label, variant=label, seed=seed, acc2_nonzero=0.8 - mae / 5, mae=mae))
    runs = pd.DataFrame(rows)
    tests = grid.comparisons(runs, "regression", against="kt")
    assert list(zip(tests["a"], tests["metric"])) == [("full", "acc2_nonzero"), ("full", "mae"), ("language", "acc2_nonzero"), ("language", "mae")]
    assert tests["p_adj"].tolist() == pytest.approx(stats.adjust(tests["p_t"]).tolist())  # Holm over the 4 cells
    assert tests.iloc[1]["better"] == "full" and tests.iloc[0]["better"] == "full"  # lower MAE and higher Acc2 alike
    assert tests.iloc[3]["reading"].startswith("no detectable difference")
    md = grid.comparisons_markdown(tests)
    assert "| full vs kt | mae | 4 |" in md and "Holm correction across the table's 4 tests" in md
    bh = grid.comparisons(runs, "regression", against="kt", correction="bh")
    assert "Benjamini-Hochberg" in grid.comparisons_markdown(bh)
    with pytest.raises(MsktError, match="against='vision': no runs of it"):
        grid.comparisons(runs, "regression", against="vision")


def test_grid_bootstrap_reports_a_metric_it_cannot_resample(monkeypatch, tmp_path):
    from mskt.experiments import grid

    rng = np.random.default_rng(5)
    y = rng.uniform(-3, 3, 30).astype(np.float32)
    preds = {("kt", 1): rng.normal(size=30), ("kt", 2): rng.normal(size=30),
             ("full", 1): y + 0.1 * rng.normal(size=30), ("full", 2): np.zeros(30)}  # a constant prediction: no Corr

    class Split:
        labels = y

    class Data:
        meta = type("Meta", (), {"task": "regression", "name": "mosi"})

        def __getitem__(self, split):
            return Split()

    def fake(run_dirs, dataset):  # run folders are <label>-seed<seed>
        return np.stack([preds[(p.name.split("-seed")[0], int(p.name.split("-seed")[1]))] for p in run_dirs])

    monkeypatch.setattr(grid, "per_sample_predictions", fake)
    runs = pd.DataFrame({"label": ["kt", "kt", "full", "full"], "seed": [1, 2, 1, 2]})
    boot = grid.bootstrap_comparisons(runs, tmp_path, Data(), "kt", ["mae", "corr"], n_boot=40)
    assert list(boot["metric"]) == ["mae", "corr"] and boot.loc[0, "note"] == "" and boot.loc[0, "delta"] < 0
    assert "not finite" in boot.loc[1, "note"]
    md = grid.bootstrap_markdown(boot)
    assert "| full vs kt | corr | 2 × 30 | bootstrap: the metric is not finite" in md and "40 resamples" in md
