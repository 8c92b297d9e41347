"""Any missing modality (beyond the paper): the kt_any variant, missing masks at evaluation, the
robustness sweep, the CLI's --missing options and the explorer.

What is pinned down here:
- for every one of the six missing patterns, and mixed patterns in one batch, NaN in the missing
  modalities gives finite predictions identical (torch.equal) to zeros there, for kt_any, full, kt
  and language_vision; without the mask the NaN does reach full's and kt_any's prediction (control);
- kt_any replaces a missing modality by its reconstruction, per sample: changing a missing
  modality's values changes nothing, changing a present one does; a mixed batch predicts each sample
  as it would alone; a training protocol's drops are missing for prediction but stay targets;
- masks: rates respected, deterministic by seed, never all three missing; bad settings are errors;
- evaluate: masks do not depend on the batch size; NaN data behind the mask change nothing;
- the sweep is deterministic by seed, and different seeds differ; its figures draw;
- ``mskt evaluate --missing / --missing-rate`` on a tiny run (subprocess), bad values exit 2 with one line;
- training kt_any for 2 epochs on the tiny dataset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from mskt.data.missing import CONDITIONS, MissingError, evaluation_masks, missing_mask, parse_missing, step_mask
from mskt.model import MISSING_PATTERNS, MODALITIES, build_model

try:
    from conftest import NO_DROPOUT, make_batch_fn, steps_for, tiny_model_config, tiny_run_config
except ImportError:  # tests/ imported as a package
    from tests.conftest import NO_DROPOUT, make_batch_fn, steps_for, tiny_model_config, tiny_run_config

ROOT = Path(__file__).resolve().parents[1]
B = 4


def build(aligned=True, ctc=False, **overrides):
    cfg = tiny_model_config(ctc_align=ctc, **overrides)
    return build_model(cfg, text_steps=steps_for(aligned)["text"] if ctc else None), cfg


def as_mask(rows) -> torch.Tensor:
    """(B, 3) bool from one tuple of missing names per sample."""
    return torch.tensor([[m in row for m in MODALITIES] for row in rows])


def fill(batch, mask, value):
    """``batch`` with ``value`` (NaN or 0) in every missing modality of every sample, and the mask."""
    out = {**batch, "missing": mask}
    for i, m in enumerate(MODALITIES):
        out[m] = torch.where(mask[:, i, None, None], torch.tensor(value), batch[m])
    return out


# One pattern for the whole batch (each of the six), and mixed patterns in one batch.
PATTERNS = {",".join(p): [p] * B for p in MISSING_PATTERNS}
PATTERNS["mixed"] = [("audio",), ("text", "vision"), (), ("text", "audio")]
VARIANTS = ("kt_any", "full", "kt", "language_vision")


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_nan_in_missing_modalities_equals_zeros(variant, pattern):
    model, cfg = build(variant=variant)
    batch = make_batch_fn(cfg)
    mask = as_mask(PATTERNS[pattern])
    model.eval()
    with torch.no_grad():
        nan = model(fill(batch, mask, float("nan"))).pred
        zero = model(fill(batch, mask, 0.0)).pred
    assert torch.isfinite(nan).all()
    assert torch.equal(nan, zero)


@pytest.mark.parametrize("variant,aligned,ctc", [("kt_any", False, False), ("kt_any", False, True), ("full", False, True), ("kt", False, False)])
def test_nan_equals_zeros_unaligned_and_ctc(variant, aligned, ctc):
    model, cfg = build(aligned, ctc, variant=variant)
    batch = make_batch_fn(cfg, aligned)
    mask = as_mask(PATTERNS["mixed"])
    model.eval()
    with torch.no_grad():
        nan = model(fill(batch, mask, float("nan"))).pred
        zero = model(fill(batch, mask, 0.0)).pred
    assert torch.isfinite(nan).all() and torch.equal(nan, zero)


@pytest.mark.parametrize("variant", ["kt_any", "full"])
def test_control_without_the_mask_nan_reaches_the_prediction(variant):
    """The NaN tests above mean something: unmasked, NaN audio does reach the prediction."""
    model, cfg = build(variant=variant)
    batch = make_batch_fn(cfg)
    model.eval()
    with torch.no_grad():
        pred = model({**batch, "audio": torch.full_like(batch["audio"], float("nan"))}).pred
    assert torch.isnan(pred).all()


def test_nan_targets_of_given_missing_modalities_keep_training_finite():
    """In training, a modality missing in the data (batch["missing"]) is neither read nor a target."""
    model, cfg = build(variant="kt_any")
    batch = make_batch_fn(cfg)
    model.train()
    terms = model.loss(model(fill(batch, as_mask(PATTERNS["mixed"]), float("nan"))), batch["labels"])
    assert all(torch.isfinite(v) for v in terms.values()), terms
    terms["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------------------------
# kt_any


@pytest.mark.parametrize("aligned", [True, False])
def test_kt_any_shapes_and_loss_terms(aligned):
    model, cfg = build(aligned, variant="kt_any")
    batch = make_batch_fn(cfg, aligned)
    steps, d = steps_for(aligned), cfg.d_model
    model.train()
    out = model(batch, return_internals=True)
    for m in MODALITIES:
        assert out.internals[f"f_{m}"].shape == (B, steps[m], d)
        assert out.internals[f"{m}_reconstruction"].shape == (B, steps[m], d)  # m' on m's own grid
        assert out.internals[f"{m}_features"].shape == (B, steps[m], cfg.dim(m))
        # read_out maps m' to the units of {m}_features, by the readout its consistency loss trains.
        read = model.read_out(m, out.internals[f"{m}_reconstruction"])
        assert read.shape == out.internals[f"{m}_features"].shape
        assert torch.equal(read, model.readout[m](out.internals[f"{m}_reconstruction"]))
        for s in MODALITIES:
            if s != m:
                assert out.internals[f"{m}_from_{s}"].shape == (B, steps[s], d)  # on the source's grid
    terms = model.loss(out, batch["labels"])
    expected = {f"consistency_{m}_{n}" for m in MODALITIES for n in [f"from_{s}" for s in MODALITIES if s != m] + ["fused"]}
    assert expected <= set(terms) and all(torch.isfinite(terms[k]) for k in expected)
    consistency = sum(terms[k] for k in expected) / 3
    torch.testing.assert_close(terms["total"], terms["task"] + cfg.lambda_any * consistency)


def test_kt_any_missing_modality_is_replaced_by_its_reconstruction():
    model, cfg = build(variant="kt_any")
    batch = make_batch_fn(cfg)
    mask = as_mask(PATTERNS["mixed"])  # sample 2 misses nothing
    other = make_batch_fn(cfg, seed=5)
    model.eval()
    with torch.no_grad():
        out = model({**batch, "missing": mask}, return_internals=True)
        for i, m in enumerate(MODALITIES):
            changed = {**batch, m: other[m], "missing": mask}
            pred = model(changed).pred
            gone = mask[:, i]
            assert torch.equal(pred[gone], out.pred[gone]), m  # the missing values are never read
            assert not torch.allclose(pred[~gone], out.pred[~gone]), m  # present values are
            # f_m is m' where m is missing and the encoder's output where present.
            assert torch.equal(out.internals[f"f_{m}"][gone], out.internals[f"{m}_reconstruction"][gone])
            assert not torch.allclose(out.internals[f"f_{m}"][~gone], out.internals[f"{m}_reconstruction"][~gone])


@pytest.mark.parametrize("aligned", [True, False])
def test_kt_any_predicts_each_sample_of_a_mixed_batch_as_alone(aligned):
    model, cfg = build(aligned, variant="kt_any")
    batch = make_batch_fn(cfg, aligned)
    mask = as_mask(PATTERNS["mixed"])
    model.eval()
    with torch.no_grad():
        together = model({**batch, "missing": mask}).pred
        for i in range(B):
            one = {m: batch[m][i : i + 1] for m in MODALITIES}
            alone = model({**one, "lengths": {m: v[i : i + 1] for m, v in batch["lengths"].items()}, "missing": mask[i : i + 1]}).pred
            torch.testing.assert_close(alone, together[i : i + 1], atol=1e-5, rtol=0)


def test_kt_any_all_three_missing_is_an_error():
    model, cfg = build(variant="kt_any")
    batch = make_batch_fn(cfg)
    model.eval()
    with pytest.raises(ValueError, match="all three"):
        model({**batch, "missing": torch.ones(B, 3, dtype=torch.bool)})


def test_dropped_modalities_are_missing_for_prediction_but_stay_targets():
    """A training protocol's drops (batch["dropped"]) remove a modality from kt_any's prediction path
    like batch["missing"], but the real values stay consistency targets; the model draws nothing
    itself (its modality dropout is the training loop's "patterns" protocol)."""
    model, cfg = build(variant="kt_any", **NO_DROPOUT)
    batch = make_batch_fn(cfg)
    mask = as_mask(PATTERNS["mixed"])
    model.train()
    assert "missing" not in model(batch).internals  # nothing dropped unless the batch says so
    dropped = model(fill(batch, mask, 0.0) | {"missing": None, "dropped": mask}, return_internals=True)
    other = model({**batch, "dropped": mask}, return_internals=True)
    torch.testing.assert_close(dropped.pred, other.pred)  # the dropped values are never read
    assert torch.equal(other.internals["missing"], mask)
    given = model({**batch, "missing": mask}, return_internals=True)
    torch.testing.assert_close(given.pred, other.pred)  # the same prediction path as data-missing
    audio = MODALITIES.index("audio")
    for name in ("fused", "from_text"):  # dropped audio still a target; data-missing audio is not
        key = f"mask_audio_{name}"
        assert other.aux[key][mask[:, audio]].any() and not given.aux[key][mask[:, audio]].any()


# ----------------------------------------------------------------------------------------------
# Masks


@pytest.mark.parametrize("rate", [0.3, 0.7])
def test_missing_mask_respects_the_rate_and_the_seed(rate):
    n = 20000
    mask = missing_mask(n, rate, seed=3)
    assert mask.shape == (n, 3) and mask.dtype == torch.bool
    assert not mask.all(dim=1).any()  # never all three
    expected = min(rate, 2 / 3)  # exactly the rate; above 2/3 every sample keeps one modality (tests/test_fair.py)
    assert (mask.float().mean(0) - expected).abs().max() < 0.015
    assert torch.equal(mask, missing_mask(n, rate, seed=3))
    assert not torch.equal(mask, missing_mask(n, rate, seed=4))
    fixed = missing_mask(n, rate, seed=3, fixed=("audio",))
    assert fixed[:, 1].all() and not fixed.all(dim=1).any()
    assert missing_mask(5, 0.0).sum() == 0


def test_step_mask_and_evaluation_masks():
    drops = step_mask(1000, {"text": 8, "audio": 12, "vision": 10}, 0.4, seed=1)
    assert {m: tuple(v.shape) for m, v in drops.items()} == {"text": (1000, 8), "audio": (1000, 12), "vision": (1000, 10)}
    assert all(abs(float(v.float().mean()) - 0.4) < 0.02 for v in drops.values())
    assert all(torch.equal(drops[m], step_mask(1000, {"text": 8, "audio": 12, "vision": 10}, 0.4, seed=1)[m]) for m in drops)
    steps = {"text": 8, "audio": 8, "vision": 8}
    assert evaluation_masks(10, steps) is None  # nothing asked: the default protocol
    assert evaluation_masks(10, steps, ()).sample.sum() == 0
    m = evaluation_masks(10, steps, "vision", 0.5, mode="step")
    assert m.sample[:, 2].all() and m.sample[:, :2].sum() == 0 and set(m.steps) == {"text", "audio"}


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda: parse_missing("smell"), "'smell' is not one of text, audio, vision"),
        (lambda: parse_missing("audio,vision,text"), "all three"),
        (lambda: parse_missing("audio,audio"), "twice"),
        (lambda: missing_mask(4, 1.0), r"\[0, 1\)"),
        (lambda: missing_mask(4, -0.1), r"\[0, 1\)"),
        (lambda: evaluation_masks(4, {}, None, 0.2, mode="frame"), "sample, step"),
    ],
)
def test_bad_missing_settings_are_errors(call, needle):
    with pytest.raises(MissingError, match=needle):
        call()


def test_parse_missing_names():
    assert parse_missing("vision, audio") == ("audio", "vision")  # MODALITIES order
    assert parse_missing("language") == ("text",)
    assert parse_missing("none") == parse_missing("") == parse_missing(None) == ()
    assert CONDITIONS == ("text", "audio", "vision", "text,audio", "text,vision", "audio,vision")


# ----------------------------------------------------------------------------------------------
# Training, evaluation, sweep, explorer and the CLI on one tiny kt_any run


@pytest.fixture(scope="module")
def tiny_runs(tiny_mosi, tmp_path_factory):
    """A kt_any run saved to a folder (2 epochs) and an in-memory kt run (1 epoch), on tiny MOSI."""
    from mskt.train import train

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("runs") / "kt_any"
    kt_any = train(tiny_run_config(variant="kt_any", data_scale=0.01), out_dir=folder, dataset=tiny_mosi)
    kt = train(tiny_run_config(variant="kt", data_scale=0.01, epochs=1), dataset=tiny_mosi, save=False)
    return kt_any, kt


def test_training_kt_any_two_epochs(tiny_runs):
    result, _ = tiny_runs
    h = result.history
    assert len(h) == 2 and result.metrics["best_epoch"] in (1, 2)
    cols = [c for c in h if c.startswith("train_consistency_")]
    assert len(cols) == 9 and h[cols].notna().all().all()
    model = result.model
    for m in MODALITIES:  # the training statistics of every modality were set
        assert not torch.equal(getattr(model, f"{m}_std"), torch.ones_like(getattr(model, f"{m}_std")))
    assert (result.dir / "checkpoint.pt").is_file()


def test_evaluate_masks_do_not_depend_on_batch_size_and_never_read_missing_values(tiny_runs, tiny_mosi):
    from mskt.train import Tensors, evaluate

    model = tiny_runs[0].model
    test = Tensors.from_split(tiny_mosi["test"], "regression", "cpu")
    assert evaluate(model, test, 3) == evaluate(model, test, 3, missing="audio")  # the default protocol: audio missing
    a = evaluate(model, test, 3, missing_rate=0.5, missing_seed=2)
    b = evaluate(model, test, 8, missing_rate=0.5, missing_seed=2)
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-6 for k in a)
    nan = Tensors(features={**test.features, "vision": torch.full_like(test.features["vision"], float("nan"))},
                  lengths=test.lengths, labels=test.labels, ids=test.ids)
    assert evaluate(model, nan, 3, missing="vision") == evaluate(model, test, 3, missing="vision")


def test_sweep_is_deterministic_by_seed_and_draws(tiny_runs, tiny_mosi, capsys):
    from mskt.viz import plots
    from mskt.experiments import robustness

    runs = {"kt_any": [tiny_runs[0].model], "kt": [tiny_runs[1].model]}
    one = robustness.sweep(runs, dataset=tiny_mosi, rates=(0.0, 0.5), seeds=(0, 1), batch_size=8, progress="on")
    assert "robustness (sample): 100%" in capsys.readouterr().err  # a bar over the 18 evaluations where a person watches
    again = robustness.sweep(runs, dataset=tiny_mosi, rates=(0.0, 0.5), seeds=(0, 1), batch_size=8, progress="off")
    assert "robustness" not in capsys.readouterr().err
    other = robustness.sweep(runs, dataset=tiny_mosi, rates=(0.0, 0.5), seeds=(5, 6), batch_size=8)
    assert len(one) == 2 * (6 + 1 + 2)  # per run: six conditions, rate 0 once, rate 0.5 per seed
    assert one.equals(again)
    random = one["mask_seed"] >= 0
    assert one[~random].equals(other[~random])  # fixed conditions and rate 0 are not random
    assert not one.loc[random, "mae"].reset_index(drop=True).equals(other.loc[random, "mae"].reset_index(drop=True))
    table = robustness.summarize(one)
    assert ("mae", "mean") in table and table.loc[("kt_any", "rate", "rate 0.5"), ("n", "")] == 2
    first = robustness.reading(one, others=("kt",)).splitlines()[0]  # one training seed each: no paired test
    assert "kt_any mae" in first and first.endswith("vs kt: not tested: 1 common seed(s) (a paired comparison needs at least 2)")
    with plots.theme():
        fig = plots.plot_robustness(one)
        assert sum(ax.get_visible() for ax in fig.axes) == 8  # every regression metric
        fig = plots.plot_conditions(one, metrics=("mae", "acc2_nonzero"))
        labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
        assert labels[0] == "nothing missing" and "A, V missing" in labels and len(labels) == 7


def test_the_rate_curves_stand_at_the_realised_rate():
    """A nominal 0.7 removes 2/3 of the slots (every sample keeps a modality): the curve's point
    stands at 2/3, and a frame without the realised rate keeps the nominal axis."""
    import pandas as pd

    from mskt.viz import plots

    rows = [{"label": "kt", "run_seed": 0, "protocol": "rate", "condition": f"rate {r:g}", "rate": r, "missing_rate_realised": q,
             "mask_seed": s, "mode": "sample", "mae": 1.0 + r + 0.01 * s}
            for r, q in ((0.0, 0.0), (0.4, 0.4), (0.7, 2 / 3)) for s in (0, 1)]
    frame = pd.DataFrame(rows)
    with plots.theme():
        xs = plots.plot_robustness(frame, metrics=("mae",)).axes[0].lines[0].get_xdata()
        assert list(xs) == pytest.approx([0.0, 0.4, 2 / 3])
        nominal = plots.plot_robustness(frame.drop(columns="missing_rate_realised"), metrics=("mae",))
        assert list(nominal.axes[0].lines[0].get_xdata()) == pytest.approx([0.0, 0.4, 0.7])
        assert nominal.axes[0].get_xlabel() == "missing rate"


def test_explorer_views(tiny_runs, tiny_mosi):
    from mskt.viz import explorer, plots
    from mskt.train import Tensors

    model = tiny_runs[0].model
    test = Tensors.from_split(tiny_mosi["test"], "regression", "cpu")
    view = explorer.sample_view(model, test, 1, ("text", "vision"))
    assert set(view["views"]) == {"text", "vision"} and view["missing"] == ("text", "vision")
    n = int(test.lengths["text"][1])
    assert view["views"]["text"]["real"].shape == view["views"]["text"]["reconstructed"].shape == (n, model.cfg.text_dim)
    assert view["pred"] != view["pred_full"]
    assert set(view["attention"]) >= {"audio->text", "vision->audio"}
    with plots.theme():
        assert plots.plot_sample_view(view) is not None
    pytest.importorskip("ipywidgets")
    assert explorer.explorer(model, test, samples=[0, 1]) is not None


def _mskt(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MSKT_HOME": str(cwd)}
    return subprocess.run([sys.executable, "-m", "mskt", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_cli_evaluate_missing(tiny_runs, tmp_path):
    run = tiny_runs[0].dir
    proc = _mskt("evaluate", "--run", run, "--missing", "audio,vision", "--out", tmp_path / "a.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "missing audio,vision" in proc.stdout and "mae" in proc.stdout
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["missing"]["missing"] == ["audio", "vision"] and record["test"]["mae"] > 0
    proc = _mskt("evaluate", "--run", run, "--missing-rate", "0.3", "--missing-mode", "step", "--missing-seed", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "missing rate 0.3 per time step (seed 4)" in proc.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--missing", "smell"], "'smell' is not one of"),
        (["--missing", "audio,vision,language"], "all three"),
        (["--missing-rate", "1.0"], "[0, 1)"),
        (["--missing-rate", "abc"], "[0, 1)"),
        (["--missing-mode", "frame"], "sample, step"),
    ],
)
def test_cli_evaluate_bad_missing_values_exit_2_with_one_line(tiny_runs, capsys, args, needle):
    from mskt.cli import main

    assert main(["evaluate", "--run", str(tiny_runs[0].dir), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mskt: error:") and needle in err[0], err


def test_cli_evaluate_bad_missing_value_in_a_subprocess(tmp_path):
    proc = _mskt("evaluate", "--run", tmp_path / "no-run", "--missing-rate", "0.9", "--missing", "text,audio,vision", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["mskt: error: all three modalities missing leaves nothing to predict from; name at most two"]
