"""mctn, the paper's missing-modality baseline (MCTN, Pham et al. 2019), a model that is not MulT:
shapes, loss terms and weights, what its prediction path reads, missing inputs, and the seams
(train, evaluate, load_run, accelerate, analyses, grid with the paper's rows)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from conftest import make_batch_fn, tiny_model_config, tiny_run_config
from formats import write_mult_pickle
from mskt.config import Config
from mskt.errors import ConfigError, MsktError
from mskt.model import MulT, build_model
from mskt.model.base import Model
from mskt.model.variants.mctn import MCTN, MCTNOptions


def _grads_everywhere(model) -> list:
    return [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]


@pytest.mark.parametrize("task", ["regression", "emotions"])
@pytest.mark.parametrize("aligned", [True, False])
def test_forward_backward_shapes_and_weighted_loss_terms(task, aligned):
    cfg = tiny_model_config(variant="mctn", task=task)
    model = build_model(cfg)
    assert isinstance(model, Model) and not isinstance(model, MulT)
    batch = make_batch_fn(cfg, aligned=aligned)
    out = model.train()(batch)
    assert out.pred.shape == ((4,) if task == "regression" else (4, 4, 2))
    terms = model.loss(out, batch["labels"])
    assert set(terms) == {"task", "translation", "cycle", "translation_audio", "output_l2", "total"}
    d = MCTNOptions()
    expected = (terms["task"] + d.translation_weight * terms["translation"] + d.cycle_weight * terms["cycle"]
                + d.audio_weight * terms["translation_audio"] + d.output_l2 * terms["output_l2"])
    assert torch.allclose(terms["total"], expected)
    assert all(terms[k].item() > 0 for k in ("translation", "cycle", "translation_audio"))
    terms["total"].backward()
    assert _grads_everywhere(model) == []  # every part (both stages, the cycle, the head) trains
    # Translations live on the text grid, left-padded like every sequence; targets on their own grids.
    internals = model.eval()(batch, return_internals=True).internals
    T = batch["text"].shape[1]
    assert internals["vision_reconstruction"].shape == (4, T, cfg.vision_dim)
    assert internals["audio_reconstruction"].shape == (4, T, cfg.audio_dim)
    assert internals["audio_features"].shape == batch["audio"].shape


def test_options_are_declared_and_a_zero_cycle_weight_removes_the_cycle():
    assert MCTN.Options is MCTNOptions and MCTNOptions().cycle_weight == 0.1
    assert Config.from_dict({"variant": "mctn", "cycle_weight": 0.5}).cycle_weight == 0.5  # the run config takes its options
    with pytest.raises(ConfigError, match="cycle_weight"):
        Config.from_dict({"variant": "mctn", "cycle_weight": -1.0})
    cfg = tiny_model_config(variant="mctn", cycle_weight=0.0)
    batch = make_batch_fn(cfg)
    model = build_model(cfg).train()
    terms = model.loss(model(batch), batch["labels"])
    assert "cycle" not in terms and "translation" in terms
    terms["total"].backward()
    assert _grads_everywhere(model) == []  # no parameter left without a gradient (DDP would refuse it)


def test_prediction_reads_only_text():
    cfg = tiny_model_config(variant="mctn")
    model = build_model(cfg).eval()
    batch = make_batch_fn(cfg, aligned=False)
    with torch.no_grad():
        pred = model(batch).pred
        poisoned = {**batch, "vision": torch.full_like(batch["vision"], math.nan), "audio": torch.full_like(batch["audio"], 1e6)}
        assert torch.equal(model(poisoned).pred, pred)
        assert torch.equal(model({**batch, "audio": None, "vision": None}).pred, pred)
        assert not torch.equal(model({**batch, "text": batch["text"] + 1.0}).pred, pred)  # the test can fail


def test_missing_text_is_zero_imputed_and_text_given_as_none_is_an_error():
    cfg = tiny_model_config(variant="mctn")
    model = build_model(cfg).eval()
    batch = make_batch_fn(cfg)
    missing = torch.tensor([[True, False, False], [False, False, False], [True, False, False], [False, False, False]])
    with torch.no_grad():
        marked = model({**batch, "text": torch.full_like(batch["text"], math.nan), "missing": missing}).pred  # values behind the mask never read
        imputed = model({**batch, "text": torch.where(missing[:, 0, None, None], 0.0, batch["text"])}).pred
        assert torch.isfinite(marked[missing[:, 0]]).all()
        assert torch.allclose(marked[missing[:, 0]], imputed[missing[:, 0]])
    with pytest.raises(ValueError, match="every modality it reads \\(text\\) is None"):
        model({**batch, "text": None})


def test_ctc_align_and_attention_maps_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="ctc_align=True: mctn reads only text"):
        build_model(tiny_model_config(variant="mctn", ctc_align=True))
    model = build_model(tiny_model_config(variant="mctn")).eval()
    with pytest.raises(ValueError, match="has no attention maps"):
        model(make_batch_fn(model.cfg), return_attention=True)


def test_train_evaluate_load_run_analyses_and_a_missing_protocol(tiny_mosi, tmp_path, caplog):
    from mskt.train import Tensors, evaluate, load_run, train
    from mskt.viz import analysis

    run = tmp_path / "mctn"
    with caplog.at_level(logging.INFO, logger="mskt.fast"):
        result = train(tiny_run_config(variant="mctn", train_missing="patterns", train_missing_rate=0.5), out_dir=run, dataset=tiny_mosi)
    assert "MCTN has no transformer stacks or kernel tables: nothing to accelerate" in caplog.text  # the fast path's one line
    assert {"train_translation", "train_cycle", "train_translation_audio"} <= set(result.history.columns)
    assert result.metrics["best_epoch"] in (1, 2) and math.isfinite(result.metrics["test"]["mae"])

    cfg, model = load_run(run)
    assert isinstance(model, MCTN) and float(model.audio_std.sum()) != cfg.audio_dim  # statistics saved with the weights
    test = Tensors.from_split(tiny_mosi["test"], "regression", "cpu")
    assert evaluate(model, test)["mae"] == pytest.approx(result.metrics["test"]["mae"], abs=1e-6)
    # Missing protocols: audio and vision missing changes nothing; text missing for every sample is zero-imputed.
    assert evaluate(model, test, missing="audio,vision")["mae"] == pytest.approx(result.metrics["test"]["mae"], abs=1e-6)
    assert math.isfinite(evaluate(model, test, missing="text")["mae"])
    assert math.isfinite(evaluate(model, test, missing_rate=0.5, missing_seed=1)["mae"])

    rec = analysis.reconstructions(model, test)  # audio translated from the joint representation
    assert list(k for k, v in rec.items() if isinstance(v, dict)) == ["joint"]
    assert "A' from joint" in set(analysis.quality_summary(rec)["reconstruction"])
    with pytest.raises(MsktError, match="variant 'mctn' has no attention layers"):
        analysis.attention_maps(model, test, [0])


def test_grid_with_mctn_shows_the_papers_mctn_row_and_other_baselines(tmp_path):
    from mskt.experiments.grid import run_grid

    pkl, _, _ = write_mult_pickle(tmp_path, "mosi")  # CMU-MOSI aligned: the paper's Table 1
    base = tiny_run_config(data=str(pkl), epochs=1, batch_size=4)
    assert isinstance(base, Config)
    runs = run_grid(base, ["mctn"], seeds=1, out_dir=tmp_path / "grid")
    assert list(runs["variant"]) == ["mctn"]
    table = (tmp_path / "grid" / "results.md").read_text()
    assert "| mctn | 1 |" in table
    assert "| *mctn (paper)* | | 35.6 | 79.3 | 79.1 |" in table and "0.909" in table  # MCTN, Table 1
    assert "| *RMFN (paper)* | | 38.3 | 78.4 | 78.0 |" in table and "*MFM (paper)*" in table and "*RAVEN (paper)*" in table


def test_the_explorer_shows_mctn_without_attention_maps(tiny_mosi):
    """The explorer asks the model whether it has attention (``has_attention``) instead of
    assuming a MulT: an MCTN sample view has its reconstructions and no maps."""
    from mskt.data.batching import Tensors
    from mskt.viz import explorer

    cfg = tiny_model_config(variant="mctn", text_dim=tiny_mosi.dims["text"], audio_dim=tiny_mosi.dims["audio"],
                            vision_dim=tiny_mosi.dims["vision"], text_steps=tiny_mosi.seq_lens["text"])
    view = explorer.sample_view(build_model(cfg), Tensors.from_split(tiny_mosi["test"], "regression", "cpu"), 0, missing="audio")
    assert view["attention"] == {} and set(view["views"]) == {"audio", "vision"}
    assert "A′ reconstructed" in explorer.describe(view)
