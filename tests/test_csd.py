"""CMU-MultimodalSDK computational sequences: layout, reading, summary, word alignment, errors."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from mskt.data.csd import (
    CMU_MOSI_STANDARD_FOLDS,
    EPS,
    CsdSequence,
    align_csds,
    average_over_intervals,
    csd_summary,
    format_csd_summary,
    hash_video_split,
    read_csd,
    write_csd,
)
from mskt.errors import ConfigError, DataError

REAL_LABELS = Path(__file__).resolve().parents[2] / "shared/data/real/CMU_MOSI_Opinion_Labels.csd"
needs_real = pytest.mark.skipif(
    not REAL_LABELS.exists(), reason=f"real CMU-MOSI label file not found at {REAL_LABELS} (../shared is absent)"
)


def iv(*pairs):
    return np.asarray(pairs, dtype=np.float64).reshape(-1, 2)


def col(*values):
    return np.asarray(values, dtype=np.float32).reshape(-1, 1)


# ----------------------------------------------------------------------------------------------
# Layout: write / read round trip, and a file built with raw h5py calls


def test_write_read_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    seq = CsdSequence(
        name="COVAREP",
        data={
            "vid1": (rng.standard_normal((5, 3)).astype(np.float32), iv([0, 1], [1, 2], [2, 3], [3, 4], [4, 5])),
            "vid_2-x": (rng.standard_normal((2, 3)).astype(np.float32), iv([0.5, 0.6], [0.6, 0.7])),
        },
        metadata={"dataset name": "CMU-MOSI", "dimension names": ["a", "b", "c"], "md5": None, "version": 1.0},
    )
    path = write_csd(tmp_path / "cov.csd", seq)
    back = read_csd(path)
    assert back.name == "COVAREP"
    assert list(back.data) == ["vid1", "vid_2-x"]
    for vid, (f, t) in seq.data.items():
        bf, bt = back.data[vid]
        assert bf.dtype == np.float32 and bf.shape == f.shape
        np.testing.assert_array_equal(bf, f)
        np.testing.assert_array_equal(bt, t)
    assert back.metadata == seq.metadata
    assert back.dim == 3 and back.n_segments == 7

    # the layout written is the SDK's: one root group, data/<vid>/{features,intervals},
    # metadata/<key> as (1,) UTF-8 variable-length strings holding JSON
    with h5py.File(path, "r") as f:
        assert list(f.keys()) == ["COVAREP"]
        assert set(f["COVAREP"].keys()) == {"data", "metadata"}
        assert set(f["COVAREP/data/vid1"].keys()) == {"features", "intervals"}
        ds = f["COVAREP/metadata/dataset name"]
        assert ds.shape == (1,)
        assert h5py.check_string_dtype(ds.dtype).encoding == "utf-8"
        assert ds[0] == b'"CMU-MOSI"'
        assert f["COVAREP/metadata/md5"][0] == b"null"
        assert json.loads(f["COVAREP/metadata/dimension names"][0]) == ["a", "b", "c"]


def test_read_file_built_with_raw_h5py(tmp_path):
    """Pin the layout independently of write_csd: what the SDK (and the real file) hold."""
    path = tmp_path / "labels.csd"
    string = h5py.special_dtype(vlen=str)
    with h5py.File(path, "w") as f:
        root = f.create_group("Opinion Segment Labels")
        g = root.create_group("data/abc123")
        g.create_dataset("features", data=np.array([[2.4], [-0.8]], dtype=np.float32))
        g.create_dataset("intervals", data=np.array([[51.9, 55.9], [56.0, 66.7]], dtype=np.float32))
        meta = root.create_group("metadata")
        for key, raw in {
            "dataset name": '"CMU-MOSI"',
            "dimension names": '["sentiment score"]',
            "md5": "null",
            "alignment compatible": "true",
            "free text": "not json {",
        }.items():
            ds = meta.create_dataset(key, (1,), dtype=string)
            ds[0] = raw
    seq = read_csd(path)
    assert seq.name == "Opinion Segment Labels"
    feats, ints = seq.data["abc123"]
    np.testing.assert_array_equal(feats, np.array([[2.4], [-0.8]], dtype=np.float32))
    np.testing.assert_array_equal(ints, np.array([[51.9, 55.9], [56.0, 66.7]], dtype=np.float32))
    assert seq.metadata == {
        "dataset name": "CMU-MOSI",
        "dimension names": ["sentiment score"],
        "md5": None,
        "alignment compatible": True,
        "free text": "not json {",  # undecodable JSON is kept as the string
    }


def test_summary_of_small_file(tmp_path):
    seq = CsdSequence(
        "FACET",
        {"a": (np.array([[1, -2], [np.inf, 4]], np.float32), iv([0, 1], [1, 2])), "b": (np.array([[0.5, 0]], np.float32), iv([3, 4]))},
        {"dimension names": ["x", "y"]},
    )
    path = write_csd(tmp_path / "facet.csd", seq)
    s = csd_summary(path)
    assert (s["name"], s["n_videos"], s["n_segments"], s["dim"]) == ("FACET", 2, 3, 2)
    assert s["dimension_names"] == ["x", "y"]
    assert s["nonfinite"] == 1
    assert s["feature_min"] == -2 and s["feature_max"] == 4
    assert s["feature_mean"] == pytest.approx((1 - 2 + 4 + 0.5 + 0) / 5)
    text = format_csd_summary(s)
    assert "2 videos, 3 segments" in text and "[-2, 4]" in text and "non-finite values: 1" in text


# ----------------------------------------------------------------------------------------------
# The real CMU-MOSI label file


@needs_real
def test_real_label_file():
    seq = read_csd(REAL_LABELS)
    assert seq.name == "Opinion Segment Labels"
    assert len(seq.data) == 93
    assert seq.n_segments == 2199
    assert seq.dim == 1
    labels = np.concatenate([f[:, 0] for f, _ in seq.data.values()])
    assert labels.min() >= -3 and labels.max() <= 3
    assert seq.metadata["dataset name"] == "CMU-MOSI"
    assert seq.metadata["dimension names"] == ["sentiment score"]
    assert seq.metadata["md5"] is None

    s = csd_summary(REAL_LABELS)
    assert (s["n_videos"], s["n_segments"], s["dim"], s["nonfinite"]) == (93, 2199, 1, 0)
    assert s["feature_min"] == -3 and s["feature_max"] == 3
    text = format_csd_summary(s)
    assert "93 videos, 2199 segments" in text
    assert "[-3, 3]" in text
    assert "sentiment score" in text


@needs_real
def test_standard_mosi_folds_match_mult_split_sizes():
    seq = read_csd(REAL_LABELS)
    assert set(seq.data) == {v for vids in CMU_MOSI_STANDARD_FOLDS.values() for v in vids}
    sizes = {s: sum(seq.data[v][1].shape[0] for v in vids) for s, vids in CMU_MOSI_STANDARD_FOLDS.items()}
    assert sizes == {"train": 1284, "valid": 229, "test": 686}


@needs_real
def test_align_synthetic_features_to_real_labels():
    labels = read_csd(REAL_LABELS)
    rng = np.random.default_rng(1)

    def frames(step, dim):
        data = {}
        for vid, (_, t) in labels.data.items():
            starts = np.arange(0.0, float(t.max()) + 1.0, step)
            data[vid] = (rng.standard_normal((len(starts), dim)).astype(np.float32), np.stack([starts, starts + step], 1))
        return CsdSequence(f"step{step}", data, {})

    ds = align_csds({"text": frames(0.4, 4), "audio": frames(0.1, 3), "vision": frames(0.2, 2)}, labels)
    assert ds.meta.extra["folds"] == "cmu-mosi-standard"
    # the one zero-length segment is skipped, as the SDK's align skips it
    assert ds.meta.extra["dropped_segment_ids"] == ["2WGyTLYerpo[43]"]
    assert {s: len(sp) for s, sp in ds.splits.items()} == {"train": 1283, "valid": 229, "test": 686}
    assert ds.meta.name == "mosi" and ds.meta.format == "csd" and ds.meta.aligned
    assert ds.seq_lens == {"text": 50, "audio": 50, "vision": 50}
    tr = ds["train"]
    assert tr.labels.dtype == np.float32 and tr.labels.min() >= -3 and tr.labels.max() <= 3
    assert tr.lengths["text"].max() == 50 and tr.lengths["text"].min() >= 1


# ----------------------------------------------------------------------------------------------
# Alignment on hand-built sequences (expected values worked out by hand)


def tiny_sequences():
    """Two videos. Words (text, D=2) every second in vidA, every half second in vidB; audio at a
    finer rate; vision with rows straddling word boundaries."""
    text = CsdSequence(
        "glove",
        {
            "vidA": (
                np.array([[1, 10], [2, 20], [3, 30], [99, 99], [5, 50]], np.float32),
                iv([0, 1], [1, 2], [2, 3], [3, 3], [5, 6]),  # [3, 3] has zero length: dropped
            ),
            "vidB": (np.array([[7, 70], [8, 80]], np.float32), iv([0, 0.5], [0.5, 1])),
        },
        {"dimension names": ["g0", "g1"]},
    )
    audio = CsdSequence(
        "covarep",
        {
            # 0.5 s frames, none after 3 s: w0 -> (1+3)/2, w1 -> (5+7)/2, w2 -> (9+11)/2, w4 -> zeros
            "vidA": (col(1, 3, 5, 7, 9, 11), iv([0, 0.5], [0.5, 1], [1, 1.5], [1.5, 2], [2, 2.5], [2.5, 3])),
            # 0.25 s frames, one -inf: w0 -> (2+4)/2, w1 -> -inf -> replaced by 0
            "vidB": (col(2, 4, -np.inf, 6), iv([0, 0.25], [0.25, 0.5], [0.5, 0.75], [0.75, 1])),
        },
        {},
    )
    vision = CsdSequence(
        "facet",
        {
            # w0 -> 4, w1 overlaps both rows -> (4+8)/2, w2 -> 8, w4 -> zeros
            "vidA": (col(4, 8), iv([0, 1.5], [1.5, 3.5])),
            "vidB": (col(5), iv([0, 1])),
        },
        {},
    )
    labels = CsdSequence(
        "Opinion Segment Labels",
        {
            # [0, 2] -> w0, w1 (w2 only touches it); [0, 6] -> w0 w1 w2 w4; [4, 4.5] -> no word
            "vidA": (col(1.5, -2.0, 0.5), iv([0, 2], [0, 6], [4, 4.5])),
            "vidB": (col(3.0), iv([0, 1])),
        },
        {"dimension names": ["sentiment score"]},
    )
    return {"text": text, "audio": audio, "vision": vision}, labels


FOLDS = {"train": ["vidA"], "valid": ["vidB"], "test": []}


def test_align_by_hand():
    feats, labels = tiny_sequences()
    ds = align_csds(feats, labels, seq_len=3, folds=FOLDS, name="tiny")
    tr, va, te = ds["train"], ds["valid"], ds["test"]

    assert list(tr.ids) == ["vidA[0]", "vidA[1]"]  # vidA[2] has no word and is dropped
    assert ds.meta.extra["dropped_segment_ids"] == ["vidA[2]"]
    np.testing.assert_array_equal(tr.labels, np.array([1.5, -2.0], np.float32))
    assert tr.labels.dtype == np.float32
    for m in ("text", "audio", "vision"):
        assert tr.features[m].dtype == np.float32 and tr.lengths[m].dtype == np.int64
        np.testing.assert_array_equal(tr.lengths[m], [2, 3])

    # vidA[0]: 2 words, left-padded with one zero step
    np.testing.assert_array_equal(tr.text[0], [[0, 0], [1, 10], [2, 20]])
    np.testing.assert_array_equal(tr.audio[0], [[0], [2], [6]])
    np.testing.assert_array_equal(tr.vision[0], [[0], [4], [6]])
    # vidA[1]: 4 words truncated to the last 3 (w1, w2, w4); w4 has no audio / vision rows -> zeros
    np.testing.assert_array_equal(tr.text[1], [[2, 20], [3, 30], [5, 50]])
    np.testing.assert_array_equal(tr.audio[1], [[6], [10], [0]])
    np.testing.assert_array_equal(tr.vision[1], [[6], [8], [0]])

    assert list(va.ids) == ["vidB[0]"]
    np.testing.assert_array_equal(va.labels, [3.0])
    np.testing.assert_array_equal(va.text[0], [[0, 0], [7, 70], [8, 80]])
    np.testing.assert_array_equal(va.audio[0], [[0], [3], [0]])  # the -inf word became 0
    np.testing.assert_array_equal(va.vision[0], [[0], [5], [5]])
    assert ds.meta.nonfinite == {"valid/audio": 1}

    assert len(te) == 0 and te.text.shape == (0, 3, 2)
    assert ds.dims == {"text": 2, "audio": 1, "vision": 1}
    assert ds.meta.name == "tiny" and ds.meta.format == "csd" and ds.meta.aligned is True
    assert ds.meta.feature_names == {"text": ["g0", "g1"]}
    assert ds.meta.extra["folds"] == "user"


def test_align_keep_first_and_longer_seq_len():
    feats, labels = tiny_sequences()
    first = align_csds(feats, labels, seq_len=3, folds=FOLDS, keep="first")
    np.testing.assert_array_equal(first["train"].text[1], [[1, 10], [2, 20], [3, 30]])
    np.testing.assert_array_equal(first["train"].audio[1], [[2], [6], [10]])

    wide = align_csds(feats, labels, seq_len=6, folds=FOLDS)
    np.testing.assert_array_equal(wide["train"].lengths["text"], [2, 4])
    np.testing.assert_array_equal(wide["train"].vision[1], [[0], [0], [4], [6], [8], [0]])


def test_align_from_files_equals_in_memory(tmp_path):
    feats, labels = tiny_sequences()
    paths = {m: write_csd(tmp_path / f"{m}.csd", s) for m, s in feats.items()}
    label_path = write_csd(tmp_path / "labels.csd", labels)
    from_files = align_csds(paths, label_path, seq_len=3, folds=FOLDS)
    in_memory = align_csds(feats, labels, seq_len=3, folds=FOLDS)
    for s in ("train", "valid", "test"):
        for m in ("text", "audio", "vision"):
            np.testing.assert_array_equal(from_files[s].features[m], in_memory[s].features[m])
            np.testing.assert_array_equal(from_files[s].lengths[m], in_memory[s].lengths[m])
        np.testing.assert_array_equal(from_files[s].labels, in_memory[s].labels)
        np.testing.assert_array_equal(from_files[s].ids, in_memory[s].ids)
    assert from_files.meta.source == str(label_path)
    assert from_files.meta.name == "labels"


def test_default_folds_standard_mosi_or_hash():
    feats, labels = tiny_sequences()

    def renamed(seq, mapping):
        return CsdSequence(seq.name, {mapping[k]: v for k, v in seq.data.items()}, seq.metadata)

    mosi_ids = {"vidA": "2iD-tVS8NPw", "vidB": "WKA5OygbEKI"}  # a train and a valid video
    ds = align_csds({m: renamed(s, mosi_ids) for m, s in feats.items()}, renamed(labels, mosi_ids), seq_len=3)
    assert ds.meta.extra["folds"] == "cmu-mosi-standard"
    assert list(ds["train"].ids) == ["2iD-tVS8NPw[0]", "2iD-tVS8NPw[1]"]
    assert list(ds["valid"].ids) == ["WKA5OygbEKI[0]"]

    ds = align_csds(feats, labels, seq_len=3)
    assert ds.meta.extra["folds"] == "hash-70/10/20"
    assert sum(len(sp) for sp in ds.splits.values()) == 3


def test_hash_split_is_deterministic_and_proportional():
    vids = [f"v{i:03d}" for i in range(100)]
    a, b = hash_video_split(vids), hash_video_split(list(reversed(vids)))
    assert a == b
    assert [len(a[s]) for s in ("train", "valid", "test")] == [70, 10, 20]
    assert set(a["train"]) | set(a["valid"]) | set(a["test"]) == set(vids)
    small = hash_video_split(["x", "y", "z"])
    assert all(len(small[s]) == 1 for s in ("train", "valid", "test"))


def test_emotions_task():
    feats, labels = tiny_sequences()
    emo = CsdSequence(
        "Emotion Labels",
        {
            "vidA": (np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], np.float32), labels.data["vidA"][1]),
            "vidB": (np.array([[0, 0, 1, 1]], np.float32), labels.data["vidB"][1]),
        },
        {},
    )
    ds = align_csds(feats, emo, seq_len=3, folds=FOLDS, task="emotions")
    assert ds.n_outputs == 4
    assert ds["train"].labels.dtype == np.int64
    np.testing.assert_array_equal(ds["train"].labels, [[0, 1, 0, 0], [1, 0, 0, 0]])
    with pytest.raises(DataError, match="task 'emotions' needs 4"):
        align_csds(feats, labels, seq_len=3, folds=FOLDS, task="emotions")


def naive_sdk_average(words, rows, feats):
    """The SDK's per-word intersect-and-clip then average, one word and one row at a time."""
    out = np.zeros((len(words), feats.shape[1]))
    for i, (s, e) in enumerate(words):
        picked = [feats[j] for j, (a, b) in enumerate(rows) if min(b, e) - max(a, s) > EPS]
        if picked:
            out[i] = np.mean(picked, axis=0)
    return out


@pytest.mark.parametrize("overlapping_rows", [False, True])
def test_vectorised_average_matches_naive(overlapping_rows):
    rng = np.random.default_rng(3)
    starts = np.cumsum(rng.uniform(0.2, 0.6, 40))
    words = np.stack([starts, starts + rng.uniform(0.05, 0.5, 40)], 1)
    if overlapping_rows:  # random durations: row ends not sorted, the masked path
        rs = np.sort(rng.uniform(0, 20, 60))
        rows = np.stack([rs, rs + rng.uniform(0.01, 3.0, 60)], 1)
    else:  # frames: the searchsorted / reduceat path
        rs = np.arange(0, 20, 0.07)
        rows = np.stack([rs, rs + 0.07], 1)
    feats = rng.standard_normal((len(rows), 3)).astype(np.float32)
    got = average_over_intervals(words, rows, feats)
    np.testing.assert_allclose(got, naive_sdk_average(words, rows, feats), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Errors name the file and the HDF5 key


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.csd"
    path.write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(DataError, match="corrupt.csd") as e:
        read_csd(path)
    assert "HDF5" in str(e.value)
    with pytest.raises(DataError, match="corrupt.csd"):
        csd_summary(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.csd: file not found"):
        read_csd(tmp_path / "nope.csd")


def _write_raw(path, build):
    with h5py.File(path, "w") as f:
        build(f)
    return path


def _good_video(g, n=2, nf=None, d=3):
    g.create_dataset("features", data=np.zeros((n if nf is None else nf, d), np.float32))
    g.create_dataset("intervals", data=np.zeros((n, 2), np.float32))


def test_two_root_groups(tmp_path):
    def build(f):
        for name in ("SeqOne", "SeqTwo"):
            _good_video(f.create_group(f"{name}/data/v1"))
            f.create_group(f"{name}/metadata")

    path = _write_raw(tmp_path / "two_roots.csd", build)
    with pytest.raises(DataError) as e:
        read_csd(path)
    msg = str(e.value)
    assert "two_roots.csd" in msg and "exactly one root group" in msg and "SeqOne" in msg and "SeqTwo" in msg


def test_missing_intervals(tmp_path):
    def build(f):
        _good_video(f.create_group("Seq/data/v1"))
        f.create_group("Seq/data/v2").create_dataset("features", data=np.zeros((2, 3), np.float32))
        f.create_group("Seq/metadata")

    path = _write_raw(tmp_path / "no_intervals.csd", build)
    with pytest.raises(DataError) as e:
        read_csd(path)
    assert "no_intervals.csd" in str(e.value) and "/Seq/data/v2/intervals" in str(e.value)


def test_mismatched_rows(tmp_path):
    def build(f):
        _good_video(f.create_group("Seq/data/v1"), n=4, nf=3)
        f.create_group("Seq/metadata")

    path = _write_raw(tmp_path / "mismatch.csd", build)
    with pytest.raises(DataError) as e:
        read_csd(path)
    msg = str(e.value)
    assert "mismatch.csd" in msg and "/Seq/data/v1" in msg and "3 rows" in msg and "4" in msg


@pytest.mark.parametrize(
    "case, key",
    [
        ("bad_interval_shape", "/Seq/data/v1/intervals"),
        ("features_1d", "/Seq/data/v1/features"),
        ("dim_differs", "/Seq/data/v2/features"),
        ("no_metadata", "/Seq/metadata"),
    ],
)
def test_other_layout_errors(tmp_path, case, key):
    def build(f):
        g = f.create_group("Seq/data/v1")
        if case == "bad_interval_shape":
            g.create_dataset("features", data=np.zeros((2, 3), np.float32))
            g.create_dataset("intervals", data=np.zeros((2, 3), np.float32))
        elif case == "features_1d":
            g.create_dataset("features", data=np.zeros(2, np.float32))
            g.create_dataset("intervals", data=np.zeros((2, 2), np.float32))
        else:
            _good_video(g)
        if case == "dim_differs":
            _good_video(f.create_group("Seq/data/v2"), d=5)
        if case != "no_metadata":
            f.create_group("Seq/metadata")

    path = _write_raw(tmp_path / f"{case}.csd", build)
    with pytest.raises(DataError) as e:
        read_csd(path)
    assert f"{case}.csd" in str(e.value) and key in str(e.value)


def test_align_errors(tmp_path):
    feats, labels = tiny_sequences()
    audio_path = write_csd(tmp_path / "audio_short.csd", CsdSequence("covarep", {"vidA": feats["audio"].data["vidA"]}, {}))
    with pytest.raises(DataError) as e:
        align_csds({**feats, "audio": audio_path}, labels, folds=FOLDS)
    msg = str(e.value)
    assert "audio_short.csd" in msg and "'vidB'" in msg and "/covarep/data/vidB" in msg

    with pytest.raises(ConfigError, match="missing \\['vision'\\]"):
        align_csds({"text": feats["text"], "audio": feats["audio"]}, labels)
    with pytest.raises(ConfigError, match="folds must map"):
        align_csds(feats, labels, folds={"train": ["vidA"]})
    with pytest.raises(ConfigError, match="task must be"):
        align_csds(feats, labels, task="classification")
