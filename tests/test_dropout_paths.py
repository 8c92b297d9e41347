"""One seed, one run, on every path: dropout masks are a function of (seed, step, site, sample,
position) defined once in the model's Python code (``mskt.model.layers``, "Dropout masks"), and the
compiled kernels compute the same bits. So:

- ``cpu_kernels="torch"`` (the Python code throughout) and the compiled path (``"fused"``) train
  every built-in variant to the same test metrics (within 1e-4 after 2 epochs; float rounding
  is all that differs), with dropout on at every site;
- an edit that is the identity at initialisation (a residual gate fixed at 1 on the layers of one
  stack, which then runs its Python code) gives the stock run's numbers, and with the gate
  trainable the difference from the stock run is the edit's alone: the same on either path.

Tiny configs (``conftest.TINY``) on the tiny MOSI-shaped data, one thread.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn as nn

from conftest import NO_DROPOUT, tiny_run_config
from mskt.fast import accelerated_stacks, compiled_kernels
from mskt.model import TransformerLayer, register
from mskt.model.variants.kt import KT
from mskt.train import train

REQUIRED = os.environ.get("MSKT_REQUIRE_KERNELS") == "1"
pytestmark = pytest.mark.skipif(compiled_kernels() is None and not REQUIRED, reason="the compiled kernels do not build here")
BUILT_IN = ("full", "kt", "language_vision", "language", "vision", "kt_any")
TOLERANCE = 1e-4
# Every dropout site on: the head's relu-dropout (off by default) too.
DROPOUT = dict(attn_dropout=0.1, attn_dropout_audio=0.1, attn_dropout_vision=0.1, relu_dropout=0.1, res_dropout=0.1,
               embed_dropout=0.25, out_dropout=0.1)


def run(data, cpu_kernels="fused", **overrides):
    cfg = tiny_run_config(cpu_kernels=cpu_kernels, **{**DROPOUT, **overrides})
    return train(cfg, dataset=data, save=False)


def assert_same_metrics(a, b, tolerance=TOLERANCE):
    assert a.metrics["best_epoch"] == b.metrics["best_epoch"]
    for key, value in a.metrics["test"].items():
        assert abs(b.metrics["test"][key] - value) <= tolerance, (key, value, b.metrics["test"][key])


@pytest.mark.parametrize("variant", BUILT_IN)
def test_the_python_path_and_the_compiled_path_train_the_same_run(variant, tiny_mosi):
    fused = run(tiny_mosi, "fused", variant=variant)
    assert all(v is True for v in accelerated_stacks(fused.model).values())  # the compiled node ran every stack
    plain = run(tiny_mosi, "torch", variant=variant)
    assert_same_metrics(fused, plain)


def test_the_compared_runs_drop_something(tiny_mosi):
    """The comparison above is not vacuous: dropout changes this run's numbers."""
    with_dropout = run(tiny_mosi, variant="kt")
    without = run(tiny_mosi, variant="kt", **NO_DROPOUT)
    assert with_dropout.metrics["test"]["mae"] != without.metrics["test"]["mae"]


# ----------------------------------------------------------------------------------------------
# An edit that is the identity at initialisation


class ResidualGateLayer(TransformerLayer):
    """The stock layer with a residual gate g: x + g * (layer(x) - x), g = 1 at initialisation."""

    def __init__(self, *args, trainable=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = nn.Parameter(torch.tensor(1.0), requires_grad=trainable)

    def forward(self, x, x_mask, source=None, source_mask=None, return_attention=False, last_only=False):
        y, weights = super().forward(x, x_mask, source, source_mask, return_attention, last_only)
        x_in = x[:, -1:] if last_only else x
        return x_in + self.gate * (y - x_in), weights


def gated_kt(trainable):
    class GatedKT(KT):
        """kt with the layers of its text->audio cross-modal stack gated (that stack alone falls back)."""

        def __init__(self, cfg):
            super().__init__(cfg)
            stack = self.crossmodal["text->audio"]
            with torch.random.fork_rng(devices=[]):  # every stock weight and later draw stays as in the stock model
                for i, layer in enumerate(stack.layers):
                    gated = ResidualGateLayer(cfg.d_model, cfg.heads, layer.attn.dropout, layer.relu_dropout, layer.res_dropout,
                                              cross=True, trainable=trainable)
                    gated.load_state_dict(layer.state_dict(), strict=False)
                    stack.layers[i] = gated

    return GatedKT


register("test_gate_fixed")(gated_kt(trainable=False))
register("test_gate_trained")(gated_kt(trainable=True))


def test_an_identity_edit_gives_the_stock_runs_numbers(tiny_mosi, caplog):
    stock = run(tiny_mosi, variant="kt")
    caplog.set_level(logging.WARNING, logger="mskt.fast")
    edited = run(tiny_mosi, variant="test_gate_fixed")
    assert accelerated_stacks(edited.model)["crossmodal.text->audio"] is not True  # it ran its Python code
    assert any("crossmodal.text->audio" in r.getMessage() for r in caplog.records)
    assert_same_metrics(stock, edited)


def test_a_trained_gate_changes_the_run_by_the_edit_alone(tiny_mosi):
    stock = run(tiny_mosi, variant="kt")
    fused = run(tiny_mosi, "fused", variant="test_gate_trained")
    plain = run(tiny_mosi, "torch", variant="test_gate_trained")
    gates = [float(m.gate.detach()) for m in fused.model.modules() if isinstance(m, ResidualGateLayer)]
    assert gates and all(g != 1.0 for g in gates)  # the gate trained
    assert_same_metrics(fused, plain)  # the path adds nothing to what the edit does
    assert fused.metrics["test"] != stock.metrics["test"]
