"""The training loop: seeding, the model and its accelerators, epochs, selection on validation,
the run folder (what it holds: ``mskt.train``'s docstring), resuming.

:func:`train` is three parts over one :class:`RunState`: :func:`setup_run` (everything before the
first epoch), :func:`train_epoch` (one epoch, validated, its files written) and :func:`finish_run`
(the best epoch on test, ``metrics.json``)."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from mskt.config import Config
from mskt.console import progress_bar
from mskt.data.batching import Tensors
from mskt.data.dataset import MultimodalDataset
from mskt.data.missing import TrainingProtocol, select_drops, training_generator, training_protocol
from mskt.data.presets import dataset_identity
from mskt.errors import DataError, MsktError
from mskt.fast import accelerate
from mskt.metrics import format_metrics
from mskt.model import MulT, build_model, key_mask
from mskt.paths import atomic_torch_save, atomic_write_text
from mskt.train.checkpoints import _restore_rng, _training_state, check_teacher, load_checkpoint, load_teacher_audio_encoder
from mskt.train.distributed import Dist, set_step_keys, weighted_share
from mskt.train.evaluation import evaluate, selection_score, validation_metrics
from mskt.train.optim import FlatAdam
from mskt.train.runtime import CompiledOrEager, autocast, keep_freed_memory
from mskt.train.setup import resolve_device, set_seed

log = logging.getLogger(__name__)


class RunInterrupted(KeyboardInterrupt):
    """Training was interrupted (Ctrl+C, a notebook's stop button); the message says how to resume.

    A KeyboardInterrupt still, so whatever stops on one stops on this. In a notebook it shows as its
    one line rather than a traceback (IPython's ``_render_traceback_``), and ends Run All there.
    """

    def _render_traceback_(self) -> list[str]:
        return [str(self)]


def interrupted_message(run_dir: Path | None, done: int, total: int) -> str:
    """The line :class:`RunInterrupted` carries: where the run stopped and the exact call to resume it."""
    if run_dir is None:
        return f"interrupted after epoch {done} of {total}; the run was not saved (save=False), so there is nothing to resume"
    kept = f"{run_dir} keeps epochs 1-{done} (last.pt)" if done else f"no epoch had finished, so resuming starts {run_dir} over"
    return f"interrupted after epoch {done} of {total}; {kept}: resume with `from mskt.train import resume; result = resume({str(run_dir)!r})` or `mskt train --resume {run_dir}`"



@dataclass
class RunResult:
    dir: Path | None
    config: Config
    history: "object"  # pandas DataFrame
    metrics: dict  # {"test": ..., "valid": ..., "best_epoch": ...}
    model: MulT



def default_run_name(cfg: Config, dataset: MultimodalDataset) -> str:
    align = "" if dataset.meta.aligned else "-unaligned"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{dataset.meta.name}{align}-{cfg.variant}-seed{cfg.seed}-{stamp}"



def model_config_for(cfg: Config, dataset: MultimodalDataset) -> Config:
    """``cfg`` with the data-dependent fields (dims, task, the dataset's identity) taken from the dataset."""
    dims = dataset.dims
    return cfg.replace(
        text_dim=dims["text"], audio_dim=dims["audio"], vision_dim=dims["vision"],
        text_steps=dataset.seq_lens["text"], task=dataset.meta.task, dataset=dataset_identity(dataset.meta.name),
    )



def feature_statistics(data: Tensors, modality: str, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per feature of ``modality`` over the real (unpadded) steps of a split, each (D_m,).

    Read in chunks of samples (in float64), so a lazy split is never loaded whole.
    """
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



class NonFiniteLoss(MsktError):
    pass



def make_optimizer(model: MulT, cfg: Config) -> torch.optim.Optimizer:
    """Adam over the trainable parameters, held as one flat tensor (:class:`FlatAdam`); fused (one
    kernel rather than a dozen small ops) where this torch supports it for the device."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return FlatAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except RuntimeError:  # a device without a fused kernel
        return FlatAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)



def training_step(model: MulT, optimizer: torch.optim.Optimizer, cfg: Config, forward=None):
    """``step(batch, weight=1.0) -> loss terms``: forward (``forward``, default the model: a DDP or
    compiled wrapper of it), loss, backward of ``weight`` x total, gradient clipping, optimizer step.

    The gradient norm is checked before the step: a NaN or inf loss raises :class:`NonFiniteLoss`
    and the weights stay as they were. Under DDP the norm is taken of the all-reduced gradient, the
    same on every rank, so every rank stops at the same step.

    A batch whose gradient is exactly zero (with ``label_fraction`` < 1, a batch with no labelled
    sample, for a variant without consistency terms) takes no optimizer step: ``step.counts``
    ({"taken", "skipped"}) counts both.
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
        if float(norm) == 0.0:
            # No gradient, no step. Adam would still move every weight on its momentum alone (and
            # advance its bias correction), so a baseline would train on batches it has nothing to
            # learn from, and more so the fewer labels it has. This rule is the same for every
            # variant: one with consistency terms has a gradient on an unlabelled batch and steps.
            counts["skipped"] += 1
            return terms
        optimizer.step()
        counts["taken"] += 1
        return terms

    counts = {"taken": 0, "skipped": 0}
    step.counts = counts
    return step



@dataclass
class RunState:
    """One run between its epochs: what :func:`setup_run` builds, :func:`train_epoch` advances and
    :func:`finish_run` reads. ``cfg`` holds the dataset's dims (``model_config_for``); ``save`` is
    False on every rank but 0 under torchrun."""

    cfg: Config
    dataset: MultimodalDataset
    dist: Dist
    device: torch.device
    save: bool
    run_dir: Path | None
    data: dict  # split name -> Tensors
    model: MulT
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    generator: torch.Generator  # the batch order: the same on every rank, one global order per epoch
    protocol: TrainingProtocol  # the missing modalities of training
    drop_generator: torch.Generator  # its masks, drawn per global batch (the seed alone decides them)
    step: object = None  # training_step's function; its .counts: optimizer steps taken and skipped
    history: list = field(default_factory=list)  # one row per epoch
    best: dict = field(default_factory=lambda: {"score": math.inf, "epoch": 0, "state": None})
    first_epoch: int | float = 1  # math.inf: a resumed run that had already stopped
    min_steps: int = 0
    stopped_by: str = "epochs"
    kept: int = 0  # the last epoch in last.pt: what a resume continues from
    started: float = 0.0


def train(
    cfg: Config,
    out_dir: str | Path | None = None,
    dataset: MultimodalDataset | None = None,
    save: bool = True,
    resume: bool = False,
    on_epoch=None,
) -> RunResult:
    """Train ``cfg`` and evaluate its best-on-validation checkpoint on test.

    ``out_dir`` defaults to ``runs/<dataset>-<variant>-seed<seed>-<time>``; ``save=False`` keeps
    everything in memory (tests). ``dataset`` skips loading ``cfg.data``. ``resume=True`` continues
    the run in ``out_dir`` from its last completed epoch (``last.pt``: weights, optimizer, scheduler
    and every RNG state), so it ends with exactly the metrics of a run that was never interrupted.
    ``on_epoch(epoch, row)`` (optional) is called after each epoch's files are written, with that
    epoch's history row (``valid_loss`` among it): a truthy return ends training after this epoch
    (the best epoch so far is evaluated), an exception it raises (a pruned search trial) propagates.
    An interrupt (Ctrl+C, a notebook's stop button) raises :class:`RunInterrupted`, whose one line
    says how to resume: the run folder holds every completed epoch (``last.pt``).

    ``cfg.progress`` ("auto": :mod:`mskt.console` says where a person watches) shows a bar over the
    epochs with the last train and validation loss.

    Under torchrun (``WORLD_SIZE`` > 1) this is DistributedDataParallel training: each rank takes
    its share of every global batch of ``batch_size``, validation and test predictions are gathered
    over the whole split, and only rank 0 writes the run folder.
    """
    state = setup_run(cfg, out_dir, dataset, save, resume)
    cfg = state.cfg
    epochs = progress_bar(_epochs(state.first_epoch, cfg, state.step.counts, state.min_steps), desc=cfg.variant, unit="epoch",
                          setting=cfg.progress if state.dist.is_main else "off", total=max(cfg.epochs - state.first_epoch + 1, 0))
    try:
        for epoch in epochs:
            row = train_epoch(state, epoch)
            # The task loss on both sides (the training total adds the consistency terms), then the selected epoch.
            train_loss = row.get("train_task", row["train_total"])
            epochs.set_postfix({"train": f"{train_loss:.4f}", "valid": f"{row['valid_loss']:.4f}", "best": state.best["epoch"]}, refresh=False)
            if _run_ends(state, epoch, row, on_epoch):
                break
    except KeyboardInterrupt:
        # Every completed epoch is in the run folder (last.pt is written atomically after each one),
        # so the interrupted epoch is the only thing lost; say how to get it back, in one line.
        done = state.kept if state.save else len(state.history)
        raise RunInterrupted(interrupted_message(state.run_dir if state.save else None, done, cfg.epochs)) from None
    finally:
        epochs.close()
    return finish_run(state)


def setup_run(cfg: Config, out_dir=None, dataset: MultimodalDataset | None = None, save: bool = True, resume: bool = False) -> RunState:
    """Everything before the first epoch (arguments as :func:`train`): the data, the process group
    and device, the run folder, the seeded model with its accelerators, the optimizer, and with
    ``resume`` every state of ``last.pt``."""
    cfg, dataset = _run_data(cfg, dataset)
    dist = Dist.from_env()
    device = resolve_device(cfg.device)
    dist.init(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    save = save and dist.is_main
    run_dir, checkpoint = _run_folder(cfg, dataset, out_dir, save, resume)
    set_seed(cfg.seed)
    data = _split_tensors(cfg, dataset, device)
    model = _prepared_model(cfg, dataset, data["train"], device)
    optimizer = make_optimizer(model, cfg)
    scheduler = None
    if cfg.scheduler == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", patience=20, factor=0.1)
    state = RunState(
        cfg=cfg, dataset=dataset, dist=dist, device=device, save=save, run_dir=run_dir, data=data, model=model,
        optimizer=optimizer, scheduler=scheduler, generator=torch.Generator().manual_seed(cfg.seed),
        protocol=training_protocol(cfg, model), drop_generator=training_generator(cfg.seed),
    )
    if state.protocol.active:
        log.info("%s: %s", cfg.variant, state.protocol.describe())
    if checkpoint is not None:
        _restore(state, checkpoint)
    state.step = training_step(model, optimizer, cfg, forward=dist.wrap(model))
    state.min_steps = _min_steps(cfg, len(data["train"]))
    if checkpoint is not None:
        state.step.counts.update(checkpoint.get("step_counts", {}))
        state.kept = checkpoint["epoch"]
        # A run that had already stopped early stays stopped when resumed.
        if cfg.max_steps and state.step.counts["taken"] >= cfg.max_steps:
            state.stopped_by, state.first_epoch = "max_steps", math.inf
        elif _patience_ends(cfg, checkpoint["epoch"], state.best["epoch"]):
            state.stopped_by, state.first_epoch = "patience", math.inf
    state.started = time.perf_counter()
    return state


def _run_data(cfg: Config, dataset: MultimodalDataset | None) -> tuple[Config, MultimodalDataset]:
    """The run's dataset (``cfg.data`` unless given) and ``cfg`` with its dims; all three splits must hold samples."""
    from mskt.data.readers import load_dataset

    if dataset is None:
        dataset = load_dataset(cfg.data, scale=cfg.data_scale, seed=cfg.data_seed, lazy=cfg.lazy, dataset=cfg.dataset)
    elif cfg.dataset not in ("auto", dataset_identity(dataset.meta.name)):  # the caller's data take the config's identity
        from mskt.data.identity import resolve_identity

        resolve_identity(dataset, cfg.dataset)
    cfg = model_config_for(cfg, dataset)
    empty = [s for s in ("train", "valid", "test") if len(dataset.splits[s]) == 0]
    if empty:
        raise DataError(f"{dataset.meta.source}: the {', '.join(empty)} split(s) have no samples; training needs all three")
    return cfg, dataset


def _run_folder(cfg: Config, dataset: MultimodalDataset, out_dir, save: bool, resume: bool) -> tuple[Path | None, dict | None]:
    """The run folder (None when neither saved nor resumed), made and given ``config.json`` when
    ``save``; and ``last.pt``'s contents when resuming a run that has one (none: it stopped in its
    first epoch)."""
    from mskt.paths import runs_dir

    run_dir = checkpoint = None
    if save or resume:
        run_dir = Path(out_dir) if out_dir is not None else runs_dir() / default_run_name(cfg, dataset)
    if resume and (run_dir / "last.pt").exists():
        checkpoint = load_checkpoint(run_dir / "last.pt")
    if save:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")
    return run_dir, checkpoint


def _split_tensors(cfg: Config, dataset: MultimodalDataset, device: torch.device) -> dict:
    """{split: Tensors} on ``device``; with ``label_fraction`` < 1 the training labels outside the
    seeded labelled subset are hidden (they train on consistency terms only: ``mskt.data.labels``)."""
    data = {s: Tensors.from_split(sp, cfg.task, device, lazy=cfg.lazy) for s, sp in dataset.splits.items()}
    if cfg.label_fraction < 1:
        from mskt.data.labels import hide_labels, labelled_subset

        keep = labelled_subset(dataset.splits["train"].labels, cfg.label_fraction, cfg.seed)
        data["train"].labels = hide_labels(data["train"].labels, keep)
    return data


def _prepared_model(cfg: Config, dataset: MultimodalDataset, train_data: Tensors, device: torch.device) -> MulT:
    """The variant's model on ``device``, with the teacher and training statistics it asks for, and
    the compiled kernels where verified (``cpu_kernels="fused"``)."""
    model = build_model(cfg).to(device)
    if model.uses_teacher(cfg):
        check_teacher(cfg, cfg.teacher_run, dataset)  # the teacher saw exactly the data and labels this run sees
        load_teacher_audio_encoder(model, cfg.teacher_run)
    for m in model.standardises():  # its consistency targets, standardised per feature
        model.set_statistics(m, *feature_statistics(train_data, m))
    if cfg.cpu_kernels == "fused":
        accelerate(model)
    return model


def _restore(state: RunState, checkpoint: dict) -> None:
    """Put ``last.pt``'s weights, optimizer, scheduler, every RNG, history and best epoch into ``state``."""
    state.model.load_state_dict(checkpoint["model"])
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    if state.scheduler is not None:
        state.scheduler.load_state_dict(checkpoint["scheduler"])
    _restore_rng(checkpoint, state.generator)
    if "missing_generator" in checkpoint:
        state.drop_generator.set_state(checkpoint["missing_generator"])
    state.history = json.loads(checkpoint["history"])
    state.best = {"score": checkpoint["best_score"], "epoch": checkpoint["best_epoch"], "state": checkpoint["best_state"]}
    state.first_epoch = checkpoint["epoch"] + 1
    log.info("resuming %s after epoch %d of %d", state.run_dir, checkpoint["epoch"], state.cfg.epochs)


def train_epoch(state: RunState, epoch: int) -> dict:
    """Train one epoch, validate, keep the best weights, write the run folder's files; return the
    epoch's history row."""
    import pandas as pd

    cfg, model, step = state.cfg, state.model, state.step
    model.train()
    t0 = time.perf_counter()
    sums = state.dist.sum(_train_batches(state, epoch))
    train_seconds = time.perf_counter() - t0
    valid = validation_metrics(model, state.data["valid"], cfg, state.dist)  # under cfg.select_missing
    if state.scheduler is not None:
        state.scheduler.step(valid["loss"])
    row = {"epoch": epoch, **{f"train_{k}": v / sums["n"] for k, v in sums.items() if k != "n"}}
    row.update({f"valid_{k}": float(v) for k, v in valid.items()})
    row.update(lr=state.optimizer.param_groups[0]["lr"], train_samples_per_s=sums["n"] / train_seconds, optimizer_steps=step.counts["taken"])
    score = selection_score(valid, cfg.task, cfg.select_on)
    row["selected"] = bool(score < state.best["score"])
    state.history.append(row)
    if score < state.best["score"]:
        state.best = {"score": score, "epoch": epoch, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        if state.save:
            atomic_torch_save({"model": state.best["state"], "config": cfg.to_dict(), "epoch": epoch}, state.run_dir / "checkpoint.pt")
    if state.save:
        atomic_write_text(state.run_dir / "history.csv", pd.DataFrame(state.history).to_csv(index=False))
        atomic_torch_save(_training_state(model, state.optimizer, state.scheduler, state.generator, epoch, state.history, state.best,
                                          state.drop_generator, step.counts), state.run_dir / "last.pt")
        state.kept = epoch
    return row


def _train_batches(state: RunState, epoch: int) -> dict:
    """One pass over this rank's share of the training batches: {"n": samples, term: sum of term x
    samples}. At ``max_steps`` optimizer steps the epoch ends early (``state.stopped_by``)."""
    cfg, dist, train_data, step = state.cfg, state.dist, state.data["train"], state.step
    train_steps = {m: x.shape[1] for m, x in train_data.features.items()}
    sums = {}
    for index in train_data.batch_indices(cfg.batch_size, state.generator):
        drops = state.protocol.draw(len(index), train_steps, state.drop_generator)  # {} when it removes nothing
        rows, weight = weighted_share(torch.arange(len(index)), dist)  # this rank's part of the global batch
        index = index[rows.to(index.device)]  # (b,)
        set_step_keys(state.model, cfg.seed, epoch, index, dist, weight)  # dropout keys (seed, epoch, dataset index), loss shares
        batch = {**train_data.batch(index), **select_drops(drops, rows, state.device)}
        try:
            terms = step(batch, weight)
        except NonFiniteLoss as e:
            where = state.run_dir / "checkpoint.pt" if state.run_dir else "not saved"
            raise MsktError(f"epoch {epoch}: {e}; the last good checkpoint is {where}") from None
        n = len(index) * (weight > 0)
        sums["n"] = sums.get("n", 0.0) + n
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * n
        if cfg.max_steps and step.counts["taken"] >= cfg.max_steps:  # this epoch ends here, validated as any other
            state.stopped_by = "max_steps"
            break
    return sums


def _run_ends(state: RunState, epoch: int, row: dict, on_epoch) -> bool:
    """Whether training ends after ``epoch`` (``on_epoch``'s say, ``max_steps``, patience), with
    why in ``state.stopped_by`` and in one log line."""
    cfg = state.cfg
    if on_epoch is not None and on_epoch(epoch, dict(row)):
        log.info("stopped after epoch %d of %d (on_epoch)", epoch, cfg.epochs)
        state.stopped_by = "on_epoch"
        return True
    if state.stopped_by == "max_steps":
        log.info("stopped in epoch %d: max_steps=%d optimizer steps taken", epoch, cfg.max_steps)
        return True
    if _patience_ends(cfg, epoch, state.best["epoch"]):
        log.info("stopped after epoch %d: no better validation score for %d epochs (patience)", epoch, cfg.patience)
        state.stopped_by = "patience"
        return True
    return False


def finish_run(state: RunState) -> RunResult:
    """The best epoch's weights evaluated on test, ``metrics.json`` written when saving; the run's result."""
    import pandas as pd

    cfg, dataset, dist, history, best = state.cfg, state.dataset, state.dist, state.history, state.best
    state.model.load_state_dict(best["state"])
    test = evaluate(state.model, state.data["test"], cfg.eval_batch_size, dist)
    metrics = {
        "test": test,
        "valid": {k.removeprefix("valid_"): v for k, v in history[best["epoch"] - 1].items() if k.startswith("valid_")},
        "best_epoch": best["epoch"],
        "epochs": cfg.epochs,
        **convergence(history, best["epoch"], state.stopped_by, cfg.patience),
        "optimizer_steps": state.step.counts["taken"],
        "skipped_steps": state.step.counts["skipped"],  # batches with no gradient (no labelled sample): no step
        "select_missing": cfg.select_missing,  # the validation protocol that selected best_epoch
        "select_on": cfg.select_on,
        "variant": cfg.variant,
        "data": dataset.meta.source,
        "dataset": dataset.meta.name,
        "aligned": dataset.meta.aligned,
        "seed": cfg.seed,
        "seconds": time.perf_counter() - state.started,
        "world_size": dist.world,
        "distributed_backend": dist.backend,  # "nccl" / "gloo" under torchrun, else None
    }
    if state.save:
        atomic_write_text(state.run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return RunResult(dir=state.run_dir, config=cfg, history=pd.DataFrame(history), metrics=metrics, model=state.model)



# A run that did not stop by patience has converged when its best validation epoch lies at least
# this many epochs before its last one (or `patience` epochs, when set).
CONVERGED_WINDOW = 5


def convergence(history: list, best_epoch: int, stopped_by: str, patience: int = 0) -> dict:
    """{"converged", "stopped_by", "epochs_run"}: converged when patience stopped the run, or when the
    best epoch is not among the last ``patience or CONVERGED_WINDOW`` epochs (the validation score
    had stopped improving before training ended); otherwise it may still have been improving."""
    last = history[-1]["epoch"] if history else 0
    window = patience or CONVERGED_WINDOW
    return {"converged": bool(stopped_by == "patience" or last - best_epoch >= window), "stopped_by": stopped_by, "epochs_run": last}


def _patience_ends(cfg: Config, epoch: int, best_epoch: int) -> bool:
    """Whether patience ends the run after ``epoch``: ``cfg.patience`` epochs without a better
    validation score, once ``cfg.min_epochs`` epochs have run."""
    return bool(cfg.patience) and epoch >= cfg.min_epochs and epoch - best_epoch >= cfg.patience


def _min_steps(cfg: Config, n_train: int) -> int:
    """The optimizer steps a run must take before it may end: ``min_steps``, and with
    ``steps_like_full_labels`` and label_fraction < 1, what the same run with every label takes
    (epochs x batches per epoch: there every batch has a gradient, so none is skipped)."""
    steps = cfg.min_steps
    if cfg.steps_like_full_labels and cfg.label_fraction < 1:
        steps = max(steps, cfg.epochs * math.ceil(n_train / cfg.batch_size))
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def _epochs(first: int, cfg: Config, counts: dict, min_steps: int):
    """Epoch numbers from ``first``: up to ``cfg.epochs``, then on while fewer than ``min_steps``
    optimizer steps were taken (not past an epoch that took none: nothing more would come)."""
    if first == math.inf:  # stopped early before a resume: nothing more
        return
    epoch = first
    while epoch <= cfg.epochs:
        yield epoch
        epoch += 1
    while counts["taken"] < min_steps:
        before = counts["taken"]
        yield epoch
        epoch += 1
        if counts["taken"] == before:
            log.warning("epoch %d took no optimizer step; stopping at %d of min_steps=%d", epoch - 1, before, min_steps)
            return


def resume(run_dir, dataset: MultimodalDataset | None = None, on_epoch=None) -> RunResult:
    """Continue the run in ``run_dir`` from its last completed epoch (``mskt train --resume DIR``);
    ``on_epoch`` as in :func:`train` (a notebook's live curve)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise MsktError(f"{run_dir}: not a run folder (no config.json), nothing to resume")
    return train(Config.load(run_dir / "config.json"), out_dir=run_dir, dataset=dataset, resume=True, on_epoch=on_epoch)



def describe(metrics: dict) -> str:
    return format_metrics({k: v for k, v in metrics.items() if k != "loss"})
