"""The synthetic controls (issue 27, part 3) and test sets of any size (part 2): the knobs parse and
refuse bad values, sizes are right, a larger test set leaves training as it was, the positive
control's probes show the intended structure, the negative control is the default world and its
reconstructable audio adds nothing to L + V, and a smoke run of ``mskt.experiments.controls``."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from mskt.data.presets import DATA_SHAPES, MODALITIES, SPLITS
from mskt.data.readers import load_dataset
from mskt.data.synthetic import control_probes, make_synthetic, parse_knobs, with_knobs
from mskt.errors import ConfigError
from mskt import stats
from mskt.experiments import controls

from conftest import tiny_run_config


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("mskt").setLevel(logging.ERROR)
    yield
    logging.getLogger("mskt").setLevel(logging.NOTSET)


def _same(a, b, splits=SPLITS):
    for s in splits:
        for m in MODALITIES:
            if not np.array_equal(a[s].features[m], b[s].features[m]) or not np.array_equal(a[s].lengths[m], b[s].lengths[m]):
                return False
        if not np.array_equal(a[s].labels, b[s].labels):
            return False
    return True


# ----------------------------------------------------------------------------------------------
# Knobs


def test_knobs_parse():
    assert parse_knobs("control=positive&test_size=2000&valid_size=300") == {"control": "positive", "test_size": 2000, "valid_size": 300}
    assert parse_knobs("control=negative") == {"control": "negative"}
    assert with_knobs("synthetic:mosi?test_size=50", control="positive") == "synthetic:mosi?test_size=50&control=positive"


@pytest.mark.parametrize("query,needle", [
    ("control=maybe", "control"),
    ("control=negative&audio_shared=0.5", "control"),
    ("test_size=-1", "test_size"),
    ("test_size=3", "test_size"),
    ("test_size=2.5", "test_size"),
    ("valid_size=abc", "valid_size"),
    ("test_size=", "test_size"),
])
def test_bad_knobs_are_one_line_errors(query, needle):
    with pytest.raises(ConfigError) as e:
        load_dataset(f"synthetic:mosi?{query}", scale=0.01)
    msg = str(e.value)
    assert "\n" not in msg and needle in msg and "synthetic:mosi" in msg


def test_positive_control_needs_text_only_coordinates():
    with pytest.raises(ConfigError, match="control='positive'"):
        make_synthetic("mosi", scale=0.01, control="positive", view_frac=1.0)


# ----------------------------------------------------------------------------------------------
# Test sets of any size


def test_sizes():
    ds = load_dataset("synthetic:mosi?test_size=40&valid_size=16", scale=0.02, seed=1)
    assert len(ds["train"]) == round(DATA_SHAPES["mosi"].split_sizes["train"] * 0.02)
    assert (len(ds["valid"]), len(ds["test"])) == (16, 40)
    assert ds.meta.extra["test_size"] == 40
    default = make_synthetic("mosi", scale=0.02, seed=1)
    assert len(default["test"]) == round(DATA_SHAPES["mosi"].split_sizes["test"] * 0.02)  # 0: the preset's size x scale


@pytest.mark.parametrize("control", ["none", "positive"])
def test_test_size_leaves_training_unchanged(control):
    a = make_synthetic("mosi", scale=0.02, seed=2, control=control)
    b = make_synthetic("mosi", scale=0.02, seed=2, control=control, test_size=100)
    assert _same(a, b, ("train", "valid"))
    assert len(b["test"]) == 100 and not _same(a, b, ("test",))
    c = make_synthetic("mosi", scale=0.02, seed=3, control=control, test_size=100)
    assert not _same(b, c, ("train",))  # the seed still matters
    d = make_synthetic("mosi", scale=0.02, seed=2, control=control, valid_size=20)
    assert _same(a, d, ("train", "test")) and len(d["valid"]) == 20


# ----------------------------------------------------------------------------------------------
# The control worlds


@pytest.mark.parametrize("preset", ["mosi", "iemocap"])
def test_negative_control_is_the_default_world(preset):
    a = make_synthetic(preset, aligned=False, scale=0.01, seed=4)
    b = make_synthetic(preset, aligned=False, scale=0.01, seed=4, control="negative")
    assert _same(a, b)
    p = make_synthetic(preset, aligned=False, scale=0.01, seed=4, control="positive")
    assert np.array_equal(a["train"].labels, p["train"].labels)  # same labels, other features
    assert not np.array_equal(a["train"].text, p["train"].text)


@pytest.fixture(scope="module")
def probes():
    return {c: control_probes(make_synthetic("mosi", scale=0.4, seed=0, control=c), max_rows=6000, n_fourier=300)
            for c in ("negative", "positive")}


def test_positive_control_structure(probes):
    r = probes["positive"]
    assert abs(r["label_r2_lv"]) < 0.1  # L + V read linearly: nothing
    assert r["label_r2_audio"] > r["label_r2_lv"] + 0.4  # audio shows it linearly
    assert r["label_r2_lv_quadratic"] > r["label_r2_lv"] + 0.4  # L + V still determine it, non-linearly
    assert r["label_r2_ahat"] > r["label_r2_lv"] + 0.3  # and audio reconstructed from L + V (no labels) shows it
    assert r["audio_r2_linear"] < 0.1 < r["audio_r2_nonlinear"] - 0.3


def test_negative_control_audio_adds_nothing_reachable(probes):
    r = probes["negative"]
    assert r["label_r2_lv"] > 0.4  # L + V read linearly already hold the label
    assert r["label_r2_lva"] > r["label_r2_lv"] + 0.02  # real audio holds private information ...
    assert abs(r["label_r2_lv_ahat"] - r["label_r2_lv"]) < 0.02  # ... which no reconstruction from L + V carries


# ----------------------------------------------------------------------------------------------
# The experiment


def test_paired_ci_and_differences():
    rows = []
    for c in ("positive",):
        for seed, (kt, lv) in enumerate([(0.5, 0.9), (0.6, 0.8), (0.55, 0.95)]):
            rows += [{"control": c, "label_fraction": 0.05, "variant": "kt", "seed": seed, "mae": kt},
                     {"control": c, "label_fraction": 0.05, "variant": "language_vision", "seed": seed, "mae": lv}]
    runs = controls.add_differences(pd.DataFrame(rows))
    assert np.allclose(runs.loc[runs["variant"] == "kt", "diff_mae"], [-0.4, -0.2, -0.4])
    ci = controls.paired_ci(runs, "mae").iloc[0]
    assert ci["n"] == 3 and ci["wins"] == 3 and np.isclose(ci["mean_diff"], -1 / 3)
    assert ci["ci_low"] < ci["mean_diff"] < ci["ci_high"] < 0 and ci["excludes_0"]
    from scipy import stats

    t = stats.ttest_rel([0.5, 0.6, 0.55], [0.9, 0.8, 0.95])
    assert np.isclose(ci["p"], t.pvalue) and ci["p"] < 0.05 and ci["mde"] > 0
    runs.loc[runs["variant"] == "kt", "mae"] = [0.9, 0.7, 1.0]  # now mixed: the interval covers 0
    ci = controls.paired_ci(controls.add_differences(runs.drop(columns="diff_mae")), "mae").iloc[0]
    assert ci["ci_low"] < 0 < ci["ci_high"] and not ci["excludes_0"]


def test_paired_ci_adjusts_the_tested_cells_with_holm_and_leaves_a_one_seed_cell_untested():
    rows = []
    for fraction, diffs in ((0.05, [-0.3, -0.2, -0.25]), (0.2, [0.01, -0.02, 0.0]), (1.0, [-0.1])):
        for seed, d in enumerate(diffs):
            rows += [{"control": "positive", "label_fraction": fraction, "seed": seed, "variant": "kt", "mae": 1.0 + d},
                     {"control": "positive", "label_fraction": fraction, "seed": seed, "variant": "language_vision", "mae": 1.0}]
    table = controls.paired_ci(controls.add_differences(pd.DataFrame(rows)), "mae").set_index("label_fraction")
    assert table.loc[0.05, "excludes_0"] and table.loc[0.05, "wins"] == 3 and not table.loc[0.2, "excludes_0"]
    assert np.isnan(table.loc[1.0, "p"]) and np.isnan(table.loc[1.0, "p_holm"]) and table.loc[1.0, "n"] == 1
    tested = table["p"].dropna()
    assert np.allclose(table.loc[tested.index, "p_holm"], stats.adjust(tested.to_numpy(), "holm"))
    assert table.loc[0.05, "p_holm"] == pytest.approx(2 * table.loc[0.05, "p"])  # the smaller of two p-values, times 2


def test_run_smoke(tmp_path):
    base = tiny_run_config(data="synthetic:mosi?test_size=16", data_scale=0.02, epochs=1, seed=0, d_model=8, heads=2)
    runs = controls.run(base, fractions=(0.2, 1.0), seeds=2, out_dir=tmp_path)
    assert len(runs) == 2 * 2 * 2 * 2  # controls x fractions x variants x seeds
    assert set(runs["control"]) == {"negative", "positive"} and set(runs["variant"]) == {"kt", "language_vision"}
    assert runs["data"].str.contains("test_size=16").all()
    kt = runs[runs["variant"] == "kt"].set_index(["control", "label_fraction", "seed"])
    lv = runs[runs["variant"] == "language_vision"].set_index(["control", "label_fraction", "seed"])
    assert np.allclose(kt["diff_mae"], kt["mae"] - lv.loc[kt.index, "mae"])
    ci = controls.paired_ci(runs, "mae")
    assert len(ci) == 4 and (ci["n"] == 2).all()
    table = controls.markdown(runs)
    assert table.count("\n") == 2 + 4 and "| positive | 20% |" in table
    again = controls.run(base, fractions=(0.2, 1.0), seeds=2, out_dir=tmp_path)  # read back, not retrained
    pd.testing.assert_frame_equal(runs, again)
    read = controls.read_runs(tmp_path).sort_values(["control", "label_fraction", "seed", "variant"]).reset_index(drop=True)
    ours = runs.sort_values(["control", "label_fraction", "seed", "variant"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(read[ours.columns], ours, check_dtype=False)
    with pytest.raises(ConfigError, match="no finished runs"):
        controls.read_runs(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="control"):
        controls.run(base, controls=("sideways",), out_dir=tmp_path)
