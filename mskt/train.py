"""Training, evaluation and run folders.

A run writes ``runs/<name>/``: ``config.json``, ``history.csv`` (one row per epoch: every loss term
on train and valid, valid metrics), ``checkpoint.pt`` (the best epoch on validation),
``last.pt`` (the last completed epoch with optimizer and RNG states, for ``--resume``) and
``metrics.json`` (test metrics of that checkpoint, which epoch it was). Every file is written to a
temporary name and renamed, so a run killed at any moment leaves a loadable folder, and a resumed
run ends with exactly the metrics of one that was never interrupted.

Data stay whole tensors in memory and batches are index selections: no per-sample Python, no
worker processes.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
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
from mskt.errors import ConfigError, DataError, MsktError
from mskt.metrics import compute_metrics, format_metrics
from mskt.model import KTMulT, build_model
from mskt.presets import MODALITIES

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Device, seeds, files


def resolve_device(name: str = "auto") -> torch.device:
    """The one place a device is chosen: "auto" is CUDA when present, else CPU. Under torchrun,
    "auto" and "cuda" mean this process's own GPU, cuda:LOCAL_RANK."""
    local_rank = os.environ.get("LOCAL_RANK")
    if name in ("auto", "cuda") and local_rank is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(local_rank)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} asked for CUDA, but torch sees no CUDA device here")
    return device


def keep_freed_memory(device: torch.device) -> bool:
    """On CPU under glibc, keep large freed blocks in the process instead of returning them to the
    operating system; True if the setting was made (or already was).

    glibc serves every block above a (dynamic, at most 32 MB) threshold with a fresh ``mmap`` and
    unmaps it on free, so each of the (B, heads, T, S) attention tensors of unaligned data, ~120 MB
    a layer, is faulted in page by page on every step: measured, 1.3 M page faults and 4 of 11
    seconds of kernel time per training step of unaligned MOSI at MulT's config. Serving all
    blocks from the heap, which is never trimmed, makes those tensors reuse warm memory. The cost:
    the process keeps its peak memory until it exits. It changes no result. A no-op elsewhere
    (CUDA has its own caching allocator; other C libraries are left alone).
    """
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    return _keep_glibc_freed_memory()


@functools.cache
def _keep_glibc_freed_memory() -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): leave its allocator as it is
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
    # mallopt returns 1 on success. -1 as the trim threshold becomes SIZE_MAX: never trim.
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))


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
    """One split as tensors on a device: features {m: (N, T, D)}, lengths {m: (N,)}, labels.

    Lazy (``from_split(..., lazy=True)`` on a lazily read ``.h5`` store): the features stay on disk
    as h5py datasets and each batch reads just its rows, into pinned memory when the device is a
    GPU, so a dataset larger than memory trains. Batches are the same either way.
    """

    features: dict  # {m: tensor on device}, or {m: h5py dataset} when lazy
    lengths: dict
    labels: torch.Tensor
    ids: np.ndarray
    lazy: bool = False

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def from_split(cls, split: Split, task: str, device, lazy: bool = False) -> "Tensors":
        lazy = lazy and not all(isinstance(x, np.ndarray) for x in split.features.values())
        label_dtype = torch.float32 if task == "regression" else torch.long
        return cls(
            features={m: split.features[m] if lazy else torch.as_tensor(np.asarray(split.features[m]), device=device) for m in MODALITIES},
            lengths={m: torch.as_tensor(np.asarray(split.lengths[m]), dtype=torch.long, device=device) for m in MODALITIES},
            labels=torch.as_tensor(np.asarray(split.labels), dtype=label_dtype, device=device),
            ids=np.asarray(split.ids),
            lazy=lazy,
        )

    def _read(self, m: str, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of a lazy modality, in ``index``'s order, on the device."""
        rows = index.cpu().numpy()
        order = np.argsort(rows)  # h5py reads increasing indices only
        source = self.features[m]
        x = np.empty((len(rows),) + source.shape[1:], dtype=np.float32)
        try:
            x[order] = source[rows[order]]
        except (OSError, RuntimeError, ValueError) as e:  # a damaged chunk shows up only when read
            raise DataError(f"{source.file.filename}: {source.name}: cannot read rows of a lazy batch ({e})") from None
        x = torch.from_numpy(x).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # as an eager read does
        device = self.labels.device
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True)
        return x

    def batch(self, index: torch.Tensor) -> dict:
        if self.lazy:
            features = {m: self._read(m, index) for m in self.features}
        else:
            features = {m: x.index_select(0, index) for m, x in self.features.items()}
        return {
            **features,
            "lengths": {m: x.index_select(0, index) for m, x in self.lengths.items()},
            "labels": self.labels.index_select(0, index),
        }

    def batch_indices(self, batch_size: int, generator: torch.Generator | None = None):
        """Index tensors of consecutive batches: shuffled by ``generator``, else in order."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        order = order.to(self.labels.device)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]

    def batches(self, batch_size: int, generator: torch.Generator | None = None):
        for index in self.batch_indices(batch_size, generator):
            yield self.batch(index)

    def shard_index(self, rank: int, world: int) -> torch.Tensor:
        """The rows of the ``rank``-th of ``world`` contiguous parts (sizes differ by at most one)."""
        return torch.arange(len(self), device=self.labels.device).tensor_split(world)[rank]

    def shard(self, rank: int, world: int) -> "Tensors":
        """The ``rank``-th of ``world`` contiguous parts, as :meth:`shard_index` gives them."""
        if world == 1:
            return self
        index = self.shard_index(rank, world)
        batch = self.batch(index)
        lengths = batch.pop("lengths")
        labels = batch.pop("labels")
        return Tensors(features=batch, lengths=lengths, labels=labels, ids=self.ids[index.cpu().numpy()])


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.inference_mode()
def predict(model: KTMulT, data: Tensors, batch_size: int = 256, return_internals: bool = False, missing=None,
            missing_rate: float = 0.0, missing_mode: str = "sample", missing_seed: int = 0) -> dict:
    """Predictions (numpy) for a whole split, in order; with internals, also f_* and A' tensors.
    By default every modality is given as it is; ``missing`` etc. as in :func:`evaluate`."""
    model.eval()
    preds, internals = [], {}
    for batch in _missing_batches(model, data, batch_size, missing, missing_rate, missing_mode, missing_seed, default_protocol=False):
        out = model(batch, return_internals=return_internals)
        preds.append(out.pred.float().cpu())
        for key, value in out.internals.items():
            internals.setdefault(key, []).append(value.float().cpu())
    result = {"pred": torch.cat(preds).numpy(), "labels": data.labels.cpu().numpy()}
    if return_internals:
        result["internals"] = {k: torch.cat(v).numpy() for k, v in internals.items()}
    return result


def _missing_batches(model, data: Tensors, batch_size, missing, rate, mode, seed, rank=0, world=1, default_protocol=True):
    """The batches of this rank's part of ``data``, in order, with what the protocol removes.

    Masks are built once for the whole split (``mskt.missing.evaluation_masks``), so they do not
    depend on batch size or the number of ranks. No protocol asked (``missing`` None, rate 0) and
    ``default_protocol``: audio is missing for every variant but ``full`` (kt_any gets the mask and
    reconstructs it; the others get no audio at all).
    """
    from mskt.missing import evaluation_masks

    masks = evaluation_masks(len(data), {m: x.shape[1] for m, x in data.features.items()}, missing, rate, mode, seed)
    if masks is None and default_protocol and model.cfg.variant == "kt_any":
        masks = evaluation_masks(len(data), {}, ("audio",))
    mine = data.shard_index(rank, world).cpu()  # rows of the whole split, for its masks
    part = data.shard(rank, world)
    for index in part.batch_indices(batch_size):
        batch = part.batch(index)
        if masks is not None:
            batch = masks.apply(batch, mine[index.cpu()])
        elif default_protocol and model.cfg.variant != "full":
            batch = {**batch, "audio": None}
        yield batch


@torch.inference_mode()
def evaluate(model: KTMulT, data: Tensors, batch_size: int = 256, dist=None, missing=None, missing_rate: float = 0.0,
             missing_mode: str = "sample", missing_seed: int = 0) -> dict:
    """Metrics (mskt.metrics names) and the mean task loss on a split.

    By default (the paper's test setting) audio is missing and every other modality present: it is
    not given to the model unless the variant reads it (full), so kt is evaluated with audio
    missing; kt_any gets audio marked missing for every sample and reconstructs it.

    Missing modalities (``mskt.missing``): ``missing`` names modalities missing for every sample
    ("audio,vision" or a tuple; ``()`` = nothing missing); ``missing_rate`` r makes each other
    modality of each sample missing with probability r (``missing_mode="sample"``; a sample left with
    nothing is drawn again) or zeroes each of its time steps with probability r
    (``missing_mode="step"``), from a generator seeded by ``missing_seed``. Given either, every
    variant gets every modality that is not missing; missing ones are zero-filled (kt_any
    reconstructs them instead; kt never reads audio, language_vision ignores it).

    Under DDP (``dist``), each rank predicts its part and every rank gets the metrics of the whole
    split, so all ranks select the same epoch.
    """
    from mskt.model import task_loss

    model.eval()
    world, rank = (dist.world, dist.rank) if dist is not None else (1, 0)
    preds = []
    for batch in _missing_batches(model, data, batch_size, missing, missing_rate, missing_mode, missing_seed, rank, world):
        preds.append(model(batch).pred.float().cpu())
    pred = torch.cat(preds) if preds else torch.empty((0,) + tuple(data.labels.shape[1:]) + ((2,) if model.cfg.task != "regression" else ()))
    if world > 1:
        pred = torch.cat(dist.gather(pred))  # rank order = split order: the parts are contiguous
    labels = data.labels.cpu()
    metrics = compute_metrics(model.cfg.task, pred.numpy(), labels.numpy())
    metrics["loss"] = float(task_loss(pred, labels, model.cfg.task))
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


def feature_statistics(data: Tensors, modality: str, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per feature of ``modality`` over the real (unpadded) steps of a split, each (D_m,).

    Read in chunks of samples (in float64), so a lazy split is never loaded whole.
    """
    from mskt.model import key_mask

    total = sum_x = sum_xx = 0.0
    for index in data.batch_indices(chunk):
        x = data.batch(index)[modality].double()  # (n, T, D)
        real = key_mask(data.lengths[modality].index_select(0, index), x.shape[1])[..., None]  # (n, T, 1)
        x = torch.where(real, x, 0.0)
        total = total + real.sum()
        sum_x = sum_x + x.sum(dim=(0, 1))
        sum_xx = sum_xx + (x * x).sum(dim=(0, 1))
    n = torch.as_tensor(total).clamp(min=1)
    mean = sum_x / n
    var = (sum_xx / n - mean * mean).clamp(min=0)
    return mean.float(), var.sqrt().float()


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


class NonFiniteLoss(MsktError):
    pass


def make_optimizer(model: KTMulT, cfg: Config) -> torch.optim.Optimizer:
    """Adam over the trainable parameters, held as one flat tensor (:class:`FlatAdam`); fused (one
    kernel rather than a dozen small ops) where this torch supports it for the device."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return FlatAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except RuntimeError:  # a device without a fused kernel
        return FlatAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class FlatAdam(torch.optim.Adam):
    """``torch.optim.Adam`` over ``params`` moved into one flat tensor, of which they become views.

    At MulT's config the model has ~700 parameter tensors of 30 to 15k values, and every per-tensor
    step costs more in dispatch than in arithmetic: Adam's update, the clipping norm and zeroing
    took ~30 ms of a ~250 ms MOSI training step (2 threads). Here each is one operation on ~1M
    values. Each step the gradients autograd produced are gathered into the flat gradient
    (:meth:`collect_gradients`, one copy); the update writes the flat tensor, and so the model's
    parameters, in place. The same update as Adam over the separate tensors (Adam is element-wise;
    the clipping norm sums in another order), provided every parameter gets a gradient each step,
    as every variant's do (a test checks it): a parameter without one is updated with a zero
    gradient here, where torch's Adam would skip it. The state dict holds the flat state, so a
    checkpoint's optimizer state fits only a FlatAdam over the same parameters.
    """

    def __init__(self, params, **kwargs):
        self.views = list(params)
        if not self.views:
            raise ValueError("FlatAdam: no parameters to optimise")
        flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in self.views]))  # (N,)
        flat.grad = torch.zeros_like(flat)
        self.grad_views = []  # each parameter's part of the flat gradient, in its shape
        offset = 0
        for p in self.views:
            p.data = flat.data[offset : offset + p.numel()].view_as(p)  # same values, now stored in flat
            self.grad_views.append(flat.grad[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        super().__init__([flat], **kwargs)
        self.flat = flat

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the parameters' gradients, so that backward hands over its buffers rather than
        adding into old ones; the flat gradient is overwritten by :meth:`collect_gradients`."""
        for p in self.views:
            p.grad = None

    def collect_gradients(self) -> torch.Tensor:
        """Copy the parameters' gradients into the flat gradient (zeros for a parameter that has
        none) and return it, (N,): what clipping and :meth:`step` act on."""
        grads = [p.grad for p in self.views]
        if any(g is None for g in grads):
            for view, g in zip(self.grad_views, grads):
                view.zero_() if g is None else view.copy_(g)
        else:
            torch._foreach_copy_(self.grad_views, grads)  # one call: 3x faster than torch.cat here
        return self.flat.grad


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast on CUDA when ``cfg.precision == "bf16"``; otherwise a no-op context."""
    import contextlib

    if cfg.precision == "bf16":
        if device.type != "cuda":
            raise ConfigError(f"precision='bf16' is for CUDA devices; this run is on {device} (use fp32)")
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class CompiledOrEager:
    """``torch.compile(module)``, falling back to the eager module (with one warning) if compiling
    fails, e.g. on a machine without a C++ compiler: a run never dies of an optimisation."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.compiled = torch.compile(module)
        self.failed = False

    def __call__(self, *args, **kwargs):
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 -- any compiler failure: the eager module computes the same
                self.failed = True
                log.warning("torch.compile failed (%s: %s); training continues in eager mode", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return self.module(*args, **kwargs)


def training_step(model: KTMulT, optimizer: torch.optim.Optimizer, cfg: Config, forward=None):
    """``step(batch, weight=1.0) -> loss terms``: forward (``forward``, default the model: a DDP or
    compiled wrapper of it), loss, backward of ``weight`` x total, gradient clipping, optimizer step.

    The gradient norm is checked before the step: a NaN or inf loss raises :class:`NonFiniteLoss`
    and the weights stay as they were. Under DDP the norm is taken of the all-reduced gradient, the
    same on every rank, so every rank stops at the same step.
    """
    forward = forward if forward is not None else model
    if cfg.compile:
        forward = CompiledOrEager(forward)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    collect = getattr(optimizer, "collect_gradients", None)  # FlatAdam: the gradients into its flat one
    device = next(model.parameters()).device
    keep_freed_memory(device)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf

    def step(batch: dict, weight: float = 1.0) -> dict:
        with autocast(cfg, device):
            terms = model.loss(forward(batch), batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        (terms["total"] * weight).backward()
        if collect is not None:
            collect()
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if not (torch.isfinite(terms["total"]) and torch.isfinite(norm)):
            detail = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
            raise NonFiniteLoss(f"the training loss became {float(terms['total'].detach())} (gradient norm {float(norm)}; {detail})")
        optimizer.step()
        return terms

    return step


def _restore_rng(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def _training_state(model, optimizer, scheduler, generator, epoch, history, best) -> dict:
    """Everything an interrupted run needs to continue exactly as if it had never stopped."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "epoch": epoch,
        # JSON: weights_only loading accepts plain containers of str/float only, no numpy scalars.
        "history": json.dumps(history),
        "best_score": best["score"],
        "best_epoch": best["epoch"],
        "best_state": best["state"],
    }


def train(
    cfg: Config,
    out_dir: str | Path | None = None,
    dataset: MultimodalDataset | None = None,
    save: bool = True,
    resume: bool = False,
) -> RunResult:
    """Train ``cfg`` and evaluate its best-on-validation checkpoint on test.

    ``out_dir`` defaults to ``runs/<dataset>-<variant>-seed<seed>-<time>``; ``save=False`` keeps
    everything in memory (tests). ``dataset`` skips loading ``cfg.data``. ``resume=True`` continues
    the run in ``out_dir`` from its last completed epoch (``last.pt``: weights, optimizer, scheduler
    and every RNG state), so it ends with exactly the metrics of a run that was never interrupted.

    Under torchrun (``WORLD_SIZE`` > 1) this is DistributedDataParallel training: each rank takes
    its share of every global batch of ``batch_size``, validation and test predictions are gathered
    over the whole split, and only rank 0 writes the run folder.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from mskt.distributed import Dist, weighted_share
    from mskt.paths import runs_dir
    from mskt.readers import load_dataset

    if dataset is None:
        dataset = load_dataset(cfg.data, scale=cfg.data_scale, seed=cfg.data_seed, lazy=cfg.lazy)
    cfg = model_config_for(cfg, dataset)
    empty = [s for s in ("train", "valid", "test") if len(dataset.splits[s]) == 0]
    if empty:
        raise DataError(f"{dataset.meta.source}: the {', '.join(empty)} split(s) have no samples; training needs all three")
    dist = Dist.from_env()
    device = resolve_device(cfg.device)
    dist.init(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    save = save and dist.is_main
    run_dir = None
    if save or resume:
        run_dir = Path(out_dir) if out_dir is not None else runs_dir() / default_run_name(cfg, dataset)
    state = None
    if resume and (run_dir / "last.pt").exists():  # none yet: the run stopped in its first epoch
        state = load_checkpoint(run_dir / "last.pt")
    if save:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")

    set_seed(cfg.seed)
    data = {s: Tensors.from_split(sp, cfg.task, device, lazy=cfg.lazy) for s, sp in dataset.splits.items()}
    model = build_model(cfg).to(device)
    if cfg.variant == "kt" and cfg.kt_target == "teacher":
        load_teacher_audio_encoder(model, cfg.teacher_run)
    if cfg.variant == "kt" and cfg.kt_target == "raw":
        model.set_audio_statistics(*feature_statistics(data["train"], "audio"))
    if cfg.variant == "kt_any":  # its consistency targets: every modality, standardised per feature
        for m in MODALITIES:
            model.set_statistics(m, *feature_statistics(data["train"], m))
    if dist.world > 1:
        torch.manual_seed(cfg.seed + dist.rank)  # each rank its own dropout masks; the weights come from rank 0
    optimizer = make_optimizer(model, cfg)
    scheduler = None
    if cfg.scheduler == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", patience=20, factor=0.1)
    generator = torch.Generator().manual_seed(cfg.seed)  # the same on every rank: one global order per epoch

    history, best = [], {"score": math.inf, "epoch": 0, "state": None}
    first_epoch = 1
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        _restore_rng(state, generator)
        history = json.loads(state["history"])
        best = {"score": state["best_score"], "epoch": state["best_epoch"], "state": state["best_state"]}
        first_epoch = state["epoch"] + 1
        log.info("resuming %s after epoch %d of %d", run_dir, state["epoch"], cfg.epochs)
    step = training_step(model, optimizer, cfg, forward=dist.wrap(model))

    started = time.perf_counter()
    show = _progress_enabled(cfg.progress) and dist.is_main
    epochs = tqdm(range(first_epoch, cfg.epochs + 1), desc=f"{cfg.variant}", disable=not show)
    for epoch in epochs:
        model.train()
        sums, t0 = {}, time.perf_counter()
        for index in data["train"].batch_indices(cfg.batch_size, generator):
            index, weight = weighted_share(index, dist)  # (b,) this rank's samples of the global batch
            batch = data["train"].batch(index)
            try:
                terms = step(batch, weight)
            except NonFiniteLoss as e:
                raise MsktError(
                    f"epoch {epoch}: {e}; the last good checkpoint is {run_dir / 'checkpoint.pt' if run_dir else 'not saved'}"
                ) from None
            n = len(index) * (weight > 0)
            sums["n"] = sums.get("n", 0.0) + n
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * n
        sums = dist.sum(sums)
        train_seconds = time.perf_counter() - t0
        valid = evaluate(model, data["valid"], cfg.eval_batch_size, dist)
        if scheduler is not None:
            scheduler.step(valid["loss"])
        row = {"epoch": epoch, **{f"train_{k}": v / sums["n"] for k, v in sums.items() if k != "n"}}
        row.update({f"valid_{k}": float(v) for k, v in valid.items()})
        row.update(lr=optimizer.param_groups[0]["lr"], train_samples_per_s=sums["n"] / train_seconds)
        score = selection_score(valid, cfg.task, cfg.select_on)
        row["selected"] = bool(score < best["score"])
        history.append(row)
        if score < best["score"]:
            best = {"score": score, "epoch": epoch, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            if save:
                atomic_torch_save({"model": best["state"], "config": cfg.to_dict(), "epoch": epoch}, run_dir / "checkpoint.pt")
        if save:
            atomic_write_text(run_dir / "history.csv", pd.DataFrame(history).to_csv(index=False))
            atomic_torch_save(_training_state(model, optimizer, scheduler, generator, epoch, history, best), run_dir / "last.pt")
        epochs.set_postfix(valid_loss=f"{valid['loss']:.4f}", best=best["epoch"])

    model.load_state_dict(best["state"])
    test = evaluate(model, data["test"], cfg.eval_batch_size, dist)
    metrics = {
        "test": test,
        "valid": {k.removeprefix("valid_"): v for k, v in history[best["epoch"] - 1].items() if k.startswith("valid_")},
        "best_epoch": best["epoch"],
        "epochs": cfg.epochs,
        "variant": cfg.variant,
        "data": dataset.meta.source,
        "dataset": dataset.meta.name,
        "aligned": dataset.meta.aligned,
        "seed": cfg.seed,
        "seconds": time.perf_counter() - started,
        "world_size": dist.world,
    }
    if save:
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return RunResult(dir=run_dir, config=cfg, history=pd.DataFrame(history), metrics=metrics, model=model)


def resume(run_dir, dataset: MultimodalDataset | None = None) -> RunResult:
    """Continue the run in ``run_dir`` from its last completed epoch (``mskt train --resume DIR``)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise MsktError(f"{run_dir}: not a run folder (no config.json), nothing to resume")
    return train(Config.load(run_dir / "config.json"), out_dir=run_dir, dataset=dataset, resume=True)


def load_run(run_dir) -> tuple[Config, KTMulT]:
    """The config and best model of a finished run folder (weights loaded with weights_only=True)."""
    run_dir = Path(run_dir)
    cfg = Config.load(run_dir / "config.json")
    path = run_dir / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or not {"model", "config"} <= set(ckpt):
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise MsktError(f"{path}: not an mskt checkpoint: expected a dict with 'model' and 'config', found {found}")
    model = build_model(Config.from_dict(ckpt["config"]))
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise MsktError(f"{path}: its weights do not fit the model its config describes ({first_line})") from None
    model.eval()
    return cfg, model


def describe(metrics: dict) -> str:
    return format_metrics({k: v for k, v in metrics.items() if k != "loss"})
