"""Which dataset a loaded file holds: the paper rows it is compared with and its label range.

A file's identity comes from its name or content (the reader sets ``meta.name``: a MulT file
name, the dims of an MMSA file, a store's attribute, a synthetic preset), or from an explicit
``--dataset mosi|mosei|iemocap|sims|other`` that overrides it. Feature dims are not part of the
identity: extractors vary (GloVe 300 or BERT 768 text, COVAREP 5 or 74, Facet 20/35/47,
OpenFace, librosa, wav2vec), the model reads its dims from the data, and the load report names
the dims found beside the usual release's.
"""

from __future__ import annotations

import logging

import numpy as np

from mskt.data.dataset import MultimodalDataset, check_label_range
from mskt.data.presets import DATASET_TASKS, DATASETS, REFERENCE_DIMS, dataset_identity, label_range
from mskt.errors import DataError
from mskt.modalities import MODALITIES

log = logging.getLogger("mskt")

DATASET_CHOICES = ("auto", *DATASETS)


def check_choice(dataset: str) -> str:
    """``dataset`` if it is one of ``DATASET_CHOICES``; DataError otherwise."""
    if dataset not in DATASET_CHOICES:
        raise DataError(f"dataset={dataset!r} is not allowed; choose one of {', '.join(DATASET_CHOICES)}")
    return dataset


def resolve_identity(ds: MultimodalDataset, dataset: str = "auto") -> MultimodalDataset:
    """Give ``ds`` the identity ``dataset`` ("auto": the one its reader found) and check that its
    task and labels fit it; report a real file's identity and feature dims in one info line.

    Returns ``ds`` (its ``meta.name`` set to the identity, or left as the user's own name for an
    unknown dataset). DataError if the task or the label range does not fit an explicit identity.
    """
    check_choice(dataset)
    src = ds.meta.source
    if dataset != "auto" and dataset != dataset_identity(ds.meta.name):
        expected = DATASET_TASKS.get(dataset)
        if expected is not None and expected != ds.meta.task:
            raise DataError(f"{src}: --dataset {dataset} holds {expected} labels, but the file holds {ds.meta.task} labels")
        ds.meta.name = dataset
        if ds.meta.task == "regression":
            for s, sp in ds.splits.items():
                check_label_range(ds, s, np.asarray(sp.labels))
    if ds.meta.format != "synthetic":
        log.info(describe_identity(ds, given=dataset != "auto"))
    return ds


def describe_identity(ds: MultimodalDataset, given: bool = False) -> str:
    """One line: the dataset's identity and where it came from, its task (and label range), the
    feature dims found and, where they differ, the usual release's."""
    identity = dataset_identity(ds.meta.name)
    origin = "as given" if given else "from the file"  # given: --dataset, or the run's own identity (mskt evaluate)
    if ds.meta.task == "regression":
        lo, hi = label_range(ds.meta.name)
        task = f"sentiment in [{lo:g}, {hi:g}]"
    else:
        task = "4 emotions"
    dims = ds.dims
    found = ", ".join(f"{m} {dims[m]}" for m in MODALITIES)
    line = f"{ds.meta.source}: dataset {identity} ({origin}), {task}; feature dims {found}"
    reference = REFERENCE_DIMS.get(identity)
    if identity == "other":
        line += " (not a dataset of the paper: no paper rows)"
    elif reference != dims:
        usual = ", ".join(f"{m} {reference[m]}" for m in MODALITIES)
        release = "MMSA's CH-SIMS" if identity == "sims" else f"the paper's {identity.upper()} files"
        line += f" (differ from {release}: {usual}; the model takes its dims from the data)"
    return line
