"""Writers for the pickle layouts users bring, built from REFERENCE.md ("Data formats a user will
bring", items 1 and 2) and independent of ``mskt.data.readers``: the tests compare what a reader returns
with what these writers put in.

- ``write_mult_pickle``: MulT's ``mosi_data.pkl`` / ``mosei_senti_data(_noalign).pkl`` /
  ``iemocap_data(_noalign).pkl`` layout, left zero-padded.
- ``write_mmsa_pickle``: MMSA's ``aligned_50.pkl`` / ``unaligned_50.pkl`` layout, right-padded, with
  ``text_bert`` (ids / attention mask / segments) and, unaligned, ``audio_lengths`` /
  ``vision_lengths``.

Both return the exact object they pickled, plus the true lengths they drew, so a test states its
expectation from the writer's inputs and never from the code under test.
"""

from __future__ import annotations

import os
import pickle
import subprocess
from pathlib import Path

import numpy as np

SPLIT_NAMES = ("train", "valid", "test")
SMALL_SIZES = {"train": 6, "valid": 3, "test": 4}

# Dims and steps copied from REFERENCE.md (deliberately not imported from mskt.data.presets).
MULT_SHAPES = {
    "mosi": {"dims": {"text": 300, "audio": 5, "vision": 20}, "aligned": 50,
             "unaligned": {"text": 50, "audio": 375, "vision": 500}},
    "mosei": {"dims": {"text": 300, "audio": 74, "vision": 35}, "aligned": 50,
              "unaligned": {"text": 50, "audio": 500, "vision": 500}},
    "iemocap": {"dims": {"text": 300, "audio": 74, "vision": 35}, "aligned": 20,
                "unaligned": {"text": 20, "audio": 400, "vision": 500}},
}
MULT_FILE_NAMES = {
    ("mosi", True): "mosi_data.pkl",
    ("mosi", False): "mosi_data_noalign.pkl",
    ("mosei", True): "mosei_senti_data.pkl",
    ("mosei", False): "mosei_senti_data_noalign.pkl",
    ("iemocap", True): "iemocap_data.pkl",
    ("iemocap", False): "iemocap_data_noalign.pkl",
}
MODS = ("text", "audio", "vision")


def draw_lengths(rng, n: int, T: int) -> np.ndarray:
    """True lengths in [1, T], always including a full-length and a length-1 sample when n >= 2."""
    ln = rng.integers(1, T + 1, size=n)
    if n >= 1:
        ln[0] = T
    if n >= 2:
        ln[1] = 1
    return ln.astype(np.int64)


def real_steps(rng, L: int, D: int, dtype) -> np.ndarray:
    """L steps of non-zero values (no step is all zero, so padding is unambiguous)."""
    x = rng.normal(size=(L, D))
    x[np.abs(x) < 1e-3] = 0.5
    return x.astype(dtype)


def left_padded(rng, lengths, T, D, dtype=np.float32) -> np.ndarray:
    x = np.zeros((len(lengths), T, D), dtype=dtype)
    for i, L in enumerate(lengths):
        if L:
            x[i, T - L:] = real_steps(rng, int(L), D, dtype)
    return x


def right_padded(rng, lengths, T, D, dtype=np.float32) -> np.ndarray:
    x = np.zeros((len(lengths), T, D), dtype=dtype)
    for i, L in enumerate(lengths):
        if L:
            x[i, :L] = real_steps(rng, int(L), D, dtype)
    return x


def mult_object(preset="mosi", aligned=True, sizes=None, seed=0, dtype=np.float32, with_id=None):
    """The dict MulT pickles hold, and the true lengths: (obj, {split: {modality: lengths}})."""
    sizes = dict(SMALL_SIZES if sizes is None else sizes)
    shape = MULT_SHAPES[preset]
    steps = {m: shape["aligned"] for m in MODS} if aligned else shape["unaligned"]
    with_id = (preset != "iemocap") if with_id is None else with_id
    rng = np.random.default_rng(seed)
    obj, true_lengths = {}, {}
    for s in SPLIT_NAMES:
        n = sizes[s]
        if aligned:  # word-aligned: every modality has the words' length
            ln = draw_lengths(rng, n, steps["text"])
            lens = {m: ln.copy() for m in MODS}
        else:
            lens = {m: draw_lengths(rng, n, steps[m]) for m in MODS}
        sp = {m: left_padded(rng, lens[m], steps[m], shape["dims"][m], dtype) for m in ("vision", "text", "audio")}
        if preset == "iemocap":
            present = rng.integers(0, 2, size=(n, 4))
            sp["labels"] = np.eye(2, dtype=np.float32)[present]  # (N, 4, 2) one-hot: [absent, present]
        else:
            sp["labels"] = rng.uniform(-3, 3, size=(n, 1, 1)).astype(np.float32)
        if with_id:
            sp["id"] = np.array(
                [[f"vid{s}{i}".encode(), str(i).encode(), str(i + 1).encode()] for i in range(n)]
            )  # (N, 3) byte strings, as MOSI ships them
        obj[s] = sp
        true_lengths[s] = lens
    return obj, true_lengths


def write_pickle(path, obj, protocol=pickle.HIGHEST_PROTOCOL) -> Path:
    path = Path(path)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def write_mult_pickle(directory, preset="mosi", aligned=True, name=None, protocol=4, **kw):
    """Write a MulT pickle under its real file name; returns (path, obj, true_lengths)."""
    obj, lens = mult_object(preset, aligned, **kw)
    path = Path(directory) / (name or MULT_FILE_NAMES[(preset, aligned)])
    write_pickle(path, obj, protocol)
    return path, obj, lens


# MMSA: MOSI dims [768, 5, 20]; text is 50 BERT tokens; unaligned audio 375, vision 500 steps.
MMSA_DIMS = {"text": 768, "audio": 5, "vision": 20}
MMSA_UNALIGNED_STEPS = {"text": 50, "audio": 375, "vision": 500}


def mmsa_object(aligned=True, sizes=None, seed=0):
    """(obj, {split: {modality: true lengths}}) in MMSA's layout."""
    sizes = dict(SMALL_SIZES if sizes is None else sizes)
    steps = {m: 50 for m in MODS} if aligned else MMSA_UNALIGNED_STEPS
    rng = np.random.default_rng(seed)
    obj, true_lengths = {}, {}
    for s in SPLIT_NAMES:
        n = sizes[s]
        text_len = np.maximum(draw_lengths(rng, n, 50), 2)  # [CLS] ... [SEP]
        lens = {"text": text_len}
        for m in ("audio", "vision"):
            lens[m] = text_len.copy() if aligned else draw_lengths(rng, n, steps[m])
        tb = np.zeros((n, 3, 50), dtype=np.float32)
        for i, L in enumerate(text_len):
            tb[i, 0, :L] = rng.integers(1000, 30000, size=L)
            tb[i, 0, 0], tb[i, 0, L - 1] = 101, 102
            tb[i, 1, :L] = 1  # attention mask
        sp = {
            "raw_text": np.array([f"utterance {s} {i}" for i in range(n)]),
            "text": right_padded(rng, lens["text"], 50, MMSA_DIMS["text"]),
            "text_bert": tb,
            "audio": right_padded(rng, lens["audio"], steps["audio"], MMSA_DIMS["audio"]),
            "vision": right_padded(rng, lens["vision"], steps["vision"], MMSA_DIMS["vision"]),
            "id": np.array([f"video{s}{i}$_${i + 1}" for i in range(n)], dtype=object),
            "regression_labels": rng.uniform(-3, 3, size=n).astype(np.float32),
            "classification_labels": rng.integers(0, 3, size=n).astype(np.float32),
        }
        if not aligned:
            sp["audio_lengths"] = [int(v) for v in lens["audio"]]  # MMSA stores plain lists
            sp["vision_lengths"] = [int(v) for v in lens["vision"]]
        obj[s] = sp
        true_lengths[s] = lens
    return obj, true_lengths


def write_mmsa_pickle(directory, aligned=True, protocol=4, **kw):
    obj, lens = mmsa_object(aligned, **kw)
    path = Path(directory) / ("aligned_50.pkl" if aligned else "unaligned_50.pkl")
    write_pickle(path, obj, protocol)
    return path, obj, lens


def to_left(x, lengths):
    """Independent reference for right -> left padding (per-sample slicing, no shared helper)."""
    out = np.zeros_like(x)
    T = x.shape[1]
    for i, L in enumerate(lengths):
        out[i, T - L:] = x[i, :L]
    return out


# ----------------------------------------------------------------------------------------------
# Malicious payloads: each would leave ``marker`` on disk if its reduce ran.


class SystemPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class EvalPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w').close()",))


class PopenPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (subprocess.Popen, (["touch", self.marker],))


def global_only_pickle(module: str, name: str) -> bytes:
    """A protocol-2 pickle that only looks up ``module.name`` (the GLOBAL opcode), then stops."""
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n."


# ----------------------------------------------------------------------------------------------
# Any shape (for the property and bad-input tests): the MulT layout with chosen sizes, steps, dims.


def custom_mult_object(sizes, steps, dims, *, emotions=False, seed=0, min_length=0):
    """A MulT-layout dict with any split sizes, steps {m: T} and dims {m: D}, left zero-padded, and
    its true lengths drawn in [min_length, T] (0 is an all-padding sample): (obj, {split: {m: lengths}}).
    Regression labels are (N, 1, 1) in [-3, 3]; emotions (N, 4, 2) one-hot [absent, present]."""
    rng = np.random.default_rng(seed)
    obj, true_lengths = {}, {}
    for s in SPLIT_NAMES:
        n = sizes[s]
        lens = {m: rng.integers(min_length, steps[m] + 1, size=n).astype(np.int64) for m in MODS}
        sp = {m: left_padded(rng, lens[m], steps[m], dims[m]) for m in MODS}
        if emotions:
            sp["labels"] = np.eye(2, dtype=np.float32)[rng.integers(0, 2, size=(n, 4))]
        else:
            sp["labels"] = rng.uniform(-3, 3, size=(n, 1, 1)).astype(np.float32)
        sp["id"] = np.array([f"{s}-{i}" for i in range(n)])
        obj[s] = sp
        true_lengths[s] = lens
    return obj, true_lengths


def custom_mmsa_object(sizes, steps, dims, *, aligned=False, label_range=(-1.0, 1.0), seed=0):
    """An MMSA-layout dict with any split sizes, steps {m: T} and dims {m: D}, right zero-padded, as
    MMSA ships CH-SIMS (``unaligned_39.pkl``: text BERT 768, audio librosa 33, vision OpenFace 709):
    ``raw_text``, ``text``, ``text_bert``, ``audio``, ``vision``, ``id``, ``annotations``,
    ``regression_labels`` (and the unimodal ``regression_labels_T/A/V``), ``classification_labels``
    and, unaligned, ``audio_lengths`` / ``vision_lengths`` as plain lists. Labels lie on a grid of
    eleven values spanning ``label_range`` (steps of 0.2 for [-1, 1]), both ends included.
    Returns (obj, {split: {modality: true lengths}})."""
    rng = np.random.default_rng(seed)
    lo, hi = label_range
    grid = np.round(np.arange(lo, hi + 1e-9, (hi - lo) / 10), 6)
    obj, true_lengths = {}, {}
    for s in SPLIT_NAMES:
        n = sizes[s]
        T_text = steps["text"]
        text_len = np.maximum(draw_lengths(rng, n, T_text), 2)  # [CLS] ... [SEP]
        lens = {"text": text_len}
        for m in ("audio", "vision"):
            lens[m] = text_len.copy() if aligned else draw_lengths(rng, n, steps[m])
        tb = np.zeros((n, 3, T_text), dtype=np.float32)
        for i, L in enumerate(text_len):
            tb[i, 0, :L] = rng.integers(100, 21128, size=L)  # bert-base-chinese's vocabulary
            tb[i, 0, 0], tb[i, 0, L - 1] = 101, 102
            tb[i, 1, :L] = 1
        labels = rng.choice(grid, size=n).astype(np.float32)
        sp = {
            "raw_text": np.array([f"句子 {s} {i}" for i in range(n)]),
            "text": right_padded(rng, lens["text"], T_text, dims["text"]),
            "text_bert": tb,
            "audio": right_padded(rng, lens["audio"], steps["audio"], dims["audio"]),
            "vision": right_padded(rng, lens["vision"], steps["vision"], dims["vision"]),
            "id": np.array([f"video_{s}{i:04d}$_${i + 1:04d}" for i in range(n)], dtype=object),
            "annotations": np.array(["Negative" if v < 0 else "Neutral" if v == 0 else "Positive" for v in labels], dtype=object),
            "regression_labels": labels,
            "regression_labels_T": rng.choice(grid, size=n).astype(np.float32),
            "regression_labels_A": rng.choice(grid, size=n).astype(np.float32),
            "regression_labels_V": rng.choice(grid, size=n).astype(np.float32),
            "classification_labels": (np.sign(labels) + 1).astype(np.float32),
        }
        if not aligned:
            sp["audio_lengths"] = [int(v) for v in lens["audio"]]
            sp["vision_lengths"] = [int(v) for v in lens["vision"]]
        obj[s] = sp
        true_lengths[s] = lens
    return obj, true_lengths
