"""Readers for the pickles users bring (MulT, MMSA), a restricted unpickler, and ``load_dataset``.

Pickles come from the internet and a pickle can run arbitrary code while loading, so every pickle
goes through ``safe_load_pickle``: it admits only plain containers and numpy's array
reconstruction, and refuses any other global *before* it is called.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import numpy as np

from mskt.dataset import (
    DatasetMeta,
    MultimodalDataset,
    Split,
    lengths_from_left_padding,
    replace_nonfinite,
    right_to_left_padding,
    validate,
)
from mskt.errors import DataError
from mskt.presets import EMOTIONS, MODALITIES, SPLITS, data_shape

# ----------------------------------------------------------------------------------------------
# Restricted unpickling

# Every global that pickled numpy arrays, numpy scalars and plain containers refer to; numpy 2
# renamed numpy.core to numpy._core, and files written by either name must load.
_SAFE_GLOBALS = {
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
    ("builtins", "complex"),
    ("builtins", "slice"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # how protocol-2 pickles store bytes
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        # latin1 lets numpy arrays pickled under Python 2 load (the encoding numpy documents).
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module, name):
        if (module, name) not in _SAFE_GLOBALS:
            raise DataError(
                f"{self.source}: refused to unpickle the global '{module}.{name}': only plain containers "
                "and numpy arrays are allowed (a pickle can run code while it loads)"
            )
        if module.startswith("numpy.core") and int(np.__version__.split(".")[0]) >= 2:
            module = module.replace("numpy.core", "numpy._core", 1)
        return super().find_class(module, name)


def safe_load_pickle(path) -> object:
    """Unpickle ``path`` admitting only containers and numpy arrays; DataError otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if not data:
        raise DataError(f"{path}: the file is empty")
    try:
        return _RestrictedUnpickler(io.BytesIO(data), str(path)).load()
    except DataError:
        raise
    except Exception as e:  # truncated, corrupt or not a pickle at all
        raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------
# MulT pickles: mosi_data.pkl, mosi_data_noalign.pkl, mosei_senti_data(_noalign).pkl, iemocap_data(_noalign).pkl

MULT_FILES = {
    "mosi_data.pkl": ("mosi", True),
    "mosi_data_noalign.pkl": ("mosi", False),
    "mosei_senti_data.pkl": ("mosei", True),
    "mosei_senti_data_noalign.pkl": ("mosei", False),
    "iemocap_data.pkl": ("iemocap", True),
    "iemocap_data_noalign.pkl": ("iemocap", False),
}


def _split_dict(obj, path, required) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict of splits {list(SPLITS)}, found {type(obj).__name__}")
    out = {}
    for s in SPLITS:
        if s not in obj:
            raise DataError(f"{path}: missing split {s!r}; found keys {sorted(map(str, obj))}")
        sp = obj[s]
        if not isinstance(sp, dict):
            raise DataError(f"{path}: split {s!r}: expected a dict, found {type(sp).__name__}")
        for k in required:
            if k not in sp:
                raise DataError(f"{path}: split {s!r} has no key {k!r}; found {sorted(map(str, sp))}")
        out[s] = sp
    return out


def _features(sp, key, path, split) -> np.ndarray:
    x = sp[key]
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "fiu":
        raise DataError(f"{path}: split {split!r} key {key!r}: expected a numeric array, found {type(x).__name__}")
    if x.ndim != 3:
        raise DataError(f"{path}: split {split!r} key {key!r}: expected a 3-D array (N, T, D), found shape {x.shape}")
    return np.array(x, dtype=np.float32)  # a copy: replacing -inf must not touch the caller's object


def _numeric(sp, key, path, split) -> np.ndarray:
    """``sp[key]`` as a numeric array of at least one dimension; DataError otherwise."""
    x = np.asarray(sp[key])
    if x.ndim == 0 or x.dtype.kind not in "fiub":
        raise DataError(
            f"{path}: split {split!r} key {key!r}: expected a numeric array, found {type(sp[key]).__name__} of dtype {x.dtype} and shape {x.shape}"
        )
    return x


def _as_str(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _ids(raw, n, split) -> np.ndarray:
    if raw is None:
        return np.array([f"{split}_{i}" for i in range(n)])
    raw = np.asarray(raw)
    if raw.ndim == 2:  # MOSI: (video, start, end) per sample
        return np.array(["_".join(_as_str(v) for v in row) for row in raw])
    return np.array([_as_str(v) for v in raw.reshape(len(raw))])


def read_mult_pickle(path, obj=None) -> MultimodalDataset:
    """A MulT pickle: {split: {vision, text, audio (N, T, D), labels, id?}}, left zero-padded."""
    path = Path(path)
    obj = safe_load_pickle(path) if obj is None else obj
    splits = _split_dict(obj, path, ("vision", "text", "audio", "labels"))
    known = MULT_FILES.get(path.name)
    first_labels = np.asarray(splits["train"]["labels"])
    task = "emotions" if first_labels.ndim == 3 and first_labels.shape[1:] == (len(EMOTIONS), 2) else "regression"
    if known:
        name, aligned = known
    else:
        name = path.stem
        aligned = "noalign" not in path.name
    out = {}
    for s, sp in splits.items():
        feats = {m: _features(sp, m, path, s) for m in MODALITIES}
        labels = _numeric(sp, "labels", path, s)
        n = labels.shape[0]
        if task == "emotions":
            if labels.shape != (n, len(EMOTIONS), 2):
                raise DataError(f"{path}: split {s!r} key 'labels': expected ({n}, 4, 2) one-hot emotions, found {labels.shape}")
            labels = labels.argmax(axis=-1).astype(np.int64)  # (N, 4): 1 = emotion present
        else:
            if labels.size != n:
                raise DataError(f"{path}: split {s!r} key 'labels': expected one sentiment per sample ({n}), found shape {labels.shape}")
            labels = labels.reshape(n).astype(np.float32)
        out[s] = Split(features=feats, lengths={}, labels=labels, ids=_ids(sp.get("id"), n, s))
    ds = MultimodalDataset(
        splits=out,
        meta=DatasetMeta(name=name, task=task, aligned=aligned, source=str(path), format="mult-pickle"),
    )
    _check_counts(ds)
    replace_nonfinite(ds)
    for sp in ds.splits.values():
        sp.lengths = {m: lengths_from_left_padding(sp.features[m]) for m in MODALITIES}
    validate(ds, data_shape(name) if known else None)
    return ds


def _check_counts(ds: MultimodalDataset) -> None:
    """Same N in every modality and the labels, before anything indexes by N."""
    for s, sp in ds.splits.items():
        n = len(sp.labels)
        for m in MODALITIES:
            if sp.features[m].shape[0] != n:
                raise DataError(
                    f"{ds.meta.source}: split {s!r} key {m!r}: expected N={n} samples (as labels), found {sp.features[m].shape[0]}"
                )
        if len(sp.ids) != n:
            raise DataError(f"{ds.meta.source}: split {s!r} key 'id': expected {n} ids, found {len(sp.ids)}")


# ----------------------------------------------------------------------------------------------
# MMSA pickles: aligned_50.pkl, unaligned_50.pkl (right-padded, with explicit lengths)


def _right_padded_lengths(x: np.ndarray) -> np.ndarray:
    nonzero_step = np.any(x != 0, axis=2)  # (N, T)
    has_any = nonzero_step.any(axis=1)
    last = x.shape[1] - np.argmax(nonzero_step[:, ::-1], axis=1)
    return np.where(has_any, last, 0).astype(np.int64)


def read_mmsa_pickle(path, obj=None) -> MultimodalDataset:
    """An MMSA pickle: {split: {text, audio, vision, regression_labels, id, [text_bert, *_lengths]}}."""
    path = Path(path)
    obj = safe_load_pickle(path) if obj is None else obj
    splits = _split_dict(obj, path, ("text", "audio", "vision", "regression_labels"))
    aligned = not path.name.startswith("unaligned")
    out = {}
    for s, sp in splits.items():
        feats = {m: _features(sp, m, path, s) for m in MODALITIES}
        labels = _numeric(sp, "regression_labels", path, s).astype(np.float32).reshape(-1)
        n = labels.shape[0]
        for m in MODALITIES:  # N must agree before lengths index the arrays
            if feats[m].shape[0] != n:
                raise DataError(f"{path}: split {s!r} key {m!r}: expected N={n} samples (as regression_labels), found {feats[m].shape[0]}")
        lengths = {}
        if "text_bert" in sp:  # BERT token ids / attention mask / segment ids: the mask gives the length
            tb = _numeric(sp, "text_bert", path, s)
            if tb.ndim != 3 or tb.shape[0] != n or tb.shape[1] != 3:
                raise DataError(f"{path}: split {s!r} key 'text_bert': expected ({n}, 3, L), found {tb.shape}")
            lengths["text"] = tb[:, 1, :].sum(axis=1).astype(np.int64)
        else:
            lengths["text"] = _right_padded_lengths(feats["text"])
        for m in ("audio", "vision"):
            key = f"{m}_lengths"
            if key in sp:
                ln = _numeric(sp, key, path, s).reshape(-1).astype(np.int64)
                if ln.shape != (n,):
                    raise DataError(f"{path}: split {s!r} key {key!r}: expected shape ({n},), found {ln.shape}")
                lengths[m] = ln
            elif aligned:
                lengths[m] = lengths["text"].copy()  # word-aligned to the text tokens
            else:
                lengths[m] = _right_padded_lengths(feats[m])
        for m in MODALITIES:
            T = feats[m].shape[1]
            if lengths[m].size and (lengths[m].min() < 0 or lengths[m].max() > T):
                raise DataError(f"{path}: split {s!r} lengths of {m!r}: expected values in [0, {T}], found [{lengths[m].min()}, {lengths[m].max()}]")
            feats[m] = right_to_left_padding(feats[m], lengths[m])
        ids = _ids(sp.get("id"), n, s)
        out[s] = Split(features=feats, lengths=lengths, labels=labels, ids=ids)
    dims = tuple(out["train"].features[m].shape[2] for m in ("audio", "vision"))
    name = {(5, 20): "mosi", (74, 35): "mosei", (33, 709): "sims"}.get(dims, path.parent.name.lower() or path.stem)
    ds = MultimodalDataset(
        splits=out,
        meta=DatasetMeta(name=name, task="regression", aligned=aligned, source=str(path), format="mmsa-pickle"),
    )
    _check_counts(ds)
    replace_nonfinite(ds)
    validate(ds)  # MMSA text features may be BERT (768) or GloVe (300): no preset dims to hold them to
    return ds


def read_pickle(path) -> MultimodalDataset:
    """A MulT or MMSA pickle, told apart by their keys."""
    obj = safe_load_pickle(path)
    train = obj.get("train") if isinstance(obj, dict) else None
    if isinstance(train, dict) and "regression_labels" in train:
        return read_mmsa_pickle(path, obj)
    if isinstance(train, dict) and "labels" in train:
        return read_mult_pickle(path, obj)
    found = sorted(map(str, train)) if isinstance(train, dict) else type(obj).__name__
    raise DataError(
        f"{path}: neither a MulT pickle (train/labels) nor an MMSA pickle (train/regression_labels); found {found}"
    )


# ----------------------------------------------------------------------------------------------
# One entry point for every source

_SYNTH_RE = re.compile(r"^(?:synthetic:)?(mosi|mosei|iemocap)(-unaligned)?$")


def load_dataset(source, *, scale: float = 1.0, seed: int = 0, lazy: bool = False) -> MultimodalDataset:
    """Load any supported source.

    ``source`` is a path (``.pkl`` MulT/MMSA, ``.h5`` feature store) or a synthetic preset
    ``synthetic:mosi``, ``synthetic:mosei-unaligned``, ... (``scale`` and ``seed`` apply to those).
    ``lazy`` keeps ``.h5`` features on disk until indexed.
    """
    text = str(source)
    m = _SYNTH_RE.match(text)
    if m and not Path(text).exists():
        from mskt.synthetic import make_synthetic

        return make_synthetic(m.group(1), aligned=m.group(2) is None, scale=scale, seed=seed)
    path = Path(text)
    if not path.exists():
        raise DataError(
            f"{path}: no such file (give a .pkl, .h5 or a synthetic preset such as synthetic:mosi, synthetic:mosi-unaligned)"
        )
    suffix = path.suffix.lower()
    if suffix in (".pkl", ".pickle"):
        return read_pickle(path)
    if suffix in (".h5", ".hdf5"):
        from mskt.store import read_store

        return read_store(path, lazy=lazy)
    if suffix == ".csd":
        raise DataError(
            f"{path}: a .csd file is one computational sequence, not a dataset with splits; "
            "`mskt data info` summarises it and `mskt data align` builds a dataset from feature and label .csd files"
        )
    raise DataError(f"{path}: unsupported file type {suffix!r}; supported: .pkl (MulT, MMSA), .h5 (mskt store), .csd (info/align)")
