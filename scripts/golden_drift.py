"""How far seeded 2-epoch runs move under a change of CPU or kernel build, against how far they move
under the smallest real change: the measurement behind the tolerance of
``tests/test_refactor_numbers.py``.

Runs the test's 12 recorded configurations (``run_all``) in this process, with the kernel build of
``$MSKT_KERNEL_ARCH``, and writes each run's test metrics, test predictions and the distance of the
nearest prediction to a class boundary of Acc2/Acc5/Acc7 (an accuracy can only change under a float
drift larger than that distance). ``--perturb`` makes a real change:

- ``init``: one layer (the model's last ``nn.Linear``) initialised from another seed;
- ``dropout-order``: every dropout mask drawn with the key of seed + 1 (init, batch order and
  everything else as with the seed). Before issue 26 this was "torch's generator advanced by one
  draw before training", which then drew the masks.

    MSKT_KERNEL_ARCH=native   python scripts/golden_drift.py --out runs/drift/native.json
    MSKT_KERNEL_ARCH=portable python scripts/golden_drift.py --out runs/drift/portable.json
    python scripts/golden_drift.py --perturb init --out runs/drift/init.json
    python scripts/golden_drift.py --compare runs/drift/native.json runs/drift/portable.json runs/drift/init.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

CONTINUOUS = ("mae", "corr", "loss")


def _perturbed_build(how: str):
    import mskt.train.loop as loop

    plain = loop.build_model

    if how == "init":
        from test_refactor_numbers import reinit_last_linear  # the test's own real change

        loop.build_model = lambda cfg: reinit_last_linear(plain(cfg))
    else:  # every dropout mask from another key, everything else (init, batches) as it was
        import mskt.train.distributed as distributed

        keyed = distributed.set_step_keys
        distributed.set_step_keys = lambda model, seed, *rest: keyed(model, seed + 1, *rest)


def boundary_margin(pred: np.ndarray) -> float:
    """Distance of the prediction nearest to a class boundary: 0 (Acc2), the half-integers in
    [-3, 3] (Acc7) and [-2, 2] (Acc5); clipping only moves values past the outermost boundary."""
    p = np.asarray(pred, dtype=np.float64).ravel()
    edges = np.concatenate([[0.0], np.arange(-2.5, 3.0, 1.0)])
    return float(np.abs(p[:, None] - edges[None, :]).min())


def measure(perturb: str) -> dict:
    from test_refactor_numbers import DATASETS, VARIANTS  # the test's own configurations

    from mskt.config import Config
    from mskt.data.readers import load_dataset
    from mskt.data.batching import Tensors
    from mskt.fast.build import build_tag, kernel_arch
    from mskt.train import train
    from mskt.train.evaluation import _missing_batches

    if perturb != "none":
        _perturbed_build(perturb)
    torch.set_num_threads(1)  # as the test suite runs
    runs = {}
    for data in DATASETS:
        ds = load_dataset(data, scale=0.05, seed=0)
        for variant in VARIANTS:
            cfg = Config.from_dict(dict(data=data, data_scale=0.05, epochs=2, variant=variant, device="cpu", progress="off"))
            result = train(cfg, dataset=ds, save=False)
            test = Tensors.from_split(ds.splits["test"], cfg.task, torch.device("cpu"))
            result.model.eval()
            with torch.inference_mode():
                pred = torch.cat([result.model(b).pred for b in _missing_batches(result.model, test, 256, None, 0.0, "sample", 0)]).numpy()
            runs[f"{data}/{variant}"] = {"metrics": {k: float(v) for k, v in result.metrics["test"].items()},
                                         "pred": pred.ravel().tolist(), "boundary_margin": boundary_margin(pred)}
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    return {"cpu": cpu, "build": build_tag(), "kernel_arch": kernel_arch(), "torch": torch.__version__, "perturb": perturb, "runs": runs}


def compare(a: dict, b: dict) -> dict:
    """Largest absolute difference per continuous metric and of any prediction, and the number of
    runs whose accuracies or F1 differ."""
    out = {k: 0.0 for k in CONTINUOUS} | {"pred": 0.0, "runs_with_other_accuracies": 0}
    for key, ra in a["runs"].items():
        rb = b["runs"][key]
        for k in CONTINUOUS:
            out[k] = max(out[k], abs(ra["metrics"][k] - rb["metrics"][k]))
        out["pred"] = max(out["pred"], float(np.abs(np.subtract(ra["pred"], rb["pred"])).max()))
        out["runs_with_other_accuracies"] += any(ra["metrics"][k] != rb["metrics"][k] for k in ra["metrics"] if k not in CONTINUOUS)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--perturb", choices=("none", "init", "dropout-order"), default="none")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compare", nargs="+", type=Path, help="the reference JSON first, then the others")
    args = ap.parse_args(argv)
    if args.compare:
        ref = json.loads(args.compare[0].read_text())
        print(f"reference {args.compare[0]}: {ref['cpu']}, {ref['kernel_arch']} build; smallest boundary margin "
              f"{min(r['boundary_margin'] for r in ref['runs'].values()):.2e}")
        for path in args.compare[1:]:
            other = json.loads(path.read_text())
            print(f"{path} ({other['cpu']}, {other['kernel_arch']}, perturb={other['perturb']}):", json.dumps(compare(ref, other)))
        return
    result = measure(args.perturb)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
