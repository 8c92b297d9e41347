"""Label efficiency (``label_fraction``), the premise knob of the generator (``audio_shared``), the
knob syntax of synthetic data sources, and the sweep's summaries (issue 19, part 2)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from mskt.config import Config
from mskt.data.labels import UNLABELLED_CLASS, hide_labels, labelled_subset, strata
from mskt.data.readers import load_dataset
from mskt.data.synthetic import SyntheticConfig, _mixed_audio_view, make_synthetic, parse_knobs, with_knobs
from mskt import stats
from mskt.errors import ConfigError
from mskt.experiments import label_efficiency as le
from mskt.model import build_model
from mskt.train import train

from conftest import NO_DROPOUT, make_batch_fn, tiny_model_config, tiny_run_config

# ----------------------------------------------------------------------------------------------
# The labelled subset: stratified and seeded


def _regression_labels(n=400, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.normal(0, 1.5, n) / 0.2) * 0.2, -3, 3).astype(np.float32)


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.25, 0.5])
def test_subset_is_stratified(fraction):
    y = _regression_labels()
    keep = labelled_subset(y, fraction, seed=3)
    assert keep.sum() == round(fraction * len(y))
    group = strata(y)
    assert set(np.unique(group)) <= set(range(-3, 4))  # Acc7's classes
    for g in np.unique(group):
        members = group == g
        # each stratum holds its share of the labels, to within the one place rounding moves
        assert abs(keep[members].sum() - fraction * members.sum()) < 1 + 1e-9, (g, keep[members].sum(), members.sum())


def test_subset_of_emotions_is_stratified_by_pattern():
    rng = np.random.default_rng(0)
    y = (rng.random((300, 4)) < [0.3, 0.25, 0.22, 0.23]).astype(np.int64)
    keep = labelled_subset(y, 0.2, seed=1)
    group = strata(y)
    assert len(np.unique(group)) > 4  # patterns of the four emotions, not one emotion
    for g in np.unique(group):
        members = group == g
        assert abs(keep[members].sum() - 0.2 * members.sum()) < 1 + 1e-9


def test_subset_is_seeded():
    y = _regression_labels()
    a, b, c = labelled_subset(y, 0.1, 5), labelled_subset(y, 0.1, 5), labelled_subset(y, 0.1, 6)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert labelled_subset(y, 1.0, 5).all()
    assert labelled_subset(y[:10], 0.01, 0).sum() == 1  # never no label at all


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), True])
def test_label_fraction_range(bad):
    with pytest.raises(ConfigError, match="label_fraction"):
        Config.from_dict({"label_fraction": bad})
    if not isinstance(bad, bool):
        with pytest.raises(ConfigError, match="label_fraction"):
            labelled_subset(_regression_labels(20), bad, 0)


def test_label_fraction_round_trips():
    cfg = Config.from_dict({"label_fraction": "0.25"})  # as the CLI gives it
    assert cfg.label_fraction == 0.25 and Config.from_dict(cfg.to_dict()) == cfg


def test_hide_labels():
    keep = np.array([True, False, True])
    reg = hide_labels(torch.tensor([1.0, -2.0, 0.4]), keep)
    assert reg[0] == 1.0 and math.isnan(reg[1]) and reg[2] == pytest.approx(0.4)
    emo = hide_labels(torch.tensor([[1, 0, 0, 1]] * 3), keep)
    assert (emo[1] == UNLABELLED_CLASS).all() and (emo[0] == torch.tensor([1, 0, 0, 1])).all()


# ----------------------------------------------------------------------------------------------
# Unlabelled samples: consistency terms yes, task-loss gradient no


def _inputs_with_grad(batch):
    for m in ("text", "vision", "audio"):
        batch[m] = batch[m].clone().requires_grad_(True)
    return batch


@pytest.mark.parametrize("task", ["regression", "emotions"])
def test_unlabelled_samples_give_no_task_gradient_but_move_the_consistency_terms(task):
    cfg = tiny_model_config(variant="kt", task=task, **NO_DROPOUT)
    model = build_model(cfg)
    model.set_statistics("audio", torch.zeros(cfg.audio_dim), torch.ones(cfg.audio_dim))
    model.train()
    batch = _inputs_with_grad(make_batch_fn(cfg, batch=6))
    keep = np.array([True, False, True, False, False, True])
    labels = hide_labels(batch["labels"], keep)
    terms = model.loss(model(batch), labels)
    consistency = terms["consistency_vision"] + terms["consistency_text"]
    g_task = torch.autograd.grad(terms["task"], batch["text"], retain_graph=True)[0].flatten(1).abs().sum(1)
    g_cons = torch.autograd.grad(consistency, batch["text"], retain_graph=True)[0].flatten(1).abs().sum(1)
    unlabelled = torch.as_tensor(~keep)
    assert (g_task[unlabelled] == 0).all()  # exactly: no path from a hidden label to the weights
    assert (g_task[~unlabelled] > 0).all()
    assert (g_cons[unlabelled] > 0).all()  # their reconstruction of audio is still trained
    assert torch.isfinite(terms["total"])

    # the task term is the mean over the labelled samples alone: as if the batch held only them
    idx = torch.as_tensor(np.flatnonzero(keep))
    sub = {m: batch[m].detach().index_select(0, idx) for m in ("text", "vision", "audio")}
    sub["lengths"] = {m: v.index_select(0, idx) for m, v in batch["lengths"].items()}
    sub["labels"] = batch["labels"].index_select(0, idx)
    assert model.loss(model(sub), sub["labels"])["task"].item() == pytest.approx(terms["task"].item(), rel=1e-5)

    # an unlabelled sample's audio moves the consistency terms, never the task term
    other = {**batch, "audio": batch["audio"].detach().clone()}
    other["audio"][1] += 1.0
    moved = model.loss(model(other), labels)
    assert moved["task"].item() == pytest.approx(terms["task"].item(), abs=1e-7)
    assert moved["consistency_vision"].item() != pytest.approx(terms["consistency_vision"].item(), abs=1e-6)


@pytest.mark.parametrize("variant", ["kt", "language_vision"])
def test_a_batch_without_labels_trains_only_the_consistency_terms(variant):
    """kt has consistency terms: with no label in the batch its whole gradient is theirs (the task
    term is 0 and adds none) and it is not zero; the prediction head, which only the task term
    reaches, gets none. language_vision has no consistency terms: no gradient at all."""
    cfg = tiny_model_config(variant=variant, **NO_DROPOUT)
    model = build_model(cfg)
    for m in model.standardises():
        model.set_statistics(m, torch.zeros(cfg.dim(m)), torch.ones(cfg.dim(m)))
    batch = make_batch_fn(cfg)
    terms = model.loss(model(batch), hide_labels(batch["labels"], np.zeros(4, bool)))
    assert terms["task"].item() == 0.0
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grad = lambda loss: [torch.zeros_like(p) if g is None else g for p, g in
                         zip(params, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))]
    g_task, g_total = grad(terms["task"]), grad(terms["total"])
    assert all(not g.any() for g in g_task)  # no path from a hidden label to any weight
    consistency = [k for k in terms if k.startswith("consistency")]
    assert bool(consistency) == (variant == "kt")
    if not consistency:
        assert all(not g.any() for g in g_total)
        return
    g_rest = grad(terms["total"] - terms["task"])
    assert all(torch.equal(a, b) for a, b in zip(g_total, g_rest))  # the total's gradient is the consistency terms'
    moved = {n for n, g in zip(names, g_total) if g.any()}
    assert any(n.startswith("transfer.") for n in moved)  # the reconstruction of audio trains
    assert not any(n.startswith("out.") for n in moved)  # the prediction head does not


def test_hidden_labels_never_reach_training(tiny_mosi):
    """Two datasets that differ only in the labels of samples outside the subset train identically:
    the same loss terms every epoch, the same weights, the same test metrics."""
    cfg = tiny_run_config(variant="kt", label_fraction=0.5, **NO_DROPOUT)
    keep = labelled_subset(tiny_mosi["train"].labels, 0.5, cfg.seed)
    changed = make_synthetic("mosi", aligned=True, scale=0.01, seed=0)
    y = changed["train"].labels
    # move each hidden label to the far end of its stratum (Acc7 class), so the subset is the same
    k = np.clip(np.round(y[~keep]), -3, 3)
    far = np.where(y[~keep] >= k, k - 0.45, k + 0.45)
    y[~keep] = np.where(np.abs(far) > 3, k - 0.45 * np.sign(k), far)  # labels stay in [-3, 3]
    assert np.array_equal(labelled_subset(y, 0.5, cfg.seed), keep) and np.abs(y - tiny_mosi["train"].labels)[~keep].min() > 0.04
    a = train(cfg, dataset=tiny_mosi, save=False)
    b = train(cfg, dataset=changed, save=False)
    losses = [c for c in a.history.columns if c.startswith(("train_", "valid_")) and c != "train_samples_per_s"]
    assert "train_task" in losses and a.history[losses].equals(b.history[losses])  # a leak moves train_task first
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    assert a.metrics["test"] == b.metrics["test"]
    c = train(cfg.replace(label_fraction=1.0), dataset=changed, save=False)
    assert c.metrics["test"] != b.metrics["test"]  # and the labels do matter once kept


# ----------------------------------------------------------------------------------------------
# The premise knob and knobs in a data source


def test_audio_shared_moves_audio_label_information_from_private_to_shared():
    cfg = SyntheticConfig()
    rng = np.random.default_rng(0)
    n = 200_000
    a = rng.standard_normal((n, 1)).astype(np.float32)
    views = {m: a + getattr(cfg, f"expr_noise_{m}") * rng.standard_normal((n, 1)).astype(np.float32) for m in ("text", "audio", "vision")}
    wl, wv = cfg.expr_noise_vision**2, cfg.expr_noise_text**2
    lv = (wl * views["text"] + wv * views["vision"]) / (wl + wv)
    for s in (0.0, 0.5, 1.0):
        view = _mixed_audio_view(SyntheticConfig(audio_shared=s), a, views, np.random.default_rng(1))
        # the amount of label information stays: the noise keeps expr_noise_audio's variance
        assert np.var(view - a) == pytest.approx(cfg.expr_noise_audio**2, rel=0.02)
        # what audio knows beyond L + V: the part of its view that L + V's view cannot explain
        beta = np.cov(view[:, 0], lv[:, 0])[0, 1] / np.var(lv)
        private = np.corrcoef((view - beta * lv)[:, 0], a[:, 0])[0, 1]
        if s == 1.0:
            assert abs(private) < 0.01
        if s == 0.0:
            assert private > 0.2
    # text, vision and labels are the same whatever s; audio is not
    d0, d1 = make_synthetic("mosi", scale=0.02, seed=1), make_synthetic("mosi", scale=0.02, seed=1, audio_shared=1.0)
    for m in ("text", "vision"):
        assert np.array_equal(d0["train"].features[m], d1["train"].features[m])
    assert np.array_equal(d0["train"].labels, d1["train"].labels)
    assert not np.array_equal(d0["train"].audio, d1["train"].audio)
    explicit = make_synthetic("mosi", scale=0.02, seed=1, audio_shared=0.0)
    assert np.array_equal(explicit["train"].audio, d0["train"].audio)


def test_knobs_in_the_data_source():
    ds = load_dataset("synthetic:mosi?audio_shared=0.5&audio_gain=3&length_beta=1,2", scale=0.02)
    assert ds.meta.extra["audio_shared"] == 0.5 and ds.meta.extra["audio_gain"] == 3.0 and ds.meta.extra["length_beta"] == [1.0, 2.0]
    ref = make_synthetic("mosi", scale=0.02, audio_shared=0.5, audio_gain=3.0, length_beta=(1, 2))
    assert np.array_equal(ds["train"].audio, ref["train"].audio)
    assert with_knobs("synthetic:mosi-unaligned?audio_gain=3", audio_shared=1.0) == "synthetic:mosi-unaligned?audio_gain=3.0&audio_shared=1.0"
    assert parse_knobs("replace_nonfinite=false&private_dim=2") == {"replace_nonfinite": False, "private_dim": 2}


@pytest.mark.parametrize("source, match", [
    ("synthetic:mosi?shared=0.5", "unknown synthetic knob 'shared'"),
    ("synthetic:mosi?audio_shared=2", "audio_shared"),
    ("synthetic:mosi?audio_shared=x", r"audio_shared='x': expected a number"),
    ("synthetic:mosi?audio_shared", "not name=value"),
    ("synthetic:mosi?audio_shared=1&audio_shared=0", "given twice"),
])
def test_bad_knobs_are_one_line_errors_naming_the_knob(source, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_dataset(source, scale=0.02)
    assert "\n" not in str(e.value) and source in str(e.value)


def test_knobs_need_a_synthetic_source():
    with pytest.raises(ConfigError, match="synthetic source"):
        with_knobs("data/mosi.pkl", audio_shared=0.5)


# ----------------------------------------------------------------------------------------------
# The sweep's summaries (on a hand-made frame: no training)


def _runs():
    rows = []
    for s in (0.0, 1.0):
        for f in (0.1, 1.0):
            for seed, noise, jitter in ((0, 0.01, 0.004), (1, -0.01, -0.003), (2, 0.0, -0.001)):
                rows.append(dict(variant="language_vision", seed=seed, label_fraction=f, audio_shared=s, mae=1.0 + noise, acc2_nonzero=0.7))
                # kt wins only at few labels and shared audio, ties at every label without it, loses otherwise
                better = (0.1 if s == 1.0 else 0.0) if f == 0.1 else (0.0 if s == 0.0 else -0.05)
                better += jitter  # paired differences that vary by seed (mean 0)
                rows.append(dict(variant="kt", seed=seed, label_fraction=f, audio_shared=s, mae=1.0 + noise - better, acc2_nonzero=0.7 + better))
    return pd.DataFrame(rows)


def test_gains_are_paired_and_oriented():
    g = le.gains(_runs())
    jitter_sd = float(np.std([0.004, -0.003, -0.001], ddof=1))
    cell = g[(g["audio_shared"] == 1.0) & (g["label_fraction"] == 0.1)].set_index("metric")
    assert cell.loc["mae", "mean"] == pytest.approx(0.1) and cell.loc["mae", "std"] == pytest.approx(jitter_sd)  # paired by seed
    assert cell.loc["acc2_nonzero", "mean"] == pytest.approx(0.1) and cell.loc["mae", "wins"] == 3
    assert 0 < cell.loc["mae", "ci_lo"] < 0.1 < cell.loc["mae", "ci_hi"]  # oriented like the gain (MAE: baseline - kt)
    assert cell.loc["mae", "p_adj"] < 0.05 and cell.loc["mae", "p_adj"] >= cell.loc["mae", "p_t"]
    worse = g[(g["audio_shared"] == 1.0) & (g["label_fraction"] == 1.0)].set_index("metric")
    assert worse.loc["mae", "mean"] == pytest.approx(-0.05) and worse.loc["mae", "wins"] == 0 and worse.loc["mae", "ci_hi"] < 0
    table = le.phase_table(g, "acc2_nonzero")
    assert table.loc[1.0, "10% labels"].startswith("+10.0 [")
    assert table.loc[0.0, "100% labels"].startswith("+0.0 [-") and " p " in table.loc[0.0, "100% labels"]
    text = le.reading(g, "mae").splitlines()
    assert len(text) == 4
    tie = g[(g["audio_shared"] == 0.0) & (g["label_fraction"] == 0.1)].set_index("metric").loc["mae"]
    assert tie["mde"] == pytest.approx(stats.mde(jitter_sd, 3))
    assert text[0] == f"audio_shared=0, 10% labels: no detectable difference; the smallest effect this design detects is {tie['mde']:.3f} of mae"
    assert text[2].startswith("audio_shared=1, 10% labels: kt better than language_vision (mae kt − language_vision -0.100, 95% CI [")
    assert text[3].startswith("audio_shared=1, 100% labels: language_vision better than kt (mae kt − language_vision +0.050")
    s = le.summary(_runs())
    assert set(s["n_seeds"]) == {3} and len(s) == 2 * 2 * 2 * 2
    assert le.curves_table(s, "acc2_nonzero").loc[("kt", 1.0), "10% labels"] == "80.0 ± 0.4"
    with pytest.raises(ConfigError, match="full"):
        le.gains(_runs(), baseline="full")


def test_one_seed_gains_are_not_tested():
    g = le.gains(_runs().query("seed == 0"))
    assert set(g["reading"].str.startswith("not tested: 1 common seed")) == {True}
    assert le.phase_table(g, "mae").loc[1.0, "10% labels"] == "+0.104 (1 seed: not tested)"


def test_plots_of_the_sweep():
    from mskt.viz.plots import plot_label_efficiency, plot_phase_diagram

    runs = _runs()
    assert len(plot_phase_diagram(le.gains(runs), metrics=["mae", "acc2_nonzero"]).axes) >= 2
    assert len(plot_label_efficiency(le.summary(runs)).axes) == 2
