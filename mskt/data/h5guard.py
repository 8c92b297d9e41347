"""A hostile HDF5 file must not hang the process that reads it.

libhdf5 loops forever on some damaged structures (a global heap collection whose object walk lands
on a zero-size free-space object: HDFGroup/hdf5#1707, h5py#2088), inside C code that no Python
signal or timeout can interrupt. So before a reader opens an ``.h5`` store or a ``.csd`` file, a
forked child walks everything in it that libhdf5 parses on the way to the data: every group and
link, every attribute's value, every variable-length or string dataset (their values live in global
heaps) and the chunk index of every chunked dataset. Numeric data is not read (the readers check
it, and chunks carry checksums). If the child does not finish within :func:`timeout_s`, it is
killed and the read is refused with a one-line ``DataError`` naming the file; if libhdf5 crashes
it, likewise. Errors the walk meets are not reported here: the reader, run next in this process,
names them with their key.

The guard costs about 40 ms per file (measured with torch loaded, on a busy 2-core machine: the
fork and exit 10-16 ms, the walk the rest), against 1.2 s for an eager read of the full-size
synthetic MOSI store (59 MB), so every read is guarded. Where ``os.fork`` does not exist (Windows),
files are read unguarded.
"""

from __future__ import annotations

import os
import select
import signal
import warnings
from pathlib import Path

from mskt.errors import ConfigError, DataError

TIMEOUT_ENV = "MSKT_HDF5_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 30.0  # the walk of a full MOSEI store's metadata takes well under a second


def timeout_s() -> float:
    """``$MSKT_HDF5_TIMEOUT_S`` (seconds, > 0), else 30."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"environment variable {TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0")
    return value


def walk(path) -> None:
    """Touch every part of the file libhdf5 parses on the way to its data; ignore what fails."""
    import h5py

    def touch(_name, obj):
        try:
            for key in list(obj.attrs):
                try:
                    obj.attrs[key]
                except Exception:  # noqa: BLE001 -- the reader reports it with its key
                    pass
            if isinstance(obj, h5py.Dataset):
                dtype = obj.dtype
                if dtype.kind == "O" or h5py.check_string_dtype(dtype) is not None or h5py.check_vlen_dtype(dtype) is not None:
                    obj[()]  # variable-length values live in global heaps
                elif obj.chunks is not None:
                    obj.id.get_num_chunks()  # walks the chunk index (a B-tree)
        except Exception:  # noqa: BLE001
            pass

    try:
        with h5py.File(path, "r") as f:
            touch("/", f)
            f.visititems(touch)
    except Exception:  # noqa: BLE001 -- not HDF5, truncated, a broken link: the reader says which
        pass


def check_hdf5(path, *, timeout: float | None = None, walker=walk) -> None:
    """Return once ``walker(path)`` has finished in a forked child; ``DataError`` if it does not
    finish within ``timeout`` seconds (default :func:`timeout_s`) or the child dies of a signal."""
    if not hasattr(os, "fork"):
        return
    timeout = timeout_s() if timeout is None else timeout
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a multi-threaded process (torch's thread pool) may
        # deadlock: a lock another thread holds stays held in the child. The child takes only
        # h5py's lock, which no other thread holds (mskt reads HDF5 from one thread), and leaves
        # by os._exit; were it ever stuck, the timeout ends it like a looping file.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: never returns, never runs the parent's cleanup (atexit, open files)
        code = 1
        try:
            os.close(read_end)
            walker(path)
            os.write(write_end, b"ok")
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], timeout)
        said = os.read(read_end, 2) if ready else b""  # b"" once the child is gone without a word
    except BaseException:  # interrupted (Ctrl-C): take the child down too
        _kill_and_reap(pid)
        raise
    finally:
        os.close(read_end)
    if not ready:
        _kill_and_reap(pid)
        raise DataError(
            f"{Path(path)}: reading its HDF5 structure did not finish within {timeout:g} s; the file is damaged in a way "
            f"the HDF5 library loops on (such as a global heap), refused (${TIMEOUT_ENV} sets the limit)"
        )
    status = _reap(pid)
    if said != b"ok" and os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        raise DataError(f"{Path(path)}: the HDF5 library crashed reading its structure ({name}); the file is damaged, refused")
    # A Python error in the walk (the walk catches libhdf5's): the reader, next, reports what it finds.


def _kill_and_reap(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)  # ours and not reaped yet, so the pid is still its own
    _reap(pid)


def _reap(pid: int) -> int:
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:  # reaped elsewhere (a SIGCHLD handler): nothing more to learn
        return 0
