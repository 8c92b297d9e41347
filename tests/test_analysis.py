"""The analyses the notebooks draw: reconstruction-quality numbers and averaged attention."""

from __future__ import annotations

import numpy as np
import pytest

from mskt.viz import analysis


def _rec(pred, target, mask):
    part = {"pred": pred, "target": target, "mask": mask}
    return {"vision": part, "text": part, "fused": part, "prediction": np.zeros(len(pred)), "labels": np.zeros(len(pred))}


def test_quality_summary_perfect_and_trivial_reconstructions():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(6, 5, 3))
    mask = np.ones((6, 5), dtype=bool)
    mask[:, :2] = False  # left padding
    perfect = analysis.quality_summary(_rec(target.copy(), target, mask)).set_index("reconstruction")
    assert perfect.loc["A' from fused", "r2"] == pytest.approx(1.0)
    assert perfect.loc["A' from fused", "cosine"] == pytest.approx(1.0)
    assert perfect.loc["A' from fused", "mse"] == pytest.approx(0.0)
    assert perfect.loc["training-mean audio", "r2"] == pytest.approx(0.0)
    zeros = analysis.quality_summary(_rec(np.zeros_like(target), target, mask)).set_index("reconstruction")
    assert zeros.loc["A' from vision", "r2"] == pytest.approx(0.0)  # the training mean of standardised audio is 0


def test_padding_never_enters_the_errors():
    target = np.ones((2, 4, 2))
    pred = np.ones((2, 4, 2))
    pred[:, 0] = 1e6  # wrong only at a padded step
    mask = np.array([[False, True, True, True]] * 2)
    per_dim = analysis.error_per_dimension(_rec(pred, target, mask))
    assert (per_dim["mse"] == 0).all()
    per_position = analysis.error_per_position(_rec(pred, target, mask), bins=3)
    assert (per_position["mse"] == 0).all()


def test_average_attention_of_uniform_attention_is_one_everywhere(monkeypatch):
    """Uniform attention over each sample's real keys must average to exactly 1 in relative
    positions, whatever the lengths and the padding."""
    lengths = np.array([3, 7, 10])
    T = 10
    w = np.zeros((3, 2, T, T))  # (n, heads, T, S)
    for i, L in enumerate(lengths):
        w[i, :, -L:, -L:] = 1.0 / L
    fake = {"text->vision": [w], "lengths": {"text": lengths, "vision": lengths, "audio": lengths}}
    monkeypatch.setattr(analysis, "attention_maps", lambda model, data, samples: {k: v for k, v in fake.items()})

    class Model:
        class cfg:
            variant = "language_vision"

    out = analysis.average_attention(Model, data=[0, 1, 2], bins=5)
    assert np.allclose(out["text->vision"][0], 1.0)
