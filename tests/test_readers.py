"""Tests for mskt.data.readers: the MulT and MMSA pickle readers, the restricted unpickler and
``load_dataset``.

Every file here is written by ``tests/formats.py`` in the layouts REFERENCE.md describes, and every
expectation is stated from what the writer put in (never from the reader's own helpers).
"""

from __future__ import annotations

import logging
import pickle
import warnings

import numpy as np
import pytest

from mskt.errors import DataError
from mskt.data.readers import load_dataset, read_mmsa_pickle, read_mult_pickle, read_pickle, safe_load_pickle

try:
    import formats as fmt
except ImportError:  # tests/ imported as a package
    from tests import formats as fmt

MODS = fmt.MODS
SPLITS = fmt.SPLIT_NAMES


def _expected_ids(raw):
    return ["_".join(b.decode() for b in row) for row in raw]


def _assert_mult_matches(ds, obj, lens, *, task):
    for s in SPLITS:
        sp, src = ds[s], obj[s]
        n = src["labels"].shape[0]
        assert len(sp) == n
        for m in MODS:
            x = sp.features[m]
            assert x.dtype == np.float32
            assert x.shape == src[m].shape
            np.testing.assert_array_equal(x, src[m].astype(np.float32))
            assert sp.lengths[m].dtype == np.int64
            np.testing.assert_array_equal(sp.lengths[m], lens[s][m])
        if task == "regression":
            assert sp.labels.dtype == np.float32 and sp.labels.shape == (n,)
            np.testing.assert_array_equal(sp.labels, src["labels"][:, 0, 0])
        else:
            assert sp.labels.dtype == np.int64 and sp.labels.shape == (n, 4)
            # one-hot [absent, present] per emotion -> 1 where "present" is hot
            np.testing.assert_array_equal(sp.labels, (src["labels"][:, :, 1] == 1).astype(np.int64))
        if "id" in src:
            assert list(sp.ids) == _expected_ids(src["id"])
        else:
            assert list(sp.ids) == [f"{s}_{i}" for i in range(n)]


# ----------------------------------------------------------------------------------------------
# MulT pickles


@pytest.mark.parametrize(
    "preset,aligned",
    [("mosi", True), ("mosi", False), ("mosei", True), ("mosei", False), ("iemocap", True), ("iemocap", False)],
)
def test_mult_pickle_round_trip(tmp_path, preset, aligned):
    path, obj, lens = fmt.write_mult_pickle(tmp_path, preset, aligned)
    ds = load_dataset(path)
    task = "emotions" if preset == "iemocap" else "regression"
    assert ds.meta.name == preset
    assert ds.meta.task == task
    assert ds.meta.aligned is aligned
    assert ds.meta.format == "mult-pickle"
    assert ds.meta.source == str(path)
    assert ds.meta.nonfinite == {}
    assert ds.n_outputs == (4 if task == "emotions" else 1)
    shape = fmt.MULT_SHAPES[preset]
    assert ds.dims == shape["dims"]
    steps = {m: shape["aligned"] for m in MODS} if aligned else shape["unaligned"]
    assert ds.seq_lens == steps
    _assert_mult_matches(ds, obj, lens, task=task)


def test_mult_mosi_ids_are_joined_byte_triples(tmp_path):
    path, obj, _ = fmt.write_mult_pickle(tmp_path, "mosi", True)
    ds = read_mult_pickle(path)
    assert ds["train"].ids[0] == "vidtrain0_0_1"
    assert ds["test"].ids[3] == "vidtest3_3_4"
    assert ds["train"].ids.dtype.kind == "U"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mult_reader_does_not_modify_caller_object(tmp_path, dtype):
    obj, lens = fmt.mult_object("mosi", True, dtype=dtype)
    obj["train"]["audio"][0, -1, 0] = -np.inf
    path = fmt.write_pickle(tmp_path / "mosi_data.pkl", obj)
    ds = read_mult_pickle(path, obj)
    assert obj["train"]["audio"][0, -1, 0] == -np.inf  # the caller's array was copied, not zeroed
    assert ds["train"].audio.dtype == np.float32
    np.testing.assert_array_equal(ds["valid"].text, obj["valid"]["text"].astype(np.float32))


def test_mult_unknown_file_name_uses_stem_and_noalign(tmp_path):
    obj, lens = fmt.mult_object("mosi", False)
    ds = load_dataset(fmt.write_pickle(tmp_path / "my_mosi_noalign.pkl", obj))
    assert ds.meta.name == "my_mosi_noalign"
    assert ds.meta.aligned is False
    _assert_mult_matches(ds, obj, lens, task="regression")


def test_mult_zero_length_sample_has_length_zero(tmp_path):
    obj, lens = fmt.mult_object("mosi", False)
    obj["valid"]["vision"][2] = 0.0
    ds = load_dataset(fmt.write_pickle(tmp_path / "mosi_data_noalign.pkl", obj))
    assert ds["valid"].lengths["vision"][2] == 0
    assert ds["valid"].lengths["audio"][2] == lens["valid"]["audio"][2]


@pytest.mark.parametrize("protocol", [2, 5])
def test_pickle_protocols_load(tmp_path, protocol):
    path, obj, lens = fmt.write_mult_pickle(tmp_path, "iemocap", True, protocol=protocol)
    raw = path.read_bytes()
    if protocol == 2:
        assert b"_reconstruct" in raw and b"_frombuffer" not in raw
    else:
        assert b"_frombuffer" in raw
    _assert_mult_matches(load_dataset(path), obj, lens, task="emotions")


def test_numpy1_module_names_load(tmp_path):
    """Pickles written under numpy 1.x name numpy.core.*; numpy 2 renamed it numpy._core."""
    obj, lens = fmt.mult_object("mosi", True)
    raw = pickle.dumps(obj, protocol=2)
    if b"numpy._core." in raw:
        raw = raw.replace(b"numpy._core.", b"numpy.core.")  # protocol-2 GLOBALs are newline-terminated text
    assert b"numpy.core.multiarray\n_reconstruct" in raw
    path = tmp_path / "mosi_data.pkl"
    path.write_bytes(raw)
    with warnings.catch_warnings():  # and without numpy 2's "numpy.core is deprecated" warning
        warnings.simplefilter("error")
        ds = load_dataset(path)
    _assert_mult_matches(ds, obj, lens, task="regression")


# ----------------------------------------------------------------------------------------------
# MMSA pickles


@pytest.mark.parametrize("aligned", [True, False])
def test_mmsa_pickle_shifts_to_left_padding(tmp_path, aligned):
    path, obj, lens = fmt.write_mmsa_pickle(tmp_path, aligned)
    ds = load_dataset(path)
    assert ds.meta.format == "mmsa-pickle"
    assert ds.meta.task == "regression"
    assert ds.meta.aligned is aligned
    assert ds.meta.name == "mosi"
    assert ds.dims == fmt.MMSA_DIMS
    for s in SPLITS:
        sp, src = ds[s], obj[s]
        n = len(src["regression_labels"])
        assert len(sp) == n
        np.testing.assert_array_equal(sp.labels, src["regression_labels"])
        assert list(sp.ids) == list(src["id"])
        for m in MODS:
            x, L = sp.features[m], lens[s][m]
            assert x.dtype == np.float32 and x.shape == src[m].shape
            np.testing.assert_array_equal(sp.lengths[m], L)
            np.testing.assert_array_equal(x, fmt.to_left(src[m], L))
            for i in range(n):  # spelled out: real steps at the end, zeros before them
                T = x.shape[1]
                np.testing.assert_array_equal(x[i, T - L[i]:], src[m][i, : L[i]])
                assert not x[i, : T - L[i]].any()
                assert np.all(np.any(x[i, T - L[i]:] != 0, axis=1))


def test_mmsa_text_length_comes_from_the_mask_not_the_features(tmp_path):
    obj, lens = fmt.mmsa_object(aligned=False)
    # the last real token's feature row is all zero: only the mask can say it is real
    L = int(lens["train"]["text"][2])
    obj["train"]["text"][2, L - 1] = 0.0
    ds = load_dataset(fmt.write_pickle(tmp_path / "unaligned_50.pkl", obj))
    assert ds["train"].lengths["text"][2] == L
    np.testing.assert_array_equal(ds["train"].text[2, 50 - L:], obj["train"]["text"][2, :L])


def test_mmsa_lengths_out_of_range_refused(tmp_path):
    obj, _ = fmt.mmsa_object(aligned=False)
    obj["valid"]["audio_lengths"][1] = 376
    path = fmt.write_pickle(tmp_path / "unaligned_50.pkl", obj)
    with pytest.raises(DataError) as e:
        load_dataset(path)
    msg = str(e.value)
    assert "unaligned_50.pkl" in msg and "'valid'" in msg and "audio" in msg and "376]" in msg


def test_mmsa_lengths_wrong_count_refused(tmp_path):
    obj, _ = fmt.mmsa_object(aligned=False)
    obj["test"]["vision_lengths"] = obj["test"]["vision_lengths"][:-1]
    path = fmt.write_pickle(tmp_path / "unaligned_50.pkl", obj)
    with pytest.raises(DataError) as e:
        read_mmsa_pickle(path)
    msg = str(e.value)
    assert "unaligned_50.pkl" in msg and "'test'" in msg and "vision_lengths" in msg


# ----------------------------------------------------------------------------------------------
# Malicious pickles


def _assert_refused(path, marker, global_names):
    with pytest.raises(DataError) as e:
        load_dataset(path)
    msg = str(e.value)
    assert str(path) in msg
    assert any(g in msg for g in global_names), msg
    assert "refused" in msg
    assert not marker.exists()


def test_system_payload_is_live_under_plain_pickle(tmp_path):
    """Control: the payload really runs under pickle.loads, so the refusals below mean something."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(fmt.SystemPayload(marker)))
    assert marker.exists()


def test_os_system_payload_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = fmt.write_pickle(tmp_path / "mosi_data.pkl", fmt.SystemPayload(marker))
    _assert_refused(path, marker, ("posix.system", "os.system"))


@pytest.mark.parametrize(
    "payload,names",
    [(fmt.EvalPayload, ("builtins.eval",)), (fmt.PopenPayload, ("subprocess.Popen",))],
)
def test_eval_and_popen_payloads_refused(tmp_path, payload, names):
    marker = tmp_path / "pwned"
    path = fmt.write_pickle(tmp_path / "data.pkl", payload(marker))
    _assert_refused(path, marker, names)


@pytest.mark.parametrize("where", ["id", "labels", "deep"])
def test_payload_nested_in_valid_mult_dict_refused(tmp_path, where):
    marker = tmp_path / "pwned"
    obj, _ = fmt.mult_object("mosi", True)
    if where == "deep":
        obj["test"]["extra"] = {"a": [1, (2, fmt.SystemPayload(marker))]}
    else:
        obj["valid"][where] = fmt.SystemPayload(marker)
    path = fmt.write_pickle(tmp_path / "mosi_data.pkl", obj)
    _assert_refused(path, marker, ("posix.system", "os.system"))
    with pytest.raises(DataError):
        read_mult_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "module,name",
    [
        ("builtins", "getattr"),
        ("builtins", "__import__"),
        ("builtins", "exec"),
        ("builtins", "open"),
        ("os", "system"),
        ("numpy", "load"),
        ("numpy.lib.format", "read_array"),
        ("numpy.core.multiarray", "ndarray.__reduce__"),
        ("pickle", "loads"),
    ],
)
def test_other_globals_refused(tmp_path, module, name):
    path = tmp_path / "x.pkl"
    path.write_bytes(fmt.global_only_pickle(module, name))
    with pytest.raises(DataError) as e:
        safe_load_pickle(path)
    assert f"'{module}.{name}'" in str(e.value) and str(path) in str(e.value)


# ----------------------------------------------------------------------------------------------
# Non-finite features


def test_mult_neg_inf_in_audio_replaced_counted_and_logged(tmp_path, caplog):
    obj, lens = fmt.mult_object("mosi", False, seed=3)
    rng = np.random.default_rng(7)
    counts = {"train": 7, "valid": 2, "test": 0}
    positions = {}
    for s, k in counts.items():
        a = obj[s]["audio"]
        real = [(i, t, d) for i in range(a.shape[0]) for t in range(a.shape[1]) for d in range(4) if a[i, t, 4] != 0]
        pick = [real[j] for j in rng.choice(len(real), size=k, replace=False)]
        for i, t, d in pick:
            a[i, t, d] = -np.inf  # dim 4 stays finite and non-zero: lengths must not change
        positions[s] = pick
    original = {s: obj[s]["audio"].copy() for s in SPLITS}
    path = fmt.write_pickle(tmp_path / "mosi_data_noalign.pkl", obj)
    with caplog.at_level(logging.INFO, logger="mskt"):  # expected, handled: a note (INFO), not a warning
        ds = load_dataset(path)
    assert ds.meta.nonfinite == {"train/audio": 7, "valid/audio": 2}
    for s in SPLITS:
        for m in MODS:
            assert np.isfinite(ds[s].features[m]).all()
            np.testing.assert_array_equal(ds[s].lengths[m], lens[s][m])
        expected = np.where(np.isinf(original[s]), 0.0, original[s]).astype(np.float32)
        np.testing.assert_array_equal(ds[s].audio, expected)
        for i, t, d in positions[s]:
            assert ds[s].audio[i, t, d] == 0.0
    records = [r for r in caplog.records if r.name == "mskt" and "non-finite" in r.getMessage()]  # INFO also holds the file's summary
    assert len(records) == 1
    line = records[0].getMessage()
    assert records[0].levelno == logging.INFO
    assert "train/audio: 7" in line and "valid/audio: 2" in line and "test/audio" not in line
    assert "mosi_data_noalign.pkl" in line


def test_finite_file_logs_nothing(tmp_path, caplog):
    path, _, _ = fmt.write_mult_pickle(tmp_path, "mosi", True)
    with caplog.at_level(logging.DEBUG, logger="mskt"):
        load_dataset(path)
    assert [r for r in caplog.records if r.name == "mskt" and r.levelno >= logging.WARNING] == []


def test_nan_and_inf_in_vision_counted(tmp_path):
    obj, _ = fmt.mult_object("mosei", True)
    obj["test"]["vision"][0, -1, 0] = np.nan
    obj["test"]["vision"][0, -1, 1] = np.inf
    obj["test"]["vision"][1, -1, 2] = np.nan
    ds = load_dataset(fmt.write_pickle(tmp_path / "mosei_senti_data.pkl", obj))
    assert ds.meta.nonfinite == {"test/vision": 3}
    assert np.isfinite(ds["test"].vision).all()


# ----------------------------------------------------------------------------------------------
# Errors: every message names the file and the key


def _error(path, reader=load_dataset) -> str:
    with pytest.raises(DataError) as e:
        reader(path)
    return str(e.value)


def test_vision_dim_disagrees_between_splits(tmp_path):
    obj, _ = fmt.mult_object("mosi", True)
    v = obj["valid"]["vision"]
    obj["valid"]["vision"] = np.concatenate([v, np.ones(v.shape[:2] + (1,), v.dtype)], axis=2)  # 21 dims
    path = fmt.write_pickle(tmp_path / "mosi_data.pkl", obj)
    msg = _error(path)
    assert "mosi_data.pkl" in msg and "'vision'" in msg and "'valid'" in msg and "dim 21" in msg


def test_vision_dim_disagrees_between_splits_unknown_file(tmp_path):
    obj, _ = fmt.mult_object("mosi", True)
    obj["test"]["vision"] = obj["test"]["vision"][:, :, :19]
    path = fmt.write_pickle(tmp_path / "custom.pkl", obj)  # no preset to compare with
    msg = _error(path)
    assert "custom.pkl" in msg and "'vision'" in msg and "'test'" in msg and "dim 19 disagrees" in msg


def test_dim_differs_from_paper_loads_and_says_so(tmp_path, caplog):
    """Extractors vary: a MOSI file with 4 audio features (not the paper's 5) loads, and one info line
    names the dims found beside the paper's (issue 20; tests/test_own_data.py goes further)."""
    obj, _ = fmt.mult_object("mosi", True)
    for s in SPLITS:
        obj[s]["audio"] = obj[s]["audio"][:, :, :4]
    with caplog.at_level(logging.INFO, logger="mskt"):
        ds = load_dataset(fmt.write_pickle(tmp_path / "mosi_data.pkl", obj))
    assert ds.meta.name == "mosi" and ds.dims["audio"] == 4
    lines = [r.getMessage() for r in caplog.records if r.name == "mskt" and "feature dims" in r.getMessage()]
    assert len(lines) == 1 and "mosi_data.pkl" in lines[0] and "audio 4" in lines[0] and "audio 5" in lines[0]


def test_missing_split(tmp_path):
    obj, _ = fmt.mult_object("mosi", True)
    del obj["valid"]
    msg = _error(fmt.write_pickle(tmp_path / "mosi_data.pkl", obj))
    assert "mosi_data.pkl" in msg and "'valid'" in msg


def test_missing_key(tmp_path):
    obj, _ = fmt.mult_object("mosi", True)
    del obj["test"]["audio"]
    msg = _error(fmt.write_pickle(tmp_path / "mosi_data.pkl", obj))
    assert "mosi_data.pkl" in msg and "'audio'" in msg and "'test'" in msg


def test_neither_mult_nor_mmsa(tmp_path):
    obj, _ = fmt.mult_object("mosi", True)
    del obj["train"]["labels"]
    msg = _error(fmt.write_pickle(tmp_path / "mosi_data.pkl", obj))
    assert "mosi_data.pkl" in msg and "labels" in msg and "regression_labels" in msg


def test_not_a_dict_of_splits(tmp_path):
    msg = _error(fmt.write_pickle(tmp_path / "mosi_data.pkl", [1, 2, 3]))
    assert "mosi_data.pkl" in msg and "list" in msg


@pytest.mark.parametrize("key", ["text", "audio", "vision"])
def test_n_mismatch_between_modality_and_labels(tmp_path, key):
    obj, _ = fmt.mult_object("mosi", True)
    obj["train"][key] = obj["train"][key][:5]
    msg = _error(fmt.write_pickle(tmp_path / "mosi_data.pkl", obj))
    assert "mosi_data.pkl" in msg and f"'{key}'" in msg and "'train'" in msg and "N=6" in msg and "found 5" in msg


def test_n_mismatch_labels_shorter(tmp_path):
    obj, _ = fmt.mult_object("mosei", True)
    obj["test"]["labels"] = obj["test"]["labels"][:3]
    msg = _error(fmt.write_pickle(tmp_path / "mosei_senti_data.pkl", obj))
    assert "mosei_senti_data.pkl" in msg and "'test'" in msg and "N=3" in msg and "found 4" in msg


def test_n_mismatch_ids(tmp_path):
    obj, _ = fmt.mult_object("mosi", True)
    obj["valid"]["id"] = obj["valid"]["id"][:2]
    msg = _error(fmt.write_pickle(tmp_path / "mosi_data.pkl", obj))
    assert "mosi_data.pkl" in msg and "'id'" in msg and "'valid'" in msg


def test_two_d_features(tmp_path):
    obj, _ = fmt.mult_object("mosi", True)
    obj["train"]["text"] = obj["train"]["text"].reshape(6, -1)
    msg = _error(fmt.write_pickle(tmp_path / "mosi_data.pkl", obj))
    assert "mosi_data.pkl" in msg and "'text'" in msg and "3-D" in msg and "(6, 15000)" in msg


def test_non_numeric_features(tmp_path):
    obj, _ = fmt.mult_object("mosi", True)
    obj["test"]["audio"] = np.array([["a"]] * 4)
    msg = _error(fmt.write_pickle(tmp_path / "mosi_data.pkl", obj))
    assert "mosi_data.pkl" in msg and "'audio'" in msg and "numeric" in msg


@pytest.mark.parametrize("bad", [np.array(["a"] * 6, dtype=object), None, 1.5])
def test_mult_non_numeric_labels(tmp_path, bad):
    obj, _ = fmt.mult_object("mosi", True)
    obj["train"]["labels"] = bad
    msg = _error(fmt.write_pickle(tmp_path / "mosi_data.pkl", obj))
    assert "mosi_data.pkl" in msg and "'labels'" in msg and "'train'" in msg and "numeric" in msg


@pytest.mark.parametrize(
    "key,bad",
    [
        ("regression_labels", np.array(["pos"] * 6)),
        ("text_bert", np.full((6, 3, 50), "x")),
        ("audio_lengths", ["a"] * 6),
        ("vision_lengths", None),
    ],
)
def test_mmsa_non_numeric_arrays(tmp_path, key, bad):
    obj, _ = fmt.mmsa_object(aligned=False)
    obj["train"][key] = bad
    msg = _error(fmt.write_pickle(tmp_path / "unaligned_50.pkl", obj))
    assert "unaligned_50.pkl" in msg and f"'{key}'" in msg and "'train'" in msg and "numeric" in msg


def test_regression_labels_wrong_size(tmp_path):
    obj, _ = fmt.mult_object("mosi", True)
    obj["train"]["labels"] = np.zeros((6, 2), np.float32)
    msg = _error(fmt.write_pickle(tmp_path / "mosi_data.pkl", obj))
    assert "mosi_data.pkl" in msg and "'labels'" in msg and "(6, 2)" in msg


def test_regression_labels_out_of_range(tmp_path):
    obj, _ = fmt.mult_object("mosi", True)
    obj["test"]["labels"][2, 0, 0] = 4.5
    msg = _error(fmt.write_pickle(tmp_path / "mosi_data.pkl", obj))
    assert "mosi_data.pkl" in msg and "'labels'" in msg and "'test'" in msg and "4.5" in msg


def test_emotion_labels_wrong_shape_in_one_split(tmp_path):
    obj, _ = fmt.mult_object("iemocap", True)
    obj["valid"]["labels"] = obj["valid"]["labels"][:, :, 1]  # (N, 4) instead of (N, 4, 2)
    msg = _error(fmt.write_pickle(tmp_path / "iemocap_data.pkl", obj))
    assert "iemocap_data.pkl" in msg and "'labels'" in msg and "'valid'" in msg and "(3, 4, 2)" in msg


def test_empty_file(tmp_path):
    path = tmp_path / "mosi_data.pkl"
    path.write_bytes(b"")
    msg = _error(path)
    assert str(path) in msg and "the file is empty" in msg


def test_truncated_pickle(tmp_path):
    path, _, _ = fmt.write_mult_pickle(tmp_path, "mosi", True)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    msg = _error(path)
    assert str(path) in msg and "not a readable pickle" in msg


def test_non_pickle_bytes(tmp_path):
    path = tmp_path / "mosi_data.pkl"
    path.write_bytes(b"video,start,end,label\nabc,0,1,2.5\n")
    msg = _error(path)
    assert str(path) in msg and "not a readable pickle" in msg


def test_unknown_suffix(tmp_path):
    path = tmp_path / "features.npz"
    path.write_bytes(b"PK\x03\x04")
    msg = _error(path)
    assert str(path) in msg and "'.npz'" in msg and ".pkl" in msg and ".h5" in msg


def test_nonexistent_path(tmp_path):
    path = tmp_path / "nope" / "mosi_data.pkl"
    msg = _error(path)
    assert str(path) in msg and "no such file" in msg


def test_nonexistent_path_read_directly(tmp_path):
    path = tmp_path / "mosi_data.pkl"
    msg = _error(path, read_pickle)
    assert str(path) in msg and "cannot read" in msg


def test_csd_given_to_load_dataset(tmp_path):
    path = tmp_path / "CMU_MOSI_Opinion_Labels.csd"
    path.write_bytes(b"\x89HDF\r\n\x1a\n")
    msg = _error(path)
    assert str(path) in msg and ".csd" in msg and "mskt data align" in msg


def test_directory_with_pickle_suffix(tmp_path):
    path = tmp_path / "mosi_data.pkl"
    path.mkdir()
    msg = _error(path)
    assert str(path) in msg and "cannot read" in msg


# ----------------------------------------------------------------------------------------------
# Synthetic presets through load_dataset


def test_synthetic_mosi_through_load_dataset():
    pytest.importorskip("mskt.data.synthetic")
    ds = load_dataset("synthetic:mosi", scale=0.02)
    assert ds.meta.format == "synthetic"
    assert ds.meta.name == "mosi" and ds.meta.task == "regression" and ds.meta.aligned is True
    assert ds.dims == fmt.MULT_SHAPES["mosi"]["dims"]
    assert ds.seq_lens == {m: 50 for m in MODS}
    # 1284 / 229 / 686 scaled by 0.02 (at least 8 per split)
    assert {s: len(ds[s]) for s in SPLITS} == {"train": 26, "valid": 8, "test": 14}
    for s in SPLITS:
        for m in MODS:
            assert ds[s].features[m].dtype == np.float32
            assert np.isfinite(ds[s].features[m]).all()
        assert ds[s].labels.shape == (len(ds[s]),)
        assert np.abs(ds[s].labels).max() <= 3


def test_synthetic_unaligned_and_seed():
    pytest.importorskip("mskt.data.synthetic")
    ds = load_dataset("synthetic:iemocap-unaligned", scale=0.01, seed=1)
    assert ds.meta.aligned is False and ds.meta.task == "emotions"
    assert ds.seq_lens == fmt.MULT_SHAPES["iemocap"]["unaligned"]
    assert ds["train"].labels.shape[1:] == (4,) and ds["train"].labels.dtype == np.int64
    again = load_dataset("synthetic:iemocap-unaligned", scale=0.01, seed=1)
    np.testing.assert_array_equal(ds["valid"].audio, again["valid"].audio)


def test_existing_file_named_like_a_preset_is_a_path(tmp_path, monkeypatch):
    """A file literally called 'mosi' in the working directory is read as a file, not a preset."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mosi").write_bytes(b"x")
    with pytest.raises(DataError) as e:
        load_dataset("mosi")
    assert "unsupported file type" in str(e.value)
