"""Tests for mskt.model, in the style of Hugging Face's ModelTester: tiny configs (d_model 8, 2 heads,
one layer per stack, B = 4, at most 12 steps), every variant, both tasks, aligned and unaligned.

What is pinned down here:
- shapes of predictions and internals for every variant x task x alignment x targets (+ CTC);
- every preset's data shape goes through the model;
- one backward pass reaches every trainable parameter; a tiny batch can be overfit;
- audio is never read on the prediction path of kt / language / vision / language_vision;
- the explicit attention path equals the fused one, and its maps are proper, masked distributions;
- padding (values in padded steps, extra left padding) does not change predictions;
- the consistency target f_A gets no gradient from the consistency terms (no collapse);
- the helpers ``resample`` and ``key_mask``, and ``ModelConfig.check``'s errors.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from mskt.config import PRESETS, preset
from mskt.errors import ConfigError
from mskt.model import (
    VARIANTS as REGISTRY,
    ModelConfig,
    build_model,
    consistency_loss,
    key_mask,
    resample,
    variant_class,
)
from mskt.data.presets import DATA_SHAPES

try:
    from conftest import NO_DROPOUT, TINY, lengths_for, make_batch_fn, steps_for, tiny_model_config
except ImportError:  # tests/ imported as a package
    from tests.conftest import NO_DROPOUT, TINY, lengths_for, make_batch_fn, steps_for, tiny_model_config

TASKS = ("regression", "emotions")
B = 4

# The built-in variants. The registry may hold more: other test files register variants of their own.
VARIANTS = ("full", "kt", "language_vision", "language", "vision", "kt_any")


def build(aligned=True, ctc=False, **overrides):
    """A tiny model and a config for it; CTC models get the text grid of the batch."""
    cfg = tiny_model_config(ctc_align=ctc, **overrides)
    return build_model(cfg, text_steps=steps_for(aligned)["text"] if ctc else None), cfg


def unbalanced(batch):
    """The batch with regression labels above the initial predictions (a tiny model's are within
    about ±1.3): with L1, two labels above and two below their predictions would give output
    biases an exactly zero gradient, a property of the loss, not a disconnected parameter."""
    if batch["labels"].dtype.is_floating_point:
        batch["labels"] = torch.tensor([2.5, 2.0, 2.2, 3.0])[: batch["labels"].shape[0]]
    return batch


def expected_pred_shape(task):
    return (B,) if task == "regression" else (B, 4, 2)


def fused_modalities(variant):
    """The modalities ``variant``'s cross-modal transformers attend among (kt: A' counts as audio)."""
    return variant_class(variant).fuses


def valid_targets(variant):
    present = fused_modalities(variant)
    return ("all",) + (present if len(present) > 1 else ())


def grid_of(cfg, modality, steps, lengths):
    """(steps, lengths) of the grid ``modality``'s features live on inside the model.

    kt's A' lives on the text grid; CTC aligns every non-text input onto the text grid.
    """
    if cfg.variant == "kt" and modality == "audio":
        modality = "text"
    if cfg.ctc_align:
        modality = "text"
    return steps[modality], lengths[modality]


# ----------------------------------------------------------------------------------------------
# Shapes


SHAPE_CASES = [
    (v, task, aligned, targets)
    for v in VARIANTS
    for task in TASKS
    for aligned in (True, False)
    for targets in valid_targets(v)
]


@pytest.mark.parametrize("variant,task,aligned,targets", SHAPE_CASES)
def test_output_shapes(variant, task, aligned, targets):
    model, cfg = build(aligned, variant=variant, task=task, targets=targets)
    batch = make_batch_fn(cfg, aligned)
    steps = steps_for(aligned)
    for training in (True, False):
        model.train(training)
        out = model(batch, return_internals=True)
        assert out.pred.shape == expected_pred_shape(task)
        assert torch.isfinite(out.pred).all()
        d = cfg.d_model
        for m in fused_modalities(variant):
            if variant == "kt" and m == "audio":
                continue
            assert out.internals[f"f_{m}"].shape == (B, steps[m], d)
        if variant == "kt":
            assert out.internals["audio_from_vision"].shape == (B, steps["vision"], d)
            assert out.internals["audio_from_text"].shape == (B, steps["text"], d)
            assert out.internals["audio_reconstruction"].shape == (B, steps["text"], d)  # A' on the text grid
            target_width = cfg.audio_dim if cfg.kt_target == "raw" else d  # raw: standardised audio features
            assert out.internals["audio_features"].shape == (B, steps["audio"], target_width)  # f_A, the target
            assert "f_audio" not in out.internals  # kt has no real-audio input feature
        terms = model.loss(out, batch["labels"])
        assert terms["total"].shape == () and torch.isfinite(terms["total"])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("task", TASKS)
def test_output_shapes_ctc_unaligned(variant, task):
    model, cfg = build(aligned=False, ctc=True, variant=variant, task=task)
    batch = make_batch_fn(cfg, aligned=False)
    model.train()
    out = model(batch)
    assert out.pred.shape == expected_pred_shape(task)
    terms = model.loss(out, batch["labels"])
    aligned_inputs = [m for m in fused_modalities(variant) if m != "text" and not (variant == "kt" and m == "audio")]
    assert sorted(k for k in terms if k.startswith("ctc_")) == sorted(f"ctc_{m}" for m in aligned_inputs)
    assert torch.isfinite(terms["total"])
    model.eval()
    assert model(batch).pred.shape == expected_pred_shape(task)
    assert model({**batch, "audio": None} if variant != "full" else batch).pred.shape == expected_pred_shape(task)


def test_ctc_aligns_onto_text_steps_and_refuses_a_nonpositive_grid():
    model = build_model(tiny_model_config(ctc_align=True, variant="full"), text_steps=9)
    assert model.ctc["vision"].steps == 9 and model.cfg.text_steps == 9
    with pytest.raises(ConfigError, match="text_steps"):
        build_model(tiny_model_config(ctc_align=True, variant="full"), text_steps=0)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_runs_on_its_data_shape(name):
    """Each preset's model runs on a batch with its dataset's feature dims (time cut down)."""
    base = name.removesuffix("-unaligned")
    aligned = not name.endswith("-unaligned")
    shape = DATA_SHAPES[base]
    model_sizes = {k: v for k, v in TINY.items() if not k.endswith("_dim")}
    cfg = preset(
        name, **model_sizes, task=shape.task, text_dim=shape.dims["text"], audio_dim=shape.dims["audio"],
        vision_dim=shape.dims["vision"],
    )
    full = shape.lengths(aligned)
    longest = max(full.values())
    steps = {m: min(T, 8) for m, T in full.items()} if aligned else {m: max(3, round(12 * T / longest)) for m, T in full.items()}
    if not aligned:
        assert len(set(steps.values())) > 1  # still unaligned after the cut
    model = build_model(cfg)
    batch = make_batch_fn(cfg, aligned, steps=steps, lengths=lengths_for(steps, aligned))
    model.train()
    out = model(batch)
    assert out.pred.shape == expected_pred_shape(shape.task)
    assert torch.isfinite(model.loss(out, batch["labels"])["total"])
    model.eval()
    assert torch.isfinite(model({**batch, "audio": None}).pred).all()


# ----------------------------------------------------------------------------------------------
# Gradients and fitting


GRAD_CASES = [(v, True, False) for v in VARIANTS] + [(v, False, False) for v in VARIANTS] + [
    (v, False, True) for v in ("full", "kt", "language_vision", "vision")
]


@pytest.mark.parametrize("variant,aligned,ctc", GRAD_CASES)
def test_backward_reaches_every_parameter(variant, aligned, ctc):
    model, cfg = build(aligned, ctc, variant=variant)
    batch = unbalanced(make_batch_fn(cfg, aligned))
    model.train()
    out = model(batch)
    model.loss(out, batch["labels"])["total"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reaches {missing}"
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    if variant == "kt":  # the default target: raw audio features through a shared readout
        assert {"transfer", "fuse", "fuse_in", "readout"} <= names
        assert not any(n.startswith("encoders.audio.") for n, _ in model.named_parameters())


@pytest.mark.parametrize("aligned", [True, False])
def test_backward_reaches_every_parameter_kt_aux(aligned):
    model, cfg = build(aligned, variant="kt", kt_target="aux")
    batch = unbalanced(make_batch_fn(cfg, aligned))
    model.train()
    model.loss(model(batch), batch["labels"])["total"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reaches {missing}"
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert {"transfer", "fuse", "fuse_in", "aux_head"} <= names and "readout" not in names
    assert any(n.startswith("encoders.audio.") for n, _ in model.named_parameters())


def test_kt_delta_is_trained_by_the_task_loss():
    """lambda_fused is 0 by default, so delta (and through it theta, phi) must learn from the task."""
    model, cfg = build(variant="kt")
    assert cfg.lambda_fused == 0.0
    batch = make_batch_fn(cfg)
    model.train()
    out = model(batch)
    model.loss(out, batch["labels"])["task"].backward()
    for prefix in ("fuse.audio.", "fuse_in.audio.", "transfer.vision->audio.", "transfer.text->audio."):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert grads and all(g is not None for g in grads), prefix
        assert sum(float(g.abs().sum()) for g in grads) > 0, prefix
    # The task loss never reads real audio in kt: no gradient reaches the audio encoder from it.
    assert all(p.grad is None or not p.grad.any() for n, p in model.named_parameters() if n.startswith("encoders.audio."))


def test_kt_teacher_target_gives_audio_encoder_no_gradient():
    """With kt_target='teacher' the audio encoder is only a (frozen, loaded) target: nothing trains it."""
    model, cfg = build(variant="kt", kt_target="teacher")
    assert not hasattr(model, "aux_head")
    batch = unbalanced(make_batch_fn(cfg))
    model.train()
    out = model(batch)
    terms = model.loss(out, batch["labels"])
    assert "aux_audio" not in terms and "consistency_vision" in terms
    terms["total"].backward()
    for n, p in model.named_parameters():
        if n.startswith("encoders.audio."):
            assert p.grad is None or not p.grad.any(), n
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def _steps_to_overfit(model, batch, max_steps=150, lr=1e-2):
    """Adam steps until both the task loss and the total loss are below 10% of their first values;
    None if that never happens within ``max_steps``. Training mode (kt's consistency terms are
    computed); the caller sets dropouts to 0."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    first = None
    for step in range(max_steps + 1):
        terms = model.loss(model(batch), batch["labels"])
        now = {k: float(v.detach()) for k, v in terms.items()}
        if first is None:
            first = now
        elif now["task"] < 0.1 * first["task"] and now["total"] < 0.1 * first["total"]:
            return step
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
    return None


@pytest.mark.parametrize(
    "variant,task,aligned",
    [("full", "regression", True), ("kt", "regression", True), ("kt", "regression", False), ("language_vision", "emotions", True)],
)
def test_overfits_a_tiny_batch(variant, task, aligned):
    model, cfg = build(aligned, variant=variant, task=task, **NO_DROPOUT)
    batch = make_batch_fn(cfg, aligned, seed=3)
    assert _steps_to_overfit(model, batch) is not None


# ----------------------------------------------------------------------------------------------
# Audio is missing at test time


NAN_CASES = [(v, a, c) for v in ("kt", "language", "vision", "language_vision") for a in (True, False) for c in (False, True)]


@pytest.mark.parametrize("variant,aligned,ctc", [c for c in NAN_CASES if not (c[2] and c[1])])
def test_prediction_never_reads_audio(variant, aligned, ctc):
    model, cfg = build(aligned, ctc, variant=variant)
    batch = make_batch_fn(cfg, aligned)
    model.eval()
    with torch.no_grad():
        real = model(batch).pred
        nan = model({**batch, "audio": torch.full_like(batch["audio"], float("nan"))}).pred
        none = model({**batch, "audio": None}).pred
    assert torch.isfinite(real).all()
    assert torch.equal(real, nan)
    assert torch.equal(real, none)


def test_full_reads_audio():
    model, cfg = build(variant="full")
    batch = make_batch_fn(cfg)
    model.eval()
    with torch.no_grad():
        pred = model({**batch, "audio": torch.full_like(batch["audio"], float("nan"))}).pred
    assert torch.isnan(pred).all()


def test_kt_internals_with_nan_audio_keep_the_prediction():
    """Asking for internals makes kt encode the audio target; the prediction still ignores it."""
    model, cfg = build(variant="kt")
    batch = make_batch_fn(cfg)
    model.eval()
    with torch.no_grad():
        plain = model(batch).pred
        out = model({**batch, "audio": torch.full_like(batch["audio"], float("nan"))}, return_internals=True)
    assert torch.equal(out.pred, plain)
    assert torch.isnan(out.internals["audio_features"]).all()


# ----------------------------------------------------------------------------------------------
# Attention


def _source_and_target(key):
    s, t = key.split("->")
    return s, t


ATTENTION_CASES = [(v, a, False) for v in VARIANTS for a in (True, False)] + [(v, False, True) for v in VARIANTS]


@pytest.mark.parametrize("variant,aligned,ctc", ATTENTION_CASES)
def test_explicit_attention_matches_fused_path(variant, aligned, ctc):
    model, cfg = build(aligned, ctc, variant=variant)
    batch = make_batch_fn(cfg, aligned)
    model.eval()
    with torch.no_grad():
        fused = model(batch)
        explicit = model(batch, return_attention=True)
    assert fused.attention is None
    torch.testing.assert_close(explicit.pred, fused.pred, atol=1e-5, rtol=0)
    steps, lengths = steps_for(aligned), batch["lengths"]
    present = fused_modalities(variant)
    expected_keys = {f"{t}->{t}" for t in model.targets}
    if len(present) > 1:
        expected_keys |= {f"{s}->{t}" for t in model.targets for s in present if s != t}
    assert set(explicit.attention) == expected_keys
    for key, maps in explicit.attention.items():
        s, t = _source_and_target(key)
        T_t, _ = grid_of(cfg, t, steps, lengths)
        T_s, len_s = grid_of(cfg, s, steps, lengths)
        n_layers = cfg.memory_layers if s == t else cfg.crossmodal_layers
        assert len(maps) == n_layers
        for w in maps:
            assert w.shape == (B, cfg.heads, T_t, T_s), key
            torch.testing.assert_close(w.sum(-1), torch.ones(B, cfg.heads, T_t), atol=1e-5, rtol=0)
            padded = ~key_mask(len_s, T_s)  # (B, T_s)
            assert (w.masked_select(padded[:, None, None, :].expand_as(w)) == 0).all(), key
            assert (w >= 0).all()


# ----------------------------------------------------------------------------------------------
# Padding


def _scramble_padding(batch, modalities, seed=1):
    """The batch with large random values in every padded step of ``modalities``."""
    g = torch.Generator().manual_seed(seed)
    out = {**batch}
    for m in modalities:
        x = batch[m]
        T = x.shape[1]
        padded = torch.arange(T)[None, :] < (T - batch["lengths"][m])[:, None]  # (B, T)
        assert padded.any()
        noise = 10 * torch.randn(x.shape, generator=g)
        out[m] = torch.where(padded[..., None], noise, x)
    return out


PAD_CASES = list(itertools.product(VARIANTS, (True, False)))


@pytest.mark.parametrize("variant,aligned", PAD_CASES)
def test_padded_values_do_not_change_predictions(variant, aligned):
    model, cfg = build(aligned, variant=variant)  # kernels are 1: no step sees its neighbour
    assert cfg.text_kernel == cfg.audio_kernel == cfg.vision_kernel == 1
    batch = make_batch_fn(cfg, aligned)
    inputs = [m for m in fused_modalities(variant) if not (variant == "kt" and m == "audio")]
    model.eval()
    with torch.no_grad():
        ref = model(batch).pred
        pred = model(_scramble_padding(batch, inputs)).pred
    torch.testing.assert_close(pred, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("aligned", (True, False))
def test_kt_consistency_terms_ignore_padding(aligned):
    """kt's consistency terms (training) do not depend on padded values of any modality, audio included."""
    model, cfg = build(aligned, variant="kt", **NO_DROPOUT)
    batch = make_batch_fn(cfg, aligned)
    model.train()
    with torch.no_grad():
        ref = model.loss(model(batch), batch["labels"])
        scrambled = _scramble_padding(batch, ("text", "audio", "vision"))
        got = model.loss(model(scrambled), batch["labels"])
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-5, msg=k)


def test_kt_padding_invariance_when_resampling_up():
    """Vision and audio shorter than text: theta(f_V) and the targets are upsampled onto longer grids,
    the case where interpolation at the edges could reach into padding."""
    steps = {"text": 8, "audio": 5, "vision": 4}
    model, cfg = build(variant="kt", **NO_DROPOUT)
    batch = make_batch_fn(cfg, steps=steps, lengths=lengths_for(steps, aligned=False))
    model.eval()
    with torch.no_grad():
        ref = model(batch).pred
        pred = model(_scramble_padding(batch, ("text", "vision"))).pred
    torch.testing.assert_close(pred, ref, atol=1e-5, rtol=0)
    model.train()
    with torch.no_grad():
        ref = model.loss(model(batch), batch["labels"])
        got = model.loss(model(_scramble_padding(batch, ("text", "audio", "vision"))), batch["labels"])
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-5, msg=k)


def _left_pad(batch, extra):
    """The same real steps with ``extra[m]`` more zero steps on the left of modality m."""
    out = {**batch, "lengths": {m: v.clone() for m, v in batch["lengths"].items()}}
    for m, n in extra.items():
        x = batch[m]
        out[m] = torch.cat([torch.zeros(x.shape[0], n, x.shape[2]), x], dim=1)
    return out


def test_left_padding_does_not_shift_positions_language():
    """Positions count from the first real step: more left padding leaves the prediction unchanged."""
    model, cfg = build(variant="language")
    batch = make_batch_fn(cfg)
    model.eval()
    with torch.no_grad():
        ref = model(batch).pred
        pred = model(_left_pad(batch, {"text": 4})).pred
    torch.testing.assert_close(pred, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant,aligned", PAD_CASES)
def test_left_padding_does_not_change_predictions(variant, aligned):
    """Every variant: extra left padding (aligned: the same for all; unaligned: different per
    modality) changes nothing, including kt's resampling of theta(f_V) onto the text grid."""
    model, cfg = build(aligned, variant=variant)
    batch = make_batch_fn(cfg, aligned)
    extra = {"text": 3, "audio": 3, "vision": 3} if aligned else {"text": 2, "audio": 5, "vision": 3}
    model.eval()
    with torch.no_grad():
        ref = model(batch).pred
        pred = model(_left_pad(batch, extra)).pred
    torch.testing.assert_close(pred, ref, atol=1e-5, rtol=0)


def test_length_zero_sample_is_finite():
    model, cfg = build(variant="kt")
    batch = make_batch_fn(cfg)
    for m in batch["lengths"]:
        batch["lengths"][m][3] = 0
        batch[m][3] = 0
    model.train()
    out = model(batch)
    assert torch.isfinite(out.pred).all()
    assert torch.isfinite(model.loss(out, batch["labels"])["total"])


# ----------------------------------------------------------------------------------------------
# Knowledge transfer: the consistency target


def test_consistency_terms_do_not_train_the_audio_encoder():
    """f_A is a target: the consistency terms give it no gradient (else a constant f_A would do);
    the training-only audio head (aux_audio) does train it."""
    model, cfg = build(variant="kt", kt_target="aux", lambda_fused=1.0)
    batch = unbalanced(make_batch_fn(cfg))
    model.train()
    audio_params = [p for n, p in model.named_parameters() if n.startswith("encoders.audio.")]
    assert audio_params

    out = model(batch)
    terms = model.loss(out, batch["labels"])
    (terms["consistency_vision"] + terms["consistency_text"] + terms["consistency_fused"]).backward()
    assert all(p.grad is None or not p.grad.any() for p in audio_params)
    assert all(p.grad is not None and p.grad.any() for n, p in model.named_parameters() if n.startswith("transfer."))

    model.zero_grad(set_to_none=True)
    out = model(batch)
    model.loss(out, batch["labels"])["aux_audio"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in audio_params)


def test_consistency_target_does_not_collapse(tiny_mosi):
    """After a short kt training the audio features f_A still differ between samples."""
    from mskt.train import Tensors, predict, train

    try:
        from conftest import tiny_run_config
    except ImportError:
        from tests.conftest import tiny_run_config

    cfg = tiny_run_config(variant="kt", kt_target="aux", epochs=4, lr=3e-3)
    result = train(cfg, dataset=tiny_mosi, save=False)
    test = Tensors.from_split(tiny_mosi["test"], "regression", "cpu")
    internals = predict(result.model, test, return_internals=True)["internals"]
    last = torch.as_tensor(internals["audio_features"][:, -1])  # (N, d)
    assert torch.isfinite(last).all()
    assert float(last.std(dim=0).mean()) > 0.1  # per channel, across samples: not a constant


def _audio_spread(model, batch):
    """Mean over channels of the across-sample std of f_A's last step: 0 for a collapsed target."""
    with torch.no_grad():
        return float(model(batch).aux["f_audio"][:, -1].std(dim=0).mean())


def test_stop_gradient_is_what_prevents_collapse():
    """Minimising only the consistency terms: with the stop-gradient (model.loss) f_A stays exactly as
    it was; the control, the same terms with the gradient let through to f_A, drives f_A towards a
    constant within a few dozen steps (a constant satisfies the consistency loss)."""
    spreads = {}
    for detached in (True, False):
        torch.manual_seed(0)
        model, cfg = build(variant="kt", kt_target="aux", **NO_DROPOUT)
        batch = make_batch_fn(cfg, batch=8, seed=5)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        model.train()
        before = _audio_spread(model, batch)
        for _ in range(50):
            out = model(batch)
            if detached:
                terms = model.loss(out, batch["labels"])
                loss = terms["consistency_vision"] + terms["consistency_text"]
            else:
                f_audio = out.aux["f_audio"]  # aligned: every grid is the audio grid
                loss = sum(consistency_loss(out.internals[k], f_audio, None, "l2") for k in ("audio_from_vision", "audio_from_text"))
            opt.zero_grad()
            loss.backward()
            opt.step()
        spreads[detached] = (before, _audio_spread(model, batch))
    before, after = spreads[True]
    assert after == before > 0.3
    before, after = spreads[False]
    assert after < 0.25 * before


def test_consistency_loss_counts_real_steps_only():
    pred = torch.zeros(2, 3, 4)
    target = torch.ones(2, 3, 4)
    target[0, 0] = 100.0  # a padded step of sample 0
    mask = torch.tensor([[False, True, True], [True, True, True]])
    assert float(consistency_loss(pred, target, mask, "l2")) == pytest.approx(1.0)
    assert float(consistency_loss(pred, 3 * target * mask[..., None], mask, "l1")) == pytest.approx(3.0)


def test_kt_ctc_consistency_mask_is_on_the_text_grid():
    """With ctc_align, theta(f_V) lives on the text grid: its consistency term counts the text grid's
    real steps, not a mask built from vision's own (longer) lengths."""
    model, cfg = build(aligned=False, ctc=True, variant="kt", kt_target="aux", **NO_DROPOUT)
    batch = make_batch_fn(cfg, aligned=False)
    model.train()
    with torch.no_grad():
        out = model(batch)
        terms = model.loss(out, batch["labels"])
        pred = out.internals["audio_from_vision"]
        assert pred.shape[1] == steps_for(False)["text"]
        mask = key_mask(batch["lengths"]["text"], pred.shape[1])
        expected = consistency_loss(pred, out.aux["target_on_vision"], mask, "l2")
    torch.testing.assert_close(terms["consistency_vision"], expected)


# ----------------------------------------------------------------------------------------------
# resample and key_mask


def test_resample_identity():
    x = torch.randn(3, 7, 5)
    full = torch.full((3,), 7)
    torch.testing.assert_close(resample(x, full, 7, full), x)
    ln = torch.tensor([7, 4, 1])
    mask = key_mask(ln, 7)
    y = resample(x, ln, 7, ln)
    torch.testing.assert_close(y[mask], x[mask])
    assert torch.isfinite(y).all()


def _ramp(S, lengths, d=2, garbage=1e3):
    """(B, S, d): on real steps a + c * (t - first_real) per channel; padded steps hold garbage."""
    Bn = len(lengths)
    t = torch.arange(S, dtype=torch.float32)[None, :] - (S - lengths)[:, None]  # (B, S)
    a = torch.tensor([1.0, -2.0])[:d]
    c = torch.tensor([0.5, 3.0])[:d]
    x = a + c * t[..., None]
    real = key_mask(lengths, S)
    return torch.where(real[..., None], x, torch.full((Bn, S, d), garbage)), a, c


@pytest.mark.parametrize("S,steps", [(12, 5), (9, 4), (5, 12), (4, 9)])
def test_resample_keeps_a_linear_ramp_linear(S, steps):
    len_x = torch.tensor([S, S - 1, max(2, S // 2)])
    len_out = torch.tensor([steps, max(2, steps - 2), steps])
    x, a, c = _ramp(S, len_x)
    y = resample(x, len_x, steps, len_out)
    assert y.shape == (3, steps, 2)
    assert torch.isfinite(y).all()  # padded output steps: irrelevant, but finite
    for b in range(3):
        Lx, Lo = int(len_x[b]), int(len_out[b])
        real = y[b, steps - Lo :]  # (Lo, d)
        # Only real input steps are read: values stay within the ramp's range, never the garbage.
        lo, hi = a, a + c * (Lx - 1)
        assert (real >= torch.minimum(lo, hi) - 1e-4).all() and (real <= torch.maximum(lo, hi) + 1e-4).all()
        # Each output step sits at the centre of its fraction of the utterance: the half-pixel map
        # u = (j + 0.5) * Lx / Lo - 0.5, clamped to the real steps at the edges.
        j = torch.arange(Lo, dtype=torch.float32)
        u = ((j + 0.5) * Lx / Lo - 0.5).clamp(0, Lx - 1)
        torch.testing.assert_close(real, a + c * u[:, None], atol=1e-4, rtol=0)
        if Lo <= Lx:  # downsampling never clamps: an exact ramp, symmetric about the centre
            diffs = real[1:] - real[:-1]
            torch.testing.assert_close(diffs, diffs[:1].expand_as(diffs), atol=1e-4, rtol=0)
            torch.testing.assert_close(real.mean(0), x[b, S - Lx :].mean(0), atol=1e-4, rtol=0)


def test_resample_ignores_padded_inputs():
    x = torch.randn(2, 6, 3)
    ln = torch.tensor([3, 2])
    out_len = torch.tensor([8, 8])
    y1 = resample(x, ln, 8, out_len)
    x2 = x.clone()
    x2[0, :3] = 1e6
    x2[1, :4] = -1e6
    torch.testing.assert_close(resample(x2, ln, 8, out_len), y1)


def test_key_mask():
    m = key_mask(torch.tensor([0, 1, 3, 5, 9]), 5)
    expected = torch.tensor(
        [
            [False, False, False, False, True],  # length 0 keeps its last step
            [False, False, False, False, True],
            [False, False, True, True, True],
            [True, True, True, True, True],
            [True, True, True, True, True],  # longer than the grid: all steps
        ]
    )
    assert m.dtype == torch.bool
    assert torch.equal(m, expected)


# ----------------------------------------------------------------------------------------------
# ModelConfig.check


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"variant": "audio_only"}, "variant"),
        ({"task": "classification"}, "task"),
        ({"targets": "everything"}, "targets"),
        ({"variant": "language", "targets": "vision"}, "not a modality variant .* fuses"),
        ({"variant": "vision", "targets": "audio"}, "not a modality variant .* fuses"),
        ({"variant": "language_vision", "targets": "audio"}, "not a modality variant .* fuses"),
        ({"d_model": 10, "heads": 4}, "divisible"),
        ({"consistency": "l3"}, "consistency"),
        ({"kt_target": "oracle"}, "kt_target"),
        ({"kt_layers": 0}, "kt_layers"),
        ({"encoder_layers": -1}, "encoder_layers"),
    ],
)
def test_model_config_check_errors(overrides, match):
    cfg = tiny_model_config(**overrides)
    with pytest.raises(ConfigError, match=match):
        cfg.check()
    with pytest.raises(ConfigError):
        build_model(cfg)


def test_model_config_targets():
    assert tiny_model_config(variant="kt").target_modalities() == ("text", "audio", "vision")
    assert tiny_model_config(variant="kt", targets="audio").target_modalities() == ("audio",)
    assert tiny_model_config(variant="language", targets="text").target_modalities() == ("text",)
    assert ModelConfig(task="emotions").n_outputs == 8 and ModelConfig().n_outputs == 1


def test_builtin_variants_declare_what_they_read_fuse_and_reconstruct():
    """The registry's classes declare the modalities that VARIANT_MODALITIES used to list (``fuses``),
    what the prediction path reads from the batch (``inputs``: kt never reads audio) and what they
    rebuild (``reconstructs``); every name builds its own class."""
    # The built-ins first, in the order the paper lists them; test files register variants of their own after.
    assert list(REGISTRY)[:6] == list(VARIANTS)
    expected = {  # variant: (inputs, fuses, reconstructs)
        "full": (("text", "audio", "vision"), ("text", "audio", "vision"), ()),
        "kt": (("text", "vision"), ("text", "audio", "vision"), ("audio",)),
        "kt_any": (("text", "audio", "vision"), ("text", "audio", "vision"), ("text", "audio", "vision")),
        "language_vision": (("text", "vision"), ("text", "vision"), ()),
        "language": (("text",), ("text",), ()),
        "vision": (("vision",), ("vision",), ()),
    }
    for name, (inputs, fuses, reconstructs) in expected.items():
        cls = variant_class(name)
        assert (tuple(cls.inputs), tuple(cls.fuses), tuple(cls.reconstructs)) == (inputs, fuses, reconstructs), name
        assert type(build_model(tiny_model_config(variant=name))) is cls
    with pytest.raises(ConfigError, match="variant"):
        variant_class("audio_only")
