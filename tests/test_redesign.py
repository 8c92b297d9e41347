"""The model's Python code is the one truth: edits take effect on the default (accelerated) CPU path,
the stock model still runs compiled, and analysis computes what training and evaluation compute.

Each edit test trains on CPU with default settings (``cpu_kernels="fused"``): the edit changes the
outputs, a new parameter gets a gradient, and the log names the stack that fell back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import NO_DROPOUT, make_batch_fn, tiny_model_config, tiny_run_config
from mskt.fast import accelerate, accelerated_stacks, compiled_kernels
from mskt.fast.source import MIRRORED_SOURCE, mirrored_code
from mskt.model import VARIANTS, TransformerLayer, build_model, register
from mskt.model.variants.kt import KT
from mskt.train import train
from mskt.train.evaluation import default_test_batch

REQUIRED = os.environ.get("MSKT_REQUIRE_KERNELS") == "1"
pytestmark = pytest.mark.skipif(compiled_kernels() is None and not REQUIRED, reason="the compiled kernels do not build here")
ROOT = Path(__file__).resolve().parents[1]
BUILT_IN = ("full", "kt", "language_vision", "language", "vision", "kt_any")


def test_the_mirrored_source_digest_is_the_recorded_one():
    digest, _ = mirrored_code()
    assert digest == MIRRORED_SOURCE, (
        f"the layer code the compiled stacks node mirrors changed (digest {digest}); if csrc/cpu_kernels.cpp was changed "
        "to compute the same function, set mskt.fast.source.MIRRORED_SOURCE to it")


@pytest.mark.parametrize("variant", BUILT_IN)
@pytest.mark.parametrize("ctc", [False, True])
def test_the_stock_model_takes_the_compiled_path(variant, ctc):
    model = accelerate(build_model(tiny_model_config(variant=variant, ctc_align=ctc)))
    status = accelerated_stacks(model)
    assert status and all(v is True for v in status.values()), status


# ----------------------------------------------------------------------------------------------
# (a) a subclass of the stock layer with a learnable gate


class GatedLayer(TransformerLayer):
    """The stock layer whose update is scaled by a learnable gate."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = nn.Parameter(torch.tensor(0.3))

    def forward(self, x, x_mask, source=None, source_mask=None, return_attention=False, last_only=False):
        y, weights = super().forward(x, x_mask, source, source_mask, return_attention, last_only)
        x_in = x[:, -1:] if last_only else x
        return x_in + self.gate * (y - x_in), weights


@register("test_gated_kt")
class GatedKT(KT):
    def __init__(self, cfg):
        super().__init__(cfg)
        first = self.crossmodal["text->audio"].layers[0]
        gated = GatedLayer(cfg.d_model, cfg.heads, first.attn.dropout, first.relu_dropout, first.res_dropout, cross=True)
        gated.load_state_dict(first.state_dict(), strict=False)
        self.crossmodal["text->audio"].layers[0] = gated


def test_a_subclassed_layer_trains_its_own_code(tiny_mosi, caplog):
    caplog.set_level(logging.WARNING, logger="mskt.fast")
    result = train(tiny_run_config(variant="test_gated_kt", epochs=2), dataset=tiny_mosi, save=False)
    model = result.model
    fell_back = [r.getMessage() for r in caplog.records if "Python code" in r.getMessage()]
    assert len(fell_back) == 1 and "crossmodal.text->audio" in fell_back[0] and "GatedLayer" in fell_back[0], fell_back
    status = accelerated_stacks(model)
    assert status.pop("crossmodal.text->audio") is not True
    assert all(v is True for v in status.values()), status  # every other stack still runs compiled
    gated = model.crossmodal["text->audio"].layers[0]
    assert gated.gate.item() != torch.tensor(0.3).item()  # Adam moved it: it received a nonzero gradient
    # The gradient of the gate on a training step, through the accelerated model:
    model.train()
    batch = make_batch_fn(model.cfg, steps={"text": 50, "audio": 50, "vision": 50}, lengths=None)
    batch = {k: v for k, v in batch.items()}
    model.zero_grad()
    model.loss(model(batch), batch["labels"])["total"].backward()
    assert gated.gate.grad is not None and float(gated.gate.grad.abs()) > 0
    # The edit changes the function: the same weights with the stock layer predict otherwise.
    stock = accelerate(build_model(result.config.replace(variant="kt")))
    stock.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith(".gate")})
    model.eval(), stock.eval()
    test = default_test_batch(model, batch)
    with torch.no_grad():
        assert not torch.allclose(model(test).pred, stock(test).pred, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# (b) a monkeypatched layer forward


def test_a_monkeypatched_layer_forward_trains(tiny_mosi, caplog, monkeypatch):
    stock = train(tiny_run_config(variant="kt", epochs=2), dataset=tiny_mosi, save=False)
    original = TransformerLayer.forward

    def halved_update(self, x, x_mask, source=None, source_mask=None, return_attention=False, last_only=False):
        y, weights = original(self, x, x_mask, source, source_mask, return_attention, last_only)
        x_in = x[:, -1:] if last_only else x
        return x_in + 0.5 * (y - x_in), weights

    monkeypatch.setattr(TransformerLayer, "forward", halved_update)
    caplog.set_level(logging.WARNING, logger="mskt.fast")
    patched = train(tiny_run_config(variant="kt", epochs=2), dataset=tiny_mosi, save=False)
    lines = [r.getMessage() for r in caplog.records if "Python code" in r.getMessage()]
    assert len(lines) == 1 and "14 stacks run their Python code" in lines[0], lines  # one line, for every stack
    assert "encoders.text.transformer" in lines[0] and "differs from the code the compiled node mirrors" in lines[0]
    assert not any(v is True for v in accelerated_stacks(patched.model).values())
    assert patched.metrics["test"]["mae"] != stock.metrics["test"]["mae"]


def test_an_instance_patch_after_accelerate_is_seen_on_the_next_call():
    model = accelerate(build_model(tiny_model_config(variant="full", **NO_DROPOUT))).eval()
    batch = make_batch_fn(model.cfg)
    stack = model.crossmodal["audio->text"]
    assert accelerated_stacks(model)["crossmodal.audio->text"] is True
    layer = stack.layers[0]
    layer.forward = lambda *a, **k: (lambda y: (y[0] * 0 + a[0][:, -1:] if k.get("last_only") else a[0], y[1]))(TransformerLayer.forward(layer, *a, **k))
    with torch.no_grad():
        edited = model(batch).pred
        reference = model(batch, return_attention=True).pred  # the Python code throughout
    assert torch.allclose(edited, reference, atol=1e-5)
    assert "own forward" in accelerated_stacks(model)["crossmodal.audio->text"]


# ----------------------------------------------------------------------------------------------
# (c) an edited copy of the model source, imported in a subprocess


EDITED_RUN = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s", stream=sys.stdout)
import torch
torch.set_num_threads(1)
import mskt
assert mskt.__file__.startswith(sys.argv[1]), mskt.__file__
from mskt.config import Config
from mskt.data.synthetic import make_synthetic
from mskt.fast import accelerated_stacks
from mskt.train import train
ds = make_synthetic("mosi", aligned=True, scale=0.01, seed=0)
cfg = Config.from_dict(dict(variant="kt", d_model=8, heads=2, encoder_layers=1, kt_layers=1, crossmodal_layers=1,
                            memory_layers=1, epochs=2, batch_size=8, eval_batch_size=8, device="cpu", progress="off", seed=7))
r = train(cfg, dataset=ds, save=False)
gates = [float(m.ff_gate) for m in r.model.modules() if hasattr(m, "ff_gate")]
print("RESULT", json.dumps({"mae": r.metrics["test"]["mae"], "gates": gates,
                            "compiled": [k for k, v in accelerated_stacks(r.model).items() if v is True]}))
"""


def test_an_edited_source_file_trains_its_own_code(tmp_path, tiny_mosi):
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "mskt", copy / "mskt", ignore=shutil.ignore_patterns("__pycache__"))
    layers = copy / "mskt" / "model" / "layers.py"
    source = layers.read_text()
    edits = [
        ("        self.relu_dropout = relu_dropout\n", "        self.relu_dropout = relu_dropout\n        self.ff_gate = nn.Parameter(torch.tensor(0.5))\n"),
        ('        x = x + self.kernels.dropout(f, self.res_dropout, dropout_key(self, "feed_forward_residual", self.res_dropout, f))\n',
         '        x = x + self.ff_gate * self.kernels.dropout(f, self.res_dropout, dropout_key(self, "feed_forward_residual", self.res_dropout, f))\n'),
    ]
    for old, new in edits:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    layers.write_text(source)
    # Run from the copy (so it is what imports), with the project root for the built kernels.
    env = {**os.environ, "PYTHONPATH": str(copy), "MSKT_HOME": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(EDITED_RUN), str(copy)], cwd=copy, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))[len("RESULT "):])
    log = done.stdout
    assert "run their Python code" in log and "encoders.text.transformer" in log and "differs from the code" in log, log[-2000:]
    assert result["compiled"] == []  # every stack runs the edited Python code
    assert result["gates"] and all(g != 0.5 for g in result["gates"])  # each new parameter was trained
    stock = train(tiny_run_config(variant="kt", epochs=2), dataset=tiny_mosi, save=False)
    assert result["mae"] != stock.metrics["test"]["mae"]


# ----------------------------------------------------------------------------------------------
# Analysis runs what was trained


@pytest.mark.parametrize("variant", BUILT_IN)
@pytest.mark.parametrize("aligned", [True, False])
def test_return_attention_predicts_what_evaluation_predicts(variant, aligned):
    torch.manual_seed(3)
    model = accelerate(build_model(tiny_model_config(variant=variant))).eval()
    batch = default_test_batch(model, make_batch_fn(model.cfg, aligned=aligned))
    with torch.no_grad():
        evaluated = model(batch).pred
        analysed = model(batch, return_attention=True, return_internals=True)
    assert all(v is True for v in accelerated_stacks(model).values())
    assert torch.allclose(evaluated, analysed.pred, atol=1e-5, rtol=0), (evaluated - analysed.pred).abs().max()
    assert analysed.attention  # the maps the notebooks draw come from this same forward


def test_variants_are_registered_in_the_papers_order():
    assert tuple(VARIANTS)[: len(BUILT_IN)] == BUILT_IN
