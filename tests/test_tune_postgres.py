"""``mskt tune`` workers on a real PostgreSQL (the ``postgres`` fixture of conftest.py: a throwaway
cluster), each worker with its own ``--root``, as on separate machines that share only the database:
no study folder, no lock file in common. What they share must be coordinated by the storage.

The workers are forked from this process and run ``mskt.cli.main`` with the README's Slurm-array
command in its single-machine form (the local database, tiny data and model): the code a fresh
``mskt tune`` runs, without paying for torch's import once per worker.

The README's submitit recipe (``scripts/submit_tune.py``) runs the same worker command; its test
runs it as the README gives it, with submitit's local executor and a journal file for the server.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from mskt.cli import main

from test_docs import ROOT, code_blocks, mskt_invocations, shell_lines

TINY = {"data": "synthetic:mosi", "data_scale": 0.01, "d_model": 8, "heads": 2, "encoder_layers": 1, "kt_layers": 1,
        "crossmodal_layers": 1, "memory_layers": 1, "batch_size": 8, "eval_batch_size": 64, "device": "cpu", "progress": "off",
        "threads": 1, "cpu_kernels": "torch", "epochs": 1}
TINY_FLAGS = [x for k, v in TINY.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def readme_worker_command() -> list[str]:
    """The README's PostgreSQL worker: the command each task of its Slurm array runs (sbatch --wrap "...")."""
    calls = [args for b in code_blocks(ROOT / "README.md") if b.lang == "bash" for line in shell_lines(b.code)
             if line.strip().startswith("sbatch --array") for args in mskt_invocations(line)]
    assert len(calls) == 1, calls
    (args,) = calls
    assert args[0] == "tune" and any(a.startswith("postgresql://") for a in args), args
    return args


def single_machine(args: list[str], url: str, root: Path, *extra: str) -> list[str]:
    """``args`` with the local database for the README's server, then tiny data and model, its own
    --root and ``extra`` (argparse keeps a flag's last value)."""
    return [url if a.startswith("postgresql://") else a for a in args] + TINY_FLAGS + ["--root", str(root), *extra]


def _child(args, go, log_path):
    """A forked worker: its output to ``log_path``, its exit status main()'s (no atexit: the parent's
    inherited connections are not the child's to close)."""
    import logging

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = open(fd, "w", buffering=1)  # pytest's capture replaced the sys streams too
    for h in list(logging.root.handlers):  # pytest's capture handlers: the child logs to its file, as `mskt` does
        logging.root.removeHandler(h)
    if go is not None:
        go.wait(60)
    try:
        rc = main(args)
    except BaseException as e:  # a traceback is a failure the test shows
        import traceback

        traceback.print_exc()
        rc = 99 if not isinstance(e, SystemExit) else (e.code or 0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


@pytest.fixture(scope="module", autouse=True)
def imported_once():
    """What a worker imports, imported before the forks: each worker would otherwise pay for it
    again (torch._dynamo alone, which torch's Adam imports, takes seconds)."""
    import torch._dynamo  # noqa: F401
    from sqlalchemy.dialects.postgresql import psycopg  # noqa: F401

    import mskt.data.readers  # noqa: F401
    import mskt.experiments.tune  # noqa: F401
    import mskt.train  # noqa: F401
    import optuna.samplers  # noqa: F401


def _start(args, log_path, go=None):
    import multiprocessing as mp

    p = mp.get_context("fork").Process(target=_child, args=(args, go, log_path))
    p.start()
    return p


def _trials(url: str, study: str):
    return optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False)


# The race: 4 workers started at the same moment (one event releases them) on a fresh database,
# --trials 3. The issue saw trials run twice in 1 round of 3. Measured here (h-pg) with the study
# folder's lock file in place of the storage's lock (separate --roots do not share it): 3 failing
# rounds of 9 run one at a time, 3 of 12 run three at a time as below (4 complete or pruned
# trials, or 2 distinct parameter sets among 3); with the code before this change every round failed
# (a worker died on the schema race). 12 rounds miss a race of 1 in 3 with probability
# (2/3)**12 = 0.8%, one of 1 in 4 with 3.2%. The rounds run three at a time, each on its own
# database: a round's workers mostly wait (for the lock, for the last trial), and 12 processes fill
# that time on 2 cores.
ROUNDS, AT_ONCE = 12, 3
WORKERS, TRIALS = 4, 3


def test_four_workers_started_together_on_a_fresh_database_run_exactly_n_trials(postgres, tmp_path):
    import multiprocessing as mp

    command = readme_worker_command()
    for wave in range(0, ROUNDS, AT_ONCE):
        rounds = {r: postgres.database() for r in range(wave, wave + AT_ONCE)}
        go = mp.get_context("fork").Event()
        logs = {(r, i): tmp_path / f"round{r}-worker{i}.log" for r in rounds for i in range(WORKERS)}
        workers = {(r, i): _start(single_machine(command, url, tmp_path / f"round{r}-root{i}", "--trials", str(TRIALS)), logs[r, i], go)
                   for r, url in rounds.items() for i in range(WORKERS)}
        go.set()
        for w in workers.values():
            w.join(300)
            if w.is_alive():  # a hung worker fails the round below; it must not outlive the test
                w.kill()
        for r, url in rounds.items():
            codes = [workers[r, i].exitcode for i in range(WORKERS)]
            assert codes == [0] * WORKERS, (r, codes, [logs[r, i].read_text()[-1500:] for i in range(WORKERS)])
            trials = _trials(url, "mosi-kt")
            states = [t.state.name for t in trials]
            done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
            assert len(done) == TRIALS and "RUNNING" not in states and "WAITING" not in states, (r, states)
            params = [json.dumps(t.params, sort_keys=True) for t in done]
            assert len(set(params)) == TRIALS, (r, params)
            assert sum(bool(t.user_attrs.get("default")) for t in trials) == 1, r  # the default was queued once
            # every worker said where the study lives, once
            assert all(logs[r, i].read_text().count(f"study mosi-kt: storage {url}") == 1 for i in range(WORKERS)), r


EPOCHS = 6  # enough that the trial still runs when the test sees its first epoch done


def test_a_sigkilled_workers_trial_is_failed_and_retried(postgres, tmp_path):
    url = postgres.database()
    command = readme_worker_command()
    # Worker A: a long trial (the default), killed once it has finished an epoch.
    a = _start(single_machine(command, url, tmp_path / "a", "--trials", "2", "--epochs", str(EPOCHS), "--heartbeat", "1"), tmp_path / "a.log")
    history = tmp_path / "a" / "mosi-kt" / "trial-0000" / "history.csv"
    deadline = time.monotonic() + 60
    while not (history.exists() and len(history.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert history.exists() and a.is_alive(), (tmp_path / "a.log").read_text()[-2000:]
    os.kill(a.pid, signal.SIGKILL)
    a.join()
    assert [t.state.name for t in _trials(url, "mosi-kt")] == ["RUNNING"]
    # Worker B, elsewhere (its own --root), with the study's settings: after the grace period (6 s) it
    # fails the dead trial, and the retry runs its parameters again.
    b = _start(single_machine(command, url, tmp_path / "b", "--trials", "2", "--epochs", str(EPOCHS), "--heartbeat", "1"), tmp_path / "b.log")
    b.join(180)
    assert b.exitcode == 0, (tmp_path / "b.log").read_text()[-2000:]
    trials = _trials(url, "mosi-kt")
    states = {t.number: t.state.name for t in trials}
    assert states[0] == "FAIL" and "RUNNING" not in states.values(), states
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].params == trials[0].params, states


@pytest.mark.parametrize("change, needle", [
    (["--heartbeat", "1"], "runs with --heartbeat 10 (set by the worker that started it), this command with 1"),
    (["--variant", "language_vision"], "another base config (variant: study 'kt', this command 'language_vision')"),
    (["--space", "SPACE"], "another space (lr: study {'low': 0.0001, 'high': 0.003"),
])
def test_a_worker_with_other_settings_is_refused_in_one_line_before_any_trial(postgres, tmp_path, capsys, change, needle):
    url = postgres.database()
    command = readme_worker_command()
    from mskt.cli import _config_from_args, build_parser
    from mskt.experiments import tune as tuning

    # The study as the first worker creates it (open_study: no trial runs here).
    args = build_parser().parse_args(single_machine(command, url, tmp_path / "first"))
    cfg = _config_from_args(args)
    given = {k[4:] for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    space = {k: v for k, v in tuning.default_space(cfg).items() if k not in given}
    tuning.open_study(cfg, "mosi-kt", tmp_path / "first" / "mosi-kt", url, space, None, "median", 10)
    space_file = tmp_path / "space.toml"
    space_file.write_text("lr = { low = 1e-4, high = 1e-2, log = true }\n")
    change = [str(space_file) if c == "SPACE" else c for c in change]
    assert main(single_machine(command, url, tmp_path / "second", *change)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mskt: error: study 'mosi-kt'") and needle in err, err
    trials = _trials(url, "mosi-kt")
    assert [t.state.name for t in trials] == ["WAITING"]  # the queued default, never started
    assert not (tmp_path / "second" / "mosi-kt").exists() or not any((tmp_path / "second" / "mosi-kt").glob("trial-*"))


def readme_submitit_command() -> tuple[list[str], list[str]]:
    """The README's submitit recipe: (scripts/submit_tune.py's options, the mskt arguments its jobs run)."""
    import shlex

    lines = [line for b in code_blocks(ROOT / "README.md") if b.lang == "bash" for line in shell_lines(b.code)
             if "scripts/submit_tune.py" in line]
    assert len(lines) == 1, lines
    words = shlex.split(lines[0], comments=True)
    at, word = words.index("scripts/submit_tune.py"), words.index("mskt")
    return words[at + 1:word], words[word + 1:]


def submit_tune_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("submit_tune", ROOT / "scripts" / "submit_tune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readmes_submitit_recipe_runs_two_local_jobs_on_one_study(tmp_path):
    """The recipe's one command in its single-machine form: submitit's local executor (processes,
    as Slurm's nodes would run them), 2 jobs of the Slurm array's worker command on one journal-file
    study, tiny data. The jobs coordinate through the storage: exactly N trials, each complete, no
    parameters twice."""
    import subprocess

    pytest.importorskip("submitit")
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    options, args = readme_submitit_command()
    assert args == readme_worker_command()  # the jobs run the worker that the tests above run
    journal = tmp_path / "journal.log"
    command = [sys.executable, str(ROOT / "scripts" / "submit_tune.py"), *options, "--cluster", "local", "--jobs", "2",
               "--timeout-min", "3", "--folder", str(tmp_path / "submitit"), "mskt", *single_machine(args, str(journal), tmp_path / "root", "--trials", str(TRIALS))]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    logs = sorted((tmp_path / "submitit").glob("*_0_log.err"))
    assert proc.returncode == 0, (proc.stdout, proc.stderr[-2000:], [p.read_text()[-1500:] for p in logs])
    assert proc.stdout.startswith("submitted 2 job(s) to local"), proc.stdout
    # each job ran the command on the shared study, once
    assert len(logs) == 2 and all(p.read_text().count(f"study mosi-kt: storage {journal}") == 1 for p in logs), [p.read_text()[-1500:] for p in logs]
    study = optuna.load_study(study_name="mosi-kt", storage=JournalStorage(JournalFileBackend(str(journal))))
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE"] * TRIALS, states
    params = [json.dumps(t.params, sort_keys=True) for t in study.trials]
    assert len(set(params)) == TRIALS, params
    assert sum(bool(t.user_attrs.get("default")) for t in study.trials) == 1  # the default was queued once


def test_submit_tune_says_in_one_line_why_it_cannot_run(tmp_path, capsys):
    """No job process starts here: a command line it refuses, a job whose mskt fails (submitit's debug
    executor runs it in this process), and --no-wait, which returns before any job has run."""
    import re

    pytest.importorskip("submitit")
    script = submit_tune_script()
    for argv, needle in ((["--jobs", "2", "tune"], "give the command the jobs run after the word mskt"),
                         (["--jobs", "0", "mskt", "tune"], "--jobs 0: expected 1 or more")):
        with pytest.raises(SystemExit) as e:
            script.main(argv)
        assert e.value.code == 2 and needle in capsys.readouterr().err
    folder = ["--cluster", "debug", "--folder", str(tmp_path / "submitit")]
    assert script.main([*folder, "mskt", "tune", "--data", "synthetic:mosi", "--root", str(tmp_path)]) == 1
    # mskt's own line (the debug job runs in this process, so it prints here), then the script's
    mskt_line, line = capsys.readouterr().err.splitlines()
    assert "--trials N is required" in mskt_line and re.fullmatch(r"submit_tune.py: job DEBUG_\d+: mskt returned 2", line), line
    assert script.main([*folder, "--no-wait", "mskt", "tune", "--data", "synthetic:mosi", "--root", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("submitted 1 job(s) to debug") and err == ""  # the job (which would fail as above) never ran


def test_a_server_out_of_reach_is_a_one_line_error_that_says_so(tmp_path, capsys):
    pytest.importorskip("psycopg")
    with __import__("socket").socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://tuner:s3cret@127.0.0.1:{port}/optuna"
    assert main(["tune", *TINY_FLAGS, "--trials", "1", "--root", str(tmp_path), "--storage", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"postgresql://tuner:***@127.0.0.1:{port}/optuna: cannot connect (OperationalError" in err, err
    assert "s3cret" not in err
