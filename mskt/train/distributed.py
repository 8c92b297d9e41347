"""DistributedDataParallel under torchrun: one process per device, PyTorch's own engine.

``torchrun --nproc_per_node N -m mskt train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*;
:class:`Dist` reads them, starts the process group (nccl on CUDA, gloo on CPU) and offers the three
collectives training needs. Without torchrun it is a world of one and every method is a no-op, so
the training loop has one code path. Under torchrun even one process (``--nproc_per_node 1``) runs
the process group and DDP: a machine with one GPU exercises the path that several GPUs take, and a
world of one computes what plain training computes (DDP averages each gradient over one rank).

How a global batch is shared: every rank draws the same permutation (same seed), cuts the same
global batch of ``batch_size`` samples and takes its own contiguous part. DDP averages gradients
over ranks, so each rank's loss is weighted by its share (``weighted_share``); the update is then
that of the whole global batch, as in single-process training, even when the last batch does not
divide evenly. Loss means over something other than samples (kt's consistency terms: real steps;
labelled samples under ``label_fraction``) divide by the global batch's count, scaled to the rank's
share (``shared_count``), so they too give the global batch's gradient.

Dropout masks are keyed by each row's dataset index (``set_step_keys``), not by its place in a
rank's part of the batch, so a sample gets the same masks at any world size: torchrun at any world
size trains what one process trains, to float rounding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mskt.model.layers import DropoutContext, set_dropout_context


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun: a process group runs even for a world of one

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        launched = all(k in os.environ for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"))  # torchrun's: enough for env://
        if world <= 1 and not launched:
            return cls()
        return cls(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")), launched=launched)

    @property
    def active(self) -> bool:
        """Whether collectives run: several ranks, or one that torchrun started."""
        return self.world > 1 or self.launched

    @property
    def backend(self) -> str | None:
        """The process group's backend ("nccl", "gloo") once started, else None."""
        return torch.distributed.get_backend() if self.active and torch.distributed.is_initialized() else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        """Start the process group once per process (nccl for CUDA devices, gloo otherwise)."""
        if not self.active or torch.distributed.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to call in training: DDP around ``model`` when collectives run (:attr:`active`)."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    def sum(self, values: dict) -> dict:
        """``{key: float}`` summed over ranks (same keys on every rank)."""
        if not self.active:
            return values
        keys = sorted(values)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else "cpu"
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's CPU ``tensor`` (first dims may differ), in rank order, on every rank."""
        if not self.active:
            return [tensor]
        parts = [None] * self.world
        torch.distributed.all_gather_object(parts, tensor.cpu())
        return parts


def weighted_share(index: torch.Tensor, dist: Dist) -> tuple[torch.Tensor, float]:
    """This rank's part of a global batch ``index`` and the weight of its mean loss.

    DDP divides the summed gradient by the world size; weighting each rank's mean loss by
    ``world * n_rank / n_global`` makes the result the gradient of the global batch's mean loss. A
    rank left without samples (a last batch smaller than the world) runs one sample at weight 0,
    because every rank must take part in every gradient all-reduce.
    """
    if dist.world == 1:
        return index, 1.0
    part = index.tensor_split(dist.world)[dist.rank]
    if len(part) == 0:
        return index[:1], 0.0
    return part, dist.world * len(part) / len(index)


def shared_count(dist: Dist, weight: float):
    """``count -> denominator`` for a rank's loss means in one step (``mskt.model.losses``): the
    count summed over ranks (the global batch's), times this rank's share of its samples
    (``weight / world``). DDP then averages ``weight * sum_r / denominator`` over ranks into
    ``sum over ranks / global count``: the global mean. One all-reduce per loss term; a rank at
    weight 0 takes part with a count of 0 and divides by its own count (its loss counts for nothing)."""

    def denominator(count: torch.Tensor) -> torch.Tensor:
        total = count.detach().to(torch.float64) * float(weight > 0)
        torch.distributed.all_reduce(total)
        if weight == 0:
            return count.clamp(min=1)
        return (total.clamp(min=1) * (weight / dist.world)).to(torch.float32)

    return denominator


def set_step_keys(model: torch.nn.Module, seed: int, epoch: int, index: torch.Tensor, dist: Dist, weight: float) -> None:
    """Before each training step: what its dropout masks are keyed by (the run's seed, the epoch and
    each row's dataset index ``index``: each sample is drawn once per epoch, so (epoch, index) names
    each draw once, the same at any world size and batch composition), and, with several ranks, how
    its loss means share their denominators (:func:`shared_count`)."""
    device = next(model.parameters()).device
    set_dropout_context(model, DropoutContext(seed, epoch, index.to(device), shared_count(dist, weight) if dist.world > 1 else None))
