"""A refactor changes no number: seeded 2-epoch runs of every built-in variant on
``synthetic:mosi`` and ``synthetic:mosi-unaligned`` (scale 0.05, the default model, one thread, the
default CPU path) give the test metrics recorded in ``tests/data/refactor_baseline.json``.

How exactly, depends on where the numbers were recorded (``recorded_on`` in the file):

- **The same kind of CPU, kernel build and torch**: every metric bit for bit. Here the bits can only
  move if the code changed.
- **Any other machine**: accuracies and F1 exactly, the continuous metrics (MAE, Corr, loss) within
  :data:`TOLERANCE`. The compiled kernels reassociate sums for the CPU's vector width, and torch
  picks its own kernels by CPU, so another CPU moves the last bits of every number; it moved no
  accuracy in the measurement, whose nearest test prediction was far from a class boundary.

The tolerance is measured (``scripts/golden_drift.py``; numbers and reasoning in
``docs/bench/golden-tolerance.md``): it sits well above what a change of CPU or of kernel build
does to these runs, and well below what the smallest real change (one layer's init, dropout draws in
another order) does. ``test_a_real_change_fails_the_comparison`` keeps the second half true.

A change that is meant to change these numbers (a new dropout law, another init) records them anew:
``python tests/test_refactor_numbers.py`` rewrites the file with where it was recorded; say why in
the commit.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import pytest
import torch

from mskt.config import Config
from mskt.data.readers import load_dataset
from mskt.fast import compiled_kernels
from mskt.fast.build import build_tag, kernel_arch
from mskt.train import train

BASELINE = Path(__file__).parent / "data" / "refactor_baseline.json"
DATASETS = ("synthetic:mosi", "synthetic:mosi-unaligned")
VARIANTS = ("full", "kt", "language_vision", "language", "vision", "kt_any")
REQUIRED = os.environ.get("MSKT_REQUIRE_KERNELS") == "1"
# Absolute, after 2 epochs. Measured (docs/bench/golden-tolerance.md): another kernel build or
# another CPU moved these by at most 4.2e-6, 120 times less; the smallest real changes measured
# (dropout draws in another order; one layer initialised from other draws of the same law) moved
# each run's MAE by at least 4.2e-3 and 2.5e-2, 8 and 50 times more.
TOLERANCE = {"mae": 5e-4, "corr": 5e-4, "loss": 5e-4}


def run_config(data: str, variant: str) -> Config:
    return Config.from_dict(dict(data=data, data_scale=0.05, epochs=2, variant=variant, device="cpu", progress="off"))


def run_all() -> dict:
    out = {}
    for data in DATASETS:
        ds = load_dataset(data, scale=0.05, seed=0)
        for variant in VARIANTS:
            out[f"{data}/{variant}"] = {k: float(v) for k, v in train(run_config(data, variant), dataset=ds, save=False).metrics["test"].items()}
    return out


def machine() -> dict:
    """Where numbers come from: the kernel build (named after the CPU's instruction set for a
    native build), the CPU's name, torch and the thread count the suite runs with."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"build": build_tag(), "kernel_arch": kernel_arch(), "cpu": cpu, "torch": torch.__version__, "threads": 1}


def same_bits_expected(recorded_on: dict, here: dict) -> bool:
    """Bitwise equality is meaningful only on the build, torch and thread count that recorded."""
    return all(recorded_on.get(k) == here[k] for k in ("build", "kernel_arch", "torch", "threads"))


def differences(recorded: dict, measured: dict, tolerance: dict | None) -> dict:
    """{run/metric: (recorded, measured)} for every number that differs: beyond ``tolerance`` for
    the metrics it names, at all for the others (accuracies, F1); ``tolerance=None``: bit for bit."""
    out = {}
    for run in recorded.keys() | measured.keys():
        a, b = recorded.get(run, {}), measured.get(run, {})
        for k in a.keys() | b.keys():
            if k not in a or k not in b:
                out[f"{run}/{k}"] = (a.get(k), b.get(k))
            elif (abs(a[k] - b[k]) > tolerance[k]) if tolerance and k in tolerance else a[k] != b[k]:
                out[f"{run}/{k}"] = (a[k], b[k])
    return out


def reinit_last_linear(model: torch.nn.Module) -> torch.nn.Module:
    """The smallest real change measured: the model's last linear layer initialised from other draws
    of the same law (uniform up to its largest weight, as its default init)."""
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        g = torch.Generator().manual_seed(12345)
        last.weight.copy_(torch.empty_like(last.weight).uniform_(-1, 1, generator=g) * last.weight.abs().max())
    return model


def test_the_comparison_is_exact_for_accuracies_and_tolerant_for_continuous_metrics():
    recorded = {"r": {"mae": 1.0, "corr": 0.5, "loss": 1.0, "acc2_nonzero": 0.75}}
    drift = {"r": {"mae": 1.0 + TOLERANCE["mae"] / 2, "corr": 0.5, "loss": 1.0, "acc2_nonzero": 0.75}}
    assert differences(recorded, drift, TOLERANCE) == {}
    assert set(differences(recorded, drift, None)) == {"r/mae"}
    moved = {"r": {**drift["r"], "mae": 1.0 + 2 * TOLERANCE["mae"]}}
    assert set(differences(recorded, moved, TOLERANCE)) == {"r/mae"}
    flipped = {"r": {**drift["r"], "acc2_nonzero": 0.75 + 1e-12}}
    assert set(differences(recorded, flipped, TOLERANCE)) == {"r/acc2_nonzero"}
    assert set(differences(recorded, {"r": {}}, TOLERANCE)) == {"r/mae", "r/corr", "r/loss", "r/acc2_nonzero"}


def test_bits_are_compared_only_where_they_were_recorded():
    here = {"build": "b1", "kernel_arch": "native", "cpu": "X", "torch": "2.13.0", "threads": 1}
    assert same_bits_expected(dict(here), here)
    assert same_bits_expected({**here, "cpu": "the same chip, renamed"}, here)
    for k, other in (("build", "b2"), ("kernel_arch", "portable"), ("torch", "2.14.1"), ("threads", 2)):
        assert not same_bits_expected({**here, k: other}, here), k


@pytest.mark.slow
@pytest.mark.skipif(compiled_kernels() is None and not REQUIRED, reason="recorded on the compiled CPU path")
def test_seeded_runs_give_the_recorded_metrics():
    baseline = json.loads(BASELINE.read_text())
    measured = run_all()
    exact = same_bits_expected(baseline["recorded_on"], machine())
    changed = differences(baseline["runs"], measured, None if exact else TOLERANCE)
    where = "bit for bit (recorded on this build)" if exact else f"within {TOLERANCE} (recorded on {baseline['recorded_on']})"
    assert not changed, f"not equal {where}: {changed}"


@pytest.mark.slow
@pytest.mark.skipif(compiled_kernels() is None and not REQUIRED, reason="recorded on the compiled CPU path")
def test_a_real_change_fails_the_comparison(monkeypatch):
    """The tolerance is not so wide that it hides a real change: one layer initialised otherwise
    (the model's last linear layer, from another seed) moves the recorded metrics past it."""
    import mskt.train.loop as loop

    plain = loop.build_model

    monkeypatch.setattr(loop, "build_model", lambda cfg: reinit_last_linear(plain(cfg)))
    baseline = json.loads(BASELINE.read_text())
    key = "synthetic:mosi/language"  # the quickest of the recorded runs
    data, variant = key.rsplit("/", 1)
    metrics = train(run_config(data, variant), dataset=load_dataset(data, scale=0.05, seed=0), save=False).metrics["test"]
    changed = differences({key: baseline["runs"][key]}, {key: {k: float(v) for k, v in metrics.items()}}, TOLERANCE)
    assert changed, "one layer's init changed and every metric stayed within the tolerance"


if __name__ == "__main__":
    torch.set_num_threads(1)  # as the test suite runs
    BASELINE.write_text(json.dumps({"recorded_on": machine(), "runs": run_all()}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {BASELINE} ({machine()})", file=sys.stderr)
