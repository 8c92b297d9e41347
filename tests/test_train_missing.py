"""Fair missing-modality protocols (issue 19): any variant trains under a missing protocol, and the
literature's evaluation summaries.

What is pinned down here:
- every training protocol's masks are exact (equal to an independent draw from the same seed: the
  evaluation masks of ``mskt.data.missing`` or the protocol's definition), repeat by seed, differ
  across seeds, and have the configured rates; "none" draws nothing;
- a baseline trained with a protocol really sees it: the inputs its encoders receive are zero for
  exactly the samples and modalities the protocol drew, at the configured rate (and for "step", at
  exactly the drawn steps); without a protocol no input is zero;
- like with like: kt_any's own recipe (``train_missing="auto"``) is the "patterns" protocol at its
  ``modality_dropout`` (equal metrics), and ``full`` under that protocol sees the very same masks;
- a resumed run under a protocol ends exactly as an uninterrupted one;
- bad settings are one-line ConfigErrors naming the field;
- the summaries: six conditions and their average, normalised AUC, the matched grid, mean ± std over seeds.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from mskt.config import Config
from mskt.data.missing import MissingError, TrainingProtocol, missing_mask, select_drops, step_mask, training_generator
from mskt.errors import ConfigError
from mskt.experiments import robustness
from mskt.model import MISSING_PATTERNS, MODALITIES, build_model
from mskt.train import train

try:
    from conftest import tiny_model_config, tiny_run_config
except ImportError:  # tests/ imported as a package
    from tests.conftest import tiny_model_config, tiny_run_config

STEPS = {"text": 8, "audio": 12, "vision": 10}
PATTERN_ROWS = torch.tensor([[m in p for m in MODALITIES] for p in MISSING_PATTERNS])  # (6, 3)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# The masks


def test_patterns_masks_are_exact_and_have_the_rate():
    n, rate = 30000, 0.4
    drawn = TrainingProtocol("patterns", rate).draw(n, STEPS, gen(3))["dropped"]
    g = gen(3)  # the protocol's definition: a pattern per sample, then which samples get theirs
    chosen = PATTERN_ROWS[torch.randint(6, (n,), generator=g)]
    assert torch.equal(drawn, chosen & (torch.rand(n, generator=g) < rate)[:, None])
    hit = drawn.any(dim=1)
    assert abs(float(hit.float().mean()) - rate) < 0.01
    counts = torch.stack([(drawn[hit] == row).all(dim=1).sum() for row in PATTERN_ROWS]).float() / hit.sum()
    assert (counts - 1 / 6).abs().max() < 0.015  # the six patterns equally often
    assert TrainingProtocol("patterns", 1.0).draw(50, STEPS, gen(0))["dropped"].any(dim=1).all()


def test_sample_and_step_masks_equal_the_evaluation_masks_of_the_same_seed():
    for rate in (0.3, 0.7):
        drawn = TrainingProtocol("sample", rate).draw(5000, STEPS, gen(11))["dropped"]
        assert torch.equal(drawn, missing_mask(5000, rate, seed=11))  # whose rate test_missing.py checks
    steps = TrainingProtocol("step", 0.25).draw(2000, STEPS, gen(5))
    assert set(steps) == {"dropped_steps"}
    expected = step_mask(2000, STEPS, 0.25, seed=5)
    assert all(torch.equal(steps["dropped_steps"][m], expected[m]) for m in MODALITIES)
    assert all(abs(float(v.float().mean()) - 0.25) < 0.01 for v in steps["dropped_steps"].values())


def test_fixed_masks_are_the_pattern_for_every_sample():
    drawn = TrainingProtocol("fixed", fixed="vision, language").draw(7, STEPS, gen(0))["dropped"]
    assert torch.equal(drawn, torch.tensor([[True, False, True]]).expand(7, 3))


def test_uniform_draws_a_rate_per_sample():
    n, high = 40000, 0.8
    drawn = TrainingProtocol("uniform", high).draw(n, STEPS, gen(2))["dropped"]
    assert not drawn.all(dim=1).any()
    # Each modality's share missing: the mean over r ~ U(0, high) of P(missing | not all three).
    r = np.linspace(0, high, 20001)
    f = (r - r**3) / (1 - r**3)
    expected = float(np.sum((f[1:] + f[:-1]) / 2 * np.diff(r)) / high)
    assert (drawn.float().mean(0) - expected).abs().max() < 0.012
    # A rate per sample, not one for all: the count per sample is over-dispersed against a fixed rate
    # with the same mean share.
    fixed = TrainingProtocol("sample", expected).draw(n, STEPS, gen(2))["dropped"]  # the same share, exactly
    share = float(fixed.float().mean())
    assert abs(share - expected) < 0.01
    assert float(drawn.sum(1).float().var()) > 1.2 * float(fixed.sum(1).float().var())


@pytest.mark.parametrize("kind,rate", [("patterns", 0.5), ("sample", 0.3), ("uniform", 1.0), ("step", 0.3)])
def test_masks_repeat_by_seed_and_differ_across_seeds(kind, rate):
    p = TrainingProtocol(kind, rate)

    def flat(d):
        return torch.cat([d["dropped"].flatten()] if "dropped" in d else [v.flatten() for v in d["dropped_steps"].values()])

    a, b, c = (flat(p.draw(64, STEPS, gen(s))) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = training_generator(9)  # the training loop's generator: from the run seed, apart from the batch order's
    assert torch.equal(flat(p.draw(64, STEPS, g)), flat(p.draw(64, STEPS, training_generator(9))))
    assert not torch.equal(flat(p.draw(64, STEPS, training_generator(9))), flat(p.draw(64, STEPS, gen(9))))


def test_nothing_drawn_without_a_protocol():
    g = gen(4)
    state = g.get_state()
    for p in (TrainingProtocol("none"), TrainingProtocol("sample", 0.0), TrainingProtocol("patterns", 0.0)):
        assert not p.active and p.draw(10, STEPS, g) == {}
    assert torch.equal(g.get_state(), state)  # and nothing taken from the generator
    sel = select_drops(TrainingProtocol("step", 0.5).draw(6, STEPS, gen(0)), torch.tensor([4, 1]), "cpu")
    assert sel["dropped_steps"]["audio"].shape == (2, 12)


@pytest.mark.parametrize(
    "values, needle",
    [
        ({"train_missing": "dropout"}, "train_missing='dropout' is not allowed; choose one of auto, none, patterns"),
        ({"train_missing": "sample", "train_missing_rate": 1.0}, r"train_missing_rate must be in \[0.0, 1.0\) with train_missing='sample'"),
        ({"train_missing": "step", "train_missing_rate": 1.0}, r"train_missing_rate must be in \[0.0, 1.0\)"),
        ({"train_missing_rate": 1.5}, r"train_missing_rate must be in \[0.0, 1.0\]"),
        ({"train_missing": "fixed", "train_missing_modalities": "smell"}, "train_missing_modalities='smell' must name one or two of text, audio, vision"),
        ({"train_missing": "fixed", "train_missing_modalities": "text,audio,vision"}, "must name one or two"),
        ({"train_missing": "fixed", "train_missing_modalities": ""}, "must name one or two"),
        ({"train_missing": "fixed", "train_missing_modalities": "text", "variant": "language"}, "leaves variant 'language' nothing it reads"),
    ],
)
def test_bad_training_protocols_are_config_errors(values, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        Config.from_dict(values)
    assert "\n" not in str(err.value)


def test_protocol_settings_round_trip_and_direct_errors(tmp_path):
    cfg = Config.from_dict({"train_missing": "uniform", "train_missing_rate": 1.0, "variant": "full"})
    cfg.save(tmp_path / "c.json")
    assert Config.load(tmp_path / "c.json") == cfg
    assert Config.from_dict({"train_missing": "fixed", "train_missing_modalities": "language"}).train_missing_modalities == "language"
    with pytest.raises(MissingError, match=r"rate must be a number in \[0, 1\)"):
        TrainingProtocol("sample", 1.0)
    with pytest.raises(MissingError, match="not one of none, patterns"):
        TrainingProtocol("auto")


# ----------------------------------------------------------------------------------------------
# What training sees


def _recording(monkeypatch):
    """Patch the training loop's build_model to record, per training batch, what each encoder was
    given (its input features) and the batch's own "dropped" mask."""
    import mskt.train.loop as loop

    seen = {"inputs": [], "dropped": []}
    original = loop.build_model

    def build(cfg):
        model = original(cfg)

        def on_batch(module, args):
            if module.training:
                seen["inputs"].append({})
                seen["dropped"].append(args[0].get("dropped"))

        def on_encoder(m):
            def hook(module, args):
                if module.training:
                    seen["inputs"][-1][m] = args[0].detach().clone()
                    seen["inputs"][-1][f"{m}_real"] = args[1].detach().clone()  # (B, T): True at real steps
            return hook

        model.register_forward_pre_hook(on_batch)
        for m, encoder in model.encoders.items():
            encoder.register_forward_pre_hook(on_encoder(m))
        return model

    monkeypatch.setattr(loop, "build_model", build)
    return seen


def _zeroed(seen) -> torch.Tensor:
    """(samples over all training batches, 3): the modality's encoder input was all zeros."""
    return torch.cat([torch.stack([(b[m] == 0).flatten(1).all(1) for m in MODALITIES], dim=1) for b in seen["inputs"]])


def test_a_baseline_really_trains_with_the_protocol(tiny_mosi, monkeypatch):
    seen = _recording(monkeypatch)
    cfg = tiny_run_config(variant="full", train_missing="sample", train_missing_rate=0.4, cpu_kernels="torch", epochs=3, batch_size=4)
    train(cfg, dataset=tiny_mosi, save=False)
    zeroed = _zeroed(seen)
    # Exactly the masks the protocol draws from the run seed's generator, batch after batch.
    g, protocol = training_generator(cfg.seed), TrainingProtocol("sample", 0.4)
    expected = torch.cat([protocol.draw(b["text"].shape[0], {}, g)["dropped"] for b in seen["inputs"]])
    assert torch.equal(zeroed, expected)
    assert len(zeroed) == 3 * len(tiny_mosi["train"])
    share = float(zeroed.float().mean())
    assert abs(share - (0.4 - 0.4**3) / (1 - 0.4**3)) < 0.15  # 39 samples x 3 modalities
    # Control: trained without a protocol, no sample's modality reaches the encoder as zeros.
    seen.update(inputs=[], dropped=[])
    train(tiny_run_config(variant="full", cpu_kernels="torch", epochs=1), dataset=tiny_mosi, save=False)
    assert not _zeroed(seen).any() and all(d is None for d in seen["dropped"])


def test_step_protocol_zeroes_exactly_the_drawn_steps_for_prediction_only(tiny_mosi, monkeypatch):
    seen = _recording(monkeypatch)
    cfg = tiny_run_config(variant="full", train_missing="step", train_missing_rate=0.3, cpu_kernels="torch", epochs=1,
                          embed_dropout=0.0)
    train(cfg, dataset=tiny_mosi, save=False)
    steps = {m: tiny_mosi["train"].features[m].shape[1] for m in MODALITIES}
    g, protocol = training_generator(cfg.seed), TrainingProtocol("step", 0.3)
    for b in seen["inputs"]:
        drops = protocol.draw(b["text"].shape[0], steps, g)["dropped_steps"]
        for m in MODALITIES:
            zero, real = (b[m] == 0).all(dim=2), b[f"{m}_real"]  # (B, T) each
            assert torch.equal(zero & real, drops[m] & real), m  # the real steps zeroed: exactly the drawn ones


def test_kt_any_recipe_is_the_patterns_protocol_and_full_sees_the_same_masks(tiny_mosi, monkeypatch):
    seen = _recording(monkeypatch)
    base = dict(cpu_kernels="torch", epochs=2, batch_size=4)
    auto = train(tiny_run_config(variant="kt_any", **base), dataset=tiny_mosi, save=False)
    auto_masks = list(seen["dropped"])
    explicit = train(tiny_run_config(variant="kt_any", train_missing="patterns", train_missing_rate=0.5, **base), dataset=tiny_mosi, save=False)
    assert auto.metrics["test"] == explicit.metrics["test"]
    seen.update(inputs=[], dropped=[])
    train(tiny_run_config(variant="full", train_missing="patterns", train_missing_rate=0.5, **base), dataset=tiny_mosi, save=False)
    full_masks, zeroed = list(seen["dropped"]), _zeroed(seen)
    assert len(full_masks) == len(auto_masks) and all(torch.equal(a, b) for a, b in zip(auto_masks, full_masks))
    assert torch.equal(zeroed, torch.cat(full_masks))  # full zero-imputes exactly those
    none = train(tiny_run_config(variant="kt_any", train_missing="none", **base), dataset=tiny_mosi, save=False)
    assert none.metrics["test"] != auto.metrics["test"]


def test_resume_under_a_protocol_is_exact(tiny_mosi, tmp_path, monkeypatch):
    from mskt.model import MulT
    from mskt.train import resume

    cfg = tiny_run_config(variant="full", train_missing="uniform", train_missing_rate=0.9, epochs=3, batch_size=4)
    reference = train(cfg, out_dir=tmp_path / "reference", dataset=tiny_mosi)
    original, calls = MulT.loss, {"n": 0}

    def interrupted(self, out, labels):
        if self.training:
            calls["n"] += 1
            if calls["n"] == 4 + 4 + 2:  # in epoch 3 (4 batches an epoch)
                raise KeyboardInterrupt
        return original(self, out, labels)

    monkeypatch.setattr(MulT, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out_dir=tmp_path / "run", dataset=tiny_mosi)
    monkeypatch.setattr(MulT, "loss", original)
    assert resume(tmp_path / "run", dataset=tiny_mosi).metrics["test"] == reference.metrics["test"]


# ----------------------------------------------------------------------------------------------
# Summaries


def _frame() -> pd.DataFrame:
    """A hand-made sweep frame: two labels x two training seeds; mae = seed-dependent known values."""
    rows = []
    for label, offset in (("a", 0.0), ("b", 1.0)):
        for seed in (1, 2):
            for i, c in enumerate(("text", "audio", "vision", "text,audio", "text,vision", "audio,vision")):
                rows.append(dict(label=label, variant=label, run_seed=seed, protocol="condition", condition=c, rate=math.nan,
                                 mask_seed=-1, mode="sample", mae=offset + i + seed))
            for rate in (0.0, 0.2, 0.6):
                for ms in ((-1,) if rate == 0 else (0, 1)):
                    rows.append(dict(label=label, variant=label, run_seed=seed, protocol="rate", condition=f"rate {rate:g}", rate=rate,
                                     mask_seed=ms, mode="sample", mae=offset + seed * rate + (0.1 * ms if ms >= 0 else 0)))
    return pd.DataFrame(rows)


def test_condition_summary_averages_per_run_then_over_seeds():
    table = robustness.condition_summary(_frame())
    assert list(table.index) == ["a", "b"]
    # per run: mean of i + seed over i = 0..5 -> 2.5 + seed; over seeds 1, 2: 4.0 ± std(3.5, 4.5)
    assert table.loc["a", ("average", "mean")] == pytest.approx(4.0)
    assert table.loc["a", ("average", "std")] == pytest.approx(np.std([3.5, 4.5], ddof=1))
    assert table.loc["b", ("audio", "mean")] == pytest.approx(1 + 1 + 1.5)
    assert int(table.loc["a", ("n_seeds", "")]) == 2


def test_rate_summary_normalised_auc():
    assert robustness.normalized_auc([0.0, 0.5, 1.0], [1.0, 2.0, 3.0]) == pytest.approx(2.0)
    assert robustness.normalized_auc([0.6, 0.0, 0.2], [3.0, 1.0, 1.0]) == pytest.approx((0.2 * 1 + 0.4 * 2) / 0.6)
    with pytest.raises(Exception, match="at least two different rates"):
        robustness.normalized_auc([0.3], [1.0])
    table = robustness.rate_summary(_frame())
    # per run: mae = seed * rate (+ mask-seed noise 0.05 on average at rates > 0): a line.
    per_seed = [robustness.normalized_auc([0, 0.2, 0.6], [0, s * 0.2 + 0.05, s * 0.6 + 0.05]) for s in (1, 2)]
    assert table.loc["a", ("auc", "mean")] == pytest.approx(np.mean(per_seed))
    assert table.loc["a", ("auc", "std")] == pytest.approx(np.std(per_seed, ddof=1))
    assert table.loc["b", ("rate 0", "mean")] == pytest.approx(1.0)
    text = robustness.fair_table(_frame())
    assert text.splitlines()[0] == "| mae | seeds | rate 0 | 6 conditions avg | audio missing | AUC rate 0–0.6 |"
    assert text.splitlines()[2].startswith("| a | 2 | 0.000 ± 0.000 | 4.000 ± 0.707 | 2.500 ± 0.707 |")
    assert "| seeds |" in robustness.summary_markdown(table)


@pytest.mark.parametrize("rate", [0.3, 0.5])
def test_fair_and_matched_configs(rate):
    """Like for like, checked on what the configs do rather than on their text: every "+drop" run and
    kt_any get the same training protocol (the one kt_any draws for itself at this rate), the
    published ones none, and every run of a comparison one and the same selection protocol."""
    from mskt.data.missing import TrainingProtocol, training_protocol

    variants = ("kt_any", "kt", "language_vision", "full")
    fair = robustness.fair_configs(variants, rate=rate)
    assert set(fair) == {"kt_any", "kt_any-nodrop"} | {f"{v}{s}" for v in variants[1:] for s in ("", "+drop")}
    protocols, selections = {}, set()
    for label, overrides in fair.items():
        cfg = tiny_run_config(**overrides)
        assert cfg.variant == label.split("+")[0].removesuffix("-nodrop")
        protocols[label] = training_protocol(cfg, build_model(cfg))
        selections.add(cfg.select_missing)
    own = training_protocol(tiny_run_config(variant="kt_any", modality_dropout=rate), build_model(tiny_model_config(variant="kt_any", modality_dropout=rate)))
    assert own == TrainingProtocol("patterns", rate)  # kt_any's own recipe at this rate
    for label, protocol in protocols.items():
        dropped = label == "kt_any" or label.endswith("+drop")
        assert protocol == (own if dropped else TrainingProtocol("none")), label
    assert selections == {robustness.FAIR_SELECTION} != {"default"}  # one protocol for all, not each variant's own
    assert {c["select_missing"] for c in robustness.fair_configs(variants, rate, select_missing="none").values()} == {"none"}

    matched = robustness.matched_configs(("kt_any", "full"), (0.0, rate))
    assert set(matched) == {f"{v}@{r:g}" for v in ("kt_any", "full") for r in (0.0, rate)}
    for label, overrides in matched.items():
        cfg = tiny_run_config(**overrides)
        r = float(label.split("@")[1])
        assert cfg.variant == label.split("@")[0] and cfg.select_missing == robustness.FAIR_SELECTION
        assert training_protocol(cfg, build_model(cfg)) == TrainingProtocol("sample", r)  # the test rate, in training


def test_matched_sweep_tests_each_run_at_its_training_rate(tiny_mosi):
    runs = {label: [train(tiny_run_config(**overrides, epochs=1), dataset=tiny_mosi, save=False).model]
            for label, overrides in robustness.matched_configs(("full",), (0.0, 0.5)).items()}
    frame = robustness.matched_sweep(runs, dataset=tiny_mosi, seeds=(0, 1), batch_size=8)
    assert list(frame["train_rate"]) == list(frame["rate"]) == [0.0, 0.5, 0.5]
    assert set(frame["protocol"]) == {"matched"} and set(frame["label"]) == {"full"}
    assert "| full |" in robustness.to_markdown(frame, "mae", protocol="matched")
    assert robustness.rate_summary(frame, protocol="matched").loc["full", ("auc", "mean")] > 0
    plain = train(tiny_run_config(variant="full", epochs=1), dataset=tiny_mosi, save=False).model
    with pytest.raises(Exception, match="needs runs trained with train_missing='sample'"):
        robustness.matched_sweep({"x": [plain]}, dataset=tiny_mosi)
