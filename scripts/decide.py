"""The experiments of docs/results.md, "Decisions" (issue 27, part 5): trained to convergence on
large test splits, over paired seeds, in three parts. Re-running reads finished runs back (a
killed measurement resumes), so seeds can be added after a power calculation
(``mskt.stats.seeds_needed``) by raising the seed count.

    headline    the five variants of the paper's Table 1 on the default synthetic world
    baselines   kt against MCTN (the paper's missing-modality baseline) and MCTN against language, same design
    robustness  the fair robustness comparison: every config selects on the six fixed missing
                conditions (select_missing="conditions"), swept under those conditions and random
                missing rates 0-0.7
    controls    kt against language_vision in both control worlds at 5%, 20% and 100% of the labels,
                each stopped by patience like every other run

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/decide.py runs/decide headline,robustness,controls --seeds 8 --jobs 2

Writes, per part, ``<out>/<part>/runs.csv`` (one row per run, with converged and epochs_run), and
for robustness ``sweep.csv``; ``mskt.experiments.decide`` reads them into the tables.
"""

import argparse
import logging
import time
from pathlib import Path

from mskt.experiments import decide


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default="runs/decide")
    p.add_argument("parts", nargs="?", default=",".join(decide.PARTS))
    p.add_argument("--seeds", type=int, default=decide.SEEDS)
    p.add_argument("--control-seeds", type=int, default=decide.CONTROL_SEEDS)
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t = time.time()

    def show(r):
        print(f"{time.time() - t:7.0f}s {r.get('control', '')} {r['label']} seed {r['seed']}: mae {r['mae']:.3f} "
              f"acc2 {r['acc2_nonzero']:.3f} (best epoch {r['best_epoch']}, converged {r.get('converged')})", flush=True)

    for part in a.parts.split(","):
        seeds = a.control_seeds if part == "controls" else a.seeds
        frame = decide.run(part, Path(a.out), seeds=seeds, jobs=a.jobs, on_run=show)
        print(f"{time.time() - t:7.0f}s {part}: {len(frame)} rows written", flush=True)
    print(f"total {time.time() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
