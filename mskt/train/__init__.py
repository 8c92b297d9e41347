"""Training, evaluation, checkpoints and run folders, and DDP.

A run writes ``runs/<name>/``: ``config.json``, ``history.csv`` (one row per epoch: every loss term
on train and valid, valid metrics), ``checkpoint.pt`` (the best epoch on validation),
``last.pt`` (the last completed epoch with optimizer and RNG states, for ``--resume``) and
``metrics.json`` (test metrics of that checkpoint, which epoch it was, the validation protocol
that selected it (``select_missing``), whether the run converged (``converged``, ``stopped_by``:
epochs, patience, max_steps or on_epoch) and its optimizer steps taken and skipped). Every file is written to a
temporary name and renamed, so a run killed at any moment leaves a loadable folder, and a resumed
run ends with exactly the metrics of one that was never interrupted.

Data stay whole tensors in memory and batches are index selections: no per-sample Python, no
worker processes.

The names users' notebooks import from ``mskt.train`` keep working from here.
"""

from mskt.data.batching import Tensors
from mskt.paths import atomic_torch_save, atomic_write_text
from mskt.train.checkpoints import load_checkpoint, load_run, load_teacher_audio_encoder
from mskt.train.evaluation import evaluate, predict, selection_score
from mskt.train.loop import (
    NonFiniteLoss,
    RunInterrupted,
    RunResult,
    RunState,
    default_run_name,
    describe,
    feature_statistics,
    finish_run,
    make_optimizer,
    model_config_for,
    resume,
    setup_run,
    train,
    train_epoch,
    training_step,
)
from mskt.train.setup import resolve_device, set_seed

__all__ = [
    "NonFiniteLoss", "RunInterrupted", "RunResult", "RunState", "Tensors", "atomic_torch_save", "atomic_write_text", "default_run_name", "describe",
    "evaluate", "feature_statistics", "finish_run", "load_checkpoint", "load_run", "load_teacher_audio_encoder", "make_optimizer",
    "model_config_for", "predict", "resolve_device", "resume", "selection_score", "set_seed", "setup_run", "train", "train_epoch", "training_step",
]
