"""One in-memory dataset structure for every file format, and the checks every reader runs.

Conventions every reader normalises to, so the model and the notebooks never special-case a format:

- ``features[m]`` is a float32 array (N, T_m, D_m) for m in text / audio / vision.
- Padding is on the **left** (MulT's convention): a sample of true length L occupies the last L
  steps, so "the last time step" is always real. Readers of right-padded formats (MMSA) shift.
- ``lengths[m]`` is an int64 array (N,) of true (unpadded) lengths.
- ``labels`` is float32 (N,) sentiment in the dataset's range for regression ([-3, 3] for MOSI and
  MOSEI, [-1, 1] for SIMS: ``mskt.data.presets.label_range``), or int64 (N, 4) with 0/1 per
  emotion in the order neutral, happy, sad, angry for IEMOCAP.
- ``ids`` is a str array (N,).

Arrays may also be lazy (h5py datasets from the feature store): anything with ``shape`` and numpy
indexing works; ``Split.load()`` reads it into memory.
"""

from __future__ import annotations

import contextvars
import logging
from dataclasses import dataclass, field

import numpy as np

from mskt.console import note
from mskt.errors import DataError
from mskt.data.presets import DATASET_TASKS, EMOTIONS, MODALITIES, SPLITS, DataShape, dataset_identity, label_range

log = logging.getLogger("mskt")


@dataclass
class Split:
    features: dict  # modality -> (N, T, D) float32
    lengths: dict  # modality -> (N,) int64
    labels: np.ndarray  # (N,) float32 or (N, 4) int64
    ids: np.ndarray  # (N,) str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def text(self):
        return self.features["text"]

    @property
    def audio(self):
        return self.features["audio"]

    @property
    def vision(self):
        return self.features["vision"]

    def load(self) -> "Split":
        """A copy with every array read into memory (a no-op copy for in-memory splits)."""
        return Split(  # np.asarray reads an h5py dataset whole, and leaves numpy arrays as they are
            features={m: np.asarray(x) for m, x in self.features.items()},
            lengths={m: np.asarray(x) for m, x in self.lengths.items()},
            labels=np.asarray(self.labels),
            ids=np.asarray(self.ids),
        )

    def subset(self, index) -> "Split":
        """Rows ``index`` (a sorted int array or a slice), read into memory."""
        return Split(
            features={m: np.asarray(x[index]) for m, x in self.features.items()},
            lengths={m: np.asarray(x[index]) for m, x in self.lengths.items()},
            labels=np.asarray(self.labels[index]),
            ids=np.asarray(self.ids[index]),
        )


@dataclass
class DatasetMeta:
    name: str  # "mosi", "mosei", "iemocap", or a user's name
    task: str  # "regression" or "emotions"
    aligned: bool
    source: str  # the file it came from, or "synthetic:<preset>"
    format: str  # "mult-pickle", "mmsa-pickle", "csd", "mskt-h5", "synthetic"
    feature_names: dict = field(default_factory=dict)  # modality -> list of names, where known
    nonfinite: dict = field(default_factory=dict)  # "split/modality" -> count replaced by 0
    extra: dict = field(default_factory=dict)  # provenance a reader wants to keep (JSON-able)


@dataclass
class MultimodalDataset:
    splits: dict  # "train" / "valid" / "test" -> Split
    meta: DatasetMeta
    resources: list = field(default_factory=list, repr=False)  # open files behind lazy arrays

    def close(self) -> None:
        for r in self.resources:
            r.close()
        self.resources.clear()

    def __getitem__(self, split: str) -> Split:
        return self.splits[split]

    @property
    def dims(self) -> dict:
        return {m: int(self.splits["train"].features[m].shape[2]) for m in MODALITIES}

    @property
    def seq_lens(self) -> dict:
        return {m: int(self.splits["train"].features[m].shape[1]) for m in MODALITIES}

    @property
    def n_outputs(self) -> int:
        return 1 if self.meta.task == "regression" else len(EMOTIONS)

    def summary(self):
        """A pandas DataFrame: one row per split and modality, with shapes, lengths and labels."""
        import pandas as pd

        rows = []
        for s, sp in self.splits.items():
            labels = np.asarray(sp.labels)
            for m in MODALITIES:
                x = sp.features[m]
                ln = np.asarray(sp.lengths[m])
                rows.append(
                    {
                        "split": s,
                        "modality": m,
                        "n": len(sp),
                        "steps": x.shape[1],
                        "dim": x.shape[2],
                        "len_min": int(ln.min()) if len(ln) else 0,
                        "len_mean": float(ln.mean()) if len(ln) else 0.0,
                        "len_max": int(ln.max()) if len(ln) else 0,
                        "nonfinite_replaced": self.meta.nonfinite.get(f"{s}/{m}", 0),
                        "label_mean": float(labels.mean()) if labels.size else float("nan"),
                        "label_std": float(labels.std()) if labels.size else float("nan"),
                    }
                )
        return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Helpers readers share


def lengths_from_left_padding(x: np.ndarray) -> np.ndarray:
    """True lengths of left-zero-padded sequences: steps after the leading all-zero rows. (N,)"""
    nonzero_step = np.any(x != 0, axis=2)  # (N, T)
    has_any = nonzero_step.any(axis=1)
    first = np.argmax(nonzero_step, axis=1)  # index of the first real step
    return np.where(has_any, x.shape[1] - first, 0).astype(np.int64)


def right_to_left_padding(x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Move each sample's first ``lengths[i]`` steps to the end (right-padded -> left-padded)."""
    out = np.zeros_like(x)
    T = x.shape[1]
    for i, n in enumerate(np.clip(lengths, 0, T)):
        if n:
            out[i, T - n :] = x[i, :n]
    return out


def replace_nonfinite(dataset: MultimodalDataset) -> str | None:
    """Set NaN/inf features to 0 (COVAREP audio has -inf), count them, return a one-line report."""
    counts = {}
    for s, sp in dataset.splits.items():
        for m in MODALITIES:
            x = sp.features[m]
            bad = ~np.isfinite(x)
            n = int(bad.sum())
            if n:
                x[bad] = 0.0
                counts[f"{s}/{m}"] = n
    dataset.meta.nonfinite.update(counts)
    if not counts:
        return None
    parts = ", ".join(f"{k}: {v}" for k, v in counts.items())
    line = f"{dataset.meta.source}: replaced non-finite feature values by 0 ({parts})"
    note(log, line)  # expected (COVAREP audio has -inf; the public code does the same): a note, not a warning
    return line


# The identity ``load_dataset`` was given (``--dataset``) while a reader runs: the reader's own guess
# (a MulT file name, MMSA's dims) must not refuse labels that the given identity allows.
GIVEN_IDENTITY: contextvars.ContextVar[str] = contextvars.ContextVar("mskt_given_dataset", default="auto")


def check_label_range(dataset: MultimodalDataset, split: str, labels: np.ndarray) -> None:
    """Refuse sentiment outside the range of the dataset's identity ([-3, 3] MOSI/MOSEI, [-1, 1] SIMS):
    the one ``load_dataset`` was given, else the one its name says."""
    given = GIVEN_IDENTITY.get()
    fits = DATASET_TASKS.get(given, "regression") == "regression"  # a given emotions identity is refused by its task
    name = given if given != "auto" and fits else dataset.meta.name
    lo, hi = label_range(name)
    if labels.size and (labels.min() < lo - 1e-6 or labels.max() > hi + 1e-6):
        raise DataError(
            f"{dataset.meta.source}: split {split!r} key 'labels': expected sentiment in [{lo:g}, {hi:g}] for "
            f"{dataset_identity(name)}, found [{labels.min():.3f}, {labels.max():.3f}]"
            + ("; for labels in [-3, 3] give --dataset mosi, mosei or other" if hi < 3 and labels.min() >= -3 and labels.max() <= 3 else "")
        )


def validate(dataset: MultimodalDataset, shape: DataShape | None = None) -> None:
    """Check the dataset's internal consistency (and against a preset's dims); raise DataError.

    Every message names the file, split, key, what was expected and what was found. Refused: a
    missing split or modality, an empty *train* split, arrays that are not (N, T >= 1, D >= 1)
    float32, sample counts that disagree, a feature dim that differs between splits (or from the
    preset), lengths that are not integers in [0, T], non-numeric or non-finite labels, sentiment
    outside [-3, 3], emotions other than 0/1 (N, 4). Allowed: an empty valid or test split (word
    alignment can produce one; training needs samples and must refuse it there) and a sample of
    length 0 (all padding: the model's key mask keeps one padded step, so attention stays finite).
    """
    src = dataset.meta.source
    missing = [s for s in SPLITS if s not in dataset.splits]
    if missing:
        raise DataError(f"{src}: missing split(s) {missing}; expected {list(SPLITS)}")
    if dataset.meta.task not in ("regression", "emotions"):
        raise DataError(f"{src}: task must be 'regression' or 'emotions', found {dataset.meta.task!r}")
    ref_dims: dict = {}
    for s in SPLITS:
        sp = dataset.splits[s]
        label_shape = getattr(sp.labels, "shape", None)
        if label_shape is None or len(label_shape) == 0:
            raise DataError(f"{src}: split {s!r} key 'labels': expected an array with one row per sample, found {type(sp.labels).__name__} of shape {label_shape}")
        n = int(label_shape[0])
        if n == 0 and s == "train":
            raise DataError(f"{src}: split 'train' has 0 samples; expected at least one to train on")
        for m in MODALITIES:
            if m not in sp.features:
                raise DataError(f"{src}: split {s!r} has no key {m!r}")
            x = sp.features[m]
            if len(x.shape) != 3:
                raise DataError(f"{src}: split {s!r} key {m!r}: expected a 3-D array (N, T, D), found shape {tuple(x.shape)}")
            if x.shape[0] != n:
                raise DataError(f"{src}: split {s!r} key {m!r}: expected N={n} samples (as labels), found {x.shape[0]}")
            if x.dtype != np.float32:
                raise DataError(f"{src}: split {s!r} key {m!r}: expected float32, found {x.dtype}")
            if x.shape[1] < 1 or x.shape[2] < 1:
                raise DataError(
                    f"{src}: split {s!r} key {m!r}: expected at least one time step and one feature (N, T, D), found shape {tuple(x.shape)}"
                )
            d = int(x.shape[2])
            if m in ref_dims and ref_dims[m][1] != d:
                raise DataError(
                    f"{src}: split {s!r} key {m!r}: feature dim {d} disagrees with split {ref_dims[m][0]!r} ({ref_dims[m][1]})"
                )
            ref_dims.setdefault(m, (s, d))
            if shape is not None and shape.dims[m] != d:
                raise DataError(
                    f"{src}: split {s!r} key {m!r}: expected feature dim {shape.dims[m]} for {shape.name}, found {d}"
                )
            ln = sp.lengths.get(m)
            if ln is None or tuple(ln.shape) != (n,):
                found = None if ln is None else tuple(ln.shape)
                raise DataError(f"{src}: split {s!r} lengths of {m!r}: expected shape ({n},), found {found}")
            ln = np.asarray(ln)
            if ln.dtype.kind not in "iu":
                raise DataError(f"{src}: split {s!r} lengths of {m!r}: expected integers, found dtype {ln.dtype}")
            if ln.size and (ln.min() < 0 or ln.max() > x.shape[1]):
                raise DataError(
                    f"{src}: split {s!r} lengths of {m!r}: expected values in [0, {x.shape[1]}], found [{ln.min()}, {ln.max()}]"
                )
        if tuple(np.shape(sp.ids)) != (n,):
            raise DataError(f"{src}: split {s!r} key 'ids': expected shape ({n},), found {tuple(np.shape(sp.ids))}")
        labels = np.asarray(sp.labels)
        if labels.dtype.kind not in "biuf":
            raise DataError(f"{src}: split {s!r} key 'labels': expected numbers, found dtype {labels.dtype}")
        if dataset.meta.task == "regression":
            if labels.shape != (n,):
                raise DataError(f"{src}: split {s!r} key 'labels': expected shape ({n},) for regression, found {labels.shape}")
            if not np.all(np.isfinite(labels)):
                raise DataError(f"{src}: split {s!r} key 'labels': {int((~np.isfinite(labels)).sum())} non-finite labels")
            check_label_range(dataset, s, labels)
        else:
            if labels.shape != (n, len(EMOTIONS)):
                raise DataError(f"{src}: split {s!r} key 'labels': expected shape ({n}, 4) for emotions, found {labels.shape}")
            if labels.size and not np.isin(labels, (0, 1)).all():
                raise DataError(f"{src}: split {s!r} key 'labels': expected 0/1 per emotion, found other values")
