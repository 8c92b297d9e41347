"""Shared fixtures for the model and training tests: tiny configs, tiny left-padded batches and a
tiny synthetic dataset.

Everything is sized so that a forward pass takes milliseconds on one CPU core: d_model 8, 2 heads,
one layer per stack, a handful of feature dims, B = 4, at most 12 steps. The helpers are exposed as
fixtures (``tiny_cfg``, ``make_batch``, ...) that return plain functions, so tests build exactly the
variant they need.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mskt.config import Config
from mskt.model import ModelConfig

@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny tensors gain nothing from a second thread, and on a shared 2-core machine a second
    OpenMP thread that is not scheduled stalls every op (seconds per step instead of ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The smallest sensible model: every stack exists (one layer each) and every width is tiny.
TINY = dict(
    d_model=8,
    heads=2,
    encoder_layers=1,
    kt_layers=1,
    crossmodal_layers=1,
    memory_layers=1,
    text_dim=7,
    audio_dim=5,
    vision_dim=6,
)
NO_DROPOUT = dict(
    attn_dropout=0.0,
    attn_dropout_audio=0.0,
    attn_dropout_vision=0.0,
    relu_dropout=0.0,
    res_dropout=0.0,
    embed_dropout=0.0,
    out_dropout=0.0,
)
# Steps per modality. Aligned: one grid. Unaligned: a different number of steps per modality, as in
# the MulT *_noalign files (text shortest, then audio, then vision is longest in MOSI).
ALIGNED_STEPS = {"text": 8, "audio": 8, "vision": 8}
UNALIGNED_STEPS = {"text": 6, "audio": 12, "vision": 10}
B = 4


def tiny_model_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


def tiny_run_config(**overrides) -> Config:
    """A training Config with the tiny model, 2 epochs, CPU, no progress bars."""
    values = {
        **TINY,
        "epochs": 2,
        "batch_size": 8,
        "eval_batch_size": 8,
        "device": "cpu",
        "progress": "off",
        "seed": 7,
        **overrides,
    }
    return Config.from_dict(values)


def steps_for(aligned: bool) -> dict:
    return dict(ALIGNED_STEPS if aligned else UNALIGNED_STEPS)


def lengths_for(steps: dict, aligned: bool, batch: int = B) -> dict:
    """Variable true lengths per sample: one full-length sample, the rest shorter (left padding).

    Aligned data share one grid, so every modality of a sample has the same length (as in the
    word-aligned files); unaligned samples cover the same fraction of each modality's steps.
    """
    fracs = np.array([1.0, 0.5, 0.75, 0.3, 0.9, 0.2, 0.6, 0.4])[:batch]
    if aligned:
        T = steps["text"]
        ln = torch.as_tensor(np.clip(np.round(fracs * T), 1, T).astype(np.int64))
        return {m: ln.clone() for m in steps}
    return {m: torch.as_tensor(np.clip(np.round(fracs * T), 1, T).astype(np.int64)) for m, T in steps.items()}


def make_batch_fn(cfg, aligned: bool = True, steps: dict | None = None, lengths: dict | None = None, batch: int = B, seed: int = 0) -> dict:
    """A left-padded batch for ``cfg``'s dims: features (batch, T_m, D_m) with exact zeros in the
    padded steps, lengths {m: (batch,)} and labels of ``cfg.task``'s kind."""
    g = torch.Generator().manual_seed(seed)
    steps = steps or steps_for(aligned)
    lengths = lengths or lengths_for(steps, aligned, batch)
    out = {"lengths": {m: lengths[m].clone() for m in steps}}
    for m, T in steps.items():
        x = torch.randn(batch, T, cfg.dim(m), generator=g)
        real = torch.arange(T)[None, :] >= (T - lengths[m])[:, None]  # (batch, T)
        out[m] = x * real[..., None]
    if cfg.task == "regression":
        out["labels"] = (torch.rand(batch, generator=g) * 6 - 3).float()
    else:
        out["labels"] = torch.randint(0, 2, (batch, 4), generator=g)
    return out


@pytest.fixture
def tiny_cfg():
    return tiny_model_config


@pytest.fixture
def run_cfg():
    return tiny_run_config


@pytest.fixture
def make_batch():
    return make_batch_fn


@pytest.fixture(autouse=True)
def _fixed_seed():
    """Every test starts from the same global torch seed, so parameter inits are reproducible."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_mosi():
    """A tiny aligned MOSI-shaped synthetic dataset (13 / 8 / 8 samples, 50 steps)."""
    from mskt.data.synthetic import make_synthetic

    return make_synthetic("mosi", aligned=True, scale=0.01, seed=0)


@pytest.fixture(scope="session")
def tiny_iemocap():
    """A tiny aligned IEMOCAP-shaped synthetic dataset (emotions; 20 steps)."""
    from mskt.data.synthetic import make_synthetic

    return make_synthetic("iemocap", aligned=True, scale=0.005, seed=0)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: without a CUDA device they are skipped, with the reason, so a
    CPU machine (CI) stays green; ``scripts/gpu_check.sh`` runs them where there is one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False here); run scripts/gpu_check.sh on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ----------------------------------------------------------------------------------------------
# A throwaway PostgreSQL cluster (tests/test_tune_postgres.py)


class PostgresCluster:
    """A cluster on 127.0.0.1:``port`` whose superuser ``mskt`` logs in without a password."""

    def __init__(self, port: int):
        self.port = port
        self._made = 0

    def database(self) -> str:
        """A fresh, empty database; its SQLAlchemy URL (psycopg 3)."""
        import psycopg

        self._made += 1
        name = f"db{self._made}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user="mskt", dbname="postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://mskt@127.0.0.1:{self.port}/{name}"


def _postgres_bin():
    """The newest Debian PostgreSQL's bin folder (initdb, pg_ctl are not on PATH there), else PATH's."""
    import glob
    import shutil
    from pathlib import Path

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    initdb = found[-1] if found else shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl", path=str(Path(initdb).parent)) else None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster in a temporary folder, on a free port of 127.0.0.1, run as a
    user other than root (initdb refuses root: CI runs as root, so the ``postgres`` system user runs
    it through runuser), stopped and deleted afterwards. Skipped without PostgreSQL or its driver,
    except where MSKT_REQUIRE_POSTGRES=1 (.ci/run installs both): there a missing one fails."""
    import os
    import pwd
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    def missing(why):
        if os.environ.get("MSKT_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{why} (MSKT_REQUIRE_POSTGRES=1)")
        pytest.skip(why)

    bindir = _postgres_bin()
    if bindir is None:
        missing("PostgreSQL is not installed (apt-get install postgresql: its initdb and pg_ctl)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing('no PostgreSQL driver: pip install -e ".[postgres]"')
    folder = Path(tempfile.mkdtemp(prefix="mskt-pg-"))
    run_as = []
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:  # Debian's package creates it; a bare root container may not have it
            subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True, capture_output=True)
            user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data = folder / "data"

    def run(*cmd):
        proc = subprocess.run([*run_as, *map(str, cmd)], capture_output=True, text=True, timeout=120)
        return proc.returncode, (proc.stdout + proc.stderr).strip()

    rc, out = run(bindir / "initdb", "-D", data, "-U", "mskt", "--auth=trust", "-E", "UTF8", "--no-sync")
    assert rc == 0, f"initdb failed: {out[-2000:]}"
    # A port picked free can be taken before the server binds it: try another.
    for _ in range(3):
        port = _free_port()
        options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={folder} -c fsync=off -c max_connections=200"
        rc, out = run(bindir / "pg_ctl", "-D", data, "-l", folder / "server.log", "-w", "-t", "60", "-o", options, "start")
        if rc == 0:
            break
    assert rc == 0, f"pg_ctl start failed: {out[-1000:]}\n{(folder / 'server.log').read_text()[-2000:] if (folder / 'server.log').exists() else ''}"
    try:
        yield PostgresCluster(port)
    finally:
        run(bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)
