"""The workspace's own feature store: any dataset in one HDF5 file, read back exactly or lazily.

Layout (format version 1)::

    /                      attrs: mskt_store_version, name, task, aligned, source, format,
                                  feature_names, nonfinite, extra (JSON), written_by
    /<split>/<modality>    float32 (N, T, D), chunked by samples, lzf-compressed
    /<split>/lengths/<m>   int64 (N,)
    /<split>/labels        float32 (N,) or int64 (N, 4)
    /<split>/ids           UTF-8 strings (N,)

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
from mskt.dataset import DatasetMeta, MultimodalDataset, Split, validate
from mskt.errors import DataError
from mskt.presets import MODALITIES, SPLITS

STORE_VERSION = 1
_SAMPLES_PER_CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: big enough to compress, small enough to read a batch


def write_store(dataset: MultimodalDataset, path) -> Path:
    """Write ``dataset`` to ``path`` (.h5) atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    meta = dataset.meta
    try:
        with h5py.File(tmp, "w") as f:
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
                    g.create_dataset(m, data=x, chunks=chunks, compression="lzf" if x.size else None, shuffle=bool(x.size))
                    g.create_dataset(f"lengths/{m}", data=np.asarray(sp.lengths[m], dtype=np.int64))
                g.create_dataset("labels", data=np.asarray(sp.labels))
                g.create_dataset("ids", data=np.asarray(sp.ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves neither a half file nor a stray .tmp
        raise
    os.replace(tmp, path)
    return path


def _attr_json(f, key, path):
    try:
        return json.loads(f.attrs.get(key, "{}"))
    except (TypeError, ValueError):
        raise DataError(f"{path}: attribute {key!r} is not valid JSON") from None


def read_store(path, lazy: bool = False) -> MultimodalDataset:
    """Read a store. ``lazy=True`` leaves features as h5py datasets (the file stays open until
    ``dataset.close()``); lengths, labels and ids are always read (they are small)."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from None
    try:
        if "mskt_store_version" not in f.attrs:
            raise DataError(f"{path}: not an mskt feature store (no 'mskt_store_version' attribute); convert it with `mskt data convert`")
        version = int(f.attrs["mskt_store_version"])
        if version != STORE_VERSION:
            raise DataError(f"{path}: store version {version}, this mskt reads version {STORE_VERSION}")
        meta = DatasetMeta(
            name=str(f.attrs["name"]),
            task=str(f.attrs["task"]),
            aligned=bool(f.attrs["aligned"]),
            source=str(path),
            format="mskt-h5",
            feature_names=_attr_json(f, "feature_names", path),
            nonfinite=_attr_json(f, "nonfinite", path),
            extra={**_attr_json(f, "extra", path), "original_source": str(f.attrs["source"]), "original_format": str(f.attrs["format"])},
        )
        splits = {}
        for s in SPLITS:
            if s not in f:
                raise DataError(f"{path}: missing group {s!r}; found {sorted(f.keys())}")
            g = f[s]
            for key in (*MODALITIES, "labels", "ids", *(f"lengths/{m}" for m in MODALITIES)):
                if key not in g:
                    raise DataError(f"{path}: missing dataset '/{s}/{key}'")
            splits[s] = Split(
                features={m: g[m] if lazy else g[m][()] for m in MODALITIES},
                lengths={m: g[f"lengths/{m}"][()] for m in MODALITIES},
                labels=g["labels"][()],
                ids=np.array(g["ids"].asstr()[()], dtype=str),
            )
        ds = MultimodalDataset(splits=splits, meta=meta)
        validate(ds)
    except DataError:
        f.close()
        raise
    except (OSError, KeyError, ValueError) as e:  # corrupt chunks, wrong types
        f.close()
        raise DataError(f"{path}: corrupt or unreadable store ({type(e).__name__}: {e})") from None
    if lazy:
        ds.resources.append(f)
    else:
        f.close()
    return ds
