"""``mskt bench``: the records it writes, at the real shapes of each preset (timings are not tested:
they are measured in the benchmark, never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mskt.experiments.bench import CONFIGS, PRESET_NAMES, PUBLIC_MULT, RECORD_KEYS, bench_one, bench_public_mult, shapes_for, synthetic_batch, to_markdown
from mskt.errors import ConfigError
from mskt.data.presets import DATA_SHAPES


def test_every_preset_has_its_real_shapes():
    assert set(PRESET_NAMES) == {f"{n}{s}" for n in DATA_SHAPES for s in ("", "-unaligned")}
    mosi = shapes_for("mosi-unaligned")
    assert mosi.steps == {"text": 50, "audio": 375, "vision": 500}
    assert mosi.dims == {"text": 300, "audio": 5, "vision": 20}
    assert shapes_for("iemocap").steps == {"text": 20, "audio": 20, "vision": 20}
    batch = synthetic_batch(shapes_for("mosei"), 3, "cpu")
    assert batch["audio"].shape == (3, 50, 74) and batch["labels"].shape == (3,)
    with pytest.raises(ConfigError, match="mosi-unaligned"):
        shapes_for("mosi-aligned")


def test_the_mult_config_is_the_public_codes():
    assert CONFIGS["mult"] == {"d_model": 30, "heads": 5, "crossmodal_layers": 5, "memory_layers": 5, "encoder_layers": 0, "batch_size": 24}


@pytest.mark.parametrize("variant", ["full", "kt"])
def test_a_record(variant, monkeypatch):
    from mskt.fast import stacks

    compiled_calls = []
    run_compiled = stacks.compiled_stacks

    def counted(calls, last_only):
        import torch

        if torch.is_grad_enabled():  # a training step's (accelerate's own numeric check runs without grad)
            compiled_calls.append(len(calls))
        return run_compiled(calls, last_only)

    monkeypatch.setattr(stacks, "compiled_stacks", counted)
    record = bench_one("iemocap", variant, "mult", steps=1, warmup=1, peak=1e10)
    assert set(RECORD_KEYS) <= set(record)
    assert record["train_samples_per_s"] > 0 and record["infer_samples_per_s"] > 0
    assert record["batch_size"] == 24
    from mskt.fast.build import compiled_kernels

    assert record["cpu_kernels"] == ("fused" if compiled_kernels() is not None else "torch")  # what actually ran
    # ... and it did run: the timed model is accelerated (mskt.fast) exactly when the record says "fused".
    assert bool(compiled_calls) == (record["cpu_kernels"] == "fused")
    # FLOPs of one training step per sample: at least the forward's matmuls, thrice for backward.
    assert 1e7 < record["train_flops_per_sample"] < 1e10
    assert 0 < record["peak_fraction"]


def test_kt_flops_count_every_attention_layer():
    """theta, phi and delta attend without returning weights; their attention must be counted too
    (by the same count on torch's operations, which the FLOP counter sees): 139.6 MFLOP per sample
    for kt at IEMOCAP's shapes, against 139.2 when the compiled kernel hid them."""
    record = bench_one("iemocap", "kt", "mult", steps=1, warmup=1, peak=1e10)
    assert record["train_flops_per_sample"] / 1e6 == pytest.approx(139.6, abs=0.05)


def test_cli_writes_the_json_records(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mskt", "bench", "--presets", "iemocap", "--variants", "full", "--steps", "1", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    records = json.loads(out.read_text())
    assert [(r["preset"], r["variant"], r["config"]) for r in records] == [("iemocap", "full", "mult")]
    assert set(RECORD_KEYS) <= set(records[0])
    assert "| iemocap | full | mult |" in proc.stdout


def test_cli_refuses_unknown_presets_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "mskt", "bench", "--presets", "mosi,imdb"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "imdb" in proc.stderr and "Traceback" not in proc.stderr


def test_the_public_mult_reference_does_the_work_of_full_at_the_mult_config():
    """The baseline of the speed targets is the same model size: its training FLOPs per sample
    equal those of mskt's ``full`` at ``--config mult`` (same widths, depths, heads and shapes)."""
    ours = bench_one("iemocap", "full", "mult", steps=1, warmup=1, peak=1e10)
    public = bench_public_mult("iemocap", steps=1, warmup=1, peak=1e10)
    assert set(RECORD_KEYS) <= set(public)
    assert (public["variant"], public["config"], public["batch_size"], public["cpu_kernels"]) == ("full", PUBLIC_MULT, 24, "torch")
    assert public["train_samples_per_s"] > 0 and public["infer_samples_per_s"] > 0
    assert public["train_flops_per_sample"] == pytest.approx(ours["train_flops_per_sample"], rel=1e-3)


def test_the_public_mult_reference_trains():
    """Its step reaches every parameter and lowers the loss on a fixed batch (regression and emotions)."""
    import torch

    from mskt.experiments import mult_reference

    for preset in ("mosi", "iemocap"):
        shapes = shapes_for(preset)
        torch.manual_seed(0)
        model = mult_reference.MULTModel(shapes.dims, d=10, heads=2, layers=1, n_outputs=1 if shapes.task == "regression" else 8)
        for module in model.modules():  # no dropout: a deterministic descent
            for name in ("attn_dropout", "relu_dropout", "res_dropout", "embed_dropout"):
                if hasattr(module, name):
                    setattr(module, name, 0.0)
        batch = synthetic_batch(shapes, 4, "cpu")
        step = mult_reference.training_step(model, shapes.task)
        first = float(step(batch).detach())
        assert all(p.grad is not None for p in model.parameters())
        for _ in range(30):
            last = float(step(batch).detach())
        assert last < 0.5 * first, (preset, first, last)


def test_markdown_has_the_speedup_column_only_with_a_reference():
    record = {"preset": "mosi", "variant": "full", "config": "mult", "train_samples_per_s": 30.0, "infer_samples_per_s": 90.0,
              "peak_mem_mb": 10.0, "train_flops_per_sample": 1e8}
    assert "public MulT" not in to_markdown([record])
    public = {**record, "config": PUBLIC_MULT, "train_samples_per_s": 10.0}
    table = to_markdown([public, {**record, "speedup_vs_public_mult": 3.0}])
    assert "| mosi | full | mult-public | 10.0 |" in table and table.splitlines()[-1].endswith("| 3.00 |")


def test_cli_reference_times_the_public_mult_first_and_gives_the_speedup(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mskt", "bench", "--presets", "iemocap", "--variants", "full", "--steps", "1", "--threads", "1",
         "--reference", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    public, ours = json.loads(out.read_text())
    assert (public["config"], ours["config"]) == (PUBLIC_MULT, "mult")
    assert ours["speedup_vs_public_mult"] == ours["train_samples_per_s"] / public["train_samples_per_s"]
    assert "x public MulT" in proc.stdout and "| iemocap | full | mult-public |" in proc.stdout


def test_cli_rounds_measure_the_speedup_interleaved_in_one_process(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mskt", "bench", "--presets", "iemocap", "--variants", "full", "--steps", "1", "--threads", "1",
         "--reference", "--rounds", "3", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    public, ours = json.loads(out.read_text())
    assert "speedup_interleaved" not in public
    rounds = ours["speedup_interleaved_rounds"]
    assert len(rounds) == 3 and all(r > 0 for r in rounds) and ours["speedup_interleaved"] == sorted(rounds)[1]
    assert "interleaved" in proc.stdout and proc.stdout.count("| iemocap | full | mult |") == 1


def test_cli_rounds_need_the_reference():
    proc = subprocess.run([sys.executable, "-m", "mskt", "bench", "--presets", "iemocap", "--rounds", "3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--rounds 3" in proc.stderr and "--reference" in proc.stderr
