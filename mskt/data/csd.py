"""CMU-MultimodalSDK computational sequences (``.csd``): read, write, summarise, word-align.

The format
----------
A ``.csd`` file is HDF5 with exactly one root group, named after the sequence (e.g.
``"Opinion Segment Labels"``, ``"COVAREP"``), holding two groups::

    /<name>/data/<video_id>/features    (n, D)  one row per time interval
    /<name>/data/<video_id>/intervals   (n, 2)  start / end of each row, in seconds
    /<name>/metadata/<key>              (1,)    a variable-length UTF-8 string holding JSON

e.g. ``metadata/dimension names`` is ``b'["sentiment score"]'`` and ``metadata/md5`` is
``b'null'``. A label sequence is an ordinary sequence whose rows are opinion segments (CMU-MOSI:
93 videos, 2199 segments, one sentiment score in [-3, 3] per segment; CMU-MOSEI "All Labels":
sentiment followed by six emotions). Feature rows are at a modality's own rate (COVAREP audio at
100 Hz, FACET video at 30 Hz, one row per word for GloVe vectors).

Word-level alignment (what :func:`align_csds` reproduces)
---------------------------------------------------------
The SDK's recipe (``examples/mmdatasdk_examples/full_examples/process_mosi.py``) is
``align(<words>, collapse_functions=[avg])`` then ``impute(<words>)`` then
``align(<labels>)`` then ``get_tensors(seq_len, direction=False, folds=...)``. Concretely:

1. **Words.** The reference (word) sequence's rows are the time steps. Rows shorter than
   ``EPS`` (the SDK's ``epsilon = 10e-6``) are dropped, as the SDK drops them.
2. **Collapse by averaging.** For every word interval [s, e] and every other modality, the
   feature rows whose interval overlaps the word by more than ``EPS`` seconds are averaged
   (unweighted mean, the SDK's ``numpy.average(features, axis=0)`` collapse). A word that no row
   overlaps gets a zero vector (the SDK's ``impute`` with ``numpy.zeros``). The reference modality
   keeps its own row for each word.
3. **Segments.** For each labelled segment (row ``j`` of the label sequence, interval [s, e]) the
   words overlapping [s, e] by more than ``EPS`` form the segment's sequence, in time order. We pick
   the words once from the reference intervals, so every modality of a segment has the same length
   (the SDK intersects each modality separately and the public tutorial drops the segments where
   the lengths then disagree). Segments with no word, and segments shorter than ``EPS`` (which the
   SDK's ``align`` skips), are dropped and counted in ``meta.extra["dropped_segments"]``: on the
   real CMU-MOSI label file that is the zero-length segment ``2WGyTLYerpo[43]``, so the standard
   folds give 1283 / 229 / 686 segments rather than MulT's 1284 / 229 / 686. The segment id is
   ``f"{video}[{j}]"`` with ``j`` the row in the label file, the SDK's key.
4. **Padding / truncation to ``seq_len``.** ``get_tensors(seq_len, direction=False)`` (the call in
   the SDK's own ``process_mosei.py``, with ``seq_len=50``) *left*-pads: it prepends ``seq_len``
   zero rows and keeps the last ``seq_len`` rows. So a segment longer than ``seq_len`` words keeps
   its **last** ``seq_len`` words, a shorter one is zero-padded at the front. That is already our
   left-padding convention (see :mod:`mskt.data.dataset`). ``keep="first"`` gives the truncation of the
   SDK's ``direction=True`` variant (first ``seq_len`` words) but the result is still stored
   left-padded. ``lengths`` hold the true (post-truncation) lengths.
5. **Non-finite values** (COVAREP's ``-inf``) propagate through the average exactly as in numpy and
   are then set to 0 and counted by :func:`mskt.data.dataset.replace_nonfinite`, as the public MulT
   pipeline did.

Splits
------
``folds`` (split name -> video ids) wins. Otherwise, if every labelled video is in the CMU-MOSI
standard folds (:data:`CMU_MOSI_STANDARD_FOLDS`), those are used: on the real label file their
videos hold exactly the 1284 / 229 / 686 segments of the MulT MOSI files. Otherwise videos are
split deterministically by a hash of their id (see :func:`hash_video_split`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from mskt.data.dataset import DatasetMeta, MultimodalDataset, Split, replace_nonfinite, validate
from mskt.data.h5guard import check_hdf5
from mskt.errors import ConfigError, DataError
from mskt.data.presets import EMOTIONS, MODALITIES, SPLITS

log = logging.getLogger("mskt")

#: Interval tolerance in seconds, the SDK's ``epsilon = 10e-6`` (mmdatasdk/dataset/dataset.py).
EPS = 1e-5

# The CMU-MOSI standard folds: the video-id lists of the SDK module
# ``mmsdk/mmdatasdk/dataset/standard_datasets/CMU_MOSI/cmu_mosi_std_folds.py``
# (``standard_train_fold`` / ``standard_valid_fold`` / ``standard_test_fold``, referenced as
# ``mmdatasdk.cmu_mosi.standard_folds`` by the SDK's ``process_mosi.py``), as reproduced verbatim in
# public CMU-MOSI preprocessing scripts. Checked against CMU_MOSI_Opinion_Labels.csd: 52 / 10 / 31
# videos covering all 93, giving 1284 / 229 / 686 segments, the MulT MOSI split sizes.
CMU_MOSI_STANDARD_FOLDS: dict[str, tuple[str, ...]] = {
    "train": (
        "2iD-tVS8NPw", "8d-gEyoeBzc", "Qr1Ca94K55A", "Ci-AH39fi3Y", "8qrpnFRGt2A", "Bfr499ggo-0",
        "QN9ZIUWUXsY", "9T9Hf74oK10", "7JsX8y1ysxY", "1iG0909rllw", "Oz06ZWiO20M", "BioHAh1qJAQ",
        "9c67fiY0wGQ", "Iu2PFX3z_1s", "Nzq88NnDkEk", "Clx4VXItLTE", "9J25DZhivz8", "Af8D0E4ZXaw",
        "TvyZBvOMOTc", "W8NXH0Djyww", "8OtFthrtaJM", "0h-zjBukYpk", "Vj1wYRQjB-o", "GWuJjcEuzt8",
        "BI97DNYfe5I", "PZ-lDQFboO8", "1DmNV9C1hbY", "OQvJTdtJ2H4", "I5y0__X72p0", "9qR7uwkblbs",
        "G6GlGvlkxAQ", "6_0THN4chvY", "Njd1F0vZSm4", "BvYR0L6f2Ig", "03bSnISJMiM", "Dg_0XKD0Mf4",
        "5W7Z1C_fDaE", "VbQk4H8hgr0", "G-xst2euQUc", "MLal-t_vJPM", "BXuRRbG0Ugk", "LSi-o-IrDMs",
        "Jkswaaud0hk", "2WGyTLYerpo", "6Egk_28TtTM", "Sqr0AcuoNnk", "POKffnXeBds", "73jzhE8R1TQ",
        "OtBXNcAL_lE", "HEsqda8_d0Q", "VCslbP0mgZI", "IumbAb8q2dM",
    ),
    "valid": (
        "WKA5OygbEKI", "c5xsKMxpXnc", "atnd_PF-Lbs", "bvLlb-M3UXU", "bOL9jKpeJRs", "_dI--eQ6qVU",
        "ZAIRrfG22O0", "X3j2zQgwYgE", "aiEXnCPZubE", "ZUXBRvtny7o",
    ),
    "test": (
        "tmZoasNr4rU", "zhpQhgha_KU", "lXPQBPVc5Cw", "iiK8YX8oH1E", "tStelxIAHjw", "nzpVDcQ0ywM",
        "etzxEpPuc6I", "cW1FSBF59ik", "d6hH302o4v8", "k5Y_838nuGo", "pLTX3ipuDJI", "jUzDDGyPkXU",
        "f_pcplsH_V0", "yvsjCA6Y5Fc", "nbWiPyCm4g0", "rnaNMUZpvvg", "wMbj6ajWbic", "cM3Yna7AavY",
        "yDtzw_Y-7RU", "vyB00TXsimI", "dq3Nf_lMPnE", "phBUpBr1hSo", "d3_k5Xpfmik", "v0zCBqDeKcE",
        "tIrG4oNLFzE", "fvVhgmXxadc", "ob23OKe5a9Q", "cXypl4FnoZo", "vvZ4IcEtiZc", "f9O3YtZ2VfI",
        "c7UH_rxdZv4",
    ),
}

#: Fractions of videos in train / valid / test when no folds are known (see hash_video_split).
HASH_SPLIT_FRACTIONS = {"train": 0.7, "valid": 0.1, "test": 0.2}


@dataclass
class CsdSequence:
    """One computational sequence in memory.

    ``data`` maps video id -> (features (n, D) float32, intervals (n, 2) seconds). ``metadata``
    holds the JSON-decoded metadata values (strings that are not JSON are kept as str).
    """

    name: str
    data: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    @property
    def dim(self) -> int | None:
        for feats, _ in self.data.values():
            return int(np.shape(feats)[1])
        return None

    @property
    def n_segments(self) -> int:
        return int(sum(np.shape(iv)[0] for _, iv in self.data.values()))


# ----------------------------------------------------------------------------------------------
# Validation shared by files and in-memory sequences


def _check_video(where: str, key: str, f_shape, i_shape, dim_ref: tuple | None) -> int:
    """Check one video's ``features`` / ``intervals`` shapes; return its feature dim D."""
    if len(i_shape) != 2 or i_shape[1] != 2:
        raise DataError(f"{where}: key '{key}/intervals': expected shape (n, 2), found {tuple(i_shape)}")
    if len(f_shape) != 2:
        raise DataError(f"{where}: key '{key}/features': expected a 2-D array (n, D), found shape {tuple(f_shape)}")
    if f_shape[0] != i_shape[0]:
        raise DataError(
            f"{where}: key '{key}': features have {f_shape[0]} rows but intervals have {i_shape[0]}; "
            "expected one interval per feature row"
        )
    d = int(f_shape[1])
    if d < 1:
        raise DataError(f"{where}: key '{key}/features': expected at least one feature column (n, D), found shape {tuple(f_shape)}")
    if dim_ref is not None and dim_ref[1] != d:
        raise DataError(
            f"{where}: key '{key}/features': feature dim {d} differs from dim {dim_ref[1]} of video {dim_ref[0]!r}"
        )
    return d


def _decode_metadata_value(raw):
    """A metadata dataset's value -> Python: bytes -> str -> JSON if it parses, else the str."""
    if isinstance(raw, np.ndarray):
        if raw.size == 1:
            raw = raw.reshape(-1)[0]
        else:
            return [_decode_metadata_value(v) for v in raw.reshape(-1)]
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raw = raw.decode("latin-1")
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    if isinstance(raw, np.generic):
        return raw.item()
    return raw


def _as_features(x) -> np.ndarray:
    """Numeric features as float32; anything else (e.g. the bytes of a words sequence) as stored."""
    x = np.asarray(x)
    if x.dtype.kind in "biuf":
        return x.astype(np.float32, copy=False)
    return x


def _as_intervals(x) -> np.ndarray:
    x = np.asarray(x)
    return x if x.dtype.kind == "f" else x.astype(np.float64)


def _kind(dtype) -> str:
    """'numeric' or 'text' (the bytes of a words sequence): every video of a sequence holds one kind."""
    return "numeric" if dtype.kind in "biuf" else "text"


def _check_kinds(where: str, key: str, f_dtype, i_dtype, kind_ref: tuple | None) -> None:
    if i_dtype.kind not in "biuf":
        raise DataError(f"{where}: key '{key}/intervals': expected numbers (seconds), found dtype {i_dtype}")
    if kind_ref is not None and _kind(f_dtype) != kind_ref[1]:
        raise DataError(
            f"{where}: key '{key}/features': {_kind(f_dtype)} values (dtype {f_dtype}) where video {kind_ref[0]!r} "
            f"holds {kind_ref[1]} values"
        )


class _FirstVideo(NamedTuple):
    dim: tuple  # (video id, feature dim)
    kind: tuple  # (video id, dtype kind)
    dtype: object


def _check_against_first(where: str, vid, key: str, feats, iv, first: "_FirstVideo | None") -> _FirstVideo:
    """Check one video's shapes and dtypes, and against the first video's; returns the first video."""
    d = _check_video(where, key, feats.shape, iv.shape, first.dim if first else None)
    _check_kinds(where, key, feats.dtype, iv.dtype, first.kind if first else None)
    return first or _FirstVideo((vid, d), (vid, _kind(feats.dtype)), feats.dtype)


def _check_intervals(where: str, key: str, iv: np.ndarray) -> np.ndarray:
    if iv.size and not np.isfinite(iv).all():
        raise DataError(f"{where}: key '{key}/intervals': expected finite start / end seconds, found {int((~np.isfinite(iv)).sum())} non-finite")
    return iv


# What h5py raises on a damaged file: a truncated or corrupt object header, B-tree or heap gives
# OSError, RuntimeError or KeyError, a wrong shape or type ValueError or TypeError.
_H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)


class _FileSource:
    """A ``.csd`` file opened and its layout checked (shapes only): videos are read on demand."""

    def __init__(self, path):
        self.path = Path(path)
        self.where = str(path)
        if not self.path.exists():
            raise DataError(f"{path}: file not found")
        if self.path.is_file() and self.path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty")
        check_hdf5(self.path)  # a file libhdf5 would loop on is refused here, not read
        try:
            self.h5 = h5py.File(self.path, "r")
        except _H5_ERRORS as e:
            raise DataError(f"{path}: not a readable HDF5 computational sequence (.csd) file: {e}") from None
        self._key = "/"
        try:
            self._open()
        except DataError:
            self.h5.close()
            raise
        except _H5_ERRORS as e:
            self.h5.close()
            raise DataError(f"{self.where}: corrupt or unreadable .csd file at key '{self._key}' ({type(e).__name__}: {e})") from None
        except BaseException:
            self.h5.close()
            raise

    def _open(self):
        roots = list(self.h5.keys())
        if len(roots) != 1:
            raise DataError(
                f"{self.where}: expected exactly one root group (the sequence name), found {len(roots)}: {roots}"
            )
        self.name = roots[0]
        root = self.h5[self.name]
        if not isinstance(root, h5py.Group):
            raise DataError(f"{self.where}: key '/{self.name}': expected a group, found a dataset")
        for sub in ("data", "metadata"):
            if sub not in root or not isinstance(root[sub], h5py.Group):
                raise DataError(
                    f"{self.where}: key '/{self.name}/{sub}': missing; expected groups 'data' and 'metadata', "
                    f"found {list(root.keys())}"
                )
        self.data = root["data"]
        self.metadata = {}
        for k, item in root["metadata"].items():
            self._key = f"/{self.name}/metadata/{k}"
            if isinstance(item, h5py.Dataset):
                self.metadata[k] = _decode_metadata_value(item[()])
            else:
                log.warning("%s: metadata entry '%s' is not a dataset; ignored", self.where, self._key)
        self._key = f"/{self.name}/data"
        self.videos = list(self.data.keys())
        first = None  # the first video, which every other one must match
        for vid in self.videos:
            key = self._key = f"/{self.name}/data/{vid}"
            g = self.data[vid]
            if not isinstance(g, h5py.Group):
                raise DataError(f"{self.where}: key '{key}': expected a group with 'features' and 'intervals'")
            for part in ("features", "intervals"):
                if part not in g:
                    raise DataError(
                        f"{self.where}: key '{key}/{part}' is missing; each video needs 'features' and 'intervals', "
                        f"found {list(g.keys())}"
                    )
                if not isinstance(g[part], h5py.Dataset):
                    raise DataError(f"{self.where}: key '{key}/{part}': expected a dataset, found {type(g[part]).__name__}")
            feats, iv = g["features"], g["intervals"]
            first = _check_against_first(self.where, vid, key, feats, iv, first)
        self.dim, self.dtype = (first.dim[1], first.dtype) if first else (None, None)

    def get(self, vid):
        key = f"/{self.name}/data/{vid}"
        try:
            g = self.data[vid]
            feats, iv = _as_features(g["features"][()]), _as_intervals(g["intervals"][()])
        except _H5_ERRORS as e:
            raise DataError(f"{self.where}: corrupt or unreadable .csd file at key '{key}' ({type(e).__name__}: {e})") from None
        return feats, _check_intervals(self.where, key, iv)

    def close(self):
        self.h5.close()


class _MemorySource:
    """The same interface over a :class:`CsdSequence` (its layout checked the same way)."""

    def __init__(self, seq: CsdSequence, where: str | None = None):
        self.seq = seq
        self.name = seq.name
        self.where = where or f"<in-memory CsdSequence {seq.name!r}>"
        self.metadata = dict(seq.metadata)
        self.videos = list(seq.data.keys())
        first = None  # the first video, which every other one must match
        for vid, pair in seq.data.items():
            key = f"/{seq.name}/data/{vid}"
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise DataError(f"{self.where}: key '{key}': expected a (features, intervals) pair")
            try:
                feats, iv = np.asarray(pair[0]), np.asarray(pair[1])
            except (ValueError, TypeError) as e:  # ragged nested lists
                raise DataError(f"{self.where}: key '{key}': features and intervals must be rectangular arrays ({e})") from None
            first = _check_against_first(self.where, vid, key, feats, iv, first)
        self.dim, self.dtype = (first.dim[1], first.dtype) if first else (None, None)

    def get(self, vid):
        feats, iv = self.seq.data[vid]
        return _as_features(feats), _check_intervals(self.where, f"/{self.name}/data/{vid}", _as_intervals(iv))

    def close(self):
        pass


def _source(x, stack: contextlib.ExitStack | None = None):
    if isinstance(x, CsdSequence):
        return _MemorySource(x)
    if isinstance(x, (str, Path)):
        src = _FileSource(x)
        if stack is not None:
            stack.callback(src.close)
        return src
    raise ConfigError(f"expected a .csd path or a CsdSequence, found {type(x).__name__}")


# ----------------------------------------------------------------------------------------------
# Read / write / summary


def read_csd(path) -> CsdSequence:
    """Read a whole ``.csd`` file into a :class:`CsdSequence`, checking its layout.

    Raises :class:`DataError` naming the file and the HDF5 key when the file is not HDF5 (empty,
    truncated, garbage), is corrupt, has other than one root group, lacks ``data`` / ``metadata``,
    or a video lacks ``features`` / ``intervals``, has row counts that disagree, no feature column,
    a feature dim or value kind (numbers / words) unlike the other videos', or intervals that are
    not finite numbers. A video with zero rows is legitimate and kept. (One damage no reader can
    catch: libhdf5 itself can loop forever on a damaged global heap, where the metadata strings
    live; HDFGroup/hdf5#1707.)
    """
    src = _FileSource(path)
    try:
        data = {vid: src.get(vid) for vid in src.videos}
        return CsdSequence(name=src.name, data=data, metadata=src.metadata)
    finally:
        src.close()


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def write_csd(path, seq: CsdSequence) -> Path:
    """Write ``seq`` in the SDK layout: ``/<name>/data/<vid>/{features,intervals}`` and
    ``/<name>/metadata/<key>`` as shape-(1,) UTF-8 variable-length strings holding JSON."""
    path = Path(path)
    where = str(path)
    if not seq.name or "/" in seq.name:
        raise DataError(f"{where}: sequence name {seq.name!r} cannot be an HDF5 root group name")
    _MemorySource(seq, where)  # same checks as reading, before anything is written
    for vid in seq.data:
        if not vid or "/" in vid:
            raise DataError(f"{where}: video id {vid!r} cannot be an HDF5 group name")
    for k in seq.metadata:
        if not k or "/" in k:
            raise DataError(f"{where}: metadata key {k!r} cannot be an HDF5 dataset name")
    string = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        root = f.create_group(seq.name)
        data = root.create_group("data")
        for vid, (feats, iv) in seq.data.items():
            g = data.create_group(vid)
            feats = np.asarray(feats)
            if feats.dtype.kind in "OU":
                feats = feats.astype(object)
                g.create_dataset("features", data=feats, dtype=string)
            else:
                g.create_dataset("features", data=feats)
            g.create_dataset("intervals", data=np.asarray(iv))
        meta = root.create_group("metadata")
        for k, v in seq.metadata.items():
            ds = meta.create_dataset(k, (1,), dtype=string)
            ds[0] = json.dumps(v, default=_json_default)
    return path


def csd_summary(path) -> dict:
    """Counts and value statistics of a ``.csd`` file (or CsdSequence), read video by video.

    ``feature_min`` / ``feature_max`` / ``feature_mean`` are over finite values (None when the
    features are not numeric, e.g. a words sequence); ``nonfinite`` counts NaN / inf values.
    """
    with contextlib.ExitStack() as stack:
        src = _source(path, stack)
        n_seg = 0
        nonfinite = 0
        fmin, fmax, total, count = math.inf, -math.inf, 0.0, 0
        numeric = src.dtype is None or src.dtype.kind in "biuf"
        t_min, t_max = math.inf, -math.inf
        for vid in src.videos:
            feats, iv = src.get(vid)
            n_seg += int(iv.shape[0])
            if iv.size:
                t_min, t_max = min(t_min, float(iv.min())), max(t_max, float(iv.max()))
            if numeric and feats.size:
                x = feats.astype(np.float64, copy=False)
                ok = np.isfinite(x)
                nonfinite += int(x.size - ok.sum())
                if ok.any():
                    vals = x[ok]
                    fmin, fmax = min(fmin, float(vals.min())), max(fmax, float(vals.max()))
                    total += float(vals.sum())
                    count += int(vals.size)
        names = src.metadata.get("dimension names")
        return {
            "path": src.where,
            "name": src.name,
            "n_videos": len(src.videos),
            "n_segments": n_seg,
            "dim": src.dim,
            "dtype": None if src.dtype is None else str(src.dtype),
            "dimension_names": list(names) if isinstance(names, list) else None,
            "feature_min": fmin if count else None,
            "feature_max": fmax if count else None,
            "feature_mean": total / count if count else None,
            "nonfinite": nonfinite,
            "time_range": [t_min, t_max] if n_seg else None,
            "metadata": dict(src.metadata),
        }


def _short(value, width: int = 72) -> str:
    s = value if isinstance(value, str) else json.dumps(value, default=_json_default)
    return s if len(s) <= width else s[: width - 3] + "..."


def format_csd_summary(summary: dict) -> str:
    """A multi-line human report of :func:`csd_summary`'s dict."""
    s = summary
    lines = [f"computational sequence {s['name']!r}  ({s.get('path', '?')})"]
    lines.append(f"  {s['n_videos']} videos, {s['n_segments']} segments, dim {s['dim']}")
    if s.get("dimension_names"):
        names = [str(n) for n in s["dimension_names"]]
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        lines.append(f"  dimensions: {shown}")
    if s.get("feature_min") is not None:
        lines.append(
            f"  value range [{s['feature_min']:.6g}, {s['feature_max']:.6g}], mean {s['feature_mean']:.4g}"
        )
    else:
        lines.append(f"  values: not numeric (dtype {s.get('dtype')})")
    lines.append(f"  non-finite values: {s['nonfinite']}")
    if s.get("time_range"):
        lines.append(f"  intervals span {s['time_range'][0]:.2f} s to {s['time_range'][1]:.2f} s")
    if s.get("metadata"):
        lines.append("  metadata:")
        for k, v in s["metadata"].items():
            lines.append(f"    {k}: {_short(v)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Alignment


def _clean_rows(feats: np.ndarray, iv: np.ndarray):
    """Drop rows shorter than EPS (they never overlap anything by > EPS) and sort by start time."""
    keep = (iv[:, 1] - iv[:, 0]) > EPS
    if not keep.all():
        feats, iv = feats[keep], iv[keep]
    order = np.argsort(iv[:, 0], kind="stable")
    return feats[order], iv[order].astype(np.float64)


def average_over_intervals(words: np.ndarray, row_iv: np.ndarray, row_feats: np.ndarray) -> np.ndarray:
    """Mean of the rows overlapping each word interval by more than EPS; zeros where none do.

    ``words`` (m, 2) and ``row_iv`` (n, 2) are intervals in seconds, ``row_feats`` (n, D). Rows
    must be sorted by start and longer than EPS (see ``_clean_rows``). When row end times are
    non-decreasing too (frame-rate features) the overlapping rows of a word are a contiguous run,
    found by two ``searchsorted`` calls and summed with one ``np.add.reduceat``; otherwise each
    word is matched with a vectorised mask. Non-finite values propagate as in ``numpy.mean``.
    Returns float32 (m, D).
    """
    m, n, d = len(words), len(row_iv), row_feats.shape[1]
    out = np.zeros((m, d), dtype=np.float64)
    if m == 0 or n == 0:
        return out.astype(np.float32)
    starts, ends = row_iv[:, 0], row_iv[:, 1]
    s, e = words[:, 0].astype(np.float64), words[:, 1].astype(np.float64)
    x = row_feats.astype(np.float64, copy=False)
    if n == 1 or np.all(np.diff(ends) >= 0):
        hi = np.searchsorted(starts, e - EPS, side="left")  # rows starting before the word ends
        lo = np.searchsorted(ends, s + EPS, side="right")  # rows ending after the word starts
        count = hi - lo
        has = count > 0
        if has.any():
            padded = np.concatenate([x, np.zeros((1, d))], axis=0)  # so an index n is valid
            idx = np.empty(2 * m, dtype=np.intp)
            idx[0::2] = np.minimum(lo, n)
            idx[1::2] = hi
            sums = np.add.reduceat(padded, idx, axis=0)[0::2]
            with np.errstate(invalid="ignore"):
                out[has] = sums[has] / count[has, None]
    else:
        for i in range(m):
            mask = (starts < e[i] - EPS) & (ends > s[i] + EPS)
            if mask.any():
                with np.errstate(invalid="ignore"):
                    out[i] = x[mask].mean(axis=0)
    return out.astype(np.float32)


def hash_video_split(videos, fractions: dict | None = None) -> dict[str, list[str]]:
    """Deterministic video-level split: videos ranked by SHA-256 of ``"mskt-csd-split:" + id``;
    the first ~70% are train, the next ~10% valid, the rest test (rounded half up; with 3 or
    more videos valid and test get at least one each). Independent of input order and of
    PYTHONHASHSEED."""
    fr = fractions or HASH_SPLIT_FRACTIONS
    ranked = sorted(set(videos), key=lambda v: hashlib.sha256(f"mskt-csd-split:{v}".encode()).hexdigest())
    n = len(ranked)
    n_valid = math.floor(fr["valid"] * n + 0.5)
    n_test = math.floor(fr["test"] * n + 0.5)
    if n >= 3:
        n_valid, n_test = max(n_valid, 1), max(n_test, 1)
    n_train = n - n_valid - n_test
    return {
        "train": ranked[:n_train],
        "valid": ranked[n_train : n_train + n_valid],
        "test": ranked[n_train + n_valid :],
    }


def _dataset_name(label_src) -> str:
    raw = label_src.metadata.get("dataset name")
    if isinstance(raw, str) and raw.strip():
        key = raw.strip().lower().replace("cmu-", "").replace("cmu_", "")
        return key
    if isinstance(label_src, _FileSource):
        return label_src.path.stem
    return label_src.name


def align_csds(
    features: dict,
    labels,
    *,
    reference: str = "text",
    seq_len: int = 50,
    folds: dict | None = None,
    name: str | None = None,
    task: str = "regression",
    keep: str = "last",
) -> MultimodalDataset:
    """Word-align feature sequences to labelled opinion segments (see the module docstring).

    ``features`` maps each of text / audio / vision to a ``.csd`` path or a :class:`CsdSequence`;
    ``labels`` is the label sequence. ``reference`` names the word-level modality. Each segment
    becomes up to ``seq_len`` word steps, left-padded; longer segments keep their last ``seq_len``
    words (``keep="last"``, the SDK's ``get_tensors(direction=False)``) or first (``keep="first"``).

    Labels: ``task="regression"`` takes the first label column (sentiment, in [-3, 3]).
    ``task="emotions"`` needs a label sequence with exactly 4 columns of 0/1 in the order
    neutral, happy, sad, angry (MulT's IEMOCAP layout); CMU-MOSEI's emotion columns are
    intensities, not that, and are refused.
    """
    seq_len = _check_align_arguments(features, reference, seq_len, task, keep)
    with contextlib.ExitStack() as stack:
        srcs = {m: _source(features[m], stack) for m in MODALITIES}
        lab = _source(labels, stack)
        _check_align_sources(srcs, lab, task)
        label_videos = list(lab.videos)
        fold_map, fold_source, unassigned = _resolve_folds(folds, label_videos)
        per_split, dropped = _segments(srcs, lab, label_videos, fold_map, reference, seq_len, keep, task)
        dims = {m: srcs[m].dim or 0 for m in MODALITIES}
        splits = {s: _padded_split(per_split[s], dims, seq_len, task, lab) for s in SPLITS}
        if dropped:
            log.warning("%s: dropped %d labelled segment(s) with no %s interval or shorter than %g s (e.g. %s)",
                        lab.where, len(dropped), reference, EPS, dropped[0])
        if unassigned:
            log.warning("%s: %d labelled video(s) are in no fold and were skipped (e.g. %s)",
                        lab.where, len(unassigned), unassigned[0])
        meta = _aligned_meta(name or _dataset_name(lab), task, srcs, lab, dims, fold_source, unassigned, dropped,
                             reference=reference, seq_len=seq_len, keep=keep)
    dataset = MultimodalDataset(splits=splits, meta=meta)
    replace_nonfinite(dataset)
    validate(dataset)
    return dataset


def _aligned_meta(name, task, srcs, lab, dims, fold_source, unassigned, dropped, *, reference, seq_len, keep) -> DatasetMeta:
    """What an aligned dataset records of where it came from and what alignment dropped."""
    return DatasetMeta(
        name=name,
        task=task,
        aligned=True,
        source=lab.where,
        format="csd",
        feature_names=_feature_names(srcs, dims),
        extra={
            "reference": reference,
            "seq_len": seq_len,
            "truncation": f"keep {keep} {seq_len} words; left zero padding (SDK get_tensors direction=False)",
            "folds": fold_source,
            "feature_sources": {m: srcs[m].where for m in MODALITIES},
            "sequence_names": {m: srcs[m].name for m in MODALITIES},
            "label_sequence": lab.name,
            "label_dimension_names": lab.metadata.get("dimension names"),
            "dropped_segments": len(dropped),
            "dropped_segment_ids": dropped[:50],
            "unassigned_videos": unassigned,
        },
    )


def _check_align_arguments(features, reference, seq_len, task, keep) -> int:
    """Refuse arguments :func:`align_csds` cannot use, before any file is opened; ``seq_len`` as an int."""
    if not isinstance(features, dict):
        raise ConfigError(f"features must be a dict modality -> .csd path, found {type(features).__name__}")
    missing = [m for m in MODALITIES if m not in features]
    unknown = [m for m in features if m not in MODALITIES]
    if missing or unknown:
        raise ConfigError(
            f"features must have exactly the keys {list(MODALITIES)}; missing {missing}, unknown {unknown}"
        )
    if reference not in MODALITIES:
        raise ConfigError(f"reference must be one of {list(MODALITIES)}, found {reference!r}")
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ConfigError(f"seq_len must be a positive integer, found {seq_len!r}")
    if task not in ("regression", "emotions"):
        raise ConfigError(f"task must be 'regression' or 'emotions', found {task!r}")
    if keep not in ("last", "first"):
        raise ConfigError(f"keep must be 'last' or 'first', found {keep!r}")
    return int(seq_len)


def _check_align_sources(srcs: dict, lab, task: str) -> None:
    """Numeric features and labels, the label columns ``task`` needs, every labelled video in every modality."""
    for m, src in srcs.items():
        if src.dtype is not None and src.dtype.kind not in "biuf":
            raise DataError(
                f"{src.where}: key '/{src.name}/data/*/features' holds {src.dtype} values; modality {m!r} "
                "needs numeric features (e.g. word vectors, not the words themselves)"
            )
    if lab.dtype is not None and lab.dtype.kind not in "biuf":
        raise DataError(f"{lab.where}: key '/{lab.name}/data/*/features': labels must be numeric, found {lab.dtype}")
    if task == "emotions" and lab.dim != len(EMOTIONS):
        raise DataError(
            f"{lab.where}: key '/{lab.name}/data/*/features': task 'emotions' needs {len(EMOTIONS)} 0/1 columns "
            f"({', '.join(EMOTIONS)}), found {lab.dim} column(s)"
        )
    label_videos = list(lab.videos)
    for m, src in srcs.items():
        have = set(src.videos)
        absent = [v for v in label_videos if v not in have]
        if absent:
            more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
            raise DataError(
                f"{src.where}: video {absent[0]!r}{more} is labelled in {lab.where} but key "
                f"'/{src.name}/data/{absent[0]}' is missing from the {m} sequence"
            )


def _segments(srcs: dict, lab, label_videos: list, fold_map: dict, reference: str, seq_len: int, keep: str, task: str):
    """Steps 1-3 of the module docstring, video by video: ``({split: {"feats": {m: [(L, D_m)]},
    "labels": [...], "ids": [...]}}, the ids of the dropped segments)``; ``L`` at most ``seq_len``."""
    per_split = {s: {"feats": {m: [] for m in MODALITIES}, "labels": [], "ids": []} for s in SPLITS}
    dropped: list[str] = []
    for vid in label_videos:
        split = fold_map.get(vid)
        if split is None:
            continue
        ref_feats, ref_iv = _clean_rows(*srcs[reference].get(vid))
        word_feats = {reference: ref_feats.astype(np.float32, copy=False)}
        for m in MODALITIES:
            if m != reference:
                f, iv = _clean_rows(*srcs[m].get(vid))
                word_feats[m] = average_over_intervals(ref_iv, iv, f)
        lab_feats, lab_iv = lab.get(vid)
        ws, we = ref_iv[:, 0], ref_iv[:, 1]
        bucket = per_split[split]
        for j in range(lab_iv.shape[0]):
            s, e = float(lab_iv[j, 0]), float(lab_iv[j, 1])
            if e - s <= EPS:  # the SDK skips reference intervals shorter than epsilon
                dropped.append(f"{vid}[{j}]")
                continue
            idx = np.flatnonzero((ws < e - EPS) & (we > s + EPS))
            if idx.size == 0:
                dropped.append(f"{vid}[{j}]")
                continue
            idx = idx[-seq_len:] if keep == "last" else idx[:seq_len]
            for m in MODALITIES:
                bucket["feats"][m].append(word_feats[m][idx])
            if task == "regression":
                bucket["labels"].append(np.float32(lab_feats[j, 0]))
            else:
                bucket["labels"].append(lab_feats[j, : len(EMOTIONS)])
            bucket["ids"].append(f"{vid}[{j}]")
    return per_split, dropped


def _padded_split(b: dict, dims: dict, seq_len: int, task: str, lab) -> Split:
    """One split's segments (a bucket of :func:`_segments`) as left-padded (n, seq_len, D_m) arrays
    with their true lengths (step 4), and its labels, checked to be 0/1 for ``task="emotions"``."""
    n = len(b["ids"])
    feats, lengths = {}, {}
    for m in MODALITIES:
        x = np.zeros((n, seq_len, dims[m]), dtype=np.float32)
        ln = np.zeros(n, dtype=np.int64)
        for i, seg in enumerate(b["feats"][m]):
            L = seg.shape[0]
            x[i, seq_len - L :] = seg
            ln[i] = L
        feats[m], lengths[m] = x, ln
    if task == "regression":
        y = np.asarray(b["labels"], dtype=np.float32).reshape(n)
    else:
        y = np.asarray(b["labels"], dtype=np.float64).reshape(n, len(EMOTIONS))
        if y.size and not np.isin(y, (0, 1)).all():
            raise DataError(
                f"{lab.where}: key '/{lab.name}/data/*/features': task 'emotions' needs 0/1 values per "
                f"emotion ({', '.join(EMOTIONS)}), found values in [{y.min():g}, {y.max():g}]"
            )
        y = y.astype(np.int64)
    return Split(features=feats, lengths=lengths, labels=y, ids=np.asarray(b["ids"], dtype=str))


def _feature_names(srcs: dict, dims: dict) -> dict:
    """{modality: its sequence's ``dimension names``}, where the metadata has one name per feature."""
    feature_names = {}
    for m in MODALITIES:
        names = srcs[m].metadata.get("dimension names")
        if isinstance(names, list) and len(names) == dims[m]:
            feature_names[m] = [str(x) for x in names]
    return feature_names


def _resolve_folds(folds, label_videos):
    """video -> split name, a short description of where the folds came from, unassigned videos."""
    if folds is not None:
        if not isinstance(folds, dict) or set(folds) != set(SPLITS):
            found = list(folds) if isinstance(folds, dict) else type(folds).__name__
            raise ConfigError(f"folds must map exactly {list(SPLITS)} to lists of video ids, found {found}")
        fold_map: dict[str, str] = {}
        for s in SPLITS:
            for v in folds[s]:
                if v in fold_map and fold_map[v] != s:
                    raise ConfigError(f"folds: video {v!r} is in both {fold_map[v]!r} and {s!r}")
                fold_map[str(v)] = s
        source = "user"
    else:
        standard = {v: s for s, vids in CMU_MOSI_STANDARD_FOLDS.items() for v in vids}
        if label_videos and all(v in standard for v in label_videos):
            fold_map, source = standard, "cmu-mosi-standard"
        else:
            split = hash_video_split(label_videos)
            fold_map = {v: s for s, vids in split.items() for v in vids}
            source = "hash-70/10/20"
    unassigned = [v for v in label_videos if v not in fold_map]
    return fold_map, source, unassigned


__all__ = [
    "CMU_MOSI_STANDARD_FOLDS",
    "EPS",
    "CsdSequence",
    "align_csds",
    "average_over_intervals",
    "csd_summary",
    "format_csd_summary",
    "hash_video_split",
    "read_csd",
    "write_csd",
]
