"""The small controls measurement of issue 27, part 3: kt against language_vision in the synthetic
positive and negative controls (``mskt.experiments.controls``), sized for a shared 2-core CPU (a
tiny model, 8 epochs, lr 3e-3 for both variants). Writes runs.csv and ci_<metric>.csv to the
output folder and prints the paired 95% intervals. Re-running reads finished runs back.

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/controls_small.py runs/controls
"""

import logging
import sys
import time

import pandas as pd

from mskt.experiments import controls

SEEDS, JOBS = 6, 2
# most telling cells first; 0.2 was added after the first four had finished (their runs are read back)
PLAN = [("positive", (0.05,)), ("negative", (0.05,)), ("positive", (1.0,)), ("negative", (1.0,)), ("positive", (0.2,)), ("negative", (0.2,))]


def main(out: str) -> pd.DataFrame:
    logging.basicConfig(level=logging.WARNING)
    base = controls.small_config()
    t = time.time()

    def show(r):
        print(f"{time.time() - t:7.0f}s {r['label']} seed {r['seed']}: mae {r['mae']:.3f} corr {r['corr']:.3f} (epoch {r['best_epoch']})", flush=True)

    frames = [controls.run(base, controls=(c,), fractions=f, seeds=SEEDS, out_dir=out, jobs=JOBS, on_run=show) for c, f in PLAN]
    runs = pd.concat(frames, ignore_index=True)
    runs.attrs.update(method="kt", baseline="language_vision")
    runs.to_csv(f"{out}/runs.csv", index=False)
    pd.set_option("display.width", 250)
    for m in ("mae", "corr", "acc2_nonzero"):
        ci = controls.paired_ci(runs, m)
        ci.to_csv(f"{out}/ci_{m}.csv", index=False)
        print(ci.round(4).to_string(), flush=True)
    print(f"total {time.time() - t:.0f} s")
    return runs


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/controls")
