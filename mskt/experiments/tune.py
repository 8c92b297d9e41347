"""Hyperparameter search on Optuna (``mskt tune``): a seeded TPE sampler, optional pruning on each
epoch's validation loss, trials that are ordinary run folders, storage that several worker
processes (or machines) share, and a finalize step that retrains the best configuration over seeds.

Layout: ``runs/tune/<study>/`` holds ``study.db`` (the embedded SQLite storage, unless
``--storage`` names another), ``trial-<number>/`` (one run folder per trial, loadable with
``load_run``; a pruned one also holds ``pruned.json``) and, after ``--finalize``, ``finalize/``.

Honest selection: a trial's value is its best-epoch validation selection score (the validation
loss under ``select_on="valid_loss"``); nothing here reads a test metric to choose. The test
metrics that every run folder holds are only reported, by finalize, for the best and the default
configuration side by side.

Several workers: each runs the same command, on any machine that reaches the storage. A worker
holds the study's lock while it counts the study's trials and asks for the next one, so exactly N
trials end complete or pruned, each with its own sampler seed (the study's seed and the trial's
number). The lock lives with the storage, not in the study folder (:func:`study_lock`): a PostgreSQL
advisory lock, or a lock file beside a SQLite database or a journal file. The study records its
base config, space, pruner and heartbeat when it is created, and a worker that brings other ones is
refused before it starts a trial. A killed worker's trial stops sending heartbeats; once its grace period has passed, the
next worker to ask marks it failed and Optuna's ``RetryFailedTrialCallback`` queues it again with
the same parameters. Optuna's RDB storages (SQLite, PostgreSQL, MySQL) keep heartbeats themselves;
for a journal file (Optuna's ``JournalStorage`` has none) this module keeps its own in a trial
system attribute, with the same grace period.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import re
import shutil
import threading
import time
import warnings
from pathlib import Path

from mskt.config import Config, coerce
from mskt.console import outer_progress
from mskt.errors import ConfigError, MsktError
from mskt.model import variant_class
from mskt.model.options import option_fields

log = logging.getLogger(__name__)

HEARTBEAT_S = 10  # seconds between a running trial's heartbeats
GRACE_FACTOR = 6  # a trial whose last heartbeat is older than GRACE_FACTOR x HEARTBEAT_S is stale
MAX_RETRY = 2  # times a trial whose worker died is queued again with the same parameters
_JOURNAL_BEAT = "mskt:heartbeat"  # the trial system attribute of the journal-file heartbeat


class SpaceError(ConfigError):
    """A search-space file or entry is not allowed (one line, naming the file and the key)."""


# ----------------------------------------------------------------------------------------------
# Search spaces


@dataclasses.dataclass(frozen=True)
class Knob:
    """One searched config field: a range (``low``..``high``, ``log`` scale, integer ``step``) or
    ``choices``; ``why`` says where the range comes from."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: int | None = None
    choices: tuple | None = None
    why: str = ""

    def values(self) -> list:
        """Every value an integer or categorical knob can take; the bounds of a float range."""
        if self.choices is not None:
            return list(self.choices)
        if isinstance(self.low, int) and isinstance(self.high, int) and not self.log:
            return list(range(self.low, self.high + 1, self.step or 1))
        return [self.low, self.high]

    def contains(self, value) -> bool:
        if self.choices is not None:
            return value in self.choices
        return self.low <= value <= self.high and (
            not isinstance(self.low, int) or self.log or (value - self.low) % (self.step or 1) == 0
        )

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items() if v not in (None, False, "")}


# Where the default ranges come from. MulT (Tsai et al., 2019), appendix table of its searched and
# chosen settings: batch 16 / 32 / 128 (MOSEI / IEMOCAP / MOSI), lr 1e-3 / 2e-3 / 1e-3, d = 40,
# 4 cross-modal layers, 8 / 10 attention heads, temporal kernels 1 or 3 (text), 3 (vision), 3 or 5
# (audio), text embedding dropout 0.2-0.3, attention dropout 0.1-0.25, output dropout 0.1; its
# public code: d = 30, 5 layers, 5 heads, batch 24. This paper (Liu et al.): blocks of three layers,
# lr 1e-3 constant, lambda1 and lambda2 (Eq. 6) with no values given, L1 vs L2 consistency (Table 5).
# d_model and heads are choices whose every pair divides (d_model % heads == 0), and the untuned
# default (d 40, 4 heads, batch 24, ...) lies inside every range, so it can be trial 0.
_BACKBONE = {
    "lr": Knob(1e-4, 3e-3, log=True, why="MulT chose 1e-3 / 2e-3; the paper 1e-3"),
    "batch_size": Knob(choices=(16, 24, 32, 64, 128), why="MulT 16 / 32 / 128, its code 24"),
    "d_model": Knob(choices=(16, 24, 32, 40, 48), why="MulT's code 30, MulT's paper and ours 40"),
    "heads": Knob(choices=(1, 2, 4, 8), why="MulT 5 (code), 8 / 10 (paper)"),
    "crossmodal_layers": Knob(2, 5, why="MulT 4 (paper) / 5 (code); this paper 3"),
    "memory_layers": Knob(1, 4, why="MulT 3 or more; this paper 3"),
    "encoder_layers": Knob(0, 2, why="MulT has none; ours 1"),
    "attn_dropout": Knob(0.0, 0.3, why="MulT 0.1-0.25"),
    "relu_dropout": Knob(0.0, 0.3, why="MulT 0.1"),
    "res_dropout": Knob(0.0, 0.3, why="MulT 0.1"),
    "embed_dropout": Knob(0.0, 0.4, why="MulT 0.2-0.3 (text embedding)"),
    "out_dropout": Knob(0.0, 0.3, why="MulT 0.0 (code) / 0.1 (paper)"),
}
_KERNELS = {
    "text": Knob(choices=(1, 3), why="MulT 1 or 3"),
    "vision": Knob(choices=(1, 3, 5), why="MulT 3; its code 1"),
    "audio": Knob(choices=(1, 3, 5), why="MulT 3 or 5; its code 1"),
}
_ATTN_DROPOUT = {"vision": "attn_dropout_vision", "audio": "attn_dropout_audio"}  # text's is attn_dropout


def default_space(cfg: Config) -> dict:
    """The default search space for ``cfg``'s variant, ``{field: Knob}``, derived from what the
    variant class declares (never its name): the backbone's fields; a temporal kernel per modality it
    reads (``inputs``); an attention dropout per modality it fuses; when it reconstructs something,
    the transfer depth; and the options it searches (``searched_options``: each option's ``search``
    in its Options, mskt.model.options), numeric ranges before choices."""
    cls = variant_class(cfg.variant)
    space = dict(_BACKBONE)
    for m in cls.inputs:
        space[f"{m}_kernel"] = _KERNELS[m]
    for m in cls.fuses:
        if m in _ATTN_DROPOUT:
            space[_ATTN_DROPOUT[m]] = Knob(0.0, 0.3, why="MulT 0.0 (audio, vision)")
    if cls.reconstructs:
        space["kt_layers"] = Knob(1, 4, why="this paper: three layers per block")
    fields = option_fields(cls.Options)
    searched = [(name, fields[name].metadata["search"]) for name in cls.searched_options(cfg)]
    for name, spec in sorted(searched, key=lambda item: "choices" in item[1]):  # stable: declaration order within each kind
        spec = {k: v for k, v in spec.items()}
        why = spec.pop("why", "")
        space[name] = Knob(choices=tuple(spec["choices"]), why=why) if "choices" in spec else Knob(spec["low"], spec["high"], log=spec.get("log", False), step=spec.get("step"), why=why)
    return space


def _load_mapping(path: Path) -> dict:
    suffix = path.suffix.lower()
    try:
        text = path.read_text()
    except OSError as e:
        raise SpaceError(f"{path}: cannot read the search space ({e.strerror or e})") from None
    try:
        if suffix == ".toml":
            import tomllib

            values = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        elif suffix == ".json":
            values = json.loads(text)
        else:
            raise SpaceError(f"{path}: a search space is a .toml, .yaml, .yml or .json file, found {suffix or 'no suffix'!r}")
    except SpaceError:
        raise
    except Exception as e:  # each parser has its own error type; the message is one line here
        raise SpaceError(f"{path}: not valid {suffix[1:].upper()} ({' '.join(str(e).split())})") from None
    if not isinstance(values, dict):
        raise SpaceError(f"{path}: the search space must be a mapping of config fields, found {type(values).__name__}")
    return values


def _parse_knob(where: str, key: str, spec, kind: str):
    """A Knob from ``spec`` (a table with low/high[/log/step] or choices), or a fixed value."""
    if not isinstance(spec, dict):
        if isinstance(spec, list):
            raise SpaceError(f"{where}: {key}: a list is ambiguous; write {{choices = [...]}} or {{low = .., high = ..}}")
        try:
            return coerce(key, spec, kind)
        except ConfigError as e:
            raise SpaceError(f"{where}: {key}: {e}") from None
    allowed = {"low", "high", "log", "step", "choices"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise SpaceError(f"{where}: {key}: unknown entr{'ies' if len(unknown) > 1 else 'y'} {unknown}; use low and high (with log or step) or choices")
    if "choices" in spec:
        if set(spec) != {"choices"}:
            raise SpaceError(f"{where}: {key}: choices cannot be combined with {sorted(set(spec) - {'choices'})}")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}: {key}: choices must be a non-empty list, found {choices!r}")
        try:
            values = tuple(coerce(key, c, kind) for c in choices)
        except ConfigError as e:
            raise SpaceError(f"{where}: {key}: {e}") from None
        if len(set(values)) != len(values):
            raise SpaceError(f"{where}: {key}: choices repeat a value: {list(values)}")
        return Knob(choices=values)
    if kind not in ("int", "float"):
        raise SpaceError(f"{where}: {key} is a {kind} field: give choices = [...], not a range")
    if "low" not in spec or "high" not in spec:
        raise SpaceError(f"{where}: {key}: a range needs both low and high")
    try:
        low, high = coerce(key, spec["low"], kind), coerce(key, spec["high"], kind)
        log_scale = coerce(f"{key}.log", spec.get("log", False), "bool")
        step = coerce(f"{key}.step", spec["step"], "int") if "step" in spec else None
    except ConfigError as e:
        raise SpaceError(f"{where}: {key}: {e}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise SpaceError(f"{where}: {key}: low must be below high, found low={low!r}, high={high!r}")
    if log_scale and low <= 0:
        raise SpaceError(f"{where}: {key}: a log range needs low > 0, found {low!r}")
    if step is not None and (kind != "int" or step < 1 or log_scale):
        raise SpaceError(f"{where}: {key}: step is for integer ranges without log, at least 1, found {spec['step']!r}")
    return Knob(low, high, log=log_scale, step=step)


def load_space(path, cfg: Config, exclude=()) -> tuple[dict, dict]:
    """The default space for ``cfg`` (less the fields in ``exclude``: those set on the command
    line) with the file at ``path`` (TOML, YAML or JSON) laid over it: ``(space, fixed)``. Each key
    is a config field: a table with ``low``/``high`` (and ``log`` or an integer ``step``) or
    ``choices`` replaces that knob, a plain value fixes the field (no search)."""
    path = Path(path)
    values = _load_mapping(path)
    types = cfg.types()  # the fields and the variant's options
    space, fixed = {k: v for k, v in default_space(cfg).items() if k not in exclude}, {}
    for key, spec in values.items():
        if key not in types:
            close = [f for f in types if f.startswith(str(key)[:4])]
            raise SpaceError(f"{path}: {key}: not a config field or an option of variant {cfg.variant!r}"
                             + (f" (did you mean {', '.join(close)}?)" if close else "; see mskt.config.Config"))
        parsed = _parse_knob(str(path), key, spec, types[key])
        if isinstance(parsed, Knob):
            space[key] = parsed
            fixed.pop(key, None)
        else:
            fixed[key] = parsed
            space.pop(key, None)
    check_space(space, cfg.replace(**fixed) if fixed else cfg, where=str(path))
    return space, fixed


def check_space(space: dict, base: Config, where: str = "search space") -> None:
    """Every value a knob can take must make a valid Config on ``base`` (ranges, odd kernels,
    choices), and every pair of d_model and heads must divide; else a one-line SpaceError naming
    the key."""
    for key, knob in space.items():
        for value in knob.values():
            try:
                # d_model and heads one at a time, with a partner they divide: the pairs are checked below.
                partner = {"d_model": {"heads": 1}, "heads": {"d_model": value}}.get(key, {}) if isinstance(value, int) and value > 0 else {}
                base.replace(**{key: value, **partner})
            except ConfigError as e:
                raise SpaceError(f"{where}: {key}: {value!r} is not allowed ({e})") from None
    widths = space["d_model"].values() if "d_model" in space else [base.d_model]
    heads = space["heads"].values() if "heads" in space else [base.heads]
    if "d_model" in space and space["d_model"].choices is None and "heads" in space and max(heads) > 1:
        raise SpaceError(f"{where}: d_model: give choices (each divisible by every heads choice), not a range, when heads is searched")
    for d in widths:
        for h in heads:
            if d % h:
                key = "heads" if "heads" in space else "d_model"
                raise SpaceError(f"{where}: {key}: heads={h} does not divide d_model={d}; every d_model must be divisible by every heads value")


def suggest(trial, space: dict) -> dict:
    """One trial's config overrides, sampled from ``space`` in a fixed key order."""
    params = {}
    for key in sorted(space):
        knob = space[key]
        if knob.choices is not None:
            params[key] = trial.suggest_categorical(key, list(knob.choices))
        elif isinstance(knob.low, int):
            params[key] = trial.suggest_int(key, knob.low, knob.high, step=knob.step or 1, log=knob.log)
        else:
            params[key] = trial.suggest_float(key, float(knob.low), float(knob.high), log=knob.log)
    return params


def describe_space(space: dict, fixed: dict | None = None) -> str:
    """A Markdown table of the space: field, range or choices, and where it comes from."""
    lines = ["| field | searched over | source |", "|---|---|---|"]
    for key in sorted(space):
        k = space[key]
        rng = ", ".join(map(str, k.choices)) if k.choices is not None else f"[{k.low}, {k.high}]" + (" log" if k.log else "") + (f" step {k.step}" if k.step else "")
        lines.append(f"| {key} | {rng} | {k.why} |")
    for key, value in sorted((fixed or {}).items()):
        lines.append(f"| {key} | fixed: {value!r} | the space file |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Studies and storage


def default_study_name(cfg: Config) -> str:
    """``<data>-<variant>`` with anything but letters, digits, ``.`` and ``-`` replaced: synthetic-mosi-kt."""
    data = cfg.data.removeprefix("synthetic:")
    stem = f"synthetic-{data}" if cfg.data.startswith("synthetic:") else Path(data).stem
    return re.sub(r"[^A-Za-z0-9.-]+", "-", f"{stem}-{cfg.variant}").strip("-")


def study_folder(study: str, root=None) -> Path:
    """``<root>/<study>/`` (root defaults to the project's runs/tune)."""
    from mskt.paths import runs_dir

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", study):
        raise MsktError(f"--study {study!r}: a study name is letters, digits, '.', '_' and '-' (it names a folder)")
    return (Path(root) if root is not None else runs_dir() / "tune") / study


def storage_url(folder: Path, storage: str | None = None) -> str:
    """The storage ``mskt tune`` uses: ``storage``, or SQLite in the study folder."""
    return storage or f"sqlite:///{(folder / 'study.db').resolve()}"


def redacted(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``: what the log and errors may show."""
    return re.sub(r"(://[^:/@\s]+):[^@/\s]*@", r"\1:***@", url)


# The module each SQLAlchemy URL scheme imports, and how to install it. psycopg (3) is what a plain
# postgresql:// means from SQLAlchemy 2.1 on; pyproject's `postgres` extra brings it.
_POSTGRES_EXTRA = 'pip install -e ".[postgres]" (or pip install "psycopg[binary]")'
_DRIVER_HINTS = {
    "psycopg": f"install the postgres extra: {_POSTGRES_EXTRA}",
    "psycopg2": f"install it (pip install psycopg2-binary), or use postgresql:// with the postgres extra: {_POSTGRES_EXTRA}",
}


def _driver_error(url: str, e: ImportError) -> MsktError:
    module = getattr(e, "name", None) or "?"
    hint = _DRIVER_HINTS.get(module, f"install the Python module {module!r}")
    return MsktError(f"--storage {redacted(url)}: its database driver is not installed (No module named {module!r}); {hint}")


def _missing_module(e: BaseException) -> ImportError | None:
    """The ModuleNotFoundError under ``e`` (Optuna wraps SQLAlchemy's in an ImportError of its own)."""
    while e is not None:
        if isinstance(e, ModuleNotFoundError) and e.name:
            return e
        e = e.__cause__ or e.__context__
    return None


def _advisory_key(name: str) -> int:
    """A signed 64-bit key for PostgreSQL's advisory locks, from a name."""
    import hashlib

    return int.from_bytes(hashlib.sha1(f"mskt:{name}".encode()).digest()[:8], "big", signed=True)


class _PostgresLock:
    """A PostgreSQL session-level advisory lock on a connection of its own: held by one worker of any
    machine at a time, and released by the server when that worker's connection ends (a killed
    worker never leaves it held)."""

    def __init__(self, url: str, name: str):
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        # NullPool: closing the connection really closes it, which releases every lock it held.
        try:
            self.engine = sqlalchemy.create_engine(url, poolclass=NullPool)  # imports the driver
        except ModuleNotFoundError as e:
            raise _driver_error(url, e) from None
        except (ImportError, ValueError, sqlalchemy.exc.ArgumentError) as e:
            raise MsktError(f"--storage {redacted(url)}: not a storage URL Optuna can open ({' '.join(str(e).split())[:200]})") from None
        self.url, self.key = url, _advisory_key(name)
        self._conn = None

    def acquire(self):
        import sqlalchemy

        try:
            self._conn = self.engine.connect()
        except sqlalchemy.exc.OperationalError as e:  # refused, unknown host or database, bad credentials
            raise MsktError(f"--storage {redacted(self.url)}: cannot connect ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
        self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
        self._conn.commit()

    def release(self):
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class _FileLock:
    """An exclusive fcntl lock on a file (beside the SQLite database or the journal, so every worker
    that can reach the storage reaches the lock); the kernel releases it when its holder dies. A
    no-op where fcntl is missing (Windows)."""

    def __init__(self, path: Path):
        self.path = path
        self._handle = None

    def acquire(self):
        try:
            import fcntl
        except ImportError:
            return
        try:
            self._handle = open(self.path, "a+")
        except OSError as e:
            raise MsktError(f"{self.path}: cannot open the study's lock file ({e.strerror or e})") from None
        fcntl.flock(self._handle, fcntl.LOCK_EX)

    def release(self):
        handle, self._handle = self._handle, None
        if handle is not None:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


def study_lock(url: str, study: str, folder: Path):
    """The lock that serialises the workers of ``study`` while one counts the trials and creates the
    next, wherever they run: it lives with the storage, not in the study folder (workers on other
    machines, or with another --root, do not share that). PostgreSQL: an advisory lock keyed by the
    study's name. SQLite and journal files: a lock file beside the database file. Any other server
    (MySQL): the study folder's lock file, with a warning that only workers sharing it are
    coordinated."""
    if url.startswith("postgresql"):
        return _PostgresLock(url, f"study:{study}")
    if "://" not in url:
        return _FileLock(Path(f"{url}.mskt-lock"))
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return _FileLock(Path(f"{url.removeprefix('sqlite:///')}.mskt-lock"))
    if url not in _WARNED:
        _WARNED.add(url)
        log.warning("--storage %s: mskt coordinates workers through PostgreSQL, SQLite or a journal file; here only the workers "
                    "that share the study folder %s are (others may overshoot --trials)", redacted(url), folder)
    return _FileLock(folder / ".gate.lock")


_WARNED = set()  # storages study_lock has warned about, once per process


@contextlib.contextmanager
def _held(lock):
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _rdb_storage(url: str, interval: int, grace: int, retry):
    """Optuna's RDBStorage on ``url``. Workers that start together on a fresh PostgreSQL database
    would race to create Optuna's tables (a duplicate key on CREATE TYPE): they take turns under an
    advisory lock. Errors name their real cause: a missing driver, a server out of reach, or
    Optuna's tables."""
    import inspect

    import optuna
    import sqlalchemy
    from optuna.storages import RDBStorage

    # Two processes on one SQLite file wait for its lock rather than fail at once.
    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    name = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in inspect.signature(RDBStorage).parameters else "failed_trial_callback"
    shown = redacted(url)
    schema = _PostgresLock(url, "schema") if url.startswith("postgresql") else None
    try:
        with _held(schema) if schema else contextlib.nullcontext(), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=interval, grace_period=grace, **{name: retry})
    except MsktError:
        raise
    except Exception as e:
        missing = _missing_module(e)
        if missing is not None:
            raise _driver_error(url, missing) from None
        detail = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        if isinstance(e, sqlalchemy.exc.OperationalError):  # refused, unknown host or database, bad credentials
            raise MsktError(f"--storage {shown}: cannot connect ({detail})") from None
        if isinstance(e, (ImportError, ValueError, sqlalchemy.exc.ArgumentError)):
            raise MsktError(f"--storage {shown}: Optuna cannot open it ({detail})") from None
        # An IntegrityError or ProgrammingError: the connection worked, creating or reading the tables did not.
        raise MsktError(f"--storage {shown}: connected, but Optuna could not set up or read its tables ({detail})") from None


def make_storage(folder: Path, storage: str | None = None, heartbeat: float = HEARTBEAT_S):
    """The study's Optuna storage: SQLite in ``folder`` by default; an RDB URL
    (``postgresql://...``, ``mysql://...``, ``sqlite:///...``); or a journal file path (a shared file
    system without a database server). RDB storages get Optuna's heartbeat and retry callback."""
    interval = max(1, int(round(heartbeat)))
    url = storage_url(folder, storage)
    if "://" in url:
        return _rdb_storage(url, interval, GRACE_FACTOR * interval, _retry_callback())
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

    path = Path(url)
    if not path.parent.is_dir():
        raise MsktError(f"--storage {url}: the journal file's folder {path.parent} does not exist")
    # The open(O_EXCL) lock works on NFS, where symlink locks may not.
    return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))


def _uses_optuna_heartbeat(storage) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(storage)


class _Gate:
    """The study's lock (:func:`study_lock`), held from counting the trials until the next trial
    exists (the objective releases it as its first act)."""

    def __init__(self, lock):
        self.lock = lock
        self._held = False

    def acquire(self):
        self.lock.acquire()
        self._held = True

    def release(self):
        if self._held:
            self._held = False
            self.lock.release()


def _sampler(seed: int, number: int, n_startup: int):
    """A TPE sampler seeded by (study seed, trial number): the same study repeats exactly with one
    worker, and workers that share a study do not draw the same random start-up points."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=(seed * 1_000_003 + number) % 2**32, n_startup_trials=n_startup, constant_liar=True)


def _pruner(kind: str | None, epochs: int):
    import optuna

    if not kind:
        return optuna.pruners.NopPruner()
    if kind == "median":
        # Compare from epoch 2 on with at least 3 finished trials: one epoch is mostly noise.
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=min(2, epochs - 1))
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    raise MsktError(f"--pruner {kind!r}: allowed median, hyperband")


# Fields that change where and how fast a run computes, not what: workers may differ in them.
EXECUTION_FIELDS = ("device", "threads", "progress", "eval_batch_size", "cpu_kernels", "lazy")


def _base_record(cfg: Config) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k not in EXECUTION_FIELDS}


def open_study(base: Config, study: str, folder: Path, storage=None, space: dict | None = None, fixed: dict | None = None,
               pruner: str | None = None, heartbeat: float = HEARTBEAT_S, create: bool = True):
    """Create or load the study ``study``. A new one records the base config, the space, the
    pruner and the heartbeat; a later worker must bring the same, so that workers never mix two
    searches, and none fails another's live trial for a heartbeat it was never going to send.
    Creating the study, recording these and queueing the default trial happen once, under the
    study's lock (:func:`study_lock`)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder.mkdir(parents=True, exist_ok=True)
    lock = study_lock(storage_url(folder, storage), study, folder)
    with _held(lock):  # two workers creating one SQLite schema at once would collide
        store = make_storage(folder, storage, heartbeat)
    record = {
        "base_config": _base_record(base),
        "space": {k: v.to_dict() for k, v in sorted((space or {}).items())},
        "fixed": fixed or {},
        "pruner": pruner or "none",
        "heartbeat": max(1, int(round(heartbeat))),
    }
    if not create:
        try:
            st = optuna.load_study(study_name=study, storage=store)
        except KeyError:
            raise MsktError(f"study {study!r} does not exist in {redacted(storage) if storage else folder / 'study.db'}; run mskt tune first") from None
        return st, store
    with _held(lock):
        st = optuna.create_study(study_name=study, storage=store, direction="minimize", load_if_exists=True,
                                 sampler=_sampler(base.seed, 0, 10), pruner=_pruner(pruner, base.epochs))
        attrs = st.user_attrs
        if "mskt" not in attrs:
            st.set_user_attr("mskt", record)
            if space and all(k in space and space[k].contains(getattr(base, k)) for k in space):
                # Trial 0 is the untuned default: the search starts from it and reports beside it.
                st.enqueue_trial({k: getattr(base, k) for k in space}, user_attrs={"default": True})
        else:
            _check_same(study, attrs["mskt"], record)
    st.pruner = _pruner(pruner, base.epochs)
    return st, store


def _check_same(study: str, stored: dict, mine: dict) -> None:
    for part in ("base_config", "space", "fixed", "pruner", "heartbeat"):
        if part not in stored:  # a study from before mskt recorded it
            continue
        a, b = stored.get(part), json.loads(json.dumps(mine[part]))
        if a != b and part == "heartbeat":
            raise MsktError(f"study {study!r} runs with --heartbeat {a} (set by the worker that started it), this command with {b}: "
                            f"a shorter one would fail the other workers' live trials; use --heartbeat {a}")
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                detail = ", ".join(f"{k}: study {a.get(k)!r}, this command {b.get(k)!r}" for k in diff[:3])
            else:
                detail = f"study {a!r}, this command {b!r}"
            raise MsktError(f"study {study!r} was started with another {part.replace('_', ' ')} ({detail}); use the same flags or another --study")


def load_study(study: str, root=None, storage: str | None = None):
    """A study that ``mskt tune`` ran (its folder under ``root``, default runs/tune; its storage)."""
    folder = study_folder(study, root)
    if storage is None and not (folder / "study.db").exists():
        raise MsktError(f"study {study!r}: no {folder / 'study.db'}; run mskt tune first (or pass its --storage)")
    return open_study(Config(), study, folder, storage, create=False)[0]


def study_config(st) -> Config:
    """The base config a study was started with."""
    return Config.from_stored(st.user_attrs["mskt"]["base_config"], where=f"study {st.study_name!r}")


def _retry_callback():
    """Optuna's callback that queues a stale trial again with its parameters (named
    RetryHeartbeatStaleTrialCallback from Optuna 4.9, RetryFailedTrialCallback before)."""
    import optuna.storages as storages

    cls = getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # marked experimental
        # The retry keeps the epochs its predecessor reported: it resumes from that run's last.pt.
        return cls(max_retry=MAX_RETRY, inherit_intermediate_values=True)


# ----------------------------------------------------------------------------------------------
# Workers


def _show_trials(bar, st, done: int, trials: int) -> None:
    """The study's bar: trials done (complete or pruned, by any worker) and the best value so far."""
    from optuna.trial import TrialState

    values = [t.value for t in st.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if values:
        bar.set_postfix_str(f"best {min(values):.4f}", refresh=False)  # the objective is minimised
    bar.n = min(done, trials)
    bar.refresh()


def _counts(st) -> dict:
    from optuna.trial import TrialState

    counts = {s: 0 for s in TrialState}
    for t in st.get_trials(deepcopy=False):
        counts[t.state] += 1
    return counts


def _fail_stale_journal_trials(st, grace: float) -> None:
    """The journal storage's stand-in for Optuna's RDB heartbeat check: a RUNNING trial whose last
    heartbeat (or start) is older than ``grace`` seconds is failed and handed to the retry callback."""
    import optuna
    from optuna.trial import TrialState

    now = time.time()
    retry = _retry_callback()
    for t in st.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = t.system_attrs.get(_JOURNAL_BEAT, t.datetime_start.timestamp() if t.datetime_start else now)
        if now - beat > grace:
            try:
                if st._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                    retry(st, copy.deepcopy(st._storage.get_trial(t._trial_id)))
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker failed it first


@contextlib.contextmanager
def _journal_heartbeat(st, trial, interval: float):
    """Record a heartbeat every ``interval`` seconds while the trial runs (journal storage only)."""
    stop = threading.Event()

    def beat():
        while True:
            st._storage.set_trial_system_attr(trial._trial_id, _JOURNAL_BEAT, time.time())
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _write_json(path: Path, record: dict) -> None:
    from mskt.paths import atomic_write_text

    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def tune(base: Config, trials: int, study: str | None = None, storage: str | None = None, space: dict | None = None,
         fixed: dict | None = None, pruner: str | None = None, timeout: float | None = None, root=None, dataset=None,
         heartbeat: float = HEARTBEAT_S, on_trial=None):
    """Run trials of ``study`` (default ``<data>-<variant>``) until it holds ``trials`` complete or
    pruned ones, or ``timeout`` seconds have passed; returns the Optuna study.

    ``space`` defaults to :func:`default_space`; ``fixed`` overrides the base config outside the
    search (a space file's plain values). ``pruner``: None, "median" or "hyperband", fed each
    epoch's validation loss. Any number of processes may run this on the same study and storage at
    once; a rerun after an interruption continues the study. ``dataset`` skips loading
    ``base.data`` (its test labels are never read to choose). ``on_trial(frozen_trial)`` is called
    after each trial this worker ran.
    """
    import optuna
    from optuna.trial import TrialState

    from mskt.data.readers import load_dataset
    from mskt.train import train
    from mskt.train.evaluation import selection_score

    if trials < 1:
        raise MsktError(f"--trials must be at least 1, found {trials}")
    if timeout is not None and timeout <= 0:
        raise MsktError(f"--timeout must be a positive number of seconds, found {timeout}")
    base = base.replace(**fixed) if fixed else base
    space = default_space(base) if space is None else space
    space = {k: v for k, v in space.items() if k not in (fixed or {})}
    check_space(space, base)
    study = study or default_study_name(base)
    folder = study_folder(study, root)
    log.info("study %s: storage %s", study, redacted(storage_url(folder, storage)))
    st, store = open_study(base, study, folder, storage, space, fixed, pruner, heartbeat)
    journal = not _uses_optuna_heartbeat(store)
    grace = GRACE_FACTOR * max(1, int(round(heartbeat)))
    if dataset is None:
        dataset = load_dataset(base.data, scale=base.data_scale, seed=base.data_seed, lazy=base.lazy)
    n_startup = min(10, max(3, trials // 3))
    gate = _Gate(study_lock(storage_url(folder, storage), study, folder))
    running = {}  # the trial this worker runs now, and what its objective raised
    deadline = time.monotonic() + timeout if timeout else None

    def objective(trial):
        gate.release()  # the trial exists: other workers may count and ask now
        running["trial"] = trial
        params = suggest(trial, space)
        cfg = base.replace(**params)
        run_dir = folder / f"trial-{trial.number:04d}"
        trial.set_user_attr("run_dir", run_dir.name)
        # A retry of a trial whose worker died continues that run from its last completed epoch.
        history = st._storage.get_trial_system_attrs(trial._trial_id).get("retry_history", [])
        before = folder / f"trial-{history[-1]:04d}" if history else None
        resume = before is not None and (before / "last.pt").exists() and not run_dir.exists()
        if resume:
            shutil.copytree(before, run_dir)
            log.info("trial %d retries trial %d from its last completed epoch", trial.number, history[-1])

        def on_epoch(epoch, row):
            try:
                trial.report(row["valid_loss"], epoch)
            except optuna.exceptions.UpdateFinishedTrialError:
                # Another worker failed this trial as stale: stop it. Raised as a prune, Optuna logs one
                # line for it rather than a traceback; the loop below says what happened.
                raise optuna.TrialPruned("another worker failed this trial as stale while it ran here") from None
            if trial.should_prune():
                _write_json(run_dir / "pruned.json", {"pruned": True, "trial": trial.number, "epoch": epoch, "of": cfg.epochs,
                                                      "valid_loss": row["valid_loss"], "pruner": pruner, "study": study})
                raise optuna.TrialPruned(f"epoch {epoch} of {cfg.epochs}: validation loss {row['valid_loss']:.4f}")

        beat = _journal_heartbeat(st, trial, max(1, int(round(heartbeat)))) if journal else contextlib.nullcontext()
        with beat:
            result = train(cfg, out_dir=run_dir, dataset=dataset, resume=resume, on_epoch=on_epoch)
        # The value is validation only: the selection score of the selected epoch.
        return selection_score(result.metrics["valid"], cfg.task, cfg.select_on)

    def watched(trial):
        try:
            return objective(trial)
        except BaseException as e:
            running["raised"] = e  # the objective's own error: never mistaken for Optuna's below
            raise

    callbacks = [lambda s, t: on_trial(t)] if on_trial else []
    # Where a person watches: a bar over the study's complete or pruned trials (any worker's).
    with outer_progress(trials, desc=f"trials of {study}", setting=base.progress, unit="trial") as bar:
        while deadline is None or time.monotonic() < deadline:
            gate.acquire()
            try:
                if journal:
                    _fail_stale_journal_trials(st, grace)
                else:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        optuna.storages.fail_stale_trials(st)
                c = _counts(st)
                done = c[TrialState.COMPLETE] + c[TrialState.PRUNED]
                _show_trials(bar, st, done, trials)
                if c[TrialState.FAIL] >= max(3, trials):  # something fails every trial: stop rather than loop
                    raise MsktError(f"study {study!r}: {c[TrialState.FAIL]} trials failed (see the log and the trial folders in {folder}); "
                                    f"fix the cause, then run the same command to continue")
                if not c[TrialState.WAITING] and done + c[TrialState.RUNNING] >= trials:
                    if done >= trials:
                        break
                    # The rest are running, here or in a worker that may have died: wait for them to end
                    # or to go stale (then they are queued again, and one of us reruns them).
                    gate.release()
                    time.sleep(min(heartbeat / 2, 2))
                    continue
                st.sampler = _sampler(base.seed, len(st.get_trials(deepcopy=False)), n_startup)
                # An expected failure (a diverging loss at a large lr) fails that trial, not the worker.
                running.clear()
                try:
                    st.optimize(watched, n_trials=1, callbacks=callbacks, catch=(MsktError,), gc_after_trial=False)
                except (optuna.exceptions.UpdateFinishedTrialError, ValueError, AssertionError) as e:
                    # Another worker failed this trial as stale while it ran (this process stalled for
                    # longer than the grace period): its retry runs the same parameters, so go on. Optuna
                    # raises ValueError ("Cannot tell a FAIL trial"), or, when the objective had returned,
                    # an AssertionError of its own ("Should not reach").
                    trial = running.get("trial")
                    if e is running.get("raised") or trial is None or st._storage.get_trial(trial._trial_id).state != TrialState.FAIL:
                        raise
                    log.warning("trial %d was failed by another worker while it ran here (no heartbeat for %d s); its retry runs it again",
                                trial.number, grace)
            finally:
                gate.release()
    return st


# ----------------------------------------------------------------------------------------------
# Results


def trials_frame(st):
    """One row per trial: number, state, value (validation), the searched parameters, run folder,
    whether it was the untuned default, and the epoch a pruned trial stopped at."""
    import pandas as pd

    rows = []
    for t in st.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": t.value,
                     "epochs_reported": len(t.intermediate_values), "default": bool(t.user_attrs.get("default")),
                     "run_dir": t.user_attrs.get("run_dir", ""), **t.params})
    return pd.DataFrame(rows)


def best_configuration(st) -> tuple[Config, object]:
    """The best complete trial's config (base + its parameters) and the trial."""
    from optuna.trial import TrialState

    complete = [t for t in st.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        raise MsktError(f"study {st.study_name!r} has no complete trial yet; run mskt tune first")
    best = min(complete, key=lambda t: (t.value, t.number))
    base = study_config(st)
    return base.replace(**{**st.user_attrs["mskt"].get("fixed", {}), **best.params}), best


def finalize_seeds(search_seed: int, seeds: int) -> list[int]:
    """The training seeds of finalize: ``seeds`` of them after the search's. Every trial of a search
    trains with the study's seed, so the winner was chosen on that seed's validation noise; a
    finalize run at that seed would be the winner itself, not a fresh draw."""
    return [search_seed + 1 + i for i in range(seeds)]


def finalize(study: str, seeds: int = 3, storage: str | None = None, root=None, jobs: int = 1, dataset=None,
             execution: dict | None = None) -> dict:
    """Retrain the study's best configuration and its untuned default (its base config) over
    ``seeds`` seeds each, disjoint from the search's seed (:func:`finalize_seeds`); writes
    ``finalize/`` (runs.csv, results.csv, results.md) in the study folder. ``execution`` sets
    fields that change where and how fast the runs compute, not what (``threads``, ``device``, ...).
    Returns {"runs", "table", "markdown", "best", "trial", "changed", "dir", "seeds"}."""
    from mskt.data.readers import load_dataset
    from mskt.experiments.grid import run_configs, run_folder, summarize, to_markdown
    from mskt.paths import atomic_write_text

    if seeds < 1:
        raise MsktError(f"--seeds must be at least 1, found {seeds}")
    not_execution = sorted(set(execution or {}) - set(EXECUTION_FIELDS))
    if not_execution:
        raise MsktError(f"--finalize retrains the study's own config; it takes only {', '.join(EXECUTION_FIELDS)}, found {not_execution}")
    folder = study_folder(study, root)
    log.info("study %s: storage %s", study, redacted(storage_url(folder, storage)))
    st = load_study(study, root, storage)
    best, trial = best_configuration(st)
    best = best.replace(**(execution or {}))
    default = study_config(st).replace(**{**st.user_attrs["mskt"].get("fixed", {}), **(execution or {})})
    if dataset is None:
        dataset = load_dataset(default.data, scale=default.data_scale, seed=default.data_seed, lazy=default.lazy)
    variant = default.variant
    changed = {k: v for k, v in best.to_dict().items() if getattr(default, k) != v}
    labels = {f"{variant} default": {}, f"{variant} tuned": changed}
    out = folder / "finalize"
    seed_list = finalize_seeds(default.seed, seeds)  # run_configs trains seeds base.seed, base.seed + 1, ...
    runs = run_configs(default.replace(seed=seed_list[0]), labels, seeds, out, jobs=jobs, dataset=dataset if jobs == 1 else None)
    assert sorted(set(runs["seed"])) == seed_list and default.seed not in seed_list
    valid = []
    for _, row in runs.iterrows():
        metrics = json.loads((run_folder(out, row["label"], row["seed"]) / "metrics.json").read_text())
        valid.append(metrics["valid"]["loss"])
    runs["valid_loss"] = valid
    atomic_write_text(out / "runs.csv", runs.to_csv(index=False))
    table = summarize(runs, dataset.meta.task)
    vl = runs.groupby("label", sort=False)["valid_loss"].agg(["mean", "std"]).fillna(0.0)
    table[("valid_loss", "mean")], table[("valid_loss", "std")] = vl["mean"], vl["std"]
    atomic_write_text(out / "results.csv", table.to_csv())
    real = dataset.meta.format != "synthetic"
    md = to_markdown(table.drop(columns="valid_loss", level=0), dataset.meta.name, dataset.meta.aligned, dataset.meta.task, with_paper=False,
                     title=f"{dataset.meta.source}: study {study}, best trial {trial.number} against the untuned default, {seeds} seed(s), {default.epochs} epochs")
    if real:
        md = _with_paper_row(md, table, dataset.meta.name, dataset.meta.aligned, variant)
    lines = [md, "", "Validation loss (the search's criterion) at the selected epoch, mean ± std over seeds: "
             + "; ".join(f"{label} {vl.loc[label, 'mean']:.4f} ± {vl.loc[label, 'std']:.4f}" for label in vl.index) + ".",
             "", f"Search seed {default.seed}; finalize seeds {', '.join(map(str, seed_list))} (disjoint from the search's).",
             "", f"Best trial {trial.number} (validation {trial.value:.4f}) changes: "
             + (", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v!r}" for k, v in sorted(changed.items())) or "nothing (the default won)") + "."]
    markdown = "\n".join(lines) + "\n"
    atomic_write_text(out / "results.md", markdown)
    return {"runs": runs, "table": table, "markdown": markdown, "best": best, "trial": trial, "changed": changed, "dir": out, "seeds": seed_list}


def _with_paper_row(md: str, table, dataset: str, aligned: bool, variant: str) -> str:
    """``md`` with the paper's row for ``variant`` after the last table row."""
    from mskt.experiments.paper import paper_row

    paper = paper_row(dataset, aligned, variant)
    if not paper:
        return md
    metrics = [m for m in table.columns.get_level_values(0).unique() if m not in ("n_seeds", "valid_loss")]
    cells = [("" if m not in paper else (f"{paper[m]:.3f}" if m in ("mae", "corr") else f"{100 * paper[m]:.1f}")) for m in metrics]
    lines = md.split("\n")
    last = max(i for i, line in enumerate(lines) if line.startswith("| "))
    lines.insert(last + 1, f"| *{variant} (paper)* | | " + " | ".join(cells) + " |")
    return "\n".join(lines)
