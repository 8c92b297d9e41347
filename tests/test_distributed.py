"""DDP under torchrun: 2 and 3 CPU processes (gloo) train the same model as one process with the same
global batch, dropout on (the default rates).

Stated tolerance: every test metric within 1e-4 of one process, for every variant. Dropout masks
are keyed by each row's dataset index, so a sample draws the same masks at any world size; loss
means over something other than samples (kt's consistency terms, means over real steps) divide by
the global batch's count scaled to each rank's share, so DDP's average of the ranks' gradients is
the global batch's. What remains is float rounding (products over other batch sizes, the
all-reduce's order of summation).
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

# 64 training samples in batches of 9: the last global batch has one sample, so rank 1 sits it out;
# 11 validation samples split 6 / 5.
RUN = [
    "--data", "synthetic:mosi", "--data-scale", "0.05", "--epochs", "2", "--batch-size", "9",
    "--threads", "1", "--device", "cpu", "--progress", "off",
    *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if not k.endswith("_dim")], "--out-dropout=0.1",
]


def _train(out, variant, procs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "mskt"]
    if procs > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m", "mskt"]
    proc = subprocess.run([*launcher, "train", *RUN, "--variant", variant, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text()), proc


@pytest.mark.parametrize("variant, procs", [("full", 2), ("kt", 2), ("kt", 3)])
def test_gloo_processes_match_one_process_with_dropout(tmp_path, variant, procs):
    single, _ = _train(tmp_path / "single", variant, 1)
    ddp, proc = _train(tmp_path / "ddp", variant, procs)
    assert ddp["world_size"] == procs and single["world_size"] == 1
    assert ddp["best_epoch"] == single["best_epoch"]
    for key, value in single["test"].items():
        assert abs(ddp["test"][key] - value) <= 1e-4, (key, value, ddp["test"][key])
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


def test_the_readmes_two_node_command_runs_on_one_machine(tmp_path):
    """The README's two-node torchrun command in its single-machine form: two launchers (the two
    "nodes", one process each) meet at a c10d rendezvous on 127.0.0.1 and train one run of world
    size 2; only rank 0 writes the run folder."""
    import shlex
    import socket
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (line,) = [l.strip() for l in readme.splitlines() if l.strip().startswith("torchrun --nnodes 2")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = shlex.split(line.replace("HOST:29500", f"127.0.0.1:{port}").replace("--nproc_per_node 4", "--nproc_per_node 1"))
    assert args[0] == "torchrun" and "-m" in args
    # argparse keeps a flag's last value: tiny data, one epoch, this test's folder
    command = [sys.executable, "-m", "torch.distributed.run", *args[1:], *RUN, "--epochs", "1", "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [o[-2000:] for o in outs]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert sum(o.count("run folder:") for o in outs) == 1
