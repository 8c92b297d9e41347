"""Bad input, format by format: every reader turns it into a one-line ``DataError`` that names the
file and, where there is one, the split / key / modality; never another exception, a hang, a
crashed process or a silently wrong dataset.

Formats: MulT pickle (``mosi_data.pkl``, ``iemocap_data.pkl``), MMSA pickle (``unaligned_50.pkl``),
the mskt HDF5 store (``.h5``, written by ``write_store``) and CMU-MultimodalSDK ``.csd`` (read by
``read_csd`` and ``csd_summary``). Valid files come from the writers in ``tests/formats.py`` (and
``write_store`` / ``write_csd``) and are then damaged. What is *not* an error is tested too: a
zero-length (all-padding) sample, an empty valid / test split, a video with no rows.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest

from mskt.data.csd import CsdSequence, align_csds, csd_summary, read_csd, write_csd
from mskt.errors import DataError, MsktError
from mskt.data.readers import load_dataset, safe_load_pickle
from mskt.data.store import read_store, write_store

try:
    import formats as fmt
except ImportError:  # tests/ imported as a package
    from tests import formats as fmt

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"train": 4, "valid": 2, "test": 3}
KINDS = ("mult", "mmsa", "h5", "csd")


# ----------------------------------------------------------------------------------------------
# Valid files of each format, and reading them


def mult_file(tmp_path, obj=None, name="mosi_data.pkl") -> Path:
    if obj is None:
        obj, _ = fmt.mult_object("mosi", True, sizes=SIZES)
    return fmt.write_pickle(tmp_path / name, obj)


def mmsa_file(tmp_path, obj=None) -> Path:
    if obj is None:
        obj, _ = fmt.mmsa_object(aligned=False, sizes=SIZES)
    return fmt.write_pickle(tmp_path / "unaligned_50.pkl", obj)


def store_file(tmp_path, name="store.h5") -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    return write_store(load_dataset(mult_file(src)), tmp_path / name)


def csd_sequence() -> CsdSequence:
    rng = np.random.default_rng(0)
    data = {}
    for v, n in (("vidA", 5), ("vidB", 3)):
        start = np.arange(n, dtype=np.float64) * 0.5
        data[v] = (rng.normal(size=(n, 4)).astype(np.float32), np.stack([start, start + 0.5], axis=1))
    return CsdSequence("COVAREP", data, {"dimension names": ["f0", "vuv", "naq", "qoq"]})


def csd_file(tmp_path, seq=None, name="covarep.csd") -> Path:
    return write_csd(tmp_path / name, seq or csd_sequence())


def valid_file(kind, tmp_path) -> Path:
    return {"mult": mult_file, "mmsa": mmsa_file, "h5": store_file, "csd": csd_file}[kind](tmp_path)


def error(path, *needles, reader=load_dataset) -> str:
    """The DataError ``reader(path)`` raises: one line naming the file and every needle."""
    with pytest.raises(MsktError) as e:
        reader(path)
    assert isinstance(e.value, DataError), repr(e.value)
    msg = str(e.value)
    assert str(path) in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in: {msg}"
    assert "\n" not in msg, msg
    return msg


def kind_error(kind, path, *needles) -> str:
    if kind == "csd":
        msg = error(path, *needles, reader=read_csd)
        error(path, *needles, reader=csd_summary)
        return msg
    return error(path, *needles)


# ----------------------------------------------------------------------------------------------
# Bytes: empty, truncated, garbage


@pytest.mark.parametrize("kind", KINDS)
def test_empty_file(tmp_path, kind):
    path = valid_file(kind, tmp_path)
    path.write_bytes(b"")
    kind_error(kind, path, "the file is empty")


CUTS = (1, 8, 64, 0.25, 0.5, 0.9, -1)  # bytes kept: a count, a fraction of the file, or all but one


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_truncated_file(tmp_path, kind, cut):
    path = valid_file(kind, tmp_path)
    raw = path.read_bytes()
    keep = cut if isinstance(cut, int) and cut > 0 else (len(raw) - 1 if cut == -1 else int(len(raw) * cut))
    path.write_bytes(raw[:keep])
    kind_error(kind, path)


def _garbage(variant: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    body = rng.bytes(4096)
    if variant == "pickle-header":  # a protocol-4 start, then noise
        return b"\x80\x04\x95" + body
    if variant == "hdf5-signature":  # the HDF5 superblock signature, then noise
        return b"\x89HDF\r\n\x1a\n" + body
    if variant == "text":
        return b"video,start,end,label\nabc,0.0,1.5,2.5\n" * 20
    return body


@pytest.mark.parametrize("variant", ["random", "pickle-header", "hdf5-signature", "text"])
@pytest.mark.parametrize("kind", KINDS)
def test_garbage_bytes(tmp_path, kind, variant):
    path = valid_file(kind, tmp_path)
    path.write_bytes(_garbage(variant, seed=len(variant)))
    kind_error(kind, path)


@pytest.mark.parametrize("key", ["valid/audio", "train/lengths/text", "test/labels", "valid/ids"])
def test_damaged_store_chunk_is_an_error_not_wrong_values(tmp_path, key):
    """Every dataset carries a Fletcher-32 checksum (ids are fixed-width strings for that): one
    flipped bit in a chunk is refused on reading instead of giving wrong features, lengths,
    labels or ids."""
    path = store_file(tmp_path)
    with h5py.File(path, "r") as f:
        info = f[key].id.get_chunk_info(0)
    raw = bytearray(path.read_bytes())
    raw[info.byte_offset + info.size // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    error(path, f"'/{key}'", "corrupt")


# ----------------------------------------------------------------------------------------------
# Pickles: wrong top-level type, tampered numpy state


@pytest.mark.parametrize("name", ["mosi_data.pkl", "aligned_50.pkl", "mine.pkl"])
@pytest.mark.parametrize(
    "obj, found",
    [([1, 2, 3], "list"), (7, "int"), ("train", "str"), (None, "NoneType"), (np.zeros(3), "ndarray"), ({"train": [1]}, "dict")],
)
def test_pickle_of_the_wrong_type(tmp_path, name, obj, found):
    error(fmt.write_pickle(tmp_path / name, obj), found)


def test_split_that_is_not_a_dict(tmp_path):
    obj, _ = fmt.mult_object("mosi", True, sizes=SIZES)
    obj["valid"] = [obj["valid"]["text"]]
    error(mult_file(tmp_path, obj), "'valid'", "expected a dict", "list")


class _TamperedDtype:
    """Pickles as float32 whose dtype state claims it holds Python objects (flags 0x78)."""

    def __reduce__(self):
        return (np.dtype, ("f4", False, True), (3, "<", None, None, None, -1, -1, 120))


class _TamperedArray:
    def __reduce__(self):
        reconstruct = np.ndarray.__reduce__(np.zeros(1, np.float32))[0]
        return (reconstruct, (np.ndarray, (0,), b"b"), (1, (2,), _TamperedDtype(), False, np.ones(2, np.float32).tobytes()))


def test_tampered_dtype_state_is_refused(tmp_path):
    """numpy trusts a pickled dtype state; one with object flags on float32 makes arrays whose
    freeing reads garbage pointers (found by the byte-mutation property test: a crashed process)."""
    control = pickle.loads(pickle.dumps(_TamperedDtype()))
    assert control.flags == 120 and np.dtype("f4").flags == 0  # the payload is live under plain pickle
    obj, _ = fmt.mult_object("mosi", True, sizes=SIZES)
    obj["train"]["text"] = _TamperedArray()
    path = mult_file(tmp_path, obj)
    msg = error(path, "refused a numpy dtype", "'<f4'")
    with pytest.raises(DataError):
        safe_load_pickle(path)
    assert "120" in msg


class _ShortObjectArray:
    """An object array of shape (155,) whose pickled item list holds 2 items (a byte-mutated
    MMSA ``id`` array): numpy's ``ndarray.__setstate__`` reads past the list, a segmentation fault."""

    def __reduce__(self):
        reconstruct = np.ndarray.__reduce__(np.zeros(1, np.float32))[0]
        return (reconstruct, (np.ndarray, (0,), b"b"), (1, (155,), np.dtype("O"), False, ["a$_$1", "b$_$2"]))


def test_object_array_with_too_few_items_is_refused_not_a_crash(tmp_path):
    obj, _ = fmt.mmsa_object(aligned=False, sizes=SIZES)
    obj["valid"]["id"] = _ShortObjectArray()
    path = mmsa_file(tmp_path, obj)
    code = (
        "import sys\nfrom mskt.data.readers import load_dataset\nfrom mskt.errors import DataError\n"
        f"try:\n    load_dataset({str(path)!r})\nexcept DataError as e:\n    print(e)\n    sys.exit(0)\nsys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode} (-11: the segmentation fault is back)\n{proc.stderr}"
    assert str(path) in proc.stdout and "object array of shape (155,)" in proc.stdout and "2 items" in proc.stdout


class _StructuredArray:
    def __reduce__(self):
        return np.zeros(2, dtype=[("a", "f4"), ("b", "i4")]).__reduce__()


def test_structured_array_is_refused(tmp_path):
    obj, _ = fmt.mult_object("mosi", True, sizes=SIZES)
    obj["test"]["labels"] = _StructuredArray()
    error(mult_file(tmp_path, obj), "structured dtype")


def test_state_on_a_container_is_refused(tmp_path):
    class Stateful:
        def __reduce__(self):
            return (list, (), {"append": 1})

    error(fmt.write_pickle(tmp_path / "mosi_data.pkl", {"train": Stateful()}), "refused to set the state of a list")


def test_protocol_2_pickle_with_an_empty_split_loads(tmp_path):
    """Protocol <= 2 writes the empty data of a 0-sample array as ``__builtin__.bytes()``: a name
    the allow-list must see through Python 2's module names (found by the round-trip property)."""
    obj, _ = fmt.mult_object("mosi", True, sizes={"train": 2, "valid": 0, "test": 1})
    path = fmt.write_pickle(tmp_path / "mosi_data.pkl", obj, protocol=2)
    assert b"__builtin__\nbytes" in path.read_bytes()
    assert len(load_dataset(path)["valid"]) == 0


class _HugeBytes:
    def __reduce__(self):
        return (bytes, (1 << 40,))


def test_bytes_of_a_size_is_refused(tmp_path):
    """``bytes(n)`` / ``bytearray(n)`` would zero-fill n bytes; pickles only build them from content."""
    msg = error(fmt.write_pickle(tmp_path / "mosi_data.pkl", {"train": _HugeBytes()}), "refused bytes() of a int")
    assert "not a readable pickle" in msg


def test_huge_declared_bytearray_is_not_allocated(tmp_path):
    """A corrupt BYTEARRAY8 length must not make the unpickler zero-fill that many bytes first."""
    path = tmp_path / "mosi_data.pkl"
    path.write_bytes(b"\x80\x05\x96" + struct.pack("<Q", 1 << 28) + b"only a few bytes")
    tracemalloc.start()
    try:
        error(path, "truncated")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"peak {peak} bytes while reading a 30-byte file"


# ----------------------------------------------------------------------------------------------
# Missing split / modality / labels


@pytest.mark.parametrize(
    "kind, split, key, needles",
    [
        ("mult", "valid", None, ("'valid'",)),
        ("mmsa", "test", None, ("'test'",)),
        ("h5", "train", None, ("'train'",)),
        ("mult", "test", "audio", ("'test'", "'audio'")),
        ("mmsa", "valid", "vision", ("'valid'", "'vision'")),
        ("h5", "train", "text", ("/train/text",)),
        ("mult", "valid", "labels", ("'valid'", "'labels'")),
        ("mult", "train", "labels", ("labels", "regression_labels")),  # then neither MulT nor MMSA
        ("mmsa", "valid", "regression_labels", ("'valid'", "'regression_labels'")),
        ("h5", "test", "labels", ("/test/labels",)),
        ("h5", "valid", "ids", ("/valid/ids",)),
        ("h5", "test", "lengths/audio", ("/test/lengths/audio",)),
    ],
)
def test_missing_split_or_key(tmp_path, kind, split, key, needles):
    path = valid_file(kind, tmp_path)
    if kind == "h5":
        with h5py.File(path, "a") as f:
            del f[split if key is None else f"{split}/{key}"]
    else:
        obj = pickle.loads(path.read_bytes())
        if key is None:
            del obj[split]
        else:
            del obj[split][key]
        fmt.write_pickle(path, obj)
    error(path, *needles)


@pytest.mark.parametrize(
    "case, needles",
    [
        ("no roots", ("exactly one root group", "found 0")),
        ("root is a dataset", ("'/COVAREP'", "expected a group")),
        ("data is a dataset", ("'/COVAREP/data'",)),
        ("video is a dataset", ("'/COVAREP/data/vidA'", "expected a group")),
        ("no features", ("'/COVAREP/data/vidB/features' is missing",)),
        ("features is a group", ("'/COVAREP/data/vidA/features'", "expected a dataset")),
    ],
)
def test_csd_wrong_layout(tmp_path, case, needles):
    path = csd_file(tmp_path)
    with h5py.File(path, "a") as f:
        if case == "no roots":
            del f["COVAREP"]
        elif case == "root is a dataset":
            del f["COVAREP"]
            f["COVAREP"] = np.zeros(3)
        elif case == "data is a dataset":
            del f["COVAREP/data"]
            f["COVAREP/data"] = np.zeros(3)
        elif case == "video is a dataset":
            del f["COVAREP/data/vidA"]
            f["COVAREP/data/vidA"] = np.zeros((2, 4))
        elif case == "no features":
            del f["COVAREP/data/vidB/features"]
        elif case == "features is a group":
            del f["COVAREP/data/vidA/features"]
            f.create_group("COVAREP/data/vidA/features")
    kind_error("csd", path, *needles)


# ----------------------------------------------------------------------------------------------
# Empty splits and zero-length samples: what is legitimate


def test_empty_train_split_is_an_error(tmp_path):
    obj, _ = fmt.mult_object("mosi", True, sizes={"train": 0, "valid": 2, "test": 3})
    error(mult_file(tmp_path, obj), "'train' has 0 samples")
    obj, _ = fmt.mmsa_object(aligned=False, sizes={"train": 0, "valid": 2, "test": 3})
    error(mmsa_file(tmp_path, obj), "'train' has 0 samples")


@pytest.mark.parametrize("kind", ["mult", "iemocap", "mmsa", "h5"])
def test_empty_valid_or_test_split_loads(tmp_path, kind):
    """An empty valid or test split is legitimate: word alignment produces one when every segment
    of a fold's videos is dropped. It loads with its shapes (0, T, D); training refuses it later
    (selection and metrics need samples), and an empty *train* split is refused on loading."""
    sizes = {"train": 3, "valid": 0, "test": 0}
    if kind == "mmsa":
        obj, _ = fmt.mmsa_object(aligned=False, sizes=sizes)
        path = mmsa_file(tmp_path, obj)
    else:
        preset = "iemocap" if kind == "iemocap" else "mosi"
        obj, _ = fmt.mult_object(preset, True, sizes=sizes)
        path = mult_file(tmp_path, obj, fmt.MULT_FILE_NAMES[(preset, True)])
    ds = load_dataset(path)
    if kind == "h5":
        ds = load_dataset(write_store(ds, tmp_path / "empty.h5"))
    for s in ("valid", "test"):
        assert len(ds[s]) == 0
        for m in fmt.MODS:
            assert ds[s].features[m].shape == (0,) + ds["train"].features[m].shape[1:]
            assert ds[s].lengths[m].shape == (0,)
    assert len(ds["train"]) == 3


@pytest.mark.parametrize("kind", ["mult", "mult-unaligned", "mmsa", "h5"])
def test_zero_length_samples_load_with_length_zero(tmp_path, kind):
    """A zero-length sample (all padding, e.g. a segment whose face FACET never found) is
    legitimate: REFERENCE.md's MulT files are zero-padded on the left, so a modality with no real
    step is all zeros, and nothing in the format forbids it. It loads with length 0 (not an error,
    not dropped) and the model's key_mask keeps one (padding) step so attention stays finite."""
    if kind == "mmsa":
        obj, _ = fmt.mmsa_object(aligned=False, sizes=SIZES)
        obj["valid"]["audio_lengths"][1] = 0
        obj["valid"]["audio"][1] = 0.0
        obj["valid"]["vision_lengths"][1] = 0
        obj["valid"]["vision"][1] = 0.0
        ds = load_dataset(mmsa_file(tmp_path, obj))
        zero = {"audio", "vision"}
    else:
        aligned = kind != "mult-unaligned"
        obj, _ = fmt.mult_object("mosi", aligned, sizes=SIZES)
        for m in fmt.MODS:
            obj["valid"][m][1] = 0.0  # every modality of sample 1 is padding
        ds = load_dataset(mult_file(tmp_path, obj, fmt.MULT_FILE_NAMES[("mosi", aligned)]))
        zero = set(fmt.MODS)
    if kind == "h5":
        ds = read_store(write_store(ds, tmp_path / "zero.h5"))
    for m in fmt.MODS:
        assert (ds["valid"].lengths[m][1] == 0) == (m in zero), m
        assert ds["valid"].lengths[m][0] > 0
    _assert_model_output_finite(ds["valid"])


def _assert_model_output_finite(split):
    torch = pytest.importorskip("torch")
    from mskt.model import ModelConfig, build_model

    dims = {f"{m}_dim": split.features[m].shape[2] for m in fmt.MODS}
    for variant in ("kt", "full"):
        cfg = ModelConfig(
            **dims, text_steps=split.text.shape[1], variant=variant, d_model=8, heads=2,
            encoder_layers=1, kt_layers=1, crossmodal_layers=1, memory_layers=1,
        )
        model = build_model(cfg).eval()
        batch = {m: torch.as_tensor(split.features[m]) for m in fmt.MODS}
        batch["lengths"] = {m: torch.as_tensor(split.lengths[m]) for m in fmt.MODS}
        with torch.no_grad():
            pred = model(batch).pred
        assert torch.isfinite(pred).all(), (variant, pred)


def test_csd_video_with_no_rows_and_file_with_no_videos_load(tmp_path):
    seq = csd_sequence()
    seq.data["vidEmpty"] = (np.zeros((0, 4), np.float32), np.zeros((0, 2)))
    got = read_csd(csd_file(tmp_path, seq))
    assert got.data["vidEmpty"][0].shape == (0, 4) and got.n_segments == 8
    empty = read_csd(csd_file(tmp_path, CsdSequence("COVAREP", {}, {}), "empty.csd"))
    assert empty.data == {} and empty.dim is None
    assert csd_summary(tmp_path / "empty.csd")["n_videos"] == 0


# ----------------------------------------------------------------------------------------------
# Sample counts that disagree


@pytest.mark.parametrize(
    "key, cut, needles",
    [
        ("vision", 1, ("'vision'", "N=3", "found 2")),
        ("text", 1, ("'text'", "N=3", "found 2")),
        ("text_bert", 1, ("'text_bert'", "(3, 3, L)")),
        ("audio_lengths", 1, ("'audio_lengths'", "(3,)")),
        ("id", 1, ("'id'", "3")),
        ("regression_labels", 1, ("N=2", "found 3")),
    ],
)
def test_mmsa_counts_disagree(tmp_path, key, cut, needles):
    obj, _ = fmt.mmsa_object(aligned=False, sizes=SIZES)
    obj["test"][key] = obj["test"][key][:-cut]
    error(mmsa_file(tmp_path, obj), "'test'", *needles)


@pytest.mark.parametrize(
    "key, n, needles",
    [
        ("audio", 1, ("'audio'", "N=2", "found 1")),
        ("lengths/vision", 1, ("'vision'", "expected shape (2,)", "(1,)")),
        ("ids", 3, ("'ids'", "(2,)", "(3,)")),
        ("labels", 1, ("'text'", "N=1", "found 2")),
    ],
)
def test_store_counts_disagree(tmp_path, key, n, needles):
    path = store_file(tmp_path)
    with h5py.File(path, "a") as f:
        old = f[f"valid/{key}"][()]
        del f[f"valid/{key}"]
        new = old[:n] if n <= len(old) else np.concatenate([old, old[: n - len(old)]])
        if key == "ids":
            f.create_dataset(f"valid/{key}", data=new.astype(object), dtype=h5py.string_dtype("utf-8"))
        else:
            f[f"valid/{key}"] = new
    error(path, "'valid'", *needles)


# ----------------------------------------------------------------------------------------------
# Lengths out of range or not whole numbers


@pytest.mark.parametrize(
    "value, needles",
    [(376, ("[0, 375]", "376")), (-1, ("[0, 375]", "-1")), (2.5, ("whole-number", "2.5")), (np.nan, ("whole-number",))],
)
def test_mmsa_lengths_out_of_range(tmp_path, value, needles):
    obj, _ = fmt.mmsa_object(aligned=False, sizes=SIZES)
    obj["train"]["audio_lengths"] = np.array(obj["train"]["audio_lengths"], dtype=np.float64)
    obj["train"]["audio_lengths"][2] = value
    error(mmsa_file(tmp_path, obj), "'train'", "audio", *needles)


def test_mmsa_text_bert_mask_not_zero_one(tmp_path):
    obj, _ = fmt.mmsa_object(aligned=False, sizes=SIZES)
    obj["valid"]["text_bert"][0, 1, :3] = 2
    error(mmsa_file(tmp_path, obj), "'valid'", "'text_bert'", "0/1")


def test_mmsa_text_bert_longer_than_text(tmp_path):
    obj, _ = fmt.mmsa_object(aligned=False, sizes=SIZES)
    tb = obj["valid"]["text_bert"]
    obj["valid"]["text_bert"] = np.concatenate([tb, np.ones((tb.shape[0], 3, 10), tb.dtype)], axis=2)
    error(mmsa_file(tmp_path, obj), "'valid'", "'text'", "[0, 50]")


@pytest.mark.parametrize(
    "value, dtype, needles",
    [(51, np.int64, ("[0, 50]", "51")), (-3, np.int64, ("[0, 50]", "-3")), (4.0, np.float64, ("expected integers", "float64"))],
)
def test_store_lengths_out_of_range(tmp_path, value, dtype, needles):
    path = store_file(tmp_path)
    with h5py.File(path, "a") as f:
        ln = f["test/lengths/text"][()].astype(dtype)
        ln[1] = value
        del f["test/lengths/text"]
        f["test/lengths/text"] = ln
    error(path, "'test'", "'text'", *needles)


# ----------------------------------------------------------------------------------------------
# Absurd feature arrays


def _bad_array(case, x):
    n, T, D = x.shape
    return {
        "D=0": np.zeros((n, T, 0), np.float32),
        "T=0": np.zeros((n, 0, D), np.float32),
        "1-D": x.reshape(-1),
        "4-D": x[..., None],
        "object": x.astype(object),
        "strings": np.full((n, T, D), "0.5"),
        "complex": x.astype(np.complex64),
        "list": x.tolist(),
    }[case]


BAD_ARRAYS = ("D=0", "T=0", "1-D", "4-D", "object", "strings", "complex", "list")
BAD_ARRAY_NEEDLES = {
    "D=0": "at least one time step and one feature",
    "T=0": "at least one time step and one feature",
    "1-D": "3-D",
    "4-D": "3-D",
    "object": "dtype object",
    "strings": "dtype <U3",
    "complex": "dtype complex64",
    "list": "found list",
}


@pytest.mark.parametrize("case", BAD_ARRAYS)
@pytest.mark.parametrize("fmt_name", ["mult-unknown-name", "mmsa"])
def test_absurd_feature_arrays_in_pickles(tmp_path, fmt_name, case):
    """An unknown file name has no preset dims to catch a 0-dim axis: the reader itself must."""
    if fmt_name == "mmsa":
        obj, _ = fmt.mmsa_object(aligned=False, sizes=SIZES)
        obj["valid"]["audio"] = _bad_array(case, obj["valid"]["audio"])
        path = mmsa_file(tmp_path, obj)
    else:
        obj, _ = fmt.mult_object("mosi", False, sizes=SIZES)
        for s in fmt.SPLIT_NAMES:  # every split, so no dim disagreement between splits hides it
            obj[s]["audio"] = _bad_array(case, obj[s]["audio"])
        path = mult_file(tmp_path, obj, "custom_noalign.pkl")
    error(path, "'audio'", BAD_ARRAY_NEEDLES[case])


@pytest.mark.parametrize(
    "case, needles",
    [
        ("D=0", ("'vision'", "at least one time step and one feature")),
        ("T=0", ("'vision'", "at least one time step and one feature")),
        ("2-D", ("'vision'", "3-D")),
        ("4-D", ("'vision'", "3-D")),
        ("float64", ("'vision'", "float32", "float64")),
        ("strings", ("'vision'", "float32")),
        ("dim differs", ("'vision'", "dim 21", "disagrees")),
    ],
)
def test_absurd_feature_arrays_in_store(tmp_path, case, needles):
    path = store_file(tmp_path)
    with h5py.File(path, "a") as f:
        x = f["test/vision"][()]
        del f["test/vision"]
        n, T, D = x.shape
        new = {
            "D=0": np.zeros((n, T, 0), np.float32),
            "T=0": np.zeros((n, 0, D), np.float32),
            "2-D": x.reshape(n, -1),
            "4-D": x[..., None],
            "float64": x.astype(np.float64),
            "dim differs": np.concatenate([x, x[..., :1]], axis=2),
        }.get(case)
        if case == "strings":
            f.create_dataset("test/vision", data=np.full((n, T, D), "x", dtype=object), dtype=h5py.string_dtype())
        else:
            f["test/vision"] = new
    error(path, "'test'", *needles)


def test_feature_dim_differs_across_splits_mmsa(tmp_path):
    obj, _ = fmt.mmsa_object(aligned=False, sizes=SIZES)
    obj["test"]["vision"] = obj["test"]["vision"][:, :, :7]
    error(mmsa_file(tmp_path, obj), "'test'", "'vision'", "dim 7 disagrees")


@pytest.mark.parametrize(
    "case, needles",
    [
        ("3-D features", ("'/COVAREP/data/vidB/features'", "2-D")),
        ("no feature column", ("'/COVAREP/data/vidA/features'", "at least one feature column")),
        ("string intervals", ("'/COVAREP/data/vidB/intervals'", "expected numbers")),
        ("NaN intervals", ("'/COVAREP/data/vidA/intervals'", "finite")),
        ("words in one video", ("'/COVAREP/data/vidB/features'", "text values", "numeric")),
        ("dim differs", ("'/COVAREP/data/vidB/features'", "feature dim 2 differs")),
    ],
)
def test_csd_absurd_arrays(tmp_path, case, needles):
    path = csd_file(tmp_path)
    with h5py.File(path, "a") as f:
        g = {v: f[f"COVAREP/data/{v}"] for v in ("vidA", "vidB")}
        if case == "3-D features":
            x = g["vidB"]["features"][()]
            del g["vidB"]["features"]
            g["vidB"]["features"] = x[..., None]
        elif case == "no feature column":
            del g["vidA"]["features"]
            g["vidA"]["features"] = np.zeros((5, 0), np.float32)
        elif case == "string intervals":
            del g["vidB"]["intervals"]
            g["vidB"].create_dataset("intervals", data=np.full((3, 2), "0.5", dtype=object), dtype=h5py.string_dtype())
        elif case == "NaN intervals":
            g["vidA"]["intervals"][2, 1] = np.nan
        elif case == "words in one video":
            del g["vidB"]["features"]
            g["vidB"].create_dataset("features", data=np.full((3, 4), "sp", dtype=object), dtype=h5py.string_dtype())
        elif case == "dim differs":
            x = g["vidB"]["features"][()]
            del g["vidB"]["features"]
            g["vidB"]["features"] = x[:, :2]
    kind_error("csd", path, *needles)


def test_truncated_csd_given_to_align_names_that_file(tmp_path):
    seq = csd_sequence()
    text = csd_file(tmp_path, CsdSequence("words", {v: (f[:, :2], iv) for v, (f, iv) in seq.data.items()}, {}), "text.csd")
    vision = csd_file(tmp_path, seq, "facet.csd")
    labels = csd_file(tmp_path, CsdSequence("labels", {v: (np.ones((1, 1), np.float32), iv[:1]) for v, (_, iv) in seq.data.items()}, {}), "labels.csd")
    audio = csd_file(tmp_path, seq, "covarep.csd")
    raw = audio.read_bytes()
    audio.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError) as e:
        align_csds({"text": text, "audio": audio, "vision": vision}, labels)
    assert str(audio) in str(e.value)


# ----------------------------------------------------------------------------------------------
# Labels: non-finite, out of range, wrong shape


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kind", ["mult", "mmsa", "h5"])
def test_nonfinite_regression_labels(tmp_path, kind, value):
    path = valid_file(kind, tmp_path)
    if kind == "h5":
        with h5py.File(path, "a") as f:
            f["test/labels"][1] = value
    else:
        obj = pickle.loads(path.read_bytes())
        key = "labels" if kind == "mult" else "regression_labels"
        obj["test"][key].reshape(-1)[1] = value
        fmt.write_pickle(path, obj)
    error(path, "'test'", "labels", "1 non-finite")


@pytest.mark.parametrize("value", [3.01, -7.0, 1e30])
@pytest.mark.parametrize("kind", ["mult", "mmsa", "h5"])
def test_regression_labels_out_of_range(tmp_path, kind, value):
    path = valid_file(kind, tmp_path)
    if kind == "h5":
        with h5py.File(path, "a") as f:
            f["valid/labels"][0] = value
    else:
        obj = pickle.loads(path.read_bytes())
        key = "labels" if kind == "mult" else "regression_labels"
        obj["valid"][key].reshape(-1)[0] = value
        fmt.write_pickle(path, obj)
    error(path, "'valid'", "labels", "expected sentiment in [-3, 3]")


@pytest.mark.parametrize(
    "case, needles",
    [
        ("NaN", ("one-hot", "nan")),
        ("value 2", ("one-hot", "[0.0, 2.0]")),
        ("both hot", ("one-hot", "[1.0, 1.0]")),
        ("neither hot", ("one-hot", "[0.0, 0.0]")),
        ("(N, 4)", ("(2, 4, 2)", "(2, 4)")),
        ("(N, 4, 3)", ("(2, 4, 2)", "(2, 4, 3)")),
        ("(N, 2, 2)", ("(2, 4, 2)", "(2, 2, 2)")),
        ("(N,)", ("(2, 4, 2)", "(2,)")),
        ("strings", ("numeric",)),
    ],
)
def test_iemocap_labels(tmp_path, case, needles):
    obj, _ = fmt.mult_object("iemocap", True, sizes=SIZES)
    y = obj["valid"]["labels"]
    if case == "NaN":
        y[1, 2, 0] = np.nan
    elif case == "value 2":
        y[1, 2] = [0, 2]
    elif case == "both hot":
        y[1, 2] = [1, 1]
    elif case == "neither hot":
        y[1, 2] = [0, 0]
    else:
        obj["valid"]["labels"] = {
            "(N, 4)": y[:, :, 1],
            "(N, 4, 3)": np.concatenate([y, y[..., :1]], axis=2),
            "(N, 2, 2)": y[:, :2],
            "(N,)": y[:, 0, 1],
            "strings": np.full((2, 4, 2), "yes"),
        }[case]
    error(mult_file(tmp_path, obj, "iemocap_data.pkl"), "'valid'", "'labels'", *needles)


def test_iemocap_file_with_sentiment_labels_is_refused(tmp_path):
    """Under its MulT name the task is known: sentiment-shaped labels in iemocap_data.pkl are
    refused instead of loading IEMOCAP as a regression dataset."""
    obj, _ = fmt.mult_object("iemocap", True, sizes=SIZES)
    for s in fmt.SPLIT_NAMES:
        obj[s]["labels"] = np.zeros((SIZES[s], 1, 1), np.float32)
    error(mult_file(tmp_path, obj, "iemocap_data.pkl"), "'train'", "'labels'", "one-hot emotions")


@pytest.mark.parametrize("case", ["(N, 2)", "ragged list", "scalar"])
def test_mmsa_regression_labels_wrong_shape(tmp_path, case):
    obj, _ = fmt.mmsa_object(aligned=False, sizes=SIZES)
    y = obj["train"]["regression_labels"]
    obj["train"]["regression_labels"] = {"(N, 2)": np.stack([y, y], 1), "ragged list": [[0.5], [1.0, 2.0], [0.0], [1.0]], "scalar": 1.5}[case]
    error(mmsa_file(tmp_path, obj), "'train'", "'regression_labels'")


@pytest.mark.parametrize("case", ["scalar", "3-D", "ragged"])
def test_weird_ids(tmp_path, case):
    obj, _ = fmt.mult_object("mosi", True, sizes=SIZES)
    obj["valid"]["id"] = {"scalar": 5, "3-D": np.zeros((2, 3, 1)), "ragged": [["a", "b"], ["c"]]}[case]
    error(mult_file(tmp_path, obj), "'valid'", "'id'")


# ----------------------------------------------------------------------------------------------
# Store: attributes and objects of the wrong kind


@pytest.mark.parametrize(
    "case, needles",
    [
        ("version is text", ("'mskt_store_version'", "integer")),
        ("no task", ("'task'", "missing")),
        ("task unknown", ("'classification'",)),
        ("aligned not bool", ("'aligned'", "True or False")),
        ("split is a dataset", ("'/valid'", "expected a group")),
        ("modality is a group", ("'/train/audio'", "expected a dataset")),
        ("ids are numbers", ("'/test/ids'", "UTF-8 strings")),
        ("labels scalar", ("'labels'", "one row per sample")),
        ("labels strings", ("'labels'", "expected numbers")),
        ("lengths is a dataset", ("lengths",)),
    ],
)
def test_store_wrong_kinds(tmp_path, case, needles):
    path = store_file(tmp_path)
    with h5py.File(path, "a") as f:
        if case == "version is text":
            f.attrs["mskt_store_version"] = "one"
        elif case == "no task":
            del f.attrs["task"]
        elif case == "task unknown":
            f.attrs["task"] = "classification"
        elif case == "aligned not bool":
            f.attrs["aligned"] = "maybe"
        elif case == "split is a dataset":
            del f["valid"]
            f["valid"] = np.zeros(3)
        elif case == "modality is a group":
            del f["train/audio"]
            f.create_group("train/audio")
        elif case == "ids are numbers":
            del f["test/ids"]
            f["test/ids"] = np.arange(3)
        elif case == "labels scalar":
            del f["test/labels"]
            f["test/labels"] = 1.0
        elif case == "labels strings":
            del f["test/labels"]
            f.create_dataset("test/labels", data=np.array(["a", "b", "c"], dtype=object), dtype=h5py.string_dtype())
        elif case == "lengths is a dataset":
            del f["test/lengths"]
            f["test/lengths"] = np.zeros(3)
    error(path, *needles)


@pytest.mark.parametrize("bad", ["nul\x00byte", "lone \ud800 surrogate"])
def test_store_refuses_ids_hdf5_cannot_hold(tmp_path, bad):
    """h5py raises a bare ValueError (NUL) or UnicodeEncodeError (surrogate) deep in its string
    conversion; write_store names the split, the id and the reason, and leaves no file behind."""
    ds = load_dataset(mult_file(tmp_path))
    ds["test"].ids = np.array(["a", bad, "c"])
    with pytest.raises(DataError) as e:
        write_store(ds, tmp_path / "out.h5")
    assert "out.h5" in str(e.value) and "'test'" in str(e.value) and "id 1" in str(e.value)
    assert not (tmp_path / "out.h5").exists() and not (tmp_path / "out.h5.tmp").exists()


def test_nonfinite_features_in_a_store_are_replaced_and_counted(tmp_path, caplog):
    """A store written by hand (or by an older tool) with NaN features is read like a pickle: the
    values are set to 0, counted per split/modality and reported, not handed to the model."""
    path = store_file(tmp_path)
    with h5py.File(path, "a") as f:
        x = f["train/vision"][()]
        x[0, -1, :3] = np.nan
        f["train/vision"][...] = x
    with caplog.at_level(logging.INFO, logger="mskt"):
        ds = read_store(path)
    assert np.isfinite(ds["train"].vision).all()
    assert ds.meta.nonfinite["train/vision"] == 3
    # Reported as a note (INFO: expected, nothing to do), not a warning (mskt.console.note)
    assert [r.levelno for r in caplog.records if "train/vision: 3" in r.getMessage()] == [logging.INFO]


# ----------------------------------------------------------------------------------------------
# Through the command line: exit 2, one line on stderr, no traceback


def _cli_cases(tmp_path):
    empty = tmp_path / "mosi_data.pkl"
    empty.write_bytes(b"")
    store = store_file(tmp_path)
    raw = store.read_bytes()
    store.write_bytes(raw[: len(raw) // 3])
    garbage = tmp_path / "labels.csd"
    garbage.write_bytes(_garbage("hdf5-signature", 1))
    obj, _ = fmt.mult_object("iemocap", True, sizes=SIZES)
    obj["test"]["labels"][0, 0] = [np.nan, 1]
    nan_labels = mult_file(tmp_path, obj, "iemocap_data.pkl")
    return [empty, store, garbage, nan_labels]


def test_cli_data_info_on_bad_files(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for path in _cli_cases(tmp_path):
        proc = subprocess.run(
            [sys.executable, "-m", "mskt", "data", "info", str(path)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
        )
        assert proc.returncode == 2, (path, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mskt: error: ") and str(path) in lines[0], proc.stderr


# ----------------------------------------------------------------------------------------------
# Hostile HDF5: a file libhdf5 loops on is refused within the timeout; the reader never hangs


def _looping_hdf5(path: Path) -> Path:
    """Damage ``path``'s first global heap collection so that libhdf5 loops forever parsing it:
    its first object becomes the free-space object (index 0) of size 0, and the parser's next
    object starts where this one did (HDFGroup/hdf5#1707). Variable-length strings live there:
    the store's string attributes, a .csd's metadata."""
    raw = bytearray(path.read_bytes())
    heap = raw.find(b"GCOL")
    assert heap >= 0, f"{path} has no global heap to damage"
    first = heap + 16  # "GCOL", version, 3 reserved bytes, the collection's 8-byte size
    raw[first : first + 2] = (0).to_bytes(2, "little")  # the object's index
    raw[first + 8 : first + 16] = (0).to_bytes(8, "little")  # its size
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("kind", ["h5", "csd"])
def test_a_file_that_hangs_libhdf5_is_refused_within_the_timeout(tmp_path, kind, monkeypatch):
    monkeypatch.setenv("MSKT_HDF5_TIMEOUT_S", "0.5")
    path = _looping_hdf5(valid_file(kind, tmp_path))
    start = time.monotonic()
    kind_error(kind, path, "did not finish within 0.5 s", "loops on")  # .csd: read_csd and csd_summary, 0.5 s each
    assert time.monotonic() - start < 10  # the parent never waits past the timeout (plus the fork)


def test_the_guard_refuses_a_reader_that_crashes_and_passes_one_that_finishes(tmp_path):
    from mskt.data.h5guard import check_hdf5

    path = tmp_path / "any.h5"
    path.write_bytes(b"")
    check_hdf5(path, walker=lambda p: None)  # finishes: nothing to say
    check_hdf5(path, walker=lambda p: 1 / 0)  # a Python error in the walk: the reader reports what it finds
    with pytest.raises(DataError, match=r"any\.h5: the HDF5 library crashed reading its structure \(SIGSEGV\)"):
        check_hdf5(path, walker=_segfault)
    with pytest.raises(DataError, match=r"any\.h5: reading its HDF5 structure did not finish within 0\.2 s"):
        check_hdf5(path, timeout=0.2, walker=lambda p: time.sleep(60))


def _segfault(_path):
    import faulthandler

    faulthandler.disable()  # pytest's handler would print the child's stack: the test wants only the signal
    os.kill(os.getpid(), signal.SIGSEGV)


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf"])
def test_a_bad_hdf5_timeout_is_a_one_line_error(monkeypatch, value):
    from mskt.data.h5guard import timeout_s

    monkeypatch.setenv("MSKT_HDF5_TIMEOUT_S", value)
    with pytest.raises(MsktError, match=r"MSKT_HDF5_TIMEOUT_S=.*expected a number of seconds > 0"):
        timeout_s()
