"""A new variant touches no other file: this file defines one (the paper's kt with theta and phi as
per-step MLPs instead of transformer stacks), then trains it, evaluates it, runs the
reconstruction-quality analysis and the missing-modality evaluation on it, through the same
functions the CLI and the notebooks call. docs/extending.md walks through it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import tiny_run_config
from mskt.data.batching import Tensors
from mskt.experiments import robustness
from mskt.model import register
from mskt.model.variants.kt import KT
from mskt.train import evaluate, load_run, train
from mskt.viz import analysis


class StepMLP(nn.Module):
    """A stack stand-in: the same two-layer MLP at every step, no attention across steps. It keeps
    the stack call signature, (x, mask, ...) -> (y, attention maps or None)."""

    def __init__(self, d: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))

    def forward(self, x, mask, source=None, source_mask=None, return_attention=False, last_only=False):
        y = self.net(x) * mask[..., None]  # (B, T, d); padded steps stay 0
        return (y[:, -1:] if last_only else y), None


@register("kt_mlp_example")  # docs/extending.md registers kt_mlp itself: one name, one class
class KTMLP(KT):
    """kt whose theta (V -> A) and phi (L -> A) see one step at a time."""

    def build_transfer(self) -> None:
        super().build_transfer()
        # The paper's names, as code written before kt named its modules by role did: they replace
        # transfer["vision->audio"] and transfer["text->audio"] (KT.renamed_modules).
        self.theta = StepMLP(self.cfg.d_model)
        self.phi = StepMLP(self.cfg.d_model)


@pytest.fixture(scope="module")
def kt_mlp_run(tmp_path_factory, tiny_mosi):
    out = tmp_path_factory.mktemp("runs") / "kt_mlp"
    return train(tiny_run_config(variant="kt_mlp_example", epochs=2), out_dir=out, dataset=tiny_mosi), out


def test_it_trains_and_evaluates(kt_mlp_run, tiny_mosi):
    result, out = kt_mlp_run
    assert isinstance(result.model.theta, StepMLP) and isinstance(result.model.phi, StepMLP)
    history = result.history
    assert {"train_consistency_vision", "train_consistency_text"} <= set(history.columns)
    assert np.isfinite(result.metrics["test"]["mae"])
    cfg, model = load_run(out)  # a run folder of the new variant loads like any other
    assert cfg.variant == "kt_mlp_example" and isinstance(model, KTMLP)
    test = Tensors.from_split(tiny_mosi.splits["test"], cfg.task, "cpu")
    assert evaluate(model, test, 8)["mae"] == pytest.approx(result.metrics["test"]["mae"], abs=1e-6)


def test_reconstruction_quality(kt_mlp_run, tiny_mosi):
    result, _ = kt_mlp_run
    test = Tensors.from_split(tiny_mosi.splits["test"], result.config.task, "cpu")
    rec = analysis.reconstructions(result.model, test, batch_size=8)
    table = analysis.quality_summary(rec)
    assert list(table["reconstruction"][:3]) == ["A' from vision", "A' from text", "A' from fused"]
    assert np.isfinite(table["mse"]).all()


def test_missing_modality_evaluation(kt_mlp_run, tiny_mosi):
    result, out = kt_mlp_run
    frame = robustness.sweep({"kt_mlp": [out]}, dataset=tiny_mosi, rates=(0.0, 0.5), seeds=(0,), batch_size=8)
    assert set(frame["label"]) == {"kt_mlp"} and np.isfinite(frame["mae"]).all()
    assert {"condition", "rate"} <= set(frame["protocol"])  # the six fixed conditions and the random rates
    with torch.no_grad():  # the default protocol never gives kt_mlp audio
        test = Tensors.from_split(tiny_mosi.splits["test"], result.config.task, "cpu")
        assert evaluate(result.model, test, 8, missing=("audio", "vision"))["mae"] != evaluate(result.model, test, 8)["mae"]
