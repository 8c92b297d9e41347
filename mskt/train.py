"""Training, evaluation and run folders.

A run writes ``runs/<name>/``: ``config.json``, ``history.csv`` (one row per epoch: every loss term
on train and valid, valid metrics), ``checkpoint.pt`` (the best epoch on validation), and
``metrics.json`` (test metrics of that checkpoint, which epoch it was). Every file is written to a
temporary name and renamed, so a run killed at any moment leaves a loadable folder.

Data stay whole tensors in memory and batches are index selections: no per-sample Python, no
worker processes.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from mskt.config import Config
from mskt.dataset import MultimodalDataset, Split
from mskt.errors import ConfigError, MsktError
from mskt.metrics import compute_metrics, format_metrics
from mskt.model import KTMulT, build_model
from mskt.presets import MODALITIES

# ----------------------------------------------------------------------------------------------
# Device, seeds, files


def resolve_device(name: str = "auto") -> torch.device:
    """The one place a device is chosen: "auto" is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} asked for CUDA, but torch sees no CUDA device here")
    return device


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _progress_enabled(setting: str) -> bool:
    if setting != "auto":
        return setting == "on"
    return sys.stderr.isatty() and not os.environ.get("CI")


# ----------------------------------------------------------------------------------------------
# Data as tensors


@dataclass
class Tensors:
    """One split as tensors on a device: features {m: (N, T, D)}, lengths {m: (N,)}, labels."""

    features: dict
    lengths: dict
    labels: torch.Tensor
    ids: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def from_split(cls, split: Split, task: str, device) -> "Tensors":
        split = split.load()
        label_dtype = torch.float32 if task == "regression" else torch.long
        return cls(
            features={m: torch.as_tensor(split.features[m], device=device) for m in MODALITIES},
            lengths={m: torch.as_tensor(split.lengths[m], dtype=torch.long, device=device) for m in MODALITIES},
            labels=torch.as_tensor(split.labels, dtype=label_dtype, device=device),
            ids=split.ids,
        )

    def batch(self, index: torch.Tensor) -> dict:
        return {
            **{m: x.index_select(0, index) for m, x in self.features.items()},
            "lengths": {m: x.index_select(0, index) for m, x in self.lengths.items()},
            "labels": self.labels.index_select(0, index),
        }

    def batches(self, batch_size: int, generator: torch.Generator | None = None):
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        order = order.to(self.labels.device)
        for start in range(0, n, batch_size):
            yield self.batch(order[start : start + batch_size])


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.inference_mode()
def predict(model: KTMulT, data: Tensors, batch_size: int = 256, return_internals: bool = False) -> dict:
    """Predictions (numpy) for a whole split, in order; with internals, also f_* and A' tensors."""
    model.eval()
    preds, internals = [], {}
    for batch in data.batches(batch_size):
        out = model(batch, return_internals=return_internals)
        preds.append(out.pred.float().cpu())
        for key, value in out.internals.items():
            internals.setdefault(key, []).append(value.float().cpu())
    result = {"pred": torch.cat(preds).numpy(), "labels": data.labels.cpu().numpy()}
    if return_internals:
        result["internals"] = {k: torch.cat(v).numpy() for k, v in internals.items()}
    return result


@torch.inference_mode()
def evaluate(model: KTMulT, data: Tensors, batch_size: int = 256) -> dict:
    """Metrics (mskt.metrics names) and the mean task loss on a split. Audio is not given to the
    model unless the variant reads it (full), so kt is evaluated with audio missing, as at test time."""
    model.eval()
    preds, loss_sum = [], 0.0
    for batch in data.batches(batch_size):
        if model.cfg.variant != "full":
            batch = {**batch, "audio": None}
        out = model(batch)
        loss_sum += float(model.loss(out, batch["labels"])["task"]) * len(batch["labels"])
        preds.append(out.pred.float().cpu())
    pred = torch.cat(preds).numpy()
    metrics = compute_metrics(model.cfg.task, pred, data.labels.cpu().numpy())
    metrics["loss"] = loss_sum / max(1, len(data))
    return metrics


def selection_score(metrics: dict, task: str, select_on: str) -> float:
    """Lower is better."""
    if select_on == "valid_loss":
        return metrics["loss"]
    return metrics["mae"] if task == "regression" else -metrics["mean_f1"]


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class RunResult:
    dir: Path | None
    config: Config
    history: "object"  # pandas DataFrame
    metrics: dict  # {"test": ..., "valid": ..., "best_epoch": ...}
    model: KTMulT


def default_run_name(cfg: Config, dataset: MultimodalDataset) -> str:
    align = "" if dataset.meta.aligned else "-unaligned"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{dataset.meta.name}{align}-{cfg.variant}-seed{cfg.seed}-{stamp}"


def model_config_for(cfg: Config, dataset: MultimodalDataset) -> Config:
    """``cfg`` with the data-dependent fields (dims, task) taken from the dataset."""
    dims = dataset.dims
    return cfg.replace(
        text_dim=dims["text"], audio_dim=dims["audio"], vision_dim=dims["vision"],
        text_steps=dataset.seq_lens["text"], task=dataset.meta.task,
    )


def audio_statistics(data: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per audio feature over the real (unpadded) steps of a split. Each (D_a,)."""
    from mskt.model import key_mask

    audio = data.features["audio"]  # (N, T, D)
    mask = key_mask(data.lengths["audio"], audio.shape[1])[..., None].to(audio.dtype)  # (N, T, 1)
    n = mask.sum().clamp(min=1)
    mean = (audio * mask).sum(dim=(0, 1)) / n
    var = (((audio - mean) * mask) ** 2).sum(dim=(0, 1)) / n
    return mean, var.sqrt()


def load_teacher_audio_encoder(model: KTMulT, teacher_dir: str) -> None:
    """Copy a finished ``full`` run's audio encoder into ``model`` and freeze it (kt_target='teacher')."""
    teacher_cfg = Config.load(Path(teacher_dir) / "config.json")
    if teacher_cfg.variant != "full":
        raise ConfigError(f"teacher_run {teacher_dir} is a {teacher_cfg.variant!r} run; the teacher must be a 'full' run")
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


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MsktError(f"{path}: no checkpoint here") from None
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise MsktError(f"{path}: not a loadable mskt checkpoint ({type(e).__name__}: {e})") from None


def train(
    cfg: Config,
    out_dir: str | Path | None = None,
    dataset: MultimodalDataset | None = None,
    save: bool = True,
) -> RunResult:
    """Train ``cfg`` and evaluate its best-on-validation checkpoint on test.

    ``out_dir`` defaults to ``runs/<dataset>-<variant>-seed<seed>-<time>``; ``save=False`` keeps
    everything in memory (tests). ``dataset`` skips loading ``cfg.data``.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from mskt.paths import runs_dir
    from mskt.readers import load_dataset

    if dataset is None:
        dataset = load_dataset(cfg.data, scale=cfg.data_scale, seed=cfg.data_seed)
    cfg = model_config_for(cfg, dataset)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = None
    if save:
        run_dir = Path(out_dir) if out_dir is not None else runs_dir() / default_run_name(cfg, dataset)
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")

    set_seed(cfg.seed)
    data = {s: Tensors.from_split(sp, cfg.task, device) for s, sp in dataset.splits.items()}
    model = build_model(cfg).to(device)
    if cfg.variant == "kt" and cfg.kt_target == "teacher":
        load_teacher_audio_encoder(model, cfg.teacher_run)
    if cfg.variant == "kt" and cfg.kt_target == "raw":
        model.set_audio_statistics(*audio_statistics(data["train"]))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = None
    if cfg.scheduler == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", patience=20, factor=0.1)
    generator = torch.Generator().manual_seed(cfg.seed)

    history, best_score, best_epoch, best_state = [], math.inf, 0, None
    started = time.perf_counter()
    epochs = tqdm(range(1, cfg.epochs + 1), desc=f"{cfg.variant}", disable=not _progress_enabled(cfg.progress))
    for epoch in epochs:
        model.train()
        sums, n_seen, t0 = {}, 0, time.perf_counter()
        for batch in data["train"].batches(cfg.batch_size, generator):
            out = model(batch)
            terms = model.loss(out, batch["labels"])
            if not torch.isfinite(terms["total"]):
                raise MsktError(
                    f"epoch {epoch}: the training loss became {float(terms['total'].detach())} "
                    f"({', '.join(f'{k}={float(v.detach()):.4g}' for k, v in terms.items())}); "
                    f"the last good checkpoint is {run_dir / 'checkpoint.pt' if run_dir else 'not saved'}"
                )
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            b = len(batch["labels"])
            n_seen += b
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * b
        train_seconds = time.perf_counter() - t0
        valid = evaluate(model, data["valid"], cfg.eval_batch_size)
        if scheduler is not None:
            scheduler.step(valid["loss"])
        row = {"epoch": epoch, **{f"train_{k}": v / n_seen for k, v in sums.items()}}
        row.update({f"valid_{k}": v for k, v in valid.items()})
        row.update(lr=optimizer.param_groups[0]["lr"], train_samples_per_s=n_seen / train_seconds)
        score = selection_score(valid, cfg.task, cfg.select_on)
        row["selected"] = score < best_score
        history.append(row)
        if score < best_score:
            best_score, best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if save:
                atomic_torch_save({"model": best_state, "config": cfg.to_dict(), "epoch": epoch}, run_dir / "checkpoint.pt")
        if save:
            atomic_write_text(run_dir / "history.csv", pd.DataFrame(history).to_csv(index=False))
        epochs.set_postfix(valid_loss=f"{valid['loss']:.4f}", best=best_epoch)

    model.load_state_dict(best_state)
    test = evaluate(model, data["test"], cfg.eval_batch_size)
    metrics = {
        "test": test,
        "valid": {k.removeprefix("valid_"): v for k, v in history[best_epoch - 1].items() if k.startswith("valid_")},
        "best_epoch": best_epoch,
        "epochs": cfg.epochs,
        "variant": cfg.variant,
        "data": dataset.meta.source,
        "dataset": dataset.meta.name,
        "aligned": dataset.meta.aligned,
        "seed": cfg.seed,
        "seconds": time.perf_counter() - started,
    }
    if save:
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return RunResult(dir=run_dir, config=cfg, history=pd.DataFrame(history), metrics=metrics, model=model)


def load_run(run_dir) -> tuple[Config, KTMulT]:
    """The config and best model of a finished run folder (weights loaded with weights_only=True)."""
    run_dir = Path(run_dir)
    cfg = Config.load(run_dir / "config.json")
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    model = build_model(Config.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    return cfg, model


def describe(metrics: dict) -> str:
    return format_metrics({k: v for k, v in metrics.items() if k != "loss"})
