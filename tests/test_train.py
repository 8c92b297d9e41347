"""Tests for mskt.train and mskt.config: a tiny training run end to end (history, metrics, run
folder, reload), determinism, the teacher mode of kt, config round trips, evaluation with audio
missing, NaN handling and device selection.

Data: tiny synthetic MOSI / IEMOCAP (13-14 / 8 / 8 samples); model: d_model 8, one layer per stack.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from mskt.config import PRESETS, Config, preset
from mskt.errors import ConfigError, MsktError
from mskt.metrics import emotion_metrics, regression_metrics
from mskt.model import MulT
from mskt.train import Tensors, evaluate, load_run, predict, resolve_device, train

try:
    from conftest import tiny_run_config
except ImportError:  # tests/ imported as a package
    from tests.conftest import tiny_run_config

# Columns that measure wall-clock time: the only ones two identical runs may disagree on.
TIMING_COLUMNS = ["train_samples_per_s"]
KT_TERMS = ["task", "consistency_vision", "consistency_text", "consistency_fused", "aux_audio", "total"]


def metric_keys(task):
    y = np.array([[0, 1, 0, 1], [1, 0, 1, 0]]) if task == "emotions" else np.array([1.0, -1.0, 0.5])
    p = np.eye(2)[y] if task == "emotions" else y
    return set((emotion_metrics if task == "emotions" else regression_metrics)(p, y))


def split_tensors(ds, split, task):
    return Tensors.from_split(ds[split], task, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# A run in memory


@pytest.mark.parametrize("kt_target", ["raw", "aux"])
def test_train_history_and_metrics(tiny_mosi, kt_target):
    result = train(tiny_run_config(variant="kt", kt_target=kt_target), dataset=tiny_mosi, save=False)
    h = result.history
    assert result.dir is None
    assert list(h["epoch"]) == [1, 2]
    for term in KT_TERMS:
        if term == "aux_audio" and kt_target != "aux":
            assert "train_aux_audio" not in h.columns  # only the aux target has a training-only audio head
            continue
        assert f"train_{term}" in h.columns, term
        assert np.isfinite(h[f"train_{term}"]).all()
    keys = metric_keys("regression")
    assert {f"valid_{k}" for k in keys | {"loss"}} <= set(h.columns)
    assert set(result.metrics["test"]) == keys | {"loss"}
    assert result.metrics["best_epoch"] in (1, 2)
    assert result.metrics["valid"]["loss"] == h["valid_loss"][result.metrics["best_epoch"] - 1]
    assert h["selected"].iloc[0]  # the first epoch is always the best so far
    # The model config got the data's dims and task.
    assert (result.config.text_dim, result.config.audio_dim, result.config.vision_dim) == (300, 5, 20)


def test_train_emotions(tiny_iemocap):
    result = train(tiny_run_config(variant="language_vision"), dataset=tiny_iemocap, save=False)
    assert result.config.task == "emotions"
    assert set(result.metrics["test"]) == metric_keys("emotions") | {"loss"}
    assert "train_consistency_vision" not in result.history.columns  # only kt has consistency terms
    assert list(result.history["epoch"]) == [1, 2]


def _comparable(history):
    return history.drop(columns=TIMING_COLUMNS)


def _test_metrics(result):
    return result.metrics["test"]


def test_same_seed_same_run_different_seed_different_run(tiny_mosi):
    cfg = tiny_run_config(variant="kt", seed=3)
    a = train(cfg, dataset=tiny_mosi, save=False)
    b = train(cfg, dataset=tiny_mosi, save=False)
    pd.testing.assert_frame_equal(_comparable(a.history), _comparable(b.history), check_exact=True)
    assert _test_metrics(a) == _test_metrics(b)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka

    c = train(cfg.replace(seed=4), dataset=tiny_mosi, save=False)
    assert not _comparable(a.history).equals(_comparable(c.history))
    assert _test_metrics(a) != _test_metrics(c)


# ----------------------------------------------------------------------------------------------
# Run folders


def test_run_folder_round_trip(tiny_mosi, tmp_path):
    run = tmp_path / "run"
    result = train(tiny_run_config(variant="kt"), out_dir=run, dataset=tiny_mosi)
    assert result.dir == run
    assert {p.name for p in run.iterdir()} == {"config.json", "history.csv", "metrics.json", "checkpoint.pt", "last.pt"}

    assert Config.load(run / "config.json") == result.config
    history = pd.read_csv(run / "history.csv")
    assert list(history.columns) == list(result.history.columns)
    assert len(history) == 2
    np.testing.assert_allclose(history["valid_loss"], result.history["valid_loss"], rtol=1e-12)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_epoch"] == result.metrics["best_epoch"]
    assert metrics["test"] == pytest.approx(result.metrics["test"])
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == result.metrics["best_epoch"]
    assert Config.from_dict(ckpt["config"]) == result.config

    cfg, model = load_run(run)
    assert cfg == result.config
    assert not model.training
    test = split_tensors(tiny_mosi, "test", "regression")
    loaded = predict(model, test)["pred"]
    in_memory = predict(result.model, test)["pred"]
    assert torch.equal(torch.as_tensor(loaded), torch.as_tensor(in_memory))
    # And the reloaded model reproduces the recorded test metrics.
    assert evaluate(model, test) == result.metrics["test"]


def test_cpu_kernels_decides_whether_train_and_load_run_accelerate(tiny_mosi, tmp_path):
    """cpu_kernels is the run's choice: "fused" runs (trained and reloaded) are accelerated by
    mskt.fast where the kernels build, "torch" runs keep the model's Python code; either way the
    same weights predict the same."""
    from mskt.fast import accelerated_stacks, compiled_kernels

    runs = {k: train(tiny_run_config(variant="kt", epochs=1, cpu_kernels=k), out_dir=tmp_path / k, dataset=tiny_mosi) for k in ("fused", "torch")}
    loaded = {k: load_run(tmp_path / k)[1] for k in runs}
    for model in (runs["torch"].model, loaded["torch"]):
        assert all(v == "not accelerated" for v in accelerated_stacks(model).values())
    for model in (runs["fused"].model, loaded["fused"]):
        status = accelerated_stacks(model)
        if compiled_kernels() is not None:
            assert status and all(v is True for v in status.values()), status
        else:
            assert all(v == "not accelerated" for v in status.values())
    loaded["torch"].load_state_dict(loaded["fused"].state_dict())
    test = split_tensors(tiny_mosi, "test", "regression")
    np.testing.assert_allclose(predict(loaded["fused"], test)["pred"], predict(loaded["torch"], test)["pred"], atol=1e-5, rtol=1e-5)


def test_run_folder_round_trip_ctc_unaligned(tmp_path):
    """An unaligned CTC run reloads with its text grid recovered from the checkpoint."""
    from mskt.data.synthetic import make_synthetic

    ds = make_synthetic("mosi", aligned=False, scale=0.006, seed=1)  # 8 samples per split
    run = tmp_path / "ctc"
    result = train(tiny_run_config(variant="kt", ctc_align=True, epochs=1), out_dir=run, dataset=ds)
    assert "train_ctc_vision" in result.history.columns
    _, model = load_run(run)
    assert model.ctc["vision"].steps == ds.seq_lens["text"]
    test = split_tensors(ds, "test", "regression")
    assert np.array_equal(predict(model, test)["pred"], predict(result.model, test)["pred"])


# ----------------------------------------------------------------------------------------------
# kt_target="teacher"


def _audio_encoder_state(model):
    return {k: v.detach().clone() for k, v in model.encoders["audio"].state_dict().items()}


def test_kt_with_a_teacher_freezes_its_audio_encoder(tiny_mosi, tmp_path):
    teacher_dir = tmp_path / "teacher"
    teacher = train(tiny_run_config(variant="full"), out_dir=teacher_dir, dataset=tiny_mosi)
    teacher_state = _audio_encoder_state(teacher.model)

    cfg = tiny_run_config(variant="kt", kt_target="teacher", teacher_run=str(teacher_dir), epochs=2)
    student = train(cfg, dataset=tiny_mosi, save=False)
    assert not hasattr(student.model, "aux_head")
    assert "train_aux_audio" not in student.history.columns
    assert student.history["train_consistency_vision"].notna().all()
    params = list(student.model.encoders["audio"].parameters())
    assert params and all(not p.requires_grad for p in params)
    after = _audio_encoder_state(student.model)
    assert after.keys() == teacher_state.keys()
    for k in after:
        assert torch.equal(after[k], teacher_state[k]), k
    # Everything else did train.
    assert any(p.requires_grad for p in student.model.parameters())
    # The frozen teacher stays in eval mode (no dropout) even when the student trains.
    student.model.train()
    assert student.model.training and not student.model.encoders["audio"].training


def test_teacher_must_be_a_full_run(tiny_mosi, tmp_path):
    not_full = tmp_path / "language"
    train(tiny_run_config(variant="language", epochs=1), out_dir=not_full, dataset=tiny_mosi)
    cfg = tiny_run_config(variant="kt", kt_target="teacher", teacher_run=str(not_full))
    with pytest.raises(ConfigError, match="full"):
        train(cfg, dataset=tiny_mosi, save=False)


def test_teacher_needs_a_run_folder():
    with pytest.raises(ConfigError, match="teacher_run"):
        tiny_run_config(variant="kt", kt_target="teacher")


# ----------------------------------------------------------------------------------------------
# Config


def test_config_round_trip():
    for cfg in (tiny_run_config(variant="language_vision", targets="vision", lr=5e-4, ctc_align=True),
                tiny_run_config(variant="kt", lr=5e-4, ctc_align=True, consistency="l1", lambda_text=0.5)):
        assert Config.from_dict(cfg.to_dict()) == cfg
        assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        owned = set(dataclasses.asdict(cfg.options))  # the variant's options: none for language_vision
        assert set(cfg.to_dict()) == set(Config.fields()) | owned  # every field, text_steps (a data-filled one) included
    assert cfg.to_dict()["consistency"] == "l1" and cfg.to_dict()["lambda_text"] == 0.5
    assert Config.from_dict({**cfg.to_dict(), "lr": 1e-3}) != cfg  # equality reads the fields ...
    assert cfg.replace(lambda_text=0.25) != cfg  # ... and the options


def test_config_save_load(tmp_path):
    cfg = tiny_run_config(variant="kt", lambda_vision=0.3)
    cfg.save(tmp_path / "config.json")
    assert Config.load(tmp_path / "config.json") == cfg


def test_config_unknown_key_lists_allowed_keys():
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"epochz": 3})
    msg = str(err.value)
    assert "epochz" in msg
    for key in ("epochs", "lr", "variant", "d_model"):
        assert key in msg


@pytest.mark.parametrize(
    "values,match",
    [
        ({"epochs": "ten"}, "epochs"),
        ({"epochs": 2.5}, "epochs"),
        ({"epochs": True}, "epochs"),
        ({"lr": "fast"}, "lr"),
        ({"ctc_align": "maybe"}, "ctc_align"),
        ({"variant": 3}, "variant"),
        ({"variant": "audio"}, "variant"),
        ({"scheduler": "cosine"}, "scheduler"),
        ({"epochs": 0}, "epochs"),
        ({"lr": 0.0}, "lr"),
        ({"attn_dropout": 1.0}, "attn_dropout"),
        ({"d_model": 10, "heads": 4}, "divisible"),
    ],
)
def test_config_bad_values(values, match):
    with pytest.raises(ConfigError, match=match):
        Config.from_dict(values)


def test_config_coerces_cli_strings():
    cfg = Config.from_dict({"epochs": "3", "lr": "0.5", "ctc_align": "true", "lambda_vision": "2", "variant": "kt"})
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.lr == 0.5 and isinstance(cfg.lr, float)
    assert cfg.ctc_align is True
    assert cfg.lambda_vision == 2.0 and isinstance(cfg.lambda_vision, float)
    assert Config.from_dict({"ctc_align": "false"}).ctc_align is False
    assert Config.from_dict({"lr": 1}).lr == 1.0  # an int where a float is meant is fine


def test_config_replace_keeps_the_rest():
    cfg = tiny_run_config(variant="full", seed=5)
    other = cfg.replace(seed=6)
    assert other.seed == 6 and other.variant == "full" and other.d_model == cfg.d_model
    assert cfg.seed == 5


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds(name):
    cfg = preset(name)
    assert cfg.data.startswith("synthetic:")
    assert Config.from_dict(cfg.to_dict()) == cfg
    # The paper's settings: 3-layer blocks, Adam at a constant 1e-3, 40 epochs.
    assert (cfg.kt_layers, cfg.crossmodal_layers, cfg.memory_layers, cfg.lr, cfg.epochs, cfg.scheduler) == (3, 3, 3, 1e-3, 40, "none")
    assert preset(name, seed=9, epochs="2").epochs == 2


def test_unknown_preset():
    with pytest.raises(ConfigError, match="mosi"):
        preset("cmu-mosi-2")


# ----------------------------------------------------------------------------------------------
# Evaluation with audio missing


def with_nan_audio(data: Tensors) -> Tensors:
    return Tensors(
        features={**data.features, "audio": torch.full_like(data.features["audio"], float("nan"))},
        lengths=data.lengths,
        labels=data.labels,
        ids=data.ids,
    )


def test_evaluate_never_gives_audio_to_kt(tiny_mosi):
    result = train(tiny_run_config(variant="kt", epochs=1), dataset=tiny_mosi, save=False)
    test = split_tensors(tiny_mosi, "test", "regression")
    with_nan = with_nan_audio(test)
    clean = evaluate(result.model, test)
    nan = evaluate(result.model, with_nan)
    assert clean == nan
    assert all(np.isfinite(v) for v in nan.values())
    assert np.array_equal(predict(result.model, test)["pred"], predict(result.model, with_nan)["pred"])


def test_evaluate_full_reads_audio(tiny_mosi):
    result = train(tiny_run_config(variant="full", epochs=1), dataset=tiny_mosi, save=False)
    test = split_tensors(tiny_mosi, "test", "regression")
    with_nan = with_nan_audio(test)
    assert np.isnan(predict(result.model, with_nan)["pred"]).all()


# ----------------------------------------------------------------------------------------------
# Failures


def test_nan_loss_stops_training_and_keeps_the_last_checkpoint(tiny_mosi, tmp_path, monkeypatch):
    """A NaN training loss at epoch 2 raises an MsktError naming the epoch; epoch 1's checkpoint stays."""
    original = MulT.loss
    calls = {"train": 0}

    def loss(self, out, labels):
        terms = original(self, out, labels)
        if self.training:
            calls["train"] += 1
            if calls["train"] >= 2:  # one batch per epoch (batch_size >= train size): epoch 2
                terms["total"] = terms["total"] * float("nan")
        return terms

    monkeypatch.setattr(MulT, "loss", loss)
    run = tmp_path / "nan"
    n_train = len(tiny_mosi["train"])
    cfg = tiny_run_config(variant="kt", epochs=3, batch_size=n_train)
    with pytest.raises(MsktError, match="epoch 2") as err:
        train(cfg, out_dir=run, dataset=tiny_mosi)
    assert "checkpoint.pt" in str(err.value)
    assert calls["train"] == 2
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1
    assert len(pd.read_csv(run / "history.csv")) == 1
    monkeypatch.setattr(MulT, "loss", original)
    _, model = load_run(run)
    pred = predict(model, split_tensors(tiny_mosi, "test", "regression"))["pred"]
    assert np.isfinite(pred).all()


def test_resolve_device():
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="CUDA"):
            resolve_device("cuda")
        with pytest.raises(ConfigError, match="CUDA"):
            resolve_device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("tpu-please")


def test_raw_target_is_standardised_with_training_statistics(tiny_mosi):
    """kt_target='raw': the model's audio mean/std buffers are the training split's per-feature
    statistics over real steps, and the standardised target has mean ~0 and std ~1 there."""
    result = train(tiny_run_config(variant="kt", kt_target="raw"), dataset=tiny_mosi, save=False)
    split = tiny_mosi["train"]
    real = np.concatenate([split.audio[i, split.audio.shape[1] - n :] for i, n in enumerate(split.lengths["audio"]) if n])
    np.testing.assert_allclose(result.model.audio_mean.numpy(), real.mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.model.audio_std.numpy(), real.std(axis=0), rtol=1e-4, atol=1e-5)
