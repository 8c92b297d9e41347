"""The workspace's own feature store: any dataset in one HDF5 file, read back exactly or lazily.

Layout (format version 1, HDF5 1.10 file format; headers carry checksums and every non-empty
dataset a Fletcher-32 checksum, so a damaged file is an error on reading, not silently wrong
numbers; only the string attributes sit in an unchecked global heap)::

    /                      attrs: mskt_store_version, name, task, aligned, source, format,
                                  feature_names, nonfinite, extra (JSON), written_by
    /<split>/<modality>    float32 (N, T, D), chunked by samples, lzf-compressed
    /<split>/lengths/<m>   int64 (N,)
    /<split>/labels        float32 (N,) or int64 (N, 4)
    /<split>/ids           UTF-8 strings (N,), fixed width (stores written before: variable length)

Features are chunked along samples so a lazy reader pulls whole batches of samples with few reads.
A store is written to a temporary file and renamed, so an interrupted write never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from mskt import __version__
from mskt.data.dataset import DatasetMeta, MultimodalDataset, Split, replace_nonfinite, validate
from mskt.data.h5guard import check_hdf5
from mskt.errors import DataError
from mskt.data.presets import MODALITIES, SPLITS

STORE_VERSION = 1
_SAMPLES_PER_CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: big enough to compress, small enough to read a batch


def write_store(dataset: MultimodalDataset, path) -> Path:
    """Write ``dataset`` to ``path`` (.h5) atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    meta = dataset.meta
    try:
        # HDF5 1.10 format: object headers, B-trees and heaps carry checksums (the 1.8 default's do
        # not), so a damaged header is an error on reading; the data carry Fletcher-32 (below).
        with h5py.File(tmp, "w", libver=("v110", "v110")) as f:
            f.attrs["mskt_store_version"] = STORE_VERSION
            f.attrs["written_by"] = f"mskt {__version__}"
            f.attrs["name"] = meta.name
            f.attrs["task"] = meta.task
            f.attrs["aligned"] = bool(meta.aligned)
            f.attrs["source"] = meta.source
            f.attrs["format"] = meta.format
            f.attrs["feature_names"] = json.dumps(meta.feature_names)
            f.attrs["nonfinite"] = json.dumps(meta.nonfinite)
            f.attrs["extra"] = json.dumps(meta.extra)
            for s, sp in dataset.splits.items():
                g = f.create_group(s)
                for m in MODALITIES:
                    x = np.asarray(sp.features[m], dtype=np.float32)
                    per_sample = max(1, x.shape[1] * x.shape[2] * 4)
                    rows = int(np.clip(_SAMPLES_PER_CHUNK_BYTES // per_sample, 1, max(1, x.shape[0])))
                    chunks = (rows, x.shape[1], x.shape[2]) if x.size else None
                    g.create_dataset(
                        m, data=x, chunks=chunks, compression="lzf" if x.size else None, shuffle=bool(x.size),
                        fletcher32=bool(x.size),  # a checksum per chunk: damage is an error, not wrong numbers
                    )
                    lengths = np.asarray(sp.lengths[m], dtype=np.int64)
                    g.create_dataset(f"lengths/{m}", data=lengths, fletcher32=bool(lengths.size))
                labels = np.asarray(sp.labels)
                g.create_dataset("labels", data=labels, fletcher32=bool(labels.size))
                ids = np.asarray(sp.ids, dtype=str)
                _check_ids(ids, path, s)
                # Fixed-width UTF-8, not variable-length: variable-length strings live in a global
                # heap, which has no checksum (a damaged byte there gives wrong ids or, in libhdf5,
                # an endless loop), while fixed-width ones sit in a checksummed chunk.
                encoded = [v.encode("utf-8") for v in ids]
                utf8 = h5py.string_dtype("utf-8", max([1, *map(len, encoded)]))
                g.create_dataset("ids", data=np.array(encoded, dtype=utf8).reshape(ids.shape), fletcher32=bool(ids.size))
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves neither a half file nor a stray .tmp
        raise
    os.replace(tmp, path)
    return path


def _check_ids(ids, path, split) -> None:
    """HDF5 UTF-8 strings hold neither NUL characters nor lone surrogates: refuse them by name."""
    for i, v in enumerate(ids.reshape(-1)):
        if "\x00" in v or any("\ud800" <= c <= "\udfff" for c in v):
            raise DataError(f"{path}: split {split!r} key 'ids': id {i} ({v!r}) has a NUL character or a lone surrogate, which HDF5 UTF-8 strings cannot hold")


def _attr_json(f, key, path):
    try:
        return json.loads(f.attrs.get(key, "{}"))
    except (TypeError, ValueError):
        raise DataError(f"{path}: attribute {key!r} is not valid JSON") from None


def _attr_str(f, key, path) -> str:
    if key not in f.attrs:
        raise DataError(f"{path}: missing attribute {key!r} of the root group")
    value = f.attrs[key]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, (str, np.str_, bool, np.bool_)):
        raise DataError(f"{path}: attribute {key!r}: expected a string, found {type(value).__name__}")
    return str(value)


def _attr_bool(f, key, path) -> bool:
    value = _attr_str(f, key, path)
    if value not in ("True", "False"):
        raise DataError(f"{path}: attribute {key!r}: expected True or False, found {value!r}")
    return value == "True"


def _dataset(g, key, path):
    """``g[key]`` if it is an h5py Dataset; DataError naming '/<split>/<key>' otherwise."""
    if key not in g:
        raise DataError(f"{path}: missing dataset '{g.name}/{key}'")
    item = g[key]
    if not isinstance(item, h5py.Dataset):
        raise DataError(f"{path}: '{g.name}/{key}': expected a dataset, found {type(item).__name__}")
    return item


# What h5py raises on a damaged file: a truncated or corrupt object header, B-tree, heap or chunk
# gives OSError, RuntimeError or KeyError, a wrong shape or type ValueError or TypeError.
_H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)


def read_store(path, lazy: bool = False) -> MultimodalDataset:
    """Read a store. ``lazy=True`` leaves features as h5py datasets (the file stays open until
    ``dataset.close()``); lengths, labels and ids are always read (they are small).

    Every problem is a DataError naming the file and the HDF5 key: empty, not HDF5, truncated, a
    damaged chunk (stores written by this version carry checksums), missing or mistyped groups,
    datasets or attributes, and whatever :func:`mskt.data.dataset.validate` refuses. A lazy read checks
    feature chunks only when they are indexed. An eager read also sets non-finite feature values
    to 0 and counts them, as the pickle readers do.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    check_hdf5(path)  # a file libhdf5 would loop on is refused here, not read
    try:
        f = h5py.File(path, "r")
    except _H5_ERRORS as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from None
    key = "/"
    try:
        if "mskt_store_version" not in f.attrs:
            raise DataError(f"{path}: not an mskt feature store (no 'mskt_store_version' attribute); convert it with `mskt data convert`")
        try:
            version = int(f.attrs["mskt_store_version"])
        except (TypeError, ValueError):
            raise DataError(f"{path}: attribute 'mskt_store_version': expected an integer, found {f.attrs['mskt_store_version']!r}") from None
        if version != STORE_VERSION:
            raise DataError(f"{path}: store version {version}, this mskt reads version {STORE_VERSION}")
        meta = DatasetMeta(
            name=_attr_str(f, "name", path),
            task=_attr_str(f, "task", path),
            aligned=_attr_bool(f, "aligned", path),
            source=str(path),
            format="mskt-h5",
            feature_names=_attr_json(f, "feature_names", path),
            nonfinite=_attr_json(f, "nonfinite", path),
            extra={**_attr_json(f, "extra", path), "original_source": _attr_str(f, "source", path), "original_format": _attr_str(f, "format", path)},
        )
        splits = {}
        for s in SPLITS:
            key = f"/{s}"
            if s not in f:
                raise DataError(f"{path}: missing group {s!r}; found {sorted(f.keys())}")
            g = f[s]
            if not isinstance(g, h5py.Group):
                raise DataError(f"{path}: '/{s}': expected a group of datasets, found {type(g).__name__}")
            names = (*MODALITIES, "labels", "ids", *(f"lengths/{m}" for m in MODALITIES))
            items = {k: _dataset(g, k, path) for k in names}
            if h5py.check_string_dtype(items["ids"].dtype) is None:
                raise DataError(f"{path}: '/{s}/ids': expected UTF-8 strings, found dtype {items['ids'].dtype}")
            values = {}
            for k in names:
                key = f"/{s}/{k}"  # named by the error if reading it fails
                if k == "ids":
                    values[k] = np.array(items[k].asstr()[()], dtype=str)
                else:
                    values[k] = items[k] if (lazy and k in MODALITIES) else items[k][()]
            splits[s] = Split(
                features={m: values[m] for m in MODALITIES},
                lengths={m: values[f"lengths/{m}"] for m in MODALITIES},
                labels=values["labels"],
                ids=values["ids"],
            )
        key = "/"
        ds = MultimodalDataset(splits=splits, meta=meta)
        validate(ds)
        if not lazy:
            replace_nonfinite(ds)
    except DataError:
        f.close()
        raise
    except _H5_ERRORS as e:  # corrupt chunks, heaps or headers
        f.close()
        raise DataError(f"{path}: corrupt or unreadable store at '{key}' ({type(e).__name__}: {e})") from None
    if lazy:
        ds.resources.append(f)
    else:
        f.close()
    return ds
