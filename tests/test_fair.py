"""Like for like and convergence (issues 26.1, 27.2, 27.4): one validation protocol selects every
variant of a comparison (``select_missing``), missing rates realise what they say, a teacher must
have seen exactly the student's data and labels, finalize's seeds are not the search's, early
stopping and step budgets, and a batch with no gradient takes no optimizer step."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from mskt.config import Config
from mskt.data.labels import hide_labels
from mskt.data.missing import CONDITIONS, EvalMasks, evaluation_masks, missing_mask, realised_rate
from mskt.errors import ConfigError
from mskt.experiments import robustness
from mskt.model import build_model
from mskt.train import Tensors, evaluate, make_optimizer, train, training_step
from mskt.train.evaluation import validation_metrics
from mskt.train.loop import CONVERGED_WINDOW, convergence

from conftest import NO_DROPOUT, make_batch_fn, tiny_model_config, tiny_run_config

# ----------------------------------------------------------------------------------------------
# Selection: one validation protocol for every variant of a comparison


@pytest.mark.parametrize("value", ["default", "none", "conditions", "audio", "audio,vision", "language,vision"])
def test_select_missing_takes_a_protocol_or_one_condition(value):
    assert tiny_run_config(select_missing=value).select_missing == value


@pytest.mark.parametrize("value", ["all", "audio,audio", "text,audio,vision", "smell", ""])
def test_select_missing_refuses_anything_else_in_one_line(value):
    with pytest.raises(ConfigError, match="select_missing") as e:
        tiny_run_config(select_missing=value)
    assert "\n" not in str(e.value)


def test_validation_metrics_follow_the_protocol(tiny_mosi):
    cfg = tiny_run_config(variant="full")
    model = train(cfg.replace(epochs=1), dataset=tiny_mosi, save=False).model
    valid = Tensors.from_split(tiny_mosi["valid"], "regression", "cpu")
    own = validation_metrics(model, valid, cfg)
    assert own == evaluate(model, valid, cfg.eval_batch_size)  # "default": today's selection
    assert validation_metrics(model, valid, cfg.replace(select_missing="audio")) == evaluate(model, valid, 8, missing="audio")
    each = [evaluate(model, valid, 8, missing=c)["loss"] for c in CONDITIONS]
    mean = validation_metrics(model, valid, cfg.replace(select_missing="conditions"))["loss"]
    assert mean == pytest.approx(np.mean(each)) and mean != own["loss"]


def test_a_run_selects_and_records_under_select_missing(tiny_mosi, tmp_path):
    runs = {}
    for protocol in ("default", "conditions"):
        cfg = tiny_run_config(variant="full", epochs=3, select_missing=protocol)
        runs[protocol] = r = train(cfg, out_dir=tmp_path / protocol, dataset=tiny_mosi)
        saved = json.loads((tmp_path / protocol / "metrics.json").read_text())
        assert saved["select_missing"] == protocol and json.loads((tmp_path / protocol / "config.json").read_text())["select_missing"] == protocol
        # the recorded validation loss of the selected epoch is the protocol's, measured on the kept weights
        valid = Tensors.from_split(tiny_mosi["valid"], "regression", "cpu")
        assert saved["valid"]["loss"] == pytest.approx(validation_metrics(r.model, valid, r.config)["loss"], rel=1e-6)
        assert saved["valid"]["loss"] == pytest.approx(r.history["valid_loss"].min(), rel=1e-6)
    # same training (seed), different protocol: different validation numbers, same weights path
    assert list(runs["default"].history["train_total"]) == list(runs["conditions"].history["train_total"])
    assert list(runs["default"].history["valid_loss"]) != list(runs["conditions"].history["valid_loss"])


# ----------------------------------------------------------------------------------------------
# Missing rates that mean what they say


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
@pytest.mark.parametrize("n", [50, 997])
def test_the_realised_rate_is_the_nominal_one(rate, n):
    mask = missing_mask(n, rate, seed=3)
    assert not mask.all(dim=1).any()  # never every modality of a sample
    realised = realised_rate(EvalMasks(mask))
    assert abs(realised - rate) <= 0.5 / (3 * n) + 1e-6  # exact up to rounding one slot
    assert abs(realised - rate) <= 0.01
    fixed = missing_mask(n, rate, seed=3, fixed=("audio",))  # two free modalities: at most 1/2 can go
    assert fixed[:, 1].all() and not fixed.all(dim=1).any()
    assert abs(realised_rate(EvalMasks(fixed), ("audio",)) - min(rate, 0.5)) <= 0.01


def test_each_modality_is_missing_at_the_rate_and_the_seed_decides():
    mask = missing_mask(30000, 0.4, seed=1)
    assert (mask.float().mean(0) - 0.4).abs().max() < 0.015  # no modality favoured
    assert torch.equal(mask, missing_mask(30000, 0.4, seed=1)) and not torch.equal(mask, missing_mask(30000, 0.4, seed=2))


def test_a_rate_that_would_empty_samples_keeps_one_modality_each_and_says_so(caplog):
    import mskt.data.missing as missing

    missing._NOTED.clear()  # the note is said once per rate and split size in a process: another test may have seen it
    with caplog.at_level(logging.INFO, logger="mskt"):  # an expected note (INFO), not a warning
        mask = missing_mask(300, 0.7, seed=0)
    assert (mask.sum(1) == 2).all()  # every sample keeps exactly one: the most that can go
    assert realised_rate(EvalMasks(mask)) == pytest.approx(2 / 3)
    assert "missing rate 0.7" in caplog.text and "0.667" in caplog.text


def test_step_masks_report_their_realised_rate():
    masks = evaluation_masks(200, {"text": 10, "audio": 12, "vision": 8}, (), 0.3, mode="step", seed=0)
    assert abs(realised_rate(masks) - 0.3) < 0.01
    assert realised_rate(None) == 0.0


def test_the_sweep_and_eval_json_record_the_realised_rate(tiny_mosi, tmp_path):
    from argparse import Namespace

    from mskt.cli import _realised_rate

    model = train(tiny_run_config(variant="full", epochs=1), dataset=tiny_mosi, save=False).model
    frame = robustness.sweep([model], dataset=tiny_mosi, rates=(0.0, 0.5), conditions=("audio",), seeds=(0, 1), batch_size=8)
    rates = frame[frame["protocol"] == "rate"]
    assert list(rates["missing_rate_realised"]) == [0.0, 0.5, 0.5]  # 8 samples x 3 slots: 12 missing, exactly
    assert frame.loc[frame["protocol"] == "condition", "missing_rate_realised"].isna().all()
    assert "missing_rate_realised" not in robustness.metric_columns(frame)
    options = {"missing": (), "missing_rate": 0.5, "missing_mode": "sample", "missing_seed": 0}
    assert _realised_rate(tiny_mosi["test"], options) == 0.5 and _realised_rate(tiny_mosi["test"], {}) == 0.0


# ----------------------------------------------------------------------------------------------
# The teacher saw exactly the student's data and labels


def test_a_teacher_trained_on_labels_the_student_hides_is_refused(tiny_mosi, tmp_path):
    every_label = tmp_path / "teacher-all"
    train(tiny_run_config(variant="full", epochs=1), out_dir=every_label, dataset=tiny_mosi)
    student = tiny_run_config(variant="kt", kt_target="teacher", teacher_run=str(every_label), epochs=1, label_fraction=0.5)
    with pytest.raises(ConfigError, match=r"label_fraction=1 .*label_fraction=0.5") as e:
        train(student, dataset=tiny_mosi, save=False)
    assert "\n" not in str(e.value) and str(every_label) in str(e.value)
    # a teacher on the same labelled subset (same fraction and seed) is accepted
    same = tmp_path / "teacher-half"
    train(tiny_run_config(variant="full", epochs=1, label_fraction=0.5), out_dir=same, dataset=tiny_mosi)
    train(student.replace(teacher_run=str(same)), dataset=tiny_mosi, save=False)
    # the same fraction at another seed is another subset: refused
    with pytest.raises(ConfigError, match="seed 8"):
        train(student.replace(teacher_run=str(same), seed=8), dataset=tiny_mosi, save=False)
    # every label on both sides (the default): accepted whatever the seeds
    train(student.replace(label_fraction=1.0, seed=8), dataset=tiny_mosi, save=False)


def test_a_teacher_trained_on_other_data_is_refused(tiny_mosi, tmp_path):
    other = tmp_path / "teacher"
    train(tiny_run_config(variant="full", epochs=1, data_seed=3), out_dir=other, dataset=tiny_mosi)
    student = tiny_run_config(variant="kt", kt_target="teacher", teacher_run=str(other), epochs=1)
    with pytest.raises(ConfigError, match="data_seed=3.*data_seed=0"):
        train(student, dataset=tiny_mosi, save=False)


# ----------------------------------------------------------------------------------------------
# Tune: finalize's seeds are not the search's


def test_finalize_seeds_are_disjoint_from_the_search_seed():
    pytest.importorskip("optuna")
    from mskt.experiments.tune import finalize_seeds

    for seed in (0, 11, 1111):
        seeds = finalize_seeds(seed, 3)
        assert len(set(seeds)) == 3 and seed not in seeds


# ----------------------------------------------------------------------------------------------
# No gradient, no step


def _weights(model):
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("variant, moves", [("language_vision", False), ("kt", True)])
def test_a_batch_without_labels_steps_only_where_there_is_a_gradient(variant, moves):
    cfg = tiny_run_config(variant=variant, cpu_kernels="torch", **NO_DROPOUT)
    model = build_model(cfg)
    for m in model.standardises():
        model.set_statistics(m, torch.zeros(cfg.dim(m)), torch.ones(cfg.dim(m)))
    model.train()
    step = training_step(model, make_optimizer(model, cfg), cfg)
    batch = make_batch_fn(cfg, seed=1)
    step(batch)  # a labelled batch: Adam now has momentum
    assert step.counts == {"taken": 1, "skipped": 0}
    before = _weights(model)
    unlabelled = {**make_batch_fn(cfg, seed=2)}
    unlabelled["labels"] = hide_labels(unlabelled["labels"], np.zeros(len(unlabelled["labels"]), bool))
    terms = step(unlabelled)
    assert terms["task"].item() == 0.0
    after = _weights(model)
    changed = any(not torch.equal(a, b) for a, b in zip(before, after))
    assert changed == moves  # momentum alone moves nothing; a consistency gradient does
    assert step.counts == ({"taken": 2, "skipped": 0} if moves else {"taken": 1, "skipped": 1})


# ----------------------------------------------------------------------------------------------
# Convergence: patience, step budgets, and a record of it


def test_convergence_is_patience_or_a_best_epoch_well_before_the_end():
    hist = [{"epoch": e} for e in range(1, 11)]
    assert convergence(hist, 3, "patience", 2) == {"converged": True, "stopped_by": "patience", "epochs_run": 10}
    assert convergence(hist, 10 - CONVERGED_WINDOW, "epochs")["converged"]
    assert not convergence(hist, 10 - CONVERGED_WINDOW + 1, "epochs")["converged"]
    assert not convergence(hist, 9, "epochs", patience=3)["converged"] and convergence(hist, 7, "epochs", patience=3)["converged"]


def test_patience_stops_a_run_and_it_is_off_by_default(tiny_mosi, tmp_path):
    cfg = tiny_run_config(variant="language_vision", epochs=12, lr=3e-2)
    plain = train(cfg, dataset=tiny_mosi, save=False)
    assert plain.metrics["epochs_run"] == 12 and plain.metrics["stopped_by"] == "epochs"
    early = train(cfg.replace(patience=2), out_dir=tmp_path / "early", dataset=tiny_mosi)
    m = json.loads((tmp_path / "early" / "metrics.json").read_text())
    assert m["stopped_by"] == "patience" and m["converged"] is True
    assert m["epochs_run"] == m["best_epoch"] + 2 < 12
    # the same run up to where it stopped: patience changes when it ends, nothing before
    n = m["epochs_run"]
    assert list(early.history["valid_loss"]) == list(plain.history["valid_loss"][:n])
    # min_epochs: patience may end the run only from that epoch on; before it, a plateau goes on
    later = train(cfg.replace(patience=2, min_epochs=n + 1), dataset=tiny_mosi, save=False).metrics
    assert later["epochs_run"] >= n + 1 and later["stopped_by"] in ("patience", "epochs")
    with pytest.raises(ConfigError, match="min_epochs=13 exceeds epochs=12"):
        cfg.replace(patience=2, min_epochs=13)


def test_max_steps_ends_a_run_mid_epoch(tiny_mosi):
    r = train(tiny_run_config(variant="language_vision", epochs=4, max_steps=3), dataset=tiny_mosi, save=False)
    # 13 training samples, batch 8: two steps per epoch, so the third step is in epoch 2
    assert r.metrics["optimizer_steps"] == 3 and r.metrics["stopped_by"] == "max_steps" and r.metrics["epochs_run"] == 2


def test_fewer_labels_get_as_many_optimizer_steps_when_asked(tiny_mosi):
    base = tiny_run_config(variant="language_vision", epochs=2, label_fraction=0.1)  # 1 labelled sample of 13
    plain = train(base, dataset=tiny_mosi, save=False).metrics
    assert plain["optimizer_steps"] + plain["skipped_steps"] == 4 and plain["skipped_steps"] > 0
    like_full = train(base.replace(steps_like_full_labels=True), dataset=tiny_mosi, save=False).metrics
    assert like_full["optimizer_steps"] == 4 and like_full["epochs_run"] > 2  # as many steps as with every label
    every = train(base.replace(label_fraction=1.0, steps_like_full_labels=True), dataset=tiny_mosi, save=False).metrics
    assert every["optimizer_steps"] == 4 and every["epochs_run"] == 2 and every["skipped_steps"] == 0  # a no-op with every label
    assert train(base.replace(min_steps=6), dataset=tiny_mosi, save=False).metrics["optimizer_steps"] >= 6


def test_grid_tables_carry_converged(tiny_mosi, tmp_path):
    from mskt.experiments.grid import run_configs

    runs = run_configs(tiny_run_config(epochs=1), {"lv": {"variant": "language_vision"}}, 1, tmp_path, dataset=tiny_mosi)
    assert runs["converged"].tolist() == [False]  # one epoch: its best is its last


@pytest.mark.parametrize("bad, match", [({"patience": -1}, "patience"), ({"max_steps": 2, "min_steps": 5}, "min_steps")])
def test_bad_step_budgets_are_one_line_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        tiny_run_config(**bad)


def test_a_label_efficiency_sweep_refuses_a_leaking_teacher_before_training(tiny_mosi, tmp_path):
    from mskt.experiments import label_efficiency as le

    teacher = tmp_path / "teacher"
    train(tiny_run_config(variant="full", epochs=1), out_dir=teacher, dataset=tiny_mosi)
    base = tiny_run_config(variant="kt", kt_target="teacher", teacher_run=str(teacher), epochs=1)
    with pytest.raises(ConfigError, match=r"label_fraction=1.0 \(run kt-lf0.5 seed 7: 0.5\)") as e:
        le.sweep(base, fractions=(1.0, 0.5), knob=None, variants=("kt",), seeds=1, out_dir=tmp_path / "sweep")
    assert "\n" not in str(e.value) and not (tmp_path / "sweep").exists()  # nothing trained
    le.check_teachers(base, {"kt-lf1": {"variant": "kt", "label_fraction": 1.0}}, seeds=2)  # every label: any seed
    le.check_teachers(base, {"lv-lf0.5": {"variant": "language_vision", "label_fraction": 0.5}}, seeds=1)  # no teacher


def test_a_resumed_run_keeps_its_step_counts_and_its_early_stop(tiny_mosi, tmp_path):
    from mskt.train import resume

    cfg = tiny_run_config(variant="language_vision", epochs=2, label_fraction=0.1, steps_like_full_labels=True)
    whole = train(cfg, out_dir=tmp_path / "whole", dataset=tiny_mosi)
    train(cfg, out_dir=tmp_path / "cut", dataset=tiny_mosi, on_epoch=lambda epoch, row: epoch == 1)  # stopped after epoch 1
    again = resume(tmp_path / "cut", dataset=tiny_mosi)
    for key in ("optimizer_steps", "skipped_steps", "epochs_run", "best_epoch", "test"):
        assert again.metrics[key] == whole.metrics[key], key
    early = train(tiny_run_config(variant="language_vision", epochs=12, lr=3e-2, patience=2), out_dir=tmp_path / "early", dataset=tiny_mosi)
    assert early.metrics["stopped_by"] == "patience"
    after = resume(tmp_path / "early", dataset=tiny_mosi)  # nothing more to train
    assert after.metrics["stopped_by"] == "patience" and len(after.history) == len(early.history)
    assert after.metrics["test"] == early.metrics["test"]
