"""A split as tensors on a device, and its batches: index selections, no per-sample Python."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mskt.data.dataset import Split
from mskt.data.presets import MODALITIES
from mskt.errors import DataError


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
