"""Evaluation metrics for the three benchmarks and CH-SIMS, with every convention named explicitly.

The literature reports "Acc2" and "F1" under two incompatible conventions, and small
differences (rounding, clipping, argument order) move the numbers by a point or more, so
each convention is spelled out here once (see REFERENCE.md, section "Metrics").

Sentiment regression (MOSI, MOSEI); ``p`` = predictions and ``y`` = labels, both flattened:

- ``acc7``: ``mean(round(clip(p, -3, 3)) == round(clip(y, -3, 3)))``. Rounding is numpy's
  half-to-even (``np.round(0.5) == 0``, ``np.round(2.5) == 2``), as in MulT's code.
- ``acc5``: the same with clipping to ``[-2, 2]``.
- ``mae``: ``mean(|p - y|)`` on the unclipped values.
- ``corr``: Pearson correlation of ``p`` and ``y``; ``nan`` if either side is constant.
- ``acc2_nonzero`` / ``f1_nonzero`` (MulT, and the paper's tables): only samples with
  ``y != 0``; ``p > 0`` against ``y > 0``. ``nan`` for both if no such sample exists.
- ``acc2_haszero`` / ``f1_haszero`` (MMSA also reports these): all samples; ``p >= 0``
  against ``y >= 0``.
- Every F1 is the support-weighted F1 (scikit-learn's ``average='weighted'``) with the true
  labels as the first argument. (MulT's code passes predictions first, which changes the
  weights; we do not reproduce that.)

CH-SIMS (sentiment in ``[-1, 1]``), as MMSA's ``MetricsTop`` evaluates it (``__eval_sims_regression``):
``p`` and ``y`` are first clipped to ``[-1, 1]``, and every metric is computed on the clipped values.

- ``acc2``: classes ``[-1, 0]`` and ``(0, 1]`` (a label of exactly 0 is negative); ``f1``: their
  support-weighted F1, true labels first.
- ``acc3``: classes ``[-1, -0.1]``, ``(-0.1, 0.1]``, ``(0.1, 1]``.
- ``acc5``: classes ``[-1, -0.7]``, ``(-0.7, -0.1]``, ``(-0.1, 0.1]``, ``(0.1, 0.7]``, ``(0.7, 1]``.
- ``mae``: ``mean(|p - y|)`` of the clipped values; ``corr``: their Pearson correlation.

IEMOCAP emotions, in the order of ``mskt.data.presets.EMOTIONS``: the model emits ``(N, 4, 2)``
logits; per emotion, argmax over the last axis, then binary accuracy and weighted F1.
``mean_acc`` / ``mean_f1`` are the unweighted means over the four emotions.

All values are plain Python floats, accuracies as fractions in ``[0, 1]`` (not percent), so
a metrics dict can go straight into JSON. Only numpy is used at runtime; scikit-learn
serves as the reference in the tests.
"""

from __future__ import annotations

import math

import numpy as np

from mskt.errors import ConfigError, DataError
from mskt.data.presets import EMOTIONS

__all__ = [
    "regression_metrics",
    "sims_regression_metrics",
    "emotion_metrics",
    "compute_metrics",
    "weighted_f1",
    "format_metrics",
    "LOWER_IS_BETTER",
    "higher_is_better",
    "display_scale",
]

# Which way each metric goes: every metric here is better higher except these (the task loss that
# ``mskt.train.evaluate`` adds beside them counts as a metric too).
LOWER_IS_BETTER = ("mae", "loss")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better (False for MAE and the loss, True otherwise)."""
    return metric not in LOWER_IS_BETTER


def display_scale(metric: str) -> tuple[int, int]:
    """(scale, decimals) to show ``metric``: accuracies and F1 in percent with 1 decimal, MAE, Corr
    and the loss as they are with 3."""
    return (1, 3) if metric in ("mae", "corr", "loss") else (100, 1)


def weighted_f1(y_true, y_pred) -> float:
    """Support-weighted F1 over integer class labels, equal to scikit-learn's
    ``f1_score(y_true, y_pred, average='weighted')``.

    The classes are those seen in either argument, as in scikit-learn. A class that is
    never predicted has precision 0/0; scikit-learn's default ``zero_division`` scores it
    0, and so does ``2*tp / (2*tp + fp + fn)`` below (tp = 0, fn > 0). A class that is only
    predicted has zero support and therefore zero weight.
    """
    y_true = np.asarray(y_true).ravel()
    y_pred = np.asarray(y_pred).ravel()
    if y_true.shape != y_pred.shape:
        raise DataError(
            f"weighted_f1: y_true has shape {y_true.shape}, y_pred has shape {y_pred.shape}"
        )
    if y_true.size == 0:
        raise DataError("weighted_f1: no samples")
    score = 0.0
    for c in np.union1d(y_true, y_pred):
        is_true, is_pred = y_true == c, y_pred == c
        tp = np.count_nonzero(is_true & is_pred)
        fp = np.count_nonzero(~is_true & is_pred)
        fn = np.count_nonzero(is_true & ~is_pred)
        # The denominator is > 0: every class here occurs in y_true or y_pred.
        score += np.count_nonzero(is_true) * (2 * tp / (2 * tp + fp + fn))
    return float(score / y_true.size)


def _accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true == y_pred))


def _pearson(p: np.ndarray, y: np.ndarray) -> float:
    # Computed by hand rather than with np.corrcoef, which warns (divide by zero) and
    # returns nan for constant inputs; a constant prediction is a normal early-training
    # outcome, not something to warn about.
    if np.ptp(p) == 0 or np.ptp(y) == 0:  # constant: tested directly, since mean() rounding can leave residues
        return float("nan")
    dp, dy = p - p.mean(), y - y.mean()
    dp, dy = dp / np.abs(dp).max(), dy / np.abs(dy).max()  # unit scale: tiny deviations cannot underflow when squared
    r = float(dp @ dy) / math.sqrt(float(dp @ dp) * float(dy @ dy))
    return min(1.0, max(-1.0, r))  # rounding can push |r| a hair past 1


def _binary_pair(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    """(accuracy, weighted F1) of two boolean vectors; nan for both if they are empty."""
    if y_true.size == 0:
        return float("nan"), float("nan")
    return _accuracy(y_true, y_pred), weighted_f1(y_true, y_pred)


def _flat_pair(pred, y, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``pred`` and ``y`` as flat float64 arrays of the same, nonzero size (any shapes, e.g. (N, 1) and (N,))."""
    p_in, y_in = np.asarray(pred), np.asarray(y)
    if p_in.size != y_in.size:
        raise DataError(
            f"{where}: pred has shape {p_in.shape} ({p_in.size} values) but "
            f"y has shape {y_in.shape} ({y_in.size} values)"
        )
    if p_in.size == 0:
        raise DataError(f"{where}: no samples (pred and y are empty)")
    return p_in.astype(np.float64).ravel(), y_in.astype(np.float64).ravel()


def regression_metrics(pred, y) -> dict[str, float]:
    """Sentiment metrics (MOSI, MOSEI) under the conventions in the module docstring.

    ``pred`` and ``y`` may have any shapes (e.g. ``(N, 1)`` and ``(N,)``); both are
    flattened and must hold the same number of elements.
    """
    p, t = _flat_pair(pred, y, "regression_metrics")

    nonzero = t != 0
    acc2_nz, f1_nz = _binary_pair(t[nonzero] > 0, p[nonzero] > 0)
    acc2_hz, f1_hz = _binary_pair(t >= 0, p >= 0)
    return {
        "acc7": _accuracy(np.round(np.clip(t, -3, 3)), np.round(np.clip(p, -3, 3))),
        "acc5": _accuracy(np.round(np.clip(t, -2, 2)), np.round(np.clip(p, -2, 2))),
        "acc2_nonzero": acc2_nz,
        "f1_nonzero": f1_nz,
        "acc2_haszero": acc2_hz,
        "f1_haszero": f1_hz,
        "mae": float(np.mean(np.abs(p - t))),
        "corr": _pearson(p, t),
    }


# MMSA's SIMS class edges: a value v is in class i when edges[i] < v <= edges[i + 1]; -1.01 puts -1 in
# the first class.
SIMS_EDGES = {
    2: (-1.01, 0.0, 1.01),
    3: (-1.01, -0.1, 0.1, 1.01),
    5: (-1.01, -0.7, -0.1, 0.1, 0.7, 1.01),
}


def _sims_classes(v: np.ndarray, k: int) -> np.ndarray:
    """Class index of each value of ``v`` (already clipped to [-1, 1]) under MMSA's k-class bins."""
    edges = np.asarray(SIMS_EDGES[k])
    return np.searchsorted(edges, v, side="left") - 1  # edges[i] < v <= edges[i + 1]  ->  i


def sims_regression_metrics(pred, y) -> dict[str, float]:
    """Sentiment metrics for CH-SIMS (labels in [-1, 1]) under MMSA's conventions (module docstring)."""
    p, t = (np.clip(v, -1.0, 1.0) for v in _flat_pair(pred, y, "sims_regression_metrics"))
    out = {}
    for k in (2, 3, 5):
        out[f"acc{k}"] = _accuracy(_sims_classes(t, k), _sims_classes(p, k))
    out["f1"] = weighted_f1(_sims_classes(t, 2), _sims_classes(p, 2))
    out["mae"] = float(np.mean(np.abs(p - t)))
    out["corr"] = _pearson(p, t)
    return out


def _emotion_labels(a, name: str) -> np.ndarray:
    """``(N, 4, 2)`` scores/one-hot -> argmax; ``(N, 4)`` 0/1 -> as is. Returns ints (N, 4)."""
    arr = np.asarray(a)
    n_emo = len(EMOTIONS)
    if arr.ndim == 3 and arr.shape[1:] == (n_emo, 2):
        return arr.argmax(axis=-1)
    if arr.ndim == 2 and arr.shape[1] == n_emo:
        # Probabilities or logits in an (N, 4) array would otherwise be compared as labels
        # and give silently wrong scores.
        if not np.isin(arr, (0, 1)).all():
            raise DataError(
                f"emotion_metrics: {name} has shape {arr.shape} but is not 0/1; pass hard "
                f"labels of shape (N, {n_emo}) or scores of shape (N, {n_emo}, 2)"
            )
        return arr.astype(np.int64)
    raise DataError(
        f"emotion_metrics: {name} has shape {arr.shape}; expected (N, {n_emo}, 2) "
        f"or (N, {n_emo}) with emotions {EMOTIONS}"
    )


def emotion_metrics(pred, y) -> dict[str, float]:
    """Per-emotion binary accuracy and weighted F1 for IEMOCAP, plus their means.

    ``pred``: logits ``(N, 4, 2)`` or hard 0/1 predictions ``(N, 4)``.
    ``y``: 0/1 labels ``(N, 4)`` or MulT's one-hot ``(N, 4, 2)``.
    """
    p = _emotion_labels(pred, "pred")
    t = _emotion_labels(y, "y")
    if p.shape[0] != t.shape[0]:
        raise DataError(
            f"emotion_metrics: pred has shape {np.shape(pred)} but y has shape "
            f"{np.shape(y)} (different numbers of samples)"
        )
    if t.shape[0] == 0:
        raise DataError("emotion_metrics: no samples (pred and y are empty)")
    out: dict[str, float] = {}
    for i, emotion in enumerate(EMOTIONS):
        out[f"{emotion}_acc"] = _accuracy(t[:, i], p[:, i])
        out[f"{emotion}_f1"] = weighted_f1(t[:, i], p[:, i])
    out["mean_acc"] = float(np.mean([out[f"{e}_acc"] for e in EMOTIONS]))
    out["mean_f1"] = float(np.mean([out[f"{e}_f1"] for e in EMOTIONS]))
    return out


def compute_metrics(task: str, pred, y, dataset: str = "auto") -> dict[str, float]:
    """Dispatch on the dataset's task (``"regression"`` or ``"emotions"``) and, for regression, on its
    identity: SIMS's metrics for ``dataset="sims"``, MOSI/MOSEI's for any other."""
    if task == "regression":
        from mskt.data.presets import dataset_identity

        if dataset_identity(dataset) == "sims":
            return sims_regression_metrics(pred, y)
        return regression_metrics(pred, y)
    if task == "emotions":
        return emotion_metrics(pred, y)
    raise ConfigError(f"unknown task {task!r}; expected 'regression' or 'emotions'")


def format_metrics(metrics: dict) -> str:
    """One line for logs, in the dict's order: ``acc7 0.391  acc5 0.402  ...  corr 0.691``."""
    parts = []
    for key, value in metrics.items():
        text = f"{value:.3f}" if isinstance(value, (float, int, np.number)) else str(value)
        parts.append(f"{key} {text}")
    return "  ".join(parts)
