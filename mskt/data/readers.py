"""Readers for the pickles users bring (MulT, MMSA), a restricted unpickler, and ``load_dataset``.

Pickles come from the internet and a pickle can run arbitrary code while loading, so every pickle
goes through ``safe_load_pickle``: it admits only plain containers and numpy's array
reconstruction, and refuses any other global *before* it is called. It also checks the states
numpy trusts blindly (a dtype's flags, an object array's items), since a damaged or tampered
state there crashes the process rather than raising.
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import pickle
import re
import struct
from pathlib import Path

import numpy as np

from mskt.data.dataset import (
    DatasetMeta,
    MultimodalDataset,
    Split,
    lengths_from_left_padding,
    replace_nonfinite,
    right_to_left_padding,
    validate,
)
from mskt.errors import DataError
from mskt.data.presets import EMOTIONS, MODALITIES, SPLITS, data_shape
from mskt.data.synthetic import SOURCE_RE as _SYNTH_RE

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
    ("builtins", "bytes"),  # protocol <= 2 writes b"" as bytes()
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


def _from_content(kind):
    """``bytes`` / ``bytearray`` that refuse a size argument: ``bytearray(10**11)`` in a pickle
    would zero-fill 100 GB; pickles only ever build them from content."""

    def build(*args):
        if args and not isinstance(args[0], (str, bytes, bytearray)):
            raise pickle.UnpicklingError(f"refused {kind.__name__}() of a {type(args[0]).__name__}: only of str or bytes content")
        return kind(*args)

    return build


_SIZED = {"bytes": _from_content(bytes), "bytearray": _from_content(bytearray)}


def _check_dtype_state(dtype: np.dtype, state, source: str) -> None:
    """Refuse a pickled dtype state other than the plain one of that type (byte order aside).

    ``np.dtype.__setstate__`` trusts its argument: a state with other flags, item size or fields
    makes a float32 dtype that claims to hold Python objects, and freeing its arrays then reads
    garbage pointers (a crashed kernel). numpy writes the plain state, so nothing legitimate is lost.
    """
    plain = dtype.__reduce__()[2]  # the state of the freshly built dtype, before BUILD changes it
    if isinstance(state, tuple) and len(state) == 8 and (state[3] is not None or state[4] is not None):
        raise DataError(f"{source}: refused a numpy array of structured dtype (fields {state[3]!r}): data files hold plain arrays")
    ok = (
        isinstance(state, tuple)
        and len(state) == len(plain)
        and state[0] == plain[0]
        and state[2:] == plain[2:]
        and (state[1] == plain[1] or (plain[1] != "|" and state[1] in ("<", ">", "=")))
    )
    if not ok:
        raise DataError(
            f"{source}: refused a numpy dtype {dtype.str!r} with the pickled state {state!r}; "
            f"expected {plain!r} (a tampered or corrupt pickle)"
        )


def _check_array_state(array: np.ndarray, state, source: str) -> None:
    """Refuse an array state numpy would not check itself: an object array's list of items must
    hold exactly one per element (a shorter list makes ``ndarray.__setstate__`` read past it: a
    segmentation fault), and only a fresh array from ``_reconstruct`` takes a state."""
    if not (array.base is None and array.flags.owndata):
        raise DataError(f"{source}: refused to set the state of an array that is a view (a tampered or corrupt pickle)")
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise DataError(f"{source}: refused a numpy array state that is not (version, shape, dtype, is_fortran, data)")
    shape, dtype, data = state[-4], state[-3], state[-1]
    if not (isinstance(shape, tuple) and all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(dtype, np.dtype)):
        raise DataError(f"{source}: refused a numpy array state with shape {shape!r} and dtype {dtype!r}")
    if dtype.fields is not None or dtype.subdtype is not None:
        raise DataError(f"{source}: refused a numpy array of structured dtype {dtype}: data files hold plain arrays")
    n = math.prod(shape)
    if dtype.hasobject:
        if not isinstance(data, list) or len(data) != n:
            found = f"{len(data)} items" if isinstance(data, list) else type(data).__name__
            raise DataError(f"{source}: refused a numpy object array of shape {shape} whose pickled items are {found}, expected {n}")
    elif not isinstance(data, (bytes, bytearray, str)) or len(data) != n * dtype.itemsize:
        found = f"{len(data)} bytes" if isinstance(data, (bytes, bytearray, str)) else type(data).__name__
        raise DataError(f"{source}: refused a numpy array of shape {shape} and dtype {dtype} whose pickled data are {found}, expected {n * dtype.itemsize} bytes")


class _RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler, so that BUILD (``obj.__setstate__(state)``) can be checked too:
    only arrays and dtypes take a state, and numpy trusts both (see the two checks above). Arrays
    are a few large opcodes each, so the Python loop costs little."""

    def __init__(self, file, source: str):
        # latin1 lets numpy arrays pickled under Python 2 load (the encoding numpy documents).
        super().__init__(file, encoding="latin1")
        self.source = source

    def load_build(self):
        inst, state = self.stack[-2], self.stack[-1]
        if isinstance(inst, np.dtype):
            _check_dtype_state(inst, state, self.source)
        elif isinstance(inst, np.ndarray):
            _check_array_state(inst, state, self.source)
        else:
            raise DataError(f"{self.source}: refused to set the state of a {type(inst).__name__}: only numpy arrays and dtypes take one")
        super().load_build()

    def load_bytearray8(self):
        # pickle.py allocates the declared size before reading: a corrupt length would zero-fill
        # gigabytes; reading first caps it at what the file holds.
        (n,) = struct.unpack("<Q", self.read(8))
        data = self.read(n)
        if len(data) != n:
            raise pickle.UnpicklingError(f"pickle data was truncated (BYTEARRAY8 of {n} bytes)")
        self.append(bytearray(data))

    dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: load_build, pickle.BYTEARRAY8[0]: load_bytearray8}

    def find_class(self, module, name):
        found = (module, name)
        if self.proto < 3:  # Python 2 names (and protocol <= 2 from Python 3): __builtin__.bytes, ...
            if found in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[found]
            else:
                module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) not in _SAFE_GLOBALS:
            raise DataError(
                f"{self.source}: refused to unpickle the global '{found[0]}.{found[1]}': only plain containers "
                "and numpy arrays are allowed (a pickle can run code while it loads)"
            )
        if module == "builtins" and name in ("bytes", "bytearray"):
            return _SIZED[name]
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
        found = f"array of dtype {x.dtype}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{path}: split {split!r} key {key!r}: expected a numeric array (N, T, D), found {found}")
    if x.ndim != 3:
        raise DataError(f"{path}: split {split!r} key {key!r}: expected a 3-D array (N, T, D), found shape {x.shape}")
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise DataError(
            f"{path}: split {split!r} key {key!r}: expected at least one time step and one feature (N, T, D), found shape {x.shape}"
        )
    return np.array(x, dtype=np.float32)  # a copy: replacing -inf must not touch the caller's object


def _numeric(sp, key, path, split) -> np.ndarray:
    """``sp[key]`` as a numeric array of at least one dimension; DataError otherwise."""
    try:
        x = np.asarray(sp[key])
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise DataError(f"{path}: split {split!r} key {key!r}: expected a numeric array, found {type(sp[key]).__name__} ({e})") from None
    if x.ndim == 0 or x.dtype.kind not in "fiub":
        raise DataError(
            f"{path}: split {split!r} key {key!r}: expected a numeric array, found {type(sp[key]).__name__} of dtype {x.dtype} and shape {x.shape}"
        )
    return x


def _lengths(sp, key, path, split, n) -> np.ndarray:
    """``sp[key]`` as int64 true lengths (n,): finite whole numbers; DataError otherwise."""
    x = _numeric(sp, key, path, split).reshape(-1)
    if x.shape != (n,):
        raise DataError(f"{path}: split {split!r} key {key!r}: expected shape ({n},), found {x.shape}")
    if x.dtype.kind == "f" and not (np.isfinite(x).all() and (x == np.round(x)).all()):
        raise DataError(f"{path}: split {split!r} key {key!r}: expected whole-number lengths, found e.g. {x[x != np.round(x)][:1]}")
    return x.astype(np.int64)


def _as_str(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _ids(raw, n, split, path) -> np.ndarray:
    """Sample ids as str: absent -> "<split>_<i>" (n of them); (m,) values; MOSI's (m, k) byte triples joined by "_"."""
    if raw is None:
        return np.array([f"{split}_{i}" for i in range(n)])
    try:
        raw = np.asarray(raw)
    except (ValueError, TypeError) as e:
        raise DataError(f"{path}: split {split!r} key 'id': expected {n} ids, found {type(raw).__name__} ({e})") from None
    if raw.ndim not in (1, 2):  # the count is checked with the modalities' (_check_counts)
        raise DataError(f"{path}: split {split!r} key 'id': expected shape ({n},) or ({n}, k), found shape {raw.shape}")
    if raw.ndim == 2:  # MOSI: (video, start, end) per sample
        return np.array(["_".join(_as_str(v) for v in row) for row in raw], dtype=str).reshape(len(raw))
    return np.array([_as_str(v) for v in raw], dtype=str).reshape(len(raw))


def read_mult_pickle(path, obj=None) -> MultimodalDataset:
    """A MulT pickle: {split: {vision, text, audio (N, T, D), labels, id?}}, left zero-padded."""
    path = Path(path)
    obj = safe_load_pickle(path) if obj is None else obj
    splits = _split_dict(obj, path, ("vision", "text", "audio", "labels"))
    known = MULT_FILES.get(path.name)
    if known:  # a file under its MulT name holds that dataset's task, whatever its labels look like
        name, aligned = known
        task = data_shape(name).task
    else:
        name = path.stem
        aligned = "noalign" not in path.name
        first_labels = _numeric(splits["train"], "labels", path, "train")
        task = "emotions" if first_labels.ndim == 3 and first_labels.shape[1:] == (len(EMOTIONS), 2) else "regression"
    out = {}
    for s, sp in splits.items():
        feats = {m: _features(sp, m, path, s) for m in MODALITIES}
        labels = _numeric(sp, "labels", path, s)
        n = labels.shape[0]
        if task == "emotions":
            if labels.shape != (n, len(EMOTIONS), 2):
                raise DataError(f"{path}: split {s!r} key 'labels': expected ({n}, 4, 2) one-hot emotions, found {labels.shape}")
            one_hot = np.isin(labels, (0, 1)).all(axis=-1) & (labels.sum(axis=-1) == 1)  # (N, 4); False for NaN
            if not one_hot.all():
                i, e = np.argwhere(~one_hot)[0]
                raise DataError(
                    f"{path}: split {s!r} key 'labels': expected a one-hot pair [absent, present] per emotion, "
                    f"found {labels[i, e].tolist()} for sample {i}, emotion {EMOTIONS[e]!r} ({int((~one_hot).sum())} such pairs)"
                )
            labels = labels.argmax(axis=-1).astype(np.int64)  # (N, 4): 1 = emotion present
        else:
            if labels.size != n:
                raise DataError(f"{path}: split {s!r} key 'labels': expected one sentiment per sample ({n}), found shape {labels.shape}")
            labels = labels.reshape(n).astype(np.float32)
        out[s] = Split(features=feats, lengths={}, labels=labels, ids=_ids(sp.get("id"), n, s, path))
    ds = MultimodalDataset(
        splits=out,
        meta=DatasetMeta(name=name, task=task, aligned=aligned, source=str(path), format="mult-pickle"),
    )
    _check_counts(ds)
    replace_nonfinite(ds)
    for sp in ds.splits.values():
        sp.lengths = {m: lengths_from_left_padding(sp.features[m]) for m in MODALITIES}
    validate(ds)  # not against the paper's dims: extractors vary; load_dataset reports the dims found
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
        labels = _numeric(sp, "regression_labels", path, s)
        n = labels.shape[0]
        if labels.shape not in ((n,), (n, 1)):
            raise DataError(f"{path}: split {s!r} key 'regression_labels': expected shape ({n},) or ({n}, 1), found {labels.shape}")
        labels = labels.astype(np.float32).reshape(n)
        for m in MODALITIES:  # N must agree before lengths index the arrays
            if feats[m].shape[0] != n:
                raise DataError(f"{path}: split {s!r} key {m!r}: expected N={n} samples (as regression_labels), found {feats[m].shape[0]}")
        lengths = {}
        if "text_bert" in sp:  # BERT token ids / attention mask / segment ids: the mask gives the length
            tb = _numeric(sp, "text_bert", path, s)
            if tb.ndim != 3 or tb.shape[0] != n or tb.shape[1] != 3:
                raise DataError(f"{path}: split {s!r} key 'text_bert': expected ({n}, 3, L), found {tb.shape}")
            mask = tb[:, 1, :]
            if not np.isin(mask, (0, 1)).all():
                raise DataError(f"{path}: split {s!r} key 'text_bert': expected an attention mask of 0/1 in [:, 1, :], found other values")
            lengths["text"] = mask.sum(axis=1).astype(np.int64)
        else:
            lengths["text"] = _right_padded_lengths(feats["text"])
        for m in ("audio", "vision"):
            key = f"{m}_lengths"
            if key in sp:
                lengths[m] = _lengths(sp, key, path, s, n)
            elif aligned:
                lengths[m] = lengths["text"].copy()  # word-aligned to the text tokens
            else:
                lengths[m] = _right_padded_lengths(feats[m])
        for m in MODALITIES:
            T = feats[m].shape[1]
            if lengths[m].size and (lengths[m].min() < 0 or lengths[m].max() > T):
                raise DataError(f"{path}: split {s!r} lengths of {m!r}: expected values in [0, {T}], found [{lengths[m].min()}, {lengths[m].max()}]")
            feats[m] = right_to_left_padding(feats[m], lengths[m])
        ids = _ids(sp.get("id"), n, s, path)
        out[s] = Split(features=feats, lengths=lengths, labels=labels, ids=ids)
    dims = tuple(out["train"].features[m].shape[2] for m in ("audio", "vision"))
    folder = path.parent.parent if path.parent.name.lower() == "processed" else path.parent  # MMSA: <DATASET>/Processed/*.pkl
    name = {(5, 20): "mosi", (74, 35): "mosei", (33, 709): "sims"}.get(dims, folder.name.lower() or path.stem)
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



def load_dataset(source, *, scale: float = 1.0, seed: int = 0, lazy: bool = False, dataset: str = "auto") -> MultimodalDataset:
    """Load any supported source (see :func:`_load_source`) as the dataset ``dataset``: "auto" (the
    identity its name or content gives), or mosi, mosei, iemocap, sims, other (``mskt.data.identity``)."""
    from mskt.data.dataset import GIVEN_IDENTITY
    from mskt.data.identity import check_choice, resolve_identity

    token = GIVEN_IDENTITY.set(check_choice(dataset))
    try:
        loaded = _load_source(source, scale=scale, seed=seed, lazy=lazy)
    finally:
        GIVEN_IDENTITY.reset(token)
    return resolve_identity(loaded, dataset)


def _load_source(source, *, scale: float = 1.0, seed: int = 0, lazy: bool = False) -> MultimodalDataset:
    """Load any supported source.

    ``source`` is a path (``.pkl`` MulT/MMSA, ``.h5`` feature store) or a synthetic preset
    ``synthetic:mosi``, ``synthetic:mosei-unaligned``, ... (``scale`` and ``seed`` apply to those),
    optionally with generator knobs: ``synthetic:mosi?audio_shared=0.5&audio_gain=3``
    (``mskt.data.synthetic.parse_knobs``). ``lazy`` keeps ``.h5`` features on disk until indexed.
    """
    text = str(source)
    m = _SYNTH_RE.match(text)
    if m and not Path(text).exists():
        from mskt.data.synthetic import make_synthetic, parse_knobs

        knobs = parse_knobs(m.group(3), text) if m.group(3) is not None else {}
        return make_synthetic(m.group(1), aligned=m.group(2) is None, scale=scale, seed=seed, **knobs)
    path = Path(text)
    if not path.exists():
        raise DataError(
            f"{path}: no such file (give a .pkl, .h5 or a synthetic preset such as synthetic:mosi, synthetic:mosi-unaligned)"
        )
    suffix = path.suffix.lower()
    if suffix in (".pkl", ".pickle"):
        return read_pickle(path)
    if suffix in (".h5", ".hdf5"):
        from mskt.data.store import read_store

        return read_store(path, lazy=lazy)
    if suffix == ".csd":
        raise DataError(
            f"{path}: a .csd file is one computational sequence, not a dataset with splits; "
            "`mskt data info` summarises it and `mskt data align` builds a dataset from feature and label .csd files"
        )
    raise DataError(f"{path}: unsupported file type {suffix!r}; supported: .pkl (MulT, MMSA), .h5 (mskt store), .csd (info/align)")
