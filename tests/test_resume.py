"""Interrupted runs lose nothing: ``train(resume=True)`` / ``mskt train --resume DIR`` continue from
the last completed epoch and end with exactly the metrics of an uninterrupted run.

Dropout stays on (MulT's defaults), so a resumed run that did not restore the RNG states, the
shuffling generator, the optimizer or the scheduler would end with different numbers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from mskt.errors import MsktError
from mskt.model import KTMulT
from mskt.train import RunInterrupted, load_checkpoint, load_run, resume, train

try:
    from conftest import TINY, tiny_run_config
except ImportError:  # tests/ imported as a package
    from tests.conftest import TINY, tiny_run_config

TIMING = ("seconds",)


def test_resume_after_an_interruption_ends_with_the_uninterrupted_metrics(tiny_mosi, tmp_path, monkeypatch):
    cfg = tiny_run_config(variant="kt", epochs=4, batch_size=4, scheduler="plateau")
    reference = train(cfg, out_dir=tmp_path / "reference", dataset=tiny_mosi)

    # Interrupt the second run in the middle of epoch 3 (batch 2 of 4).
    original = KTMulT.loss
    calls = {"n": 0}

    def interrupted(self, out, labels):
        if self.training:
            calls["n"] += 1
            if calls["n"] == 2 * 4 + 2:
                raise KeyboardInterrupt
        return original(self, out, labels)

    monkeypatch.setattr(KTMulT, "loss", interrupted)
    run = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt) as stopped:  # Ctrl+C, or a notebook's stop button
        train(cfg, out_dir=run, dataset=tiny_mosi)
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    assert not (run / "metrics.json").exists()
    monkeypatch.setattr(KTMulT, "loss", original)
    # It says, in one line (also in a notebook: no traceback), where it stopped and how to resume.
    message = str(stopped.value)
    assert isinstance(stopped.value, RunInterrupted) and stopped.value._render_traceback_() == [message]
    assert message.startswith(f"interrupted after epoch 2 of 4; {run} keeps epochs 1-2 (last.pt): resume with "), message
    assert f"`mskt train --resume {run}`" in message
    call = message.split("`")[1]
    assert call == f"from mskt.train import resume; result = resume({str(run)!r})"

    resumed = resume(run, dataset=tiny_mosi)  # the call it gives, with the data already loaded
    assert resumed.metrics["test"] == reference.metrics["test"]
    assert resumed.metrics["best_epoch"] == reference.metrics["best_epoch"]
    columns = [c for c in reference.history.columns if c != "train_samples_per_s"]
    pd.testing.assert_frame_equal(resumed.history[columns], reference.history[columns])
    on_disk = pd.read_csv(run / "history.csv")
    assert list(on_disk["epoch"]) == [1, 2, 3, 4]
    for name, value in reference.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


def test_resume_before_the_first_epoch_finished_starts_over(tiny_mosi, tmp_path):
    cfg = tiny_run_config(variant="language_vision", epochs=2)
    reference = train(cfg, save=False, dataset=tiny_mosi)
    run = tmp_path / "run"
    run.mkdir()
    cfg.save(run / "config.json")  # what a run killed during its first epoch leaves
    assert resume(run, dataset=tiny_mosi).metrics["test"] == reference.metrics["test"]


def test_resume_a_finished_run_reevaluates_it(tiny_mosi, tmp_path):
    run = tmp_path / "run"
    first = train(tiny_run_config(variant="full", epochs=2), out_dir=run, dataset=tiny_mosi)
    assert resume(run, dataset=tiny_mosi).metrics["test"] == first.metrics["test"]


def test_resume_needs_a_run_folder(tmp_path):
    with pytest.raises(MsktError, match="not a run folder"):
        resume(tmp_path / "nothing")


def test_a_corrupt_last_checkpoint_is_a_clear_error(tiny_mosi, tmp_path):
    run = tmp_path / "run"
    train(tiny_run_config(variant="full", epochs=1), out_dir=run, dataset=tiny_mosi)
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:100])
    with pytest.raises(MsktError, match="last.pt"):
        resume(run, dataset=tiny_mosi)


# ----------------------------------------------------------------------------------------------
# The real thing: SIGKILL a training process mid-epoch, resume it from the command line.

# Big enough that an epoch takes a few tenths of a second (so the kill lands inside one), small
# enough that the whole test takes seconds. One torch thread: the same arithmetic in every process.
CLI_RUN = [
    "--data", "synthetic:mosi", "--data-scale", "0.1", "--variant", "kt", "--epochs", "5",
    "--batch-size", "8", "--threads", "1", "--device", "cpu", "--progress", "off", "--seed", "3",
    *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if not k.endswith("_dim")],
]


def _mskt(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mskt", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _completed_epochs(run: Path) -> int:
    try:
        return len(pd.read_csv(run / "history.csv"))
    except (OSError, ValueError, pd.errors.EmptyDataError):
        return 0


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_metrics(tmp_path):
    reference = _mskt("train", *CLI_RUN, "--out", str(tmp_path / "reference"))
    victim = _mskt("train", *CLI_RUN, "--out", str(tmp_path / "victim"))
    run = tmp_path / "victim"
    deadline = time.monotonic() + 240
    while _completed_epochs(run) < 2:  # epoch 3 starts right after epoch 2's files are written
        assert victim.poll() is None, f"the run ended before it could be killed: {victim.communicate()}"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)
    time.sleep(0.1)  # into epoch 3
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (run / "metrics.json").exists(), "the run finished before the kill; make CLI_RUN bigger"

    # Killed at an arbitrary moment, every file in the folder is whole.
    killed_at = load_checkpoint(run / "last.pt")["epoch"]
    assert killed_at >= 2
    load_run(run)
    assert not list(run.glob("*.tmp"))

    resumed = _mskt("train", "--resume", str(run))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resuming {run} after epoch {killed_at} of 5" in err
    out_ref, err_ref = reference.communicate(timeout=300)
    assert reference.returncode == 0, err_ref

    got = json.loads((run / "metrics.json").read_text())
    want = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    assert got["test"] == want["test"]
    assert got["valid"] == want["valid"]
    assert got["best_epoch"] == want["best_epoch"]


def test_resume_refuses_config_options(tmp_path):
    proc = _mskt("train", "--resume", str(tmp_path), "--epochs", "3")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "continues that run with its own config.json" in err
    assert "Traceback" not in err
