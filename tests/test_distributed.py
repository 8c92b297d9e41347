"""DDP under torchrun: 2 CPU processes (gloo) train the same model as one process with the same
global batch.

Stated tolerance. Variants whose loss is a mean over samples (full, language_vision, ...) match
single-process training to float rounding: every test metric within 1e-6. kt's consistency terms
are means over the real (unpadded) steps of each rank's part of the batch, and DDP averages ranks
by samples, so with sequences of different lengths its update differs slightly from the global
batch's: test metrics within 0.02 after 2 epochs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mskt.train.distributed import Dist, weighted_share

try:
    from conftest import TINY
except ImportError:  # tests/ imported as a package
    from tests.conftest import TINY

NO_DROPOUT = ["--attn-dropout=0", "--relu-dropout=0", "--res-dropout=0", "--embed-dropout=0"]
# 64 training samples in batches of 9: the last global batch has one sample, so rank 1 sits it out;
# 11 validation samples split 6 / 5.
RUN = [
    "--data", "synthetic:mosi", "--data-scale", "0.05", "--epochs", "2", "--batch-size", "9",
    "--threads", "1", "--device", "cpu", "--progress", "off",
    *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if not k.endswith("_dim")], *NO_DROPOUT,
]


def _train(out, variant, procs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "mskt"]
    if procs > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m", "mskt"]
    proc = subprocess.run([*launcher, "train", *RUN, "--variant", variant, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text()), proc


@pytest.mark.parametrize("variant, tolerance", [("full", 1e-6), ("kt", 0.02)])
def test_two_gloo_processes_match_one_process(tmp_path, variant, tolerance):
    single, _ = _train(tmp_path / "single", variant, 1)
    ddp, proc = _train(tmp_path / "ddp", variant, 2)
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["best_epoch"] == single["best_epoch"]
    for key, value in single["test"].items():
        assert abs(ddp["test"][key] - value) <= tolerance, (key, value, ddp["test"][key])
    # Only rank 0 reports and writes: one summary line, one set of files.
    assert proc.stdout.count("run folder:") == 1
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["checkpoint.pt", "config.json", "history.csv", "last.pt", "metrics.json"]


def test_weighted_shares_give_the_global_batch_gradient():
    """What DDP computes (the mean over ranks of each rank's weighted gradient) is the gradient of
    the global batch's mean loss, for even, uneven and smaller-than-the-world batches."""
    torch.manual_seed(0)
    w = torch.randn(3, requires_grad=True)
    x, y = torch.randn(11, 3), torch.randn(11)

    def grad(index, weight=1.0):
        w.grad = None
        ((x[index] @ w - y[index]).abs().mean() * weight).backward()
        return w.grad.clone()

    for world in (2, 3):
        for index in (torch.arange(8), torch.arange(11), torch.tensor([4]), torch.tensor([2, 9])):
            parts = [weighted_share(index, Dist(rank=r, world=world)) for r in range(world)]
            assert sum(len(p) for p, wt in parts if wt > 0) == len(index)
            ddp = sum(grad(p, wt) for p, wt in parts) / world
            torch.testing.assert_close(ddp, grad(index), rtol=1e-6, atol=1e-7)


def test_a_world_of_one_is_a_no_op():
    dist = Dist.from_env() if "WORLD_SIZE" not in os.environ else Dist()
    assert (dist.rank, dist.world, dist.is_main) == (0, 1, True)
    index = torch.arange(5)
    assert weighted_share(index, dist) == (index, 1.0)
    model = torch.nn.Linear(2, 2)
    assert dist.wrap(model) is model
    assert dist.sum({"a": 1.0}) == {"a": 1.0}
