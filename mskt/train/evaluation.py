"""Evaluation: predictions and metrics of a split, under the missing-modality protocols."""

from __future__ import annotations

import torch

from mskt.data.batching import Tensors
from mskt.metrics import compute_metrics
from mskt.modalities import MODALITIES
from mskt.model import MulT


@torch.inference_mode()
def predict(model: MulT, data: Tensors, batch_size: int = 256, return_internals: bool = False, missing=None,
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


def default_test_batch(model: MulT, batch: dict) -> dict:
    """``batch`` as the default (the paper's) test protocol gives it to ``model``: its
    ``test_missing`` modalities marked missing where it reads them, left out where it does not."""
    absent = model.test_missing
    if any(m in model.inputs for m in absent):
        B = batch["labels"].shape[0]
        missing = torch.tensor([m in absent for m in MODALITIES], device=batch["labels"].device).expand(B, -1)  # (B, 3)
        return {**batch, "missing": missing}
    return {**batch, **{m: None for m in absent}}


def _missing_batches(model, data: Tensors, batch_size, missing, rate, mode, seed, rank=0, world=1, default_protocol=True):
    """The batches of this rank's part of ``data``, in order, with what the protocol removes.

    Masks are built once for the whole split (``mskt.data.missing.evaluation_masks``), so they do not
    depend on batch size or the number of ranks. No protocol asked (``missing`` None, rate 0) and
    ``default_protocol``: the model's ``test_missing`` modalities (audio, but for ``full``) are
    missing: a model that reads them gets them marked missing (and may reconstruct them), the others
    do not get them at all.
    """
    from mskt.data.missing import evaluation_masks

    masks = evaluation_masks(len(data), {m: x.shape[1] for m, x in data.features.items()}, missing, rate, mode, seed)
    mine = data.shard_index(rank, world).cpu()  # rows of the whole split, for its masks
    part = data.shard(rank, world)
    for index in part.batch_indices(batch_size):
        batch = part.batch(index)
        if masks is not None:
            batch = masks.apply(batch, mine[index.cpu()])
        elif default_protocol:
            batch = default_test_batch(model, batch)
        yield batch


@torch.inference_mode()
def evaluate(model: MulT, data: Tensors, batch_size: int = 256, dist=None, missing=None, missing_rate: float = 0.0,
             missing_mode: str = "sample", missing_seed: int = 0) -> dict:
    """Metrics (mskt.metrics names) and the mean task loss on a split.

    By default (the paper's test setting) the model's ``test_missing`` modalities are missing (audio,
    for every variant but ``full``) and every other modality present: kt never gets audio; a variant
    that reads audio (kt_any) gets it marked missing for every sample and reconstructs it.

    Missing modalities (``mskt.data.missing``): ``missing`` names modalities missing for every sample
    ("audio,vision" or a tuple; ``()`` = nothing missing); ``missing_rate`` r makes each other
    modality of each sample missing with probability r (``missing_mode="sample"``; exactly that
    share of the slots, never all of a sample's) or zeroes each of its time steps with probability r
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
    if dist is not None and dist.active:  # a torchrun world of one gathers too: the path of several ranks
        pred = torch.cat(dist.gather(pred))  # rank order = split order: the parts are contiguous
    labels = data.labels.cpu()
    metrics = compute_metrics(model.cfg.task, pred.numpy(), labels.numpy(), getattr(model.cfg, "dataset", "auto"))  # a bare ModelConfig has no identity
    metrics["loss"] = float(task_loss(pred, labels, model.cfg.task))
    return metrics


def selection_score(metrics: dict, task: str, select_on: str) -> float:
    """Lower is better."""
    if select_on == "valid_loss":
        return metrics["loss"]
    return metrics["mae"] if task == "regression" else -metrics["mean_f1"]


def validation_metrics(model: MulT, data: Tensors, cfg, dist=None) -> dict:
    """Validation metrics under the run's selection protocol ``cfg.select_missing``: the model's own
    test protocol ("default"), nothing missing ("none"), one fixed condition ("audio,vision"), or
    the mean of each metric over the six fixed conditions ("conditions"). Checkpoint selection,
    patience, the scheduler and a search's pruner all read these, so variants compared with each
    other are selected alike when they share ``select_missing``."""
    from mskt.data.missing import CONDITIONS

    protocol = cfg.select_missing
    if protocol == "default":
        return evaluate(model, data, cfg.eval_batch_size, dist)
    if protocol != "conditions":
        return evaluate(model, data, cfg.eval_batch_size, dist, missing=() if protocol == "none" else protocol)
    each = [evaluate(model, data, cfg.eval_batch_size, dist, missing=c) for c in CONDITIONS]
    return {k: sum(float(m[k]) for m in each) / len(each) for k in each[0]}
