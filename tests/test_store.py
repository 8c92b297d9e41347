"""Tests for mskt.data.store: the HDF5 feature store round trip (eager and lazy), its layout, atomic
writes, and the errors a broken store gives.

Datasets come from ``tests/formats.py`` MulT pickles read by the reader, so the store is tested on
what users will actually put in it.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from mskt.data.dataset import MultimodalDataset
from mskt.errors import DataError
from mskt.data.readers import load_dataset
from mskt.data.store import read_store, write_store

try:
    import formats as fmt
except ImportError:  # tests/ imported as a package
    from tests import formats as fmt

MODS = fmt.MODS
SPLITS = fmt.SPLIT_NAMES
NON_ASCII_IDS = ["vidéo_ñ_1", "视频_2", "émoji 🎉", "Ωmega$_$3"]


def _mosi(tmp_path) -> MultimodalDataset:
    obj, _ = fmt.mult_object("mosi", False, seed=11)
    obj["train"]["audio"][0, -1, 0] = -np.inf
    obj["train"]["audio"][1, -1, 1] = -np.inf
    obj["test"]["audio"][2, -1, 2] = -np.inf
    ds = load_dataset(fmt.write_pickle(tmp_path / "mosi_data_noalign.pkl", obj))
    ds["test"].ids = np.array(NON_ASCII_IDS)
    ds.meta.feature_names = {"audio": ["f0", "vuv", "naq", "qoq", "h1h2"], "vision": [f"AU{j}" for j in range(20)]}
    ds.meta.extra = {"note": "données", "seeds": [1, 2, 3], "nested": {"a": 1.5}}
    return ds


def _iemocap(tmp_path) -> MultimodalDataset:
    path, _, _ = fmt.write_mult_pickle(tmp_path, "iemocap", True, seed=5)
    return load_dataset(path)


def _assert_same(a: MultimodalDataset, b: MultimodalDataset):
    assert set(a.splits) == set(b.splits) == set(SPLITS)
    for s in SPLITS:
        x, y = a[s], b[s]
        for m in MODS:
            got = np.asarray(y.features[m][()])
            assert got.dtype == x.features[m].dtype == np.float32
            assert np.array_equal(got, x.features[m])
            assert y.lengths[m].dtype == np.int64
            assert np.array_equal(y.lengths[m], x.lengths[m])
        assert y.labels.dtype == x.labels.dtype
        assert y.labels.shape == x.labels.shape
        assert np.array_equal(y.labels, x.labels)
        assert y.ids.dtype.kind == "U"
        assert list(y.ids) == list(x.ids)
    assert b.meta.name == a.meta.name
    assert b.meta.task == a.meta.task
    assert b.meta.aligned is a.meta.aligned
    assert b.meta.feature_names == a.meta.feature_names
    assert b.meta.nonfinite == a.meta.nonfinite
    assert {k: b.meta.extra[k] for k in a.meta.extra} == a.meta.extra
    assert b.meta.extra["original_source"] == a.meta.source
    assert b.meta.extra["original_format"] == a.meta.format
    assert b.meta.format == "mskt-h5"


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("which", ["mosi", "iemocap"])
def test_round_trip_exact(tmp_path, which, lazy):
    ds = _mosi(tmp_path) if which == "mosi" else _iemocap(tmp_path)
    if which == "mosi":
        assert ds.meta.nonfinite == {"train/audio": 2, "test/audio": 1}  # the round trip has something to keep
    else:
        assert ds["train"].labels.dtype == np.int64 and ds["train"].labels.shape == (6, 4)
    out = write_store(ds, tmp_path / "store.h5")
    assert out == tmp_path / "store.h5"
    back = read_store(out, lazy=lazy)
    try:
        assert back.meta.source == str(out)
        _assert_same(ds, back)
        for s in SPLITS:
            for m in MODS:
                assert isinstance(back[s].features[m], h5py.Dataset) is lazy
    finally:
        back.close()


def test_round_trip_through_load_dataset(tmp_path):
    ds = _iemocap(tmp_path)
    path = write_store(ds, tmp_path / "iemocap.hdf5")
    back = load_dataset(path)
    _assert_same(ds, back)
    lazy = load_dataset(path, lazy=True)
    assert isinstance(lazy["train"].text, h5py.Dataset)
    lazy.close()


def test_store_of_a_store_round_trips(tmp_path):
    ds = _mosi(tmp_path)
    first = read_store(write_store(ds, tmp_path / "a.h5"))
    second = read_store(write_store(first, tmp_path / "b.h5"))
    for s in SPLITS:
        for m in MODS:
            assert np.array_equal(second[s].features[m], ds[s].features[m])
        assert list(second[s].ids) == list(ds[s].ids)
    assert second.meta.nonfinite == ds.meta.nonfinite
    assert second.meta.extra["note"] == "données"


# ----------------------------------------------------------------------------------------------
# Layout


def test_file_layout(tmp_path):
    ds = _mosi(tmp_path)
    path = write_store(ds, tmp_path / "store.h5")
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == set(SPLITS)
        assert int(f.attrs["mskt_store_version"]) == 1
        assert str(f.attrs["written_by"]).startswith("mskt ")
        assert f.attrs["name"] == "mosi"
        assert f.attrs["task"] == "regression"
        assert bool(f.attrs["aligned"]) is False
        assert f.attrs["source"] == str(tmp_path / "mosi_data_noalign.pkl")
        assert f.attrs["format"] == "mult-pickle"
        assert json.loads(f.attrs["nonfinite"]) == {"train/audio": 2, "test/audio": 1}
        assert json.loads(f.attrs["feature_names"])["audio"][0] == "f0"
        assert json.loads(f.attrs["extra"])["note"] == "données"
        for s in SPLITS:
            g = f[s]
            assert isinstance(g, h5py.Group)
            n = len(ds[s])
            for m in MODS:
                d = g[m]
                T, D = ds[s].features[m].shape[1:]
                assert d.shape == (n, T, D) and d.dtype == np.float32
                assert d.chunks is not None
                assert d.chunks[1:] == (T, D)  # chunked along samples only
                assert 1 <= d.chunks[0] <= n
                assert d.compression == "lzf"
                assert g[f"lengths/{m}"].dtype == np.int64 and g[f"lengths/{m}"].shape == (n,)
            assert g["labels"].dtype == np.float32 and g["labels"].shape == (n,)
            assert h5py.check_string_dtype(g["ids"].dtype).encoding == "utf-8"
        assert list(f["test/ids"].asstr()[()]) == NON_ASCII_IDS


def test_chunks_hold_many_samples_of_small_features(tmp_path):
    ds = _iemocap(tmp_path)  # 20 x 74 floats per sample: many samples fit in one ~1 MiB chunk
    path = write_store(ds, tmp_path / "s.h5")
    with h5py.File(path, "r") as f:
        assert f["train/audio"].chunks == (6, 20, 74)


# ----------------------------------------------------------------------------------------------
# Lazy reading


def test_lazy_subset_and_close(tmp_path):
    ds = _mosi(tmp_path)
    path = write_store(ds, tmp_path / "store.h5")
    lazy = read_store(path, lazy=True)
    x = lazy["train"].features["vision"]
    assert isinstance(x, h5py.Dataset)
    assert isinstance(lazy["train"].lengths["vision"], np.ndarray)  # small arrays are read eagerly
    idx = np.array([0, 2, 5])
    sub = lazy["train"].subset(idx)
    for m in MODS:
        assert isinstance(sub.features[m], np.ndarray)
        assert np.array_equal(sub.features[m], ds["train"].features[m][idx])
        assert np.array_equal(sub.lengths[m], ds["train"].lengths[m][idx])
    assert np.array_equal(sub.labels, ds["train"].labels[idx])
    assert list(sub.ids) == [ds["train"].ids[i] for i in idx]
    sl = lazy["test"].subset(slice(1, 3))
    assert np.array_equal(sl.audio, ds["test"].audio[1:3])
    assert list(sl.ids) == NON_ASCII_IDS[1:3]
    loaded = lazy["valid"].load()
    assert isinstance(loaded.text, np.ndarray) and np.array_equal(loaded.text, ds["valid"].text)

    assert len(lazy.resources) == 1
    lazy.close()
    assert lazy.resources == []
    assert not x.id.valid
    with pytest.raises(Exception):
        x[0]
    lazy.close()  # closing twice is harmless
    # the file is really released: it can be opened for writing and replaced
    write_store(ds, path)


def test_eager_read_keeps_no_file_open(tmp_path):
    path = write_store(_iemocap(tmp_path), tmp_path / "s.h5")
    ds = read_store(path)
    assert ds.resources == []
    with h5py.File(path, "a") as f:  # would fail if the reader still held it (HDF5 file locking)
        f.attrs["touched"] = 1


# ----------------------------------------------------------------------------------------------
# Atomic writes


def test_no_tmp_left_and_existing_file_replaced(tmp_path):
    path = tmp_path / "out" / "store.h5"
    path.parent.mkdir()
    path.write_bytes(b"an older, unrelated file")
    ds = _iemocap(tmp_path)
    write_store(ds, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["store.h5"]
    _assert_same(ds, read_store(path))
    # replace a real store with a different dataset
    other = _mosi(tmp_path)
    write_store(other, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["store.h5"]
    back = read_store(path)
    assert back.meta.name == "mosi"
    _assert_same(other, back)


def test_creates_parent_directories(tmp_path):
    path = write_store(_iemocap(tmp_path), tmp_path / "a" / "b" / "s.h5")
    assert path.exists()


def test_failed_write_leaves_old_file_and_no_tmp(tmp_path):
    path = tmp_path / "out" / "store.h5"
    ds = _iemocap(tmp_path)
    write_store(ds, path)
    before = path.read_bytes()
    ds.meta.extra = {"not json": object()}
    with pytest.raises(TypeError):
        write_store(ds, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["store.h5"]


# ----------------------------------------------------------------------------------------------
# Errors


def _error(path, **kw) -> str:
    with pytest.raises(DataError) as e:
        read_store(path, **kw)
    return str(e.value)


def test_random_bytes_h5(tmp_path):
    path = tmp_path / "junk.h5"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    msg = _error(path)
    assert str(path) in msg and "HDF5" in msg
    with pytest.raises(DataError):
        load_dataset(path)


def test_hdf5_that_is_not_a_store(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["train/text"] = np.zeros((2, 3, 4), np.float32)
    msg = _error(path)
    assert str(path) in msg and "mskt_store_version" in msg


def test_wrong_store_version(tmp_path):
    path = write_store(_iemocap(tmp_path), tmp_path / "s.h5")
    with h5py.File(path, "a") as f:
        f.attrs["mskt_store_version"] = 99
    msg = _error(path)
    assert str(path) in msg and "version 99" in msg


def test_missing_split_group(tmp_path):
    path = write_store(_iemocap(tmp_path), tmp_path / "s.h5")
    with h5py.File(path, "a") as f:
        del f["valid"]
    msg = _error(path)
    assert str(path) in msg and "'valid'" in msg


@pytest.mark.parametrize("key", ["train/labels", "test/ids", "valid/audio", "train/lengths/vision"])
def test_missing_dataset(tmp_path, key):
    path = write_store(_iemocap(tmp_path), tmp_path / "s.h5")
    with h5py.File(path, "a") as f:
        del f[key]
    for lazy in (False, True):
        msg = _error(path, lazy=lazy)
        assert str(path) in msg and f"/{key}" in msg
    with h5py.File(path, "a"):  # the failed reads closed the file
        pass


def test_bad_json_attribute(tmp_path):
    path = write_store(_iemocap(tmp_path), tmp_path / "s.h5")
    with h5py.File(path, "a") as f:
        f.attrs["nonfinite"] = "{not json"
    msg = _error(path)
    assert str(path) in msg and "'nonfinite'" in msg


def test_inconsistent_store_fails_validation(tmp_path):
    path = write_store(_iemocap(tmp_path), tmp_path / "s.h5")
    with h5py.File(path, "a") as f:
        del f["test/vision"]
        f["test/vision"] = np.zeros((4, 20, 36), np.float32)  # 36 dims where train has 35
    msg = _error(path)
    assert str(path) in msg and "'vision'" in msg and "'test'" in msg and "dim 36" in msg
