"""CUDA: the branches a GPU takes (issue 21), and the script that checks them on a GPU machine.

Tests marked ``gpu`` need CUDA and are skipped without it, with the reason (tests/conftest.py), so
CPU machines and CI stay green; ``scripts/gpu_check.sh`` runs them (``pytest -m gpu``) on a GPU.

Stated tolerances. Forward and backward on CUDA against the CPU path: ``rtol=1e-4, atol=1e-5`` on
predictions, every loss term and every parameter's gradient, with TF32 off (cuBLAS and cuDNN then
compute in fp32 as the CPU does). The two devices sum in different orders, so they differ in the
last bits: on the CPU, this fp32 model is within 4e-7 (absolute) of the same model in float64 for
every variant (predictions, loss terms, gradients of size up to 1.4), so the tolerance leaves a
margin of 25x, while a device bug (a mask or constant on the wrong device, a dropped term) shows at
1e-2 and more. Evaluation metrics on CUDA against the CPU's: within 1e-4. A one-process torchrun
against plain training: 1e-6 on the CPU (gloo), where DDP over one rank averages each gradient over
one rank; 1e-4 on CUDA, whose atomic adds make the last bits vary from run to run.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mskt.config import Config
from mskt.data.batching import Tensors
from mskt.model import build_model
from mskt.train import evaluate, make_optimizer, predict, resolve_device, train, training_step
from mskt.train.evaluation import default_test_batch

try:
    from conftest import NO_DROPOUT, TINY, make_batch_fn, steps_for, tiny_model_config, tiny_run_config
except ImportError:  # tests/ imported as a package
    from tests.conftest import NO_DROPOUT, TINY, make_batch_fn, steps_for, tiny_model_config, tiny_run_config

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-4, atol=1e-5)
gpu = pytest.mark.gpu

# (variant, task, aligned, ctc): every built-in variant aligned and unaligned, both tasks, and CTC
# alignment (its loss runs CUDA's own CTC kernel).
CASES = [(v, "regression", aligned, False) for v in ("full", "kt", "language_vision", "language", "vision", "kt_any") for aligned in (True, False)]
CASES += [("full", "emotions", True, False), ("kt", "emotions", False, False), ("full", "regression", False, True)]


@pytest.fixture
def exact_fp32():
    """TF32 off: cuDNN's convolutions (on by default) and cuBLAS's matmuls in full fp32, as on the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def to_device(batch, device):
    """The batch (nested dicts of tensors, or None) on ``device``."""
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if torch.is_tensor(batch) else batch


def forward_backward(model, batch) -> dict:
    """Predictions, every loss term and every gradient of one training forward and backward, on the CPU."""
    out = model(batch)
    terms = model.loss(out, batch["labels"])
    model.zero_grad(set_to_none=True)
    terms["total"].backward()
    found = {"pred": out.pred.detach().cpu()}
    found.update({f"loss {k}": v.detach().cpu() for k, v in terms.items()})
    found.update({f"grad {n}": p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None})
    return found


def assert_all_close(got: dict, want: dict, **tol):
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for key in want:
        torch.testing.assert_close(got[key], want[key], **tol, msg=lambda m, key=key: f"{key}: {m}")


# ----------------------------------------------------------------------------------------------
# The model on CUDA


@gpu
@pytest.mark.parametrize("variant, task, aligned, ctc", CASES)
def test_forward_and_backward_on_cuda_equal_the_cpu_path(variant, task, aligned, ctc, exact_fp32):
    cfg = tiny_model_config(variant=variant, task=task, ctc_align=ctc, **NO_DROPOUT)
    cpu_model = build_model(cfg, text_steps=steps_for(aligned)["text"] if ctc else None).train()
    cuda_model = copy.deepcopy(cpu_model).cuda()
    batch = make_batch_fn(cfg, aligned)
    # Training: predictions, every loss term (kt's consistency terms, CTC's) and every gradient.
    assert_all_close(forward_backward(cuda_model, to_device(batch, "cuda")), forward_backward(cpu_model, batch), **TOL)
    # Evaluation: the default test protocol (audio missing: left out, or marked missing and rebuilt).
    cpu_model.eval(), cuda_model.eval()
    with torch.inference_mode():
        want = cpu_model(default_test_batch(cpu_model, batch)).pred
        got = cuda_model(default_test_batch(cuda_model, to_device(batch, "cuda"))).pred
    torch.testing.assert_close(got.cpu(), want, **TOL)


@gpu
def test_torch_compile_on_cuda_computes_the_eager_forward_and_backward(exact_fp32, caplog):
    """The compiled training forward (``cfg.compile``: :class:`CompiledOrEager`) compiles on CUDA,
    without falling back to eager, and computes what the eager model computes, gradients included."""
    from mskt.train.runtime import CompiledOrEager

    cfg = tiny_model_config(variant="kt", **NO_DROPOUT)
    model = build_model(cfg).cuda().train()
    batch = to_device(make_batch_fn(cfg, aligned=False), "cuda")
    compiled = CompiledOrEager(model)
    with caplog.at_level(logging.WARNING, logger="mskt.train.runtime"):
        out = compiled(batch)
    assert not compiled.failed, caplog.text
    terms = model.loss(out, batch["labels"])
    model.zero_grad(set_to_none=True)
    terms["total"].backward()
    got = {"pred": out.pred.detach().cpu(), **{f"grad {n}": p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}}
    want = forward_backward(model, batch)
    assert_all_close(got, {k: v for k, v in want.items() if not k.startswith("loss")}, **TOL)


@gpu
def test_bf16_autocast_runs_the_forward_in_bfloat16_and_keeps_fp32_weights():
    cfg = tiny_run_config(variant="kt", device="cuda", precision="bf16")
    model = build_model(cfg).cuda()
    dtypes = []
    model.out.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    step = training_step(model, make_optimizer(model, cfg), cfg)
    terms = step(to_device(make_batch_fn(cfg, aligned=False, batch=8), "cuda"))
    assert dtypes == [torch.bfloat16]  # the head's matmul ran under autocast
    assert all(torch.isfinite(v) for v in terms.values())
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # weights and optimizer stay fp32


@gpu
@pytest.mark.parametrize("variant", ["full", "kt", "kt_any"])
def test_bf16_autocast_trains_two_epochs_with_a_finite_loss(variant, tiny_mosi):
    cfg = tiny_run_config(variant=variant, device="cuda", precision="bf16", epochs=2)
    result = train(cfg, dataset=tiny_mosi, save=False)
    assert len(result.history) == 2
    losses = result.history[[c for c in result.history.columns if c.startswith(("train_", "valid_"))]]
    assert np.isfinite(losses.to_numpy(dtype=float)).all(), losses
    assert all(math.isfinite(v) for v in result.metrics["test"].values()), result.metrics["test"]
    assert next(result.model.parameters()).device.type == "cuda"


# ----------------------------------------------------------------------------------------------
# Evaluation and data on CUDA


@pytest.fixture(scope="module")
def trained_kt_any(tiny_mosi):
    """kt_any (reads every modality, rebuilds whichever is missing) after one epoch on the CPU."""
    cfg = tiny_run_config(variant="kt_any", epochs=1, cpu_kernels="torch")
    return train(cfg, dataset=tiny_mosi, save=False).model


@gpu
@pytest.mark.parametrize("protocol", [{}, {"missing": "vision"}, {"missing_rate": 0.3, "missing_mode": "step", "missing_seed": 1}],
                         ids=["default", "vision-missing", "steps-dropped"])
def test_evaluation_on_cuda_gives_the_cpu_metrics(protocol, trained_kt_any, tiny_mosi, exact_fp32):
    split = tiny_mosi.splits["test"]
    cpu_model, cuda_model = trained_kt_any, copy.deepcopy(trained_kt_any).cuda()
    cpu_data, cuda_data = Tensors.from_split(split, "regression", "cpu"), Tensors.from_split(split, "regression", "cuda")
    want, got = evaluate(cpu_model, cpu_data, 4, **protocol), evaluate(cuda_model, cuda_data, 4, **protocol)
    assert got.keys() == want.keys()
    assert all(abs(got[k] - want[k]) <= 1e-4 for k in want), (got, want)
    preds = predict(cuda_model, cuda_data, 4, **protocol)["pred"], predict(cpu_model, cpu_data, 4, **protocol)["pred"]
    torch.testing.assert_close(torch.as_tensor(preds[0]), torch.as_tensor(preds[1]), **TOL)


@gpu
def test_lazy_batches_reach_the_gpu_through_pinned_memory_unchanged(tmp_path, tiny_mosi):
    from mskt.data.store import read_store, write_store

    path = write_store(tiny_mosi, tmp_path / "tiny.h5")
    eager = Tensors.from_split(read_store(path).splits["train"], "regression", "cpu")
    stored = read_store(path, lazy=True)
    try:
        lazy = Tensors.from_split(stored.splits["train"], "regression", "cuda", lazy=True)
        index = torch.tensor([5, 0, 3, 9, 2])  # not increasing: h5py reads sorted rows, the batch keeps this order
        got, want = lazy.batch(index.cuda()), eager.batch(index)
        for m in ("text", "audio", "vision"):
            assert got[m].device.type == "cuda"
            assert torch.equal(got[m].cpu(), want[m]), m
        assert torch.equal(got["labels"].cpu(), want["labels"])
    finally:
        stored.close()


@gpu
def test_resolve_device_under_torchrun_is_this_ranks_gpu(monkeypatch):
    last = torch.cuda.device_count() - 1
    monkeypatch.setenv("LOCAL_RANK", str(last))
    assert resolve_device("auto") == resolve_device("cuda") == torch.device(f"cuda:{last}")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_resolve_device_under_torchrun_without_cuda(monkeypatch):
    from mskt.errors import ConfigError

    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="torch sees no CUDA device"):
        resolve_device("cuda")


# ----------------------------------------------------------------------------------------------
# torchrun


TRAIN = [
    "train", "--data", "synthetic:mosi", "--data-scale", "0.05", "--epochs", "2", "--batch-size", "9", "--variant", "kt",
    "--threads", "1", "--progress", "off", "--seed", "3",
    *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if not k.endswith("_dim")],
    *[f"--{k.replace('_', '-')}={v}" for k, v in NO_DROPOUT.items()],
]


def _mskt(args, torchrun: bool):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun else [sys.executable]
    proc = subprocess.run([*launcher, "-m", "mskt", *args], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@gpu
def test_one_process_nccl_torchrun_writes_its_run_folder_and_matches_plain_training(tmp_path):
    _mskt([*TRAIN, "--device", "cuda", "--out", str(tmp_path / "ddp")], torchrun=True)
    _mskt([*TRAIN, "--device", "cuda", "--out", str(tmp_path / "plain")], torchrun=False)
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["checkpoint.pt", "config.json", "history.csv", "last.pt", "metrics.json"]
    ddp, plain = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("ddp", "plain"))
    assert (ddp["world_size"], ddp["distributed_backend"]) == (1, "nccl")
    assert plain["distributed_backend"] is None
    assert ddp["best_epoch"] == plain["best_epoch"]
    assert all(abs(ddp["test"][k] - v) <= 1e-4 for k, v in plain["test"].items()), (ddp["test"], plain["test"])


# ----------------------------------------------------------------------------------------------
# scripts/gpu_check.sh, dry on the CPU


def test_the_gpu_check_script_runs_dry_on_cpu(tmp_path):
    """The script's dry mode (tiny sizes; install and the compile bench left out to keep this short:
    a CPU compile takes minutes) writes a summary whose every step passed; its one-process gloo
    torchrun ran DDP and computed exactly what plain training computes."""
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--device", "cpu", "--dry", "--no-install",
         "--python", sys.executable, "--only", "env,pytest-gpu,torchrun,bench-fp32,bench-bf16"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["bench-fp32.json", "details.tar.gz", "summary.json", "summary.md"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] and summary["dry"] and summary["device"] == "cpu"
    steps = {s["step"]: s for s in summary["steps"]}
    assert list(steps) == ["install", "env", "pytest-gpu", "torchrun", "bench-fp32", "bench-bf16", "bench-compile"]
    assert {k: s["status"] for k, s in steps.items()} == {
        "install": "skipped", "env": "ok", "pytest-gpu": "ok", "torchrun": "ok", "bench-fp32": "ok", "bench-bf16": "skipped", "bench-compile": "skipped",
    }
    assert all(s["rc"] == 0 and s["seconds"] > 0 for s in steps.values() if s["status"] == "ok")
    assert "CUDA-only" in steps["bench-bf16"]["note"] and steps["bench-compile"]["note"] == "not in --only"
    assert summary["env"]["torch"] == torch.__version__ and summary["env"]["cuda_available"] is False

    tests = summary["pytest"]  # the gpu tests: collected, every one skipped for want of CUDA
    assert (tests["passed"], tests["failed"], tests["error"]) == (0, 0, 0) and tests["skipped"] >= len(CASES)
    assert all(t["outcome"] == "skipped" and "CUDA" in t["message"] for t in tests["tests"])

    records = summary["bench"]["bench-fp32"]
    assert [(r["preset"], r["variant"], r["config"], r["device"]) for r in records] == [
        ("iemocap", "full", "mult-public", "cpu"), ("iemocap", "full", "mult", "cpu")]
    assert records[1]["speedup_vs_public_mult"] > 0 and records == json.loads((out / "bench-fp32.json").read_text())
    text = (out / "summary.md").read_text()
    assert "**Dry run**" in text and "## mskt bench, fp32" in text and "| iemocap | full | mult |" in text

    ddp = summary["torchrun"]
    assert (ddp["world_size"], ddp["distributed_backend"]) == (1, "gloo")
    with tarfile.open(out / "details.tar.gz") as tar:
        names = set(tar.getnames())
        assert {"./logs/torchrun.log", "./logs/bench-fp32.log", "./pytest-gpu.xml", "./steps.tsv", "./torchrun-run/metrics.json",
                "./torchrun-run-files.txt"} <= names
        assert not any(n.endswith(".pt") for n in names)  # checkpoints stay out: the device tool returns files <= 16 MiB
        cfg = Config.from_dict(json.loads(tar.extractfile("./torchrun-run/config.json").read()))
    plain = train(cfg, save=False).metrics  # the same run, in this process, without torchrun
    assert plain["best_epoch"] == ddp["best_epoch"]
    assert all(abs(ddp["test"][k] - v) <= 1e-6 for k, v in plain["test"].items()), (ddp["test"], plain["test"])
