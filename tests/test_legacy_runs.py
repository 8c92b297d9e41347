"""Run folders written before the variants owned their options still load and score the same.

``tests/data/legacy_runs/{full,kt,kt_any}`` were trained (SMOKE model, 1 epoch, synthetic:mosi at
scale 0.02) by the code of commit 502fdfc, when every config held kt's and kt_any's options as flat
fields (``lambda_language``, ``kt_target``, ``modality_dropout``, ...). Their ``config.json`` and
checkpoint must load with today's code, each option landing where its variant now keeps it, and the
loaded model must reproduce the test metrics the run recorded. The kt checkpoint's weights are
saved under the paper's module names (``theta``, ``phi``, ``delta``, ``delta_in``, ``audio_readout``),
which kt now calls ``transfer``, ``fuse``, ``fuse_in`` and ``readout`` (``KT.renamed_modules``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import torch

from mskt.config import Config
from mskt.model import build_model
from mskt.model.layers import DropoutContext, set_dropout_context
from mskt.train.checkpoints import load_checkpoint
from mskt.data.batching import Tensors
from mskt.data.readers import load_dataset
from mskt.train import evaluate, load_run

LEGACY = Path(__file__).parent / "data" / "legacy_runs"


def test_the_legacy_configs_hold_the_old_flat_options():
    stored = json.loads((LEGACY / "full" / "config.json").read_text())
    assert {"lambda_language", "kt_target", "modality_dropout"} <= set(stored)  # what the test is about


def test_old_config_json_files_load_with_options_where_their_variant_keeps_them():
    full = Config.load(LEGACY / "full" / "config.json")
    assert full.variant == "full" and "lambda_vision" not in full.to_dict()  # kt's options had no effect on full
    kt = Config.load(LEGACY / "kt" / "config.json")
    assert (kt.lambda_text, kt.consistency, kt.kt_target) == (0.5, "l1", "raw")  # lambda_language read as lambda_text
    assert "modality_dropout" not in kt.to_dict()
    kt_any = Config.load(LEGACY / "kt_any" / "config.json")
    assert (kt_any.modality_dropout, kt_any.lambda_any) == (0.3, 1.0) and "kt_target" not in kt_any.to_dict()


@pytest.mark.parametrize("variant", ["full", "kt", "kt_any"])
def test_old_run_folders_load_and_reproduce_their_metrics(variant):
    cfg, model = load_run(LEGACY / variant)
    recorded = json.loads((LEGACY / variant / "metrics.json").read_text())["test"]
    ds = load_dataset(cfg.data, scale=cfg.data_scale, seed=cfg.data_seed)
    metrics = evaluate(model, Tensors.from_split(ds["test"], ds.meta.task, "cpu"), cfg.eval_batch_size)
    # Another CPU or kernel build moves the last bits (tests/test_refactor_numbers.py measured 4.2e-6).
    assert metrics["mae"] == pytest.approx(recorded["mae"], abs=1e-4)
    assert metrics["acc2_nonzero"] == recorded["acc2_nonzero"]


KT_RENAMED = {"theta": "transfer.vision->audio", "phi": "transfer.text->audio", "delta_in": "fuse_in.audio",
              "delta": "fuse.audio", "audio_readout": "readout.audio"}


def test_an_old_kt_checkpoint_loads_its_paper_named_weights_into_the_role_named_modules():
    saved = load_checkpoint(LEGACY / "kt" / "checkpoint.pt")["model"]
    assert {k.split(".")[0] for k in saved} >= set(KT_RENAMED)  # what the test is about
    _, model = load_run(LEGACY / "kt")
    now = model.state_dict()
    assert not set(now) & set(saved) - {k for k in saved if k.split(".")[0] not in KT_RENAMED}
    for key, value in saved.items():
        head = key.split(".")[0]
        new = KT_RENAMED[head] + key[len(head):] if head in KT_RENAMED else key
        assert torch.equal(now[new], value), key


def test_the_paper_names_read_and_replace_the_modules_and_keep_their_dropout_sites():
    model = build_model(Config.from_dict(dict(data="synthetic:mosi", variant="kt", d_model=8, heads=2, crossmodal_layers=1, memory_layers=1, kt_layers=1)))
    assert type(model).renamed_modules == KT_RENAMED
    for old, new in KT_RENAMED.items():
        assert getattr(model, old) is model.get_submodule(new)
    replacement = torch.nn.Linear(2 * 8, 8)
    model.delta_in = replacement  # code written against the old name
    assert model.fuse_in["audio"] is replacement and "delta_in" not in dict(model.named_children())
    with pytest.raises(AttributeError):
        model.not_a_module
    # A renamed module keys its dropout by its old path, so a seed draws the same masks as before.
    set_dropout_context(model, DropoutContext(1, 0, torch.arange(2)))
    sites = {name: m.dropout_site for name, m in model.named_modules() if hasattr(m, "kernels")}
    assert sites and all(site == name for name, site in sites.items() if not name.startswith(("transfer.", "fuse.")))
    assert {site.split(".")[0] for name, site in sites.items() if name.startswith(("transfer.", "fuse."))} == {"theta", "phi", "delta"}
