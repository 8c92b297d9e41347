"""The synthetic generator: conventions of MultimodalDataset, determinism, knobs, and the probe.

Everything runs at small scale so the whole file takes a few seconds.
"""

import json
import logging

import numpy as np
import pytest

from mskt.data.dataset import lengths_from_left_padding, validate
from mskt.errors import ConfigError
from mskt.data.presets import DATA_SHAPES, EMOTIONS, MODALITIES, SPLITS
from mskt.data.synthetic import SyntheticConfig, make_synthetic, probe, ridge_r2


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("mskt").setLevel(logging.ERROR)
    yield
    logging.getLogger("mskt").setLevel(logging.NOTSET)


CASES = [(p, a) for p in DATA_SHAPES for a in (True, False)]


@pytest.fixture(scope="module")
def small():
    return {(p, a): make_synthetic(p, aligned=a, scale=0.01, seed=3) for p, a in CASES}


@pytest.fixture(scope="module")
def mosi_half():
    return make_synthetic("mosi", aligned=True, scale=0.5, seed=0)


@pytest.mark.parametrize("preset,aligned", CASES)
def test_shapes_dtypes_padding_labels(small, preset, aligned):
    ds = small[(preset, aligned)]
    shape = DATA_SHAPES[preset]
    validate(ds, shape)
    Ts = shape.lengths(aligned)
    assert ds.meta.name == preset and ds.meta.aligned is aligned and ds.meta.format == "synthetic"
    assert ds.meta.task == shape.task
    assert ds.meta.source == f"synthetic:{preset}{'' if aligned else '-unaligned'}:seed=3:scale=0.01"
    assert ds.dims == shape.dims and ds.seq_lens == Ts
    for m in MODALITIES:
        names = ds.meta.feature_names[m]
        assert len(names) == shape.dims[m] and len(set(names)) == len(names)
    all_ids = []
    for s in SPLITS:
        sp = ds[s]
        n = len(sp)
        assert n == max(8, round(shape.split_sizes[s] * 0.01))
        fracs = []
        for m in MODALITIES:
            x, L = sp.features[m], sp.lengths[m]
            T = Ts[m]
            assert x.dtype == np.float32 and x.shape == (n, T, shape.dims[m])
            assert L.dtype == np.int64 and L.shape == (n,)
            assert L.min() >= 1 and L.max() <= T
            assert np.isfinite(x).all()  # -inf were replaced
            pad = np.arange(T)[None, :] < (T - L)[:, None]
            assert (x[pad] == 0).all()  # left padding is exactly zero
            assert np.any(x[~pad] != 0, axis=-1).all()  # every real step has signal
            assert (lengths_from_left_padding(x) == L).all()
            fracs.append(L / T)
        # one sample: the same fraction of the full length for every modality (up to rounding)
        tol = sum(0.5 / T for T in Ts.values()) + 1e-9
        assert np.abs(fracs[0] - fracs[1]).max() <= tol and np.abs(fracs[0] - fracs[2]).max() <= tol
        if aligned:
            assert (sp.lengths["text"] == sp.lengths["audio"]).all() and (sp.lengths["text"] == sp.lengths["vision"]).all()
        y = sp.labels
        if shape.task == "regression":
            assert y.dtype == np.float32 and y.shape == (n,)
            assert y.min() >= -3 and y.max() <= 3
            # averages of 5 or 3 annotators' integer scores
            on_grid = np.isclose(y * 5, np.round(y * 5), atol=1e-4) | np.isclose(y * 3, np.round(y * 3), atol=1e-4)
            assert on_grid.all()
        else:
            assert y.dtype == np.int64 and y.shape == (n, len(EMOTIONS))
            assert np.isin(y, (0, 1)).all()
        assert sp.ids.shape == (n,) and sp.ids.dtype.kind == "U"
        all_ids.extend(sp.ids.tolist())
    assert len(set(all_ids)) == len(all_ids)
    # extra is JSON-able and holds every knob: it rebuilds the same data
    assert set(ds.meta.extra) == set(SyntheticConfig.__dataclass_fields__)
    json.dumps(ds.meta.extra)
    assert set(k.split("/")[1] for k in ds.meta.nonfinite) <= {"audio"}


def test_label_distribution_mosi_like(mosi_half):
    y = np.concatenate([mosi_half[s].labels for s in SPLITS])
    zero = (y == 0).mean()
    assert 0.01 < zero < 0.1  # a few percent exact zeros: non-zero and has-zero Acc2 differ
    assert 0.3 < (y > 0).mean() < 0.6 and 1.0 < y.std() < 2.0
    assert len(np.unique(y)) > 20


def test_emotion_base_rates():
    ds = make_synthetic("iemocap", scale=0.3, seed=1)
    rates = np.concatenate([ds[s].labels for s in SPLITS]).mean(0)
    assert ((rates > 0.15) & (rates < 0.4)).all(), rates


def test_determinism_and_seed():
    a = make_synthetic("mosi", aligned=False, scale=0.02, seed=5)
    b = make_synthetic("mosi", aligned=False, scale=0.02, seed=5)
    c = make_synthetic("mosi", aligned=False, scale=0.02, seed=6)
    np.random.seed(123)  # global state must not matter
    d = make_synthetic("mosi", aligned=False, scale=0.02, seed=5)
    for s in SPLITS:
        for m in MODALITIES:
            assert np.array_equal(a[s].features[m], b[s].features[m])
            assert np.array_equal(a[s].features[m], d[s].features[m])
            assert np.array_equal(a[s].lengths[m], b[s].lengths[m])
            assert not np.array_equal(a[s].features[m], c[s].features[m])
        assert np.array_equal(a[s].labels, b[s].labels) and np.array_equal(a[s].ids, b[s].ids)
    assert not all(np.array_equal(a[s].labels, c[s].labels) for s in SPLITS)
    assert a.meta.nonfinite == b.meta.nonfinite


def test_aligned_and_unaligned_share_labels():
    a = make_synthetic("mosi", aligned=True, scale=0.02, seed=2)
    u = make_synthetic("mosi", aligned=False, scale=0.02, seed=2)
    for s in SPLITS:
        assert np.array_equal(a[s].labels, u[s].labels)


def test_extra_rebuilds_same_data():
    a = make_synthetic("iemocap", aligned=True, scale=0.01, seed=4, audio_predictability=0.5, latent_dim=6)
    b = make_synthetic("iemocap", True, 0.01, 4, **a.meta.extra)
    assert a.meta.extra["audio_predictability"] == 0.5 and a.meta.extra["latent_dim"] == 6
    for m in MODALITIES:
        assert np.array_equal(a["train"].features[m], b["train"].features[m])


def test_unknown_knob_and_bad_values():
    with pytest.raises(ConfigError, match="unknown synthetic knob.*noise_txt.*allowed:.*noise_text"):
        make_synthetic("mosi", scale=0.01, noise_txt=1.0)
    with pytest.raises(ConfigError, match="audio_predictability"):
        make_synthetic("mosi", scale=0.01, audio_predictability=1.5)
    with pytest.raises(ConfigError, match="latent_dim"):
        make_synthetic("mosi", scale=0.01, latent_dim=0)
    with pytest.raises(ConfigError, match="emotion_rates"):
        make_synthetic("iemocap", scale=0.01, emotion_rates=(0.2, 0.3))
    with pytest.raises(ConfigError, match="scale"):
        make_synthetic("mosi", scale=0)
    with pytest.raises(ConfigError, match="unknown dataset preset"):
        make_synthetic("nope", scale=0.01)


def test_neg_inf_injection_and_replacement():
    raw = make_synthetic("mosi", aligned=False, scale=0.05, seed=0, replace_nonfinite=False)
    clean = make_synthetic("mosi", aligned=False, scale=0.05, seed=0)
    n_inf = 0
    for s in SPLITS:
        for m in MODALITIES:
            x = raw[s].features[m]
            bad = ~np.isfinite(x)
            if m != "audio":
                assert not bad.any()
                continue
            assert np.isneginf(x[bad]).all()
            T, L = x.shape[1], raw[s].lengths[m]
            pad = np.arange(T)[None, :] < (T - L)[:, None]
            assert not bad[pad].any()  # only real steps
            n_inf += int(bad.sum())
            assert clean.meta.nonfinite.get(f"{s}/audio", 0) == int(bad.sum())
            assert (clean[s].audio[bad] == 0).all()
            assert np.array_equal(clean[s].audio[~bad], x[~bad])
    assert n_inf > 0 and raw.meta.nonfinite == {}
    none = make_synthetic("mosi", scale=0.01, audio_neg_inf_rate=0.0)
    assert none.meta.nonfinite == {}


def test_ridge_r2_sanity():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((600, 5))
    y = X @ np.array([1.0, -2.0, 0.5, 0.0, 3.0]) + 0.1 * rng.standard_normal(600)
    r2, lam = ridge_r2(X[:400], y[:400], X[400:500], y[400:500], X[500:], y[500:])
    assert r2 > 0.99
    r2_noise, _ = ridge_r2(X[:400], rng.standard_normal(400), X[400:500], rng.standard_normal(100), X[500:], rng.standard_normal(100))
    assert r2_noise < 0.05


def test_probe_ordering(mosi_half):
    r = probe(mosi_half, max_rows=3000, n_fourier=300)
    # label information: text is the strongest single modality, audio beats vision, audio adds to L+V
    assert r["label_r2_text"] > r["label_r2_audio"] > r["label_r2_vision"] > 0.05
    assert r["label_r2_lva"] > r["label_r2_lv"] + 0.01
    assert r["label_r2_lv"] >= r["label_r2_text"] - 0.01
    # audio is largely, not fully, predictable from [L, V], and the non-linear part matters
    assert 0.4 < r["audio_r2_linear"] < r["audio_r2_nonlinear"] - 0.03
    assert r["audio_r2_nonlinear"] < 0.8


def test_audio_predictability_knob():
    r0 = probe(make_synthetic("mosi", scale=0.3, seed=1, audio_predictability=0.0), max_rows=2000, n_fourier=300)
    r1 = probe(make_synthetic("mosi", scale=0.3, seed=1, audio_predictability=1.0), max_rows=2000, n_fourier=300)
    assert abs(r0["audio_r2_linear"]) < 0.05 and abs(r0["audio_r2_nonlinear"]) < 0.05
    assert r1["audio_r2_nonlinear"] > 0.45 and r1["audio_r2_linear"] > 0.35
