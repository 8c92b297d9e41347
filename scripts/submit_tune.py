"""One ``mskt`` command as N jobs through submitit: the README's submitit recipe.

Everything after the word ``mskt`` is the command each job runs (``mskt.cli.main`` on those
arguments, in the job's Python, which is this one); the options before it are submitit's:

    python scripts/submit_tune.py --jobs 8 --timeout-min 600 --cpus-per-task 2 \\
        mskt tune --preset mosi --variant kt --trials 100 --prune --study mosi-kt --storage postgresql://tuner@db-host/optuna

On a Slurm login node (``sbatch`` on PATH) the jobs are one Slurm array; elsewhere, or with
``--cluster local``, they are N processes on this machine. The workers coordinate through the
study's storage, as with ``sbatch --array`` (README, "Several workers, one study"). The command
waits for the jobs and exits with 0 only when every job's ``mskt`` returned 0 (each failure is
one line: the job, its status, the tail of its log); ``--no-wait`` returns once they are submitted.
Needs the ``slurm`` extra: ``pip install -e ".[slurm]"``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(submitit's options, the mskt arguments) of ``... mskt ARGS``; argparse keeps an option's last value."""
    parser = argparse.ArgumentParser(prog="submit_tune.py", description="Run one mskt command as N submitit jobs.",
                                     usage="%(prog)s [options] mskt ARGS...")
    parser.add_argument("--jobs", type=int, default=1, help="how many jobs run the command (default 1)")
    parser.add_argument("--cluster", choices=["slurm", "local", "debug"], default=None,
                        help="submitit's executor (default: slurm where sbatch is on PATH, else local)")
    parser.add_argument("--folder", default="runs/submitit", help="submitit's logs and pickles (default runs/submitit)")
    parser.add_argument("--timeout-min", type=int, default=60, help="each job's time limit in minutes (default 60)")
    parser.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per job (Slurm)")
    parser.add_argument("--partition", default=None, help="Slurm partition")
    parser.add_argument("--no-wait", action="store_true", help="return once the jobs are submitted")
    if "mskt" not in argv:
        parser.error("give the command the jobs run after the word mskt, e.g. mskt tune --data synthetic:mosi --trials 8")
    at = argv.index("mskt")
    opts = parser.parse_args(argv[:at])
    if opts.jobs < 1:
        parser.error(f"--jobs {opts.jobs}: expected 1 or more")
    return opts, argv[at + 1:]


def submit(opts: argparse.Namespace, args: list[str]):
    """The submitted jobs, one per worker, each running ``mskt.cli.main(args)``."""
    import submitit

    from mskt.cli import main

    executor = submitit.AutoExecutor(folder=opts.folder, cluster=opts.cluster)
    executor.update_parameters(timeout_min=opts.timeout_min, cpus_per_task=opts.cpus_per_task, name="mskt-" + (args[0] if args else "job"),
                               slurm_array_parallelism=opts.jobs, slurm_partition=opts.partition)
    return executor.map_array(main, [args] * opts.jobs)


# submitit's own lines in a job's log, which say nothing about why mskt failed
SUBMITIT_LINES = ("submitit ", "Job completed successfully", "Exiting after successful completion", "Logging is written both")


def wait(jobs) -> list[str]:
    """Waits for every job; one line per job that did not end with ``mskt`` returning 0."""
    failures = []
    for job in jobs:
        try:
            rc = job.result()
        except Exception as e:  # noqa: BLE001 -- submitit's failure (a traceback, a timeout, a cancelled job): the line says which
            rc = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1]}"
        if rc != 0:
            log = [line for line in (job.stderr() or "").splitlines() if line.strip() and not line.startswith(SUBMITIT_LINES)]
            failures.append(f"job {job.job_id}: {rc if isinstance(rc, str) else f'mskt returned {rc}'}"
                            + (f" (its log: {log[-1]})" if log else ""))
    return failures


def main(argv: list[str] | None = None) -> int:
    opts, args = parse(sys.argv[1:] if argv is None else argv)
    try:
        import submitit  # noqa: F401
    except ImportError:
        print('submit_tune.py: error: submitit is not installed: pip install -e ".[slurm]"', file=sys.stderr)
        return 2
    jobs = submit(opts, args)
    print(f"submitted {len(jobs)} job(s) to {jobs[0].__class__.__name__.removesuffix('Job').lower() or 'submitit'}: "
          f"{', '.join(j.job_id for j in jobs)}; logs in {Path(opts.folder)}", flush=True)
    if opts.no_wait:
        return 0
    failures = wait(jobs)
    for line in failures:
        print(f"submit_tune.py: {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
