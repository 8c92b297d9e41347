"""Checkpoints and run folders: safe loading, the state that makes a resumed run exact, finished runs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mskt.config import Config
from mskt.errors import ConfigError, MsktError
from mskt.fast import accelerate
from mskt.model import MulT, build_model, variant_class


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's contents, loaded with ``weights_only=True``: tensors and plain containers
    only, so a file from the internet cannot run code. Any refusal is one line naming the file."""
    import pickle
    import re
    import warnings

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol notes: the refusal below says it all
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MsktError(f"{path}: no checkpoint here") from None
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global: GLOBAL|global) ([\w.]+)", str(e))
        what = f"it holds the global {found.group(1)}, which could run code" if found else str(e).splitlines()[0]
        raise MsktError(
            f"{path}: refused to load: {what}; only tensors and plain containers are loaded (weights_only=True)"
        ) from None
    except Exception as e:  # truncated, not a zip, not a pickle at all
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise MsktError(f"{path}: not a loadable mskt checkpoint ({type(e).__name__}: {first_line})") from None



def _restore_rng(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])



def _training_state(model, optimizer, scheduler, generator, epoch, history, best, missing_generator=None, step_counts=None) -> dict:
    """Everything an interrupted run needs to continue exactly as if it had never stopped
    (``missing_generator``: the training protocol's masks, ``mskt.data.missing.training_generator``;
    ``step_counts``: the optimizer steps taken and skipped, for max_steps / min_steps)."""
    return {
        **({"step_counts": {k: int(v) for k, v in step_counts.items()}} if step_counts is not None else {}),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "generator": generator.get_state(),
        **({"missing_generator": missing_generator.get_state()} if missing_generator is not None else {}),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "epoch": epoch,
        # JSON: weights_only loading accepts plain containers of str/float only, no numpy scalars.
        "history": json.dumps(history),
        "best_score": best["score"],
        "best_epoch": best["epoch"],
        "best_state": best["state"],
    }



def load_run(run_dir) -> tuple[Config, MulT]:
    """The config and best model of a finished run folder (weights loaded with weights_only=True)."""
    run_dir = Path(run_dir)
    cfg = Config.load(run_dir / "config.json")
    path = run_dir / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or not {"model", "config"} <= set(ckpt):
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise MsktError(f"{path}: not an mskt checkpoint: expected a dict with 'model' and 'config', found {found}")
    model = build_model(Config.from_stored(ckpt["config"], where=str(path)))
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise MsktError(f"{path}: its weights do not fit the model its config describes ({first_line})") from None
    if cfg.cpu_kernels == "fused":
        accelerate(model)  # the function it was trained with; return_attention=True runs the Python code
    model.eval()
    return cfg, model



# The config fields that say which data a run trained on (the splits come with the data).
DATA_FIELDS = ("data", "data_scale", "data_seed", "dataset")


def check_teacher(cfg: Config, teacher_dir, dataset) -> None:
    """ConfigError, one line naming the difference, unless the teacher run in ``teacher_dir`` was
    trained on the data this run ``cfg`` trains on (``dataset``: the same source, scale, seed and
    identity, so the same splits) and on exactly the same labelled training samples. A teacher that
    saw labels this run hides (a ``full`` run on every label, under a student with
    ``label_fraction`` < 1) would leak them into the student through its frozen audio encoder."""
    import numpy as np

    from mskt.data.labels import labelled_subset

    teacher = Config.load(Path(teacher_dir) / "config.json")
    for key in DATA_FIELDS:
        if getattr(teacher, key) != getattr(cfg, key):
            raise ConfigError(f"teacher_run {teacher_dir}: trained on {key}={getattr(teacher, key)!r}, this run on {key}={getattr(cfg, key)!r}; "
                              "the teacher must be trained on the same data and splits")
    labels = dataset.splits["train"].labels
    theirs = labelled_subset(labels, teacher.label_fraction, teacher.seed)
    mine = labelled_subset(labels, cfg.label_fraction, cfg.seed)
    if not np.array_equal(theirs, mine):
        extra = int((theirs & ~mine).sum())
        raise ConfigError(
            f"teacher_run {teacher_dir}: trained on label_fraction={teacher.label_fraction:g} (seed {teacher.seed}: {int(theirs.sum())} labelled samples), "
            f"this run on label_fraction={cfg.label_fraction:g} (seed {cfg.seed}: {int(mine.sum())}); the teacher saw {extra} label(s) this run hides "
            "and must be trained on the same labelled subset (same label_fraction and seed)")


def load_teacher_audio_encoder(model: MulT, teacher_dir: str) -> None:
    """Copy a finished ``full`` run's audio encoder into ``model`` and freeze it (kt_target='teacher')."""
    teacher_cfg = Config.load(Path(teacher_dir) / "config.json")
    teacher = variant_class(teacher_cfg.variant)
    if "audio" not in teacher.inputs or "audio" in teacher.test_missing:
        raise ConfigError(f"teacher_run {teacher_dir} is a {teacher_cfg.variant!r} run; the teacher must be a run that reads audio at test time, like 'full'")
    state = load_checkpoint(Path(teacher_dir) / "checkpoint.pt")["model"]
    prefix = "encoders.audio."
    own = model.encoders["audio"].state_dict()
    theirs = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    mismatched = [k for k in own if k not in theirs or theirs[k].shape != own[k].shape]
    if mismatched:
        raise ConfigError(
            f"teacher_run {teacher_dir}: its audio encoder does not fit this model ({mismatched[:3]}...): "
            "d_model, encoder_layers, audio_kernel and the audio dim must match"
        )
    model.encoders["audio"].load_state_dict(theirs)
    model.freeze_audio_encoder()
