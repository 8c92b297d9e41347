"""Label efficiency: keep a seeded, stratified subset of the training labels (``Config.label_fraction``).

The samples outside the subset stay in the training split with their features, so a variant's
consistency terms (e.g. ``kt`` reconstructing audio from language and vision) still learn from
them: knowledge transfer from unlabelled data. Their labels are hidden: NaN for regression, -1 in
every emotion column; ``mskt.model.losses.task_loss`` skips such samples, so they give no
task-loss gradient.
"""

from __future__ import annotations

import numpy as np
import torch

from mskt.errors import ConfigError

UNLABELLED_CLASS = -1  # an emotion column of a sample whose labels are hidden (regression: NaN)


def strata(labels) -> np.ndarray:
    """The stratum of each sample: regression, the label rounded to the 7 classes -3..3 (Acc7's);
    emotions ((N, 4) 0/1), the pattern of the four emotions (16 possible)."""
    y = np.asarray(labels)
    if y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1):
        return np.clip(np.round(y.reshape(-1).astype(np.float64)), -3, 3).astype(np.int64)
    return (y.astype(np.int64) << np.arange(y.shape[1])).sum(axis=1)


def labelled_subset(labels, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the samples that keep their labels: round(fraction x N) of them (at least
    one), spread over the strata (:func:`strata`) in proportion to their sizes (largest remainders
    get the leftover places, ties in a seeded random order), drawn at random within each stratum.
    The same (labels, fraction, seed) always gives the same mask; fraction 1 keeps every label."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ConfigError(f"label_fraction={fraction!r}: expected a number in (0, 1]")
    group = strata(labels)
    n = len(group)
    keep = np.zeros(n, dtype=bool)
    if fraction == 1 or n == 0:
        keep[:] = True
        return keep
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(0x1abe1,)))
    values, counts = np.unique(group, return_counts=True)
    quota = fraction * counts
    take = np.floor(quota).astype(np.int64)
    left = max(1, int(round(fraction * n))) - int(take.sum())
    if left > 0:  # largest remainders first; a random key breaks ties
        order = np.lexsort((rng.random(len(values)), -(quota - take)))
        take[order[:left]] += 1
    for value, k in zip(values, take):
        members = np.flatnonzero(group == value)
        keep[rng.permutation(members)[:k]] = True
    return keep


def hide_labels(labels: torch.Tensor, keep) -> torch.Tensor:
    """A copy of ``labels`` with the samples outside ``keep`` marked unlabelled (NaN, or -1 per emotion)."""
    hidden = labels.clone()
    drop = ~torch.as_tensor(np.asarray(keep), dtype=torch.bool, device=labels.device)
    hidden[drop] = float("nan") if labels.is_floating_point() else UNLABELLED_CLASS
    return hidden
