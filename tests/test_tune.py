"""``mskt tune``: workers sharing one study, a killed worker's trial retried, pruning, selection on
validation only, search-space errors, and the command line end to end. Tiny models and data."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

optuna = pytest.importorskip("optuna")

from mskt.cli import main
from mskt.config import Config
from mskt.experiments import tune as tuning
from mskt.experiments.tune import Knob

ROOT = Path(__file__).resolve().parents[1]
TINY = {"d_model": 8, "heads": 2, "encoder_layers": 1, "kt_layers": 1, "crossmodal_layers": 1, "memory_layers": 1,
        "batch_size": 8, "eval_batch_size": 64, "device": "cpu", "progress": "off", "threads": 1, "cpu_kernels": "torch"}
TINY_FLAGS = [x for k, v in {**TINY, "data": "synthetic:mosi", "data_scale": 0.01}.items() for x in (f"--{k.replace('_', '-')}", str(v))]
SPACE = {"lr": Knob(1e-4, 1e-2, log=True), "lambda_vision": Knob(0.1, 10.0, log=True)}


def _study(folder: Path, name: str = "t"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / name / 'study.db'}")


def _work(root: Path, trials: int, epochs: int, space: dict, log: Path | None = None, heartbeat: float = 10, storage=None) -> None:
    """One worker: what `mskt tune --study t --root ROOT [--storage S]` runs, on the tiny dataset."""
    from mskt.data.synthetic import make_synthetic

    report = (lambda t: log.open("a").write(f"{t.number}\n")) if log else None
    tuning.tune(Config.from_dict({**TINY, "epochs": epochs}), trials, study="t", space=space, root=root, heartbeat=heartbeat,
                dataset=make_synthetic("mosi", aligned=True, scale=0.01, seed=0), on_trial=report, storage=storage)


def _process(*args, **kwargs):
    """A worker process forked from this one: the same code as a fresh `mskt tune`, without paying
    for torch's import again."""
    import multiprocessing as mp

    p = mp.get_context("fork").Process(target=_work, args=args, kwargs=kwargs)
    p.start()
    return p


def _space_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_two_workers_finish_n_trials_together_without_repeating_one(tmp_path, storage):
    """SQLite: the workers share the study folder. A journal file on a shared file system: each
    worker has its own --root, as on two machines; the lock beside the journal coordinates them."""
    journal = str(tmp_path / "journal.log") if storage == "journal" else None
    roots = [tmp_path / f"root{i}" if journal else tmp_path for i in range(2)]
    workers = [_process(roots[i], 4, 1, SPACE, tmp_path / f"worker{i}.txt", heartbeat=1, storage=journal) for i in range(2)]
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    trials = (optuna.load_study(study_name="t", storage=tuning.make_storage(tmp_path, journal)) if journal else _study(tmp_path)).get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert all(t.state.name in ("COMPLETE", "PRUNED", "FAIL") for t in trials)
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == 4  # the gate: exactly N, not N + 1
    # Both workers ran trials, and none ran one the other ran; each trial is a run folder of its own.
    ran = [{int(n) for n in (tmp_path / f"worker{i}.txt").read_text().split()} for i in range(2)]
    assert ran[0] and ran[1] and not ran[0] & ran[1] and ran[0] | ran[1] == set(numbers), ran
    assert len({json.dumps(t.params, sort_keys=True) for t in trials if t.state.name == "COMPLETE"}) == 4
    for t in trials:
        assert any((root / "t" / t.user_attrs["run_dir"] / "metrics.json").is_file() for root in roots)


def test_a_worker_killed_mid_trial_leaves_it_retried_and_the_study_finishes(tmp_path, caplog):
    import logging

    from mskt.train import load_run

    space = {"lr": Knob(choices=(1e-3,))}
    worker = _process(tmp_path, 2, 8, space, heartbeat=1)
    history = tmp_path / "t" / "trial-0000" / "history.csv"
    deadline = time.monotonic() + 60
    while not (history.exists() and len(history.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.1)  # two epochs done: the trial is mid-run
    assert history.exists() and worker.is_alive()
    os.kill(worker.pid, signal.SIGKILL)
    worker.join()
    assert [t.state.name for t in _study(tmp_path).get_trials()] == ["RUNNING"]

    with caplog.at_level(logging.INFO, logger="mskt"):
        _work(tmp_path, 2, 8, space, heartbeat=1)  # the same command again
    trials = _study(tmp_path).get_trials()
    states = {t.number: t.state.name for t in trials}
    assert states[0] == "FAIL" and "RUNNING" not in states.values() and "WAITING" not in states.values(), states
    assert sum(s == "COMPLETE" for s in states.values()) == 2
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    # The retry continued the killed run from its last completed epoch, and its folder loads.
    retried = tmp_path / "t" / retry[0].user_attrs["run_dir"]
    assert "resuming" in caplog.text and len((retried / "history.csv").read_text().splitlines()) == 9
    assert retried.name != "trial-0000" and (tmp_path / "t" / "trial-0000" / "history.csv").is_file()
    cfg, _ = load_run(retried)
    assert cfg.epochs == 8


def _queued_study(root: Path, base: Config, space: dict, queue: list, dataset, pruner="median", name="p"):
    """A study whose trials are exactly ``queue`` (parameter dicts), in order: each is enqueued, so
    no sampler draw decides which trial is good or bad."""
    st, _ = tuning.open_study(base, name, tuning.study_folder(name, root), space=space, pruner=pruner)
    for params in queue:
        st.enqueue_trial(params)
    return tuning.tune(base, len(st.trials), study=name, space=space, pruner=pruner, root=root, dataset=dataset)


GOOD, BAD = {"lr": 3e-3}, {"lr": 1e-7}  # 1e-7 barely moves the weights: a bad trial


def test_the_pruner_stops_a_bad_trial_early(tmp_path, tiny_mosi):
    from mskt.train import load_run

    base = Config.from_dict({**TINY, "epochs": 3, "seed": 9, "lr": 3e-3})  # trial 0, the default, is a good one
    space = {"lr": Knob(choices=(3e-3, 1e-7))}
    st = _queued_study(tmp_path, base, space, [GOOD, GOOD, BAD, BAD], tiny_mosi)
    assert [t.params["lr"] for t in st.trials] == [3e-3] * 3 + [1e-7] * 2  # the queue, not the sampler
    states = [t.state.name for t in st.trials]
    assert states == ["COMPLETE"] * 3 + ["PRUNED"] * 2, states  # median pruner: 3 trials to compare with, then prunes
    for t in st.trials[3:]:
        folder = tmp_path / "p" / t.user_attrs["run_dir"]
        note = json.loads((folder / "pruned.json").read_text())
        assert note["pruned"] and note["epoch"] < 3 and t.params["lr"] == 1e-7
        assert len((folder / "history.csv").read_text().splitlines()) - 1 == note["epoch"] == max(t.intermediate_values)
        cfg, _ = load_run(folder)  # an ordinary run folder, cut short
        assert cfg.lr == 1e-7 and not (folder / "metrics.json").exists()
    # without a pruner the same queue runs every trial to the end
    st = _queued_study(tmp_path / "none", base, space, [GOOD, GOOD, BAD, BAD], tiny_mosi, pruner=None)
    assert [t.state.name for t in st.trials] == ["COMPLETE"] * 5


def test_pruning_never_reads_test_labels(tmp_path, tiny_mosi):
    """The pruner sees each epoch's validation loss, nothing of test: with poisoned test labels every
    trial reports the same values and is pruned (or not) at the same epoch."""
    import pandas as pd

    base = Config.from_dict({**TINY, "epochs": 3, "seed": 9, "lr": 3e-3})
    space = {"lr": Knob(choices=(3e-3, 1e-7))}
    test = tiny_mosi.splits["test"]
    poisoned_labels = np.random.default_rng(1).uniform(-3, 3, size=test.labels.shape).astype(test.labels.dtype)
    poisoned = dataclasses.replace(tiny_mosi, splits={**tiny_mosi.splits, "test": dataclasses.replace(test, labels=poisoned_labels)})
    seen = []
    for name, ds in (("clean", tiny_mosi), ("poisoned", poisoned)):
        st = _queued_study(tmp_path / name, base, space, [GOOD, GOOD, BAD, BAD], ds)
        seen.append([(t.number, t.state.name, t.intermediate_values) for t in st.trials])
        for t in st.trials:  # what the pruner saw is the run's validation loss, epoch by epoch
            history = pd.read_csv(tmp_path / name / "p" / t.user_attrs["run_dir"] / "history.csv")
            assert dict(zip(history["epoch"], history["valid_loss"])) == pytest.approx(t.intermediate_values, rel=1e-12)
    assert seen[0] == seen[1]
    assert "PRUNED" in {s for _, s, _ in seen[0]}


def test_poisoned_test_labels_leave_the_chosen_trial_unchanged(tmp_path, tiny_mosi):
    base = Config.from_dict({**TINY, "epochs": 2, "seed": 5})
    test = tiny_mosi.splits["test"]
    poisoned_labels = np.random.default_rng(0).uniform(-3, 3, size=test.labels.shape).astype(test.labels.dtype)
    poisoned = dataclasses.replace(tiny_mosi, splits={**tiny_mosi.splits, "test": dataclasses.replace(test, labels=poisoned_labels)})
    studies = [tuning.tune(base, 3, study="s", space=SPACE, root=tmp_path / name, dataset=ds)
               for name, ds in (("clean", tiny_mosi), ("poisoned", poisoned))]
    clean, dirty = ([(t.number, t.params, t.value) for t in st.trials] for st in studies)
    # The same trials, in the same order, with the same values: the test labels play no part, and one
    # seed repeats a study exactly.
    assert clean == dirty
    assert tuning.best_configuration(studies[0])[1].number == tuning.best_configuration(studies[1])[1].number
    run = studies[0].best_trial.user_attrs["run_dir"]
    metrics = [json.loads((tmp_path / n / "s" / run / "metrics.json").read_text())["test"] for n in ("clean", "poisoned")]
    assert metrics[0]["mae"] != metrics[1]["mae"]  # the poison did reach the test metrics


@pytest.mark.parametrize("text, key", [
    ("learning_rate = { low = 1e-4, high = 1e-2 }\n", "learning_rate"),
    ("lr = { low = 1e-2, high = 1e-4 }\n", "lr"),
    ("lr = { low = 0.0, high = 1e-2, log = true }\n", "lr"),
    ("lr = { lo = 1e-4, high = 1e-2 }\n", "lr"),
    ("text_kernel = { choices = [1, 2] }\n", "text_kernel"),
    ("heads = { choices = [2, 3] }\nd_model = { choices = [8, 16] }\n", "heads"),
    ("consistency = { low = 1, high = 2 }\n", "consistency"),
    ("batch_size = { choices = [] }\n", "batch_size"),
    ("attn_dropout = { low = 0.0, high = 1.5 }\n", "attn_dropout"),
    ("lr = [1e-4, 1e-2]\n", "lr"),
])
def test_a_bad_space_file_is_a_one_line_error_naming_the_key(tmp_path, capsys, text, key):
    space = _space_file(tmp_path, text)
    assert main(["tune", *TINY_FLAGS, "--trials", "1", "--space", str(space), "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(space) in err and f" {key}" in err, err
    assert not (tmp_path / "synthetic-mosi-kt").exists()  # nothing started


def test_a_space_file_that_does_not_parse_names_the_file(tmp_path, capsys):
    space = _space_file(tmp_path, "lr = { low = \n")
    assert main(["tune", *TINY_FLAGS, "--trials", "1", "--space", str(space)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(space) in err and "TOML" in err


def test_default_spaces_follow_what_the_variant_declares():
    kt, full, kt_any = (tuning.default_space(Config.from_dict({"variant": v})) for v in ("kt", "full", "kt_any"))
    assert {"lambda_vision", "lambda_text", "consistency", "kt_layers"} <= set(kt)
    assert not {"lambda_vision", "lambda_text", "consistency", "kt_layers", "lambda_any"} & set(full)
    assert "lambda_any" in kt_any and "lambda_vision" not in kt_any
    assert "audio_kernel" in full and "audio_kernel" not in kt  # kt never reads audio on its prediction path
    for space, variant in ((kt, "kt"), (full, "full"), (kt_any, "kt_any")):  # every default lies inside: the untuned default can be trial 0
        default = Config.from_dict({"variant": variant})
        assert all(knob.contains(getattr(default, key)) for key, knob in space.items())
        tuning.check_space(space, default)


def test_the_command_line_tunes_finalizes_and_each_trial_is_a_run(tmp_path, capsys, caplog):
    import logging

    from mskt.train import load_run

    journal = tmp_path / "journal.log"
    space = _space_file(tmp_path, "lr = { low = 1e-4, high = 1e-2, log = true }\nembed_dropout = 0.0\n")
    flags = [*TINY_FLAGS, "--epochs", "2", "--root", str(tmp_path), "--study", "c", "--storage", str(journal)]
    with caplog.at_level(logging.INFO, logger="mskt"):
        assert main(["tune", *flags, "--space", str(space), "--trials", "2", "--prune", "--seed", "11"]) == 0
    out = capsys.readouterr().out
    assert caplog.text.count(f"study c: storage {journal}") == 1  # where the study lives, said once
    assert "study c: 2 trials" in out and "best trial" in out
    st = optuna.load_study(study_name="c", storage=tuning.make_storage(tmp_path / "c", str(journal)))
    assert st.trials[0].user_attrs.get("default") and st.trials[0].params["lr"] == 1e-3  # trial 0: the untuned default
    cfg, model = load_run(tmp_path / "c" / "trial-0001")
    assert cfg.embed_dropout == 0.0 and cfg.lr == st.trials[1].params["lr"] and cfg.seed == 11
    # finalize takes the execution flags (--threads), not config ones
    assert main(["tune", "--finalize", "--seeds", "1", "--study", "c", "--root", str(tmp_path), "--storage", str(journal), "--lr", "0.1"]) == 2
    assert "drop ['lr']" in capsys.readouterr().err
    assert main(["tune", "--finalize", "--seeds", "1", "--study", "c", "--root", str(tmp_path), "--storage", str(journal), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| kt default | 1 |" in out and "| kt tuned | 1 |" in out and "Validation loss" in out
    assert (tmp_path / "c" / "finalize" / "results.md").read_text() in out
    # finalize trains fresh seeds: every trial of the search trained with seed 11
    assert sorted(p.name for p in (tmp_path / "c" / "finalize").iterdir() if p.is_dir()) == ["kt-default-seed12", "kt-tuned-seed12"]
    assert "finalize seeds 12 (disjoint from the search's)" in out
    # Another worker on this study must bring the same config: a different one is refused, in one line.
    assert main(["tune", *flags, "--space", str(space), "--trials", "2", "--prune", "--seed", "11", "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "epochs: study 2, this command 3" in err, err


def test_on_epoch_sees_each_validation_loss_and_can_stop_training(tiny_mosi):
    from mskt.train import train

    seen = []
    result = train(Config.from_dict({**TINY, "epochs": 4}), dataset=tiny_mosi, save=False,
                   on_epoch=lambda epoch, row: seen.append((epoch, row["valid_loss"])) or epoch == 2)
    assert [e for e, _ in seen] == [1, 2] and len(result.history) == 2
    assert [v for _, v in seen] == list(result.history["valid_loss"]) and result.metrics["best_epoch"] in (1, 2)


@pytest.mark.parametrize("scheme, module, hint", [
    ("postgresql", "psycopg", 'pip install -e ".[postgres]"'),  # what a plain postgresql:// means to SQLAlchemy 2.1
    ("postgresql+psycopg2", "psycopg2", "pip install psycopg2-binary"),
])
def test_a_missing_database_driver_is_named_with_what_to_install(tmp_path, capsys, monkeypatch, scheme, module, hint):
    for m in ("psycopg", "psycopg2"):
        monkeypatch.setitem(sys.modules, m, None)  # import fails as if it were not installed
    url = f"{scheme}://tuner:s3cret@127.0.0.1:1/optuna"
    assert main(["tune", *TINY_FLAGS, "--trials", "1", "--root", str(tmp_path), "--storage", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"No module named '{module}'" in err and hint in err, err
    assert "s3cret" not in err and f"{scheme}://tuner:***@127.0.0.1:1/optuna" in err


def test_a_password_never_reaches_the_log():
    assert tuning.redacted("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert tuning.redacted("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert tuning.redacted("/shared/tune/journal.log") == "/shared/tune/journal.log"


@pytest.mark.parametrize("when", ["mid-run", "after its last epoch"])
def test_a_trial_another_worker_failed_while_it_ran_here_is_a_warning_not_a_crash(tmp_path, tiny_mosi, monkeypatch, caplog, when):
    """What a worker stalled past the grace period meets: its trial was failed as stale by another
    worker, while it trained (its next report fails) or after (Optuna's tell fails). It says so in
    one warning and goes on; the study still ends with its N trials."""
    import logging

    import mskt.train
    from optuna.trial import TrialState

    real, calls = mskt.train.train, []

    def fail_the_running_trial():  # what another worker's stale check does
        st = _study(tmp_path, "f")
        (t,) = st.get_trials(states=(TrialState.RUNNING,))
        st._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)

    def train(cfg, on_epoch=None, **kwargs):
        calls.append(cfg)
        if len(calls) == 1 and when == "mid-run":
            fail_the_running_trial()
        result = real(cfg, on_epoch=on_epoch, **kwargs)
        if len(calls) == 1 and when != "mid-run":
            fail_the_running_trial()
        return result

    monkeypatch.setattr(mskt.train, "train", train)
    with caplog.at_level(logging.WARNING, logger="mskt"):
        st = tuning.tune(Config.from_dict({**TINY, "epochs": 1}), 1, study="f", space={"lr": Knob(choices=(1e-3,))}, root=tmp_path, dataset=tiny_mosi)
    assert [t.state.name for t in st.trials] == ["FAIL", "COMPLETE"]
    assert "trial 0 was failed by another worker while it ran here" in caplog.text


def test_an_error_of_the_trial_itself_is_not_taken_for_another_workers_doing(tmp_path, tiny_mosi, monkeypatch):
    import mskt.train

    def train(cfg, **kwargs):
        raise ValueError("a bug in training")

    monkeypatch.setattr(mskt.train, "train", train)
    with pytest.raises(ValueError, match="a bug in training"):  # the trial is FAIL too, but this worker failed it
        tuning.tune(Config.from_dict({**TINY, "epochs": 1}), 1, study="g", space={"lr": Knob(choices=(1e-3,))}, root=tmp_path, dataset=tiny_mosi)
