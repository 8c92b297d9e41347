"""Tests for mskt.metrics.

Golden values are worked out by hand in the comments (never by calling the code under
test); scikit-learn, when installed, is the reference for the randomised comparisons.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mskt.errors import ConfigError, DataError
from mskt.metrics import (
    compute_metrics,
    emotion_metrics,
    format_metrics,
    regression_metrics,
    weighted_f1,
)
from mskt.data.presets import EMOTIONS

REGRESSION_KEYS = [
    "acc7",
    "acc5",
    "acc2_nonzero",
    "f1_nonzero",
    "acc2_haszero",
    "f1_haszero",
    "mae",
    "corr",
]

# --------------------------------------------------------------------------- golden: regression

GOLD_Y = [-2.6, -1.4, -0.3, 0.0, 0.5, 1.0, 2.2, 3.0]
GOLD_P = [-3.5, -0.6, 0.2, -0.1, 0.7, 1.6, 1.4, 2.4]


def test_regression_golden():
    m = regression_metrics(GOLD_P, GOLD_Y)
    assert list(m) == REGRESSION_KEYS

    # Acc7, clip [-3, 3] then round half to even:
    #   y -> [-3, -1, 0, 0, 0, 1, 2, 3]   (0.5 -> 0)
    #   p -> [-3, -1, 0, 0, 1, 2, 1, 2]   (-3.5 clipped to -3)
    #   equal at indices 0..3 -> 4/8
    assert m["acc7"] == pytest.approx(0.5)
    # Acc5, clip [-2, 2]:
    #   y -> [-2, -1, 0, 0, 0, 1, 2, 2]
    #   p -> [-2, -1, 0, 0, 1, 2, 1, 2]
    #   equal at 0, 1, 2, 3, 7 -> 5/8
    assert m["acc5"] == pytest.approx(0.625)
    # MAE: |diffs| = .9 .8 .5 .1 .2 .6 .8 .6 -> 4.5 / 8
    assert m["mae"] == pytest.approx(0.5625)

    # Non-zero: drop index 3 (y = 0), 7 samples left.
    #   y > 0: F F F T T T T     p > 0: F F T T T T T     -> 6/7 correct
    #   class F (support 3): tp 2, fp 0, fn 1 -> F1 = 4/5
    #   class T (support 4): tp 4, fp 1, fn 0 -> F1 = 8/9
    #   weighted: (3 * 4/5 + 4 * 8/9) / 7 = 268/315
    assert m["acc2_nonzero"] == pytest.approx(6 / 7)
    assert m["f1_nonzero"] == pytest.approx(268 / 315)

    # Has-zero: all 8 samples.
    #   y >= 0: F F F T T T T T   p >= 0: F F T F T T T T   -> 6/8 correct
    #   class F (support 3): tp 2, fp 1, fn 1 -> 2/3
    #   class T (support 5): tp 4, fp 1, fn 1 -> 4/5
    #   weighted: (3 * 2/3 + 5 * 4/5) / 8 = 6/8
    assert m["acc2_haszero"] == pytest.approx(0.75)
    assert m["f1_haszero"] == pytest.approx(0.75)


def test_acc2_conventions_differ_on_zeros():
    y = [0.0, 0.0, 1.0, -1.0]
    p = [0.0, -0.5, 2.0, -1.0]
    m = regression_metrics(p, y)
    # Non-zero keeps indices 2, 3: y > 0 = [T, F], p > 0 = [T, F] -> perfect.
    assert m["acc2_nonzero"] == 1.0
    assert m["f1_nonzero"] == 1.0
    # Has-zero: y >= 0 = [T, T, T, F], p >= 0 = [T, F, T, F] -> 3/4.
    #   class F (support 1): tp 1, fp 1, fn 0 -> 2/3
    #   class T (support 3): tp 2, fp 0, fn 1 -> 4/5
    #   weighted: (2/3 + 3 * 4/5) / 4 = 23/30
    assert m["acc2_haszero"] == pytest.approx(0.75)
    assert m["f1_haszero"] == pytest.approx(23 / 30)


def test_acc7_rounds_half_to_even():
    y = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5]
    # Half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, and symmetrically for negatives.
    assert regression_metrics([0, 2, 2, 0, -2, -2], y)["acc7"] == 1.0
    # Half away from zero would give [1, 2, 3, -1, -2, -3]: only the +-1.5 entries agree.
    assert regression_metrics([1, 2, 3, -1, -2, -3], y)["acc7"] == pytest.approx(2 / 6)


def test_acc7_acc5_clip_before_rounding():
    y = [3.4, -5.0]
    p = [2.6, -2.5]
    m = regression_metrics(p, y)
    # Acc7: y -> [3, -3]; p -> [3, -2] (-2.5 rounds to even -2)   -> 1/2
    assert m["acc7"] == 0.5
    # Acc5: y -> [2, -2]; p -> [2, -2] (-2.5 clipped to -2 first) -> 2/2
    assert m["acc5"] == 1.0


def test_corr_golden_and_constant():
    # dp = dy' = [-1.5, -.5, .5, 1.5] / [-1.5, .5, -.5, 1.5]: dot 4, both sums of squares 5.
    assert regression_metrics([1, 2, 3, 4], [1, 3, 2, 4])["corr"] == pytest.approx(0.8)
    assert regression_metrics([1, 2, 3], [6, 4, 2])["corr"] == pytest.approx(-1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a constant side must not emit a numpy warning
        assert math.isnan(regression_metrics([0.3, 0.3, 0.3], [1, 2, 3])["corr"])
        assert math.isnan(regression_metrics([1, 2, 3], [2, 2, 2])["corr"])


@pytest.mark.parametrize("seed", range(5))
def test_corr_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=40)
    p = 0.5 * y + rng.normal(size=40)
    expected = np.corrcoef(p, y)[0, 1]
    assert regression_metrics(p, y)["corr"] == pytest.approx(expected, rel=1e-12)


def test_regression_flattens_and_returns_plain_floats():
    p = np.array(GOLD_P, dtype=np.float32).reshape(-1, 1)  # a model's (N, 1) output
    m = regression_metrics(p, np.array(GOLD_Y))
    assert all(type(v) is float for v in m.values())
    json.dumps(m)
    assert m["acc7"] == pytest.approx(0.5)


def test_nonzero_without_survivors_is_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = regression_metrics([0.5, -1.0, 0.0], [0.0, 0.0, 0.0])
    assert math.isnan(m["acc2_nonzero"]) and math.isnan(m["f1_nonzero"])
    # Has-zero still counts them all: y >= 0 all T, p >= 0 = [T, F, T] -> 2/3.
    assert m["acc2_haszero"] == pytest.approx(2 / 3)


def test_regression_shape_errors():
    with pytest.raises(DataError, match=r"\(3,\).*\(2, 2\)"):
        regression_metrics([1.0, 2.0, 3.0], [[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(DataError, match="no samples"):
        regression_metrics([], [])


# --------------------------------------------------------------------------- golden: emotions

# Rows: samples; columns: neutral, happy, sad, angry.
EMO_Y = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 0]])
EMO_P = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
EMO_EXPECTED = {
    # neutral: y 1001, p 1000 -> 3/4; F1 class0 (n=2) 4/5, class1 (n=2) 2/3 -> 11/15
    "neutral_acc": 3 / 4,
    "neutral_f1": 11 / 15,
    # happy: y 0100, p 0010 -> 2/4; class0 (n=3) tp2 fp1 fn1 -> 2/3, class1 0 -> 1/2
    "happy_acc": 1 / 2,
    "happy_f1": 1 / 2,
    # sad: identical -> 1, 1
    "sad_acc": 1.0,
    "sad_f1": 1.0,
    # angry: y 0010, p 0000 -> 3/4; class0 (n=3) tp3 fp1 -> 6/7, class1 never predicted 0
    #   -> 3 * 6/7 / 4 = 9/14
    "angry_acc": 3 / 4,
    "angry_f1": 9 / 14,
    # means: (3/4 + 1/2 + 1 + 3/4) / 4; (11/15 + 1/2 + 1 + 9/14) / 4 = 151/210
    "mean_acc": 3 / 4,
    "mean_f1": 151 / 210,
}


def _logits(hard: np.ndarray) -> np.ndarray:
    """(N, 4) 0/1 -> (N, 4, 2) logits whose argmax is ``hard``."""
    return np.stack([-hard * 1.3, hard * 0.7 - 0.2], axis=-1).astype(np.float32)


def _one_hot(hard: np.ndarray) -> np.ndarray:
    return np.eye(2, dtype=np.int64)[hard]


@pytest.mark.parametrize(
    "pred, y",
    [
        (EMO_P, EMO_Y),
        (_logits(EMO_P), EMO_Y),
        (EMO_P, _one_hot(EMO_Y)),
        (_logits(EMO_P), _one_hot(EMO_Y)),
    ],
    ids=["hard-hard", "logits-hard", "hard-onehot", "logits-onehot"],
)
def test_emotion_golden(pred, y):
    m = emotion_metrics(pred, y)
    expected_keys = [f"{e}_{k}" for e in EMOTIONS for k in ("acc", "f1")] + [
        "mean_acc",
        "mean_f1",
    ]
    assert list(m) == expected_keys
    assert m == pytest.approx(EMO_EXPECTED)
    assert all(type(v) is float for v in m.values())


@pytest.mark.parametrize(
    "pred, y, shapes",
    [
        (np.zeros((4, 3, 2)), EMO_Y, r"\(4, 3, 2\)"),
        (np.zeros((4, 4, 3)), EMO_Y, r"\(4, 4, 3\)"),
        (np.zeros(4), EMO_Y, r"\(4,\)"),
        (EMO_P, np.zeros((4, 4, 2, 1)), r"\(4, 4, 2, 1\)"),
        (np.zeros((5, 4, 2)), EMO_Y, r"\(5, 4, 2\).*\(4, 4\)"),
        (np.full((4, 4), 0.7), EMO_Y, r"\(4, 4\).*not 0/1"),
    ],
)
def test_emotion_shape_errors(pred, y, shapes):
    with pytest.raises(DataError, match=shapes):
        emotion_metrics(pred, y)


# --------------------------------------------------------------------------- weighted F1, misc


def test_weighted_f1_golden():
    # class 0 (n=1): tp0 fn1 -> 0; class 1 (n=1): tp0 fn1 fp0 -> 0;
    # class 2 (n=2): tp1 fp2 fn1 -> 2/5;  weighted: 2 * 2/5 / 4 = 1/5
    assert weighted_f1([0, 1, 2, 2], [2, 2, 2, 0]) == pytest.approx(0.2)
    # Class 1 has support but is never predicted: scores 0 (sklearn's zero_division).
    # class 0 (n=2): tp2 fp2 -> 2/3; class 1 (n=2): 0 -> (2 * 2/3) / 4 = 1/3
    assert weighted_f1([1, 1, 0, 0], [0, 0, 0, 0]) == pytest.approx(1 / 3)
    assert weighted_f1([1, 1, 1], [1, 1, 1]) == 1.0
    assert weighted_f1([1, 1, 1], [0, 0, 0]) == 0.0
    with pytest.raises(DataError):
        weighted_f1([], [])
    with pytest.raises(DataError, match=r"\(3,\).*\(2,\)"):
        weighted_f1([0, 1, 1], [0, 1])


def test_compute_metrics_dispatch():
    assert compute_metrics("regression", GOLD_P, GOLD_Y) == regression_metrics(GOLD_P, GOLD_Y)
    assert compute_metrics("emotions", EMO_P, EMO_Y) == emotion_metrics(EMO_P, EMO_Y)
    with pytest.raises(ConfigError, match="classification"):
        compute_metrics("classification", GOLD_P, GOLD_Y)


def test_format_metrics():
    metrics = {"acc7": 0.39125, "acc2_nonzero": 0.8231, "mae": 0.8576, "corr": math.nan}
    line = format_metrics(metrics)
    assert line == "acc7 0.391  acc2_nonzero 0.823  mae 0.858  corr nan"
    assert "\n" not in format_metrics(regression_metrics(GOLD_P, GOLD_Y))


# --------------------------------------------------------------------------- agreement with sklearn


def _random_regression(seed: int, n: int = 60):
    rng = np.random.default_rng(seed)
    # Labels on the half-point grid of MOSI/MOSEI averages, so exact zeros occur; some
    # predictions are exactly zero too, where the two Acc2 conventions part ways.
    y = np.round(rng.uniform(-3, 3, n) * 2) / 2
    p = y + rng.normal(0, 1.2, n)
    p[rng.random(n) < 0.1] = 0.0
    return p, y


@pytest.mark.filterwarnings("ignore")  # sklearn's UndefinedMetricWarning on empty classes
@pytest.mark.parametrize("seed", range(6))
def test_regression_matches_sklearn(seed):
    skm = pytest.importorskip("sklearn.metrics")
    p, y = _random_regression(seed)
    m = regression_metrics(p, y)

    nz = y != 0
    assert m["acc2_nonzero"] == pytest.approx(skm.accuracy_score(y[nz] > 0, p[nz] > 0))
    assert m["f1_nonzero"] == pytest.approx(
        skm.f1_score(y[nz] > 0, p[nz] > 0, average="weighted")
    )
    assert m["acc2_haszero"] == pytest.approx(skm.accuracy_score(y >= 0, p >= 0))
    assert m["f1_haszero"] == pytest.approx(skm.f1_score(y >= 0, p >= 0, average="weighted"))
    for key, bound in (("acc7", 3), ("acc5", 2)):
        expected = skm.accuracy_score(
            np.round(np.clip(y, -bound, bound)), np.round(np.clip(p, -bound, bound))
        )
        assert m[key] == pytest.approx(expected)
    assert m["mae"] == pytest.approx(skm.mean_absolute_error(y, p))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("seed", range(6))
def test_weighted_f1_matches_sklearn_multiclass(seed):
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 30))
    # Small and skewed label sets so classes missing from one side are common.
    y_true = rng.choice(5, size=n, p=[0.5, 0.3, 0.1, 0.1, 0.0])
    y_pred = rng.choice(5, size=n, p=[0.2, 0.2, 0.2, 0.2, 0.2])
    assert weighted_f1(y_true, y_pred) == pytest.approx(
        skm.f1_score(y_true, y_pred, average="weighted")
    )


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("seed", range(6))
def test_emotions_match_sklearn(seed):
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n = 25
    logits = rng.normal(size=(n, 4, 2))
    y = (rng.random((n, 4)) < 0.25).astype(int)
    y[:, 3] = 0  # an emotion absent from the labels, as can happen in a small batch
    m = emotion_metrics(logits, y)
    hard = logits.argmax(-1)
    for i, e in enumerate(EMOTIONS):
        assert m[f"{e}_acc"] == pytest.approx(skm.accuracy_score(y[:, i], hard[:, i]))
        assert m[f"{e}_f1"] == pytest.approx(skm.f1_score(y[:, i], hard[:, i], average="weighted"))


# --------------------------------------------------------------------------- properties

_label = st.one_of(
    st.just(0.0),
    st.sampled_from([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5]),
    st.floats(-4, 4, allow_nan=False),
)
_pred = st.one_of(st.just(0.0), st.floats(-5, 5, allow_nan=False))


@settings(max_examples=80, deadline=None, database=None)  # no .hypothesis dir in the repo
@given(st.lists(st.tuples(_pred, _label), min_size=1, max_size=30))
def test_regression_properties(pairs):
    p, y = (np.array(v) for v in zip(*pairs))
    m = regression_metrics(p, y)
    for key in ("acc7", "acc5", "acc2_haszero", "f1_haszero"):
        assert 0.0 <= m[key] <= 1.0
    assert m["mae"] >= 0.0
    assert math.isnan(m["corr"]) or -1.0 <= m["corr"] <= 1.0

    # The non-zero convention ignores y == 0 samples, so dropping them changes nothing.
    keep = y != 0
    if not keep.any():
        assert math.isnan(m["acc2_nonzero"]) and math.isnan(m["f1_nonzero"])
        return
    for key in ("acc2_nonzero", "f1_nonzero"):
        assert 0.0 <= m[key] <= 1.0
    dropped = regression_metrics(p[keep], y[keep])
    assert dropped["acc2_nonzero"] == m["acc2_nonzero"]
    assert dropped["f1_nonzero"] == m["f1_nonzero"]


def test_corr_with_tiny_spreads_does_not_underflow():
    """Found by hypothesis: ss_p * ss_y underflowed to 0 for spreads ~1e-90 (ZeroDivisionError)."""
    m = regression_metrics(np.array([0.0, 9.893507661245421e-78]), np.array([2.168294772172034e-101, 0.0]))
    assert m["corr"] == pytest.approx(-1.0)
