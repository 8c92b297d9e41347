"""Compiled CPU kernels (``mskt/fast/csrc``), built on first use into one cache per machine.

The C++ kernels (``csrc/cpu_kernels.cpp``: attention, dropout, relu-dropout, LayerNorm, and
groups of independent transformer stacks as one autograd node) are built with
``torch.utils.cpp_extension`` the first time a process asks for them (about a minute on two
cores), into the user's cache folder: ``$MSKT_KERNEL_CACHE`` if set, else
``$XDG_CACHE_HOME/mskt/kernels`` (``~/.cache/mskt/kernels``). Each build has its own folder, named
by the CPU (:func:`build_tag`) and a digest of the C++ source, the compiler flags, torch's version
and Python's ABI, so every checkout and working folder on a machine shares one build, and two
source trees that differ never load each other's library. Later processes import the cached build
directly (a few milliseconds) when the stamp beside it says the build finished. Concurrent first
uses build once: the others wait on a lock the kernel drops if the builder dies.
Two builds, chosen by the environment variable ``MSKT_KERNEL_ARCH``:

- ``native`` (the default): ``-march=native``, the fastest here. Its floats depend on the CPU
  (vector width and reassociated sums), so its folder is named after the CPU's feature flags and a
  project folder shared by different machines keeps one build per kind of CPU.
- ``portable``: a generic target (``-march=x86-64 -mtune=generic`` on x86-64, ``-march=armv8-a`` on
  ARM), so the library runs on any CPU of the architecture and its own arithmetic is the same on
  each. torch's operations around it still pick kernels by CPU, so a whole run is equal across CPUs
  only within float tolerance either way (``tests/test_refactor_numbers.py`` measures how close).
  ``docs/speed.md`` states what it costs.

A machine without a C++ compiler or ninja gets ``None`` and one warning; the model then runs the
same function with torch's own operations, only slower.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

from mskt.console import note

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
# Reassociating sums (-fassociative-math and what it needs) lets the row loops vectorise; the
# kernels' inputs are finite by construction (masked keys get -1e30, never -inf).
MATH_FLAGS = ["-O3", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-ffinite-math-only", "-fopenmp"]
ARCHES = ("native", "portable")


def kernel_arch() -> str:
    """``$MSKT_KERNEL_ARCH``: ``native`` (default) or ``portable``; anything else is an error."""
    arch = os.environ.get("MSKT_KERNEL_ARCH", "native").strip() or "native"
    if arch not in ARCHES:
        from mskt.errors import ConfigError

        raise ConfigError(f"environment variable MSKT_KERNEL_ARCH={arch!r}: expected one of {', '.join(ARCHES)}")
    return arch


def cflags(arch: str | None = None) -> list[str]:
    """The compiler flags of the ``arch`` build (default: :func:`kernel_arch`)."""
    arch = arch or kernel_arch()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if arch == "native":
        # 512-bit vectors where the CPU has them: the attention rows are long enough to fill them.
        target = ["-march=native", "-mprefer-vector-width=512"] if x86 else ["-march=native"]
    else:
        target = ["-march=x86-64", "-mtune=generic"] if x86 else (["-march=armv8-a"] if platform.machine() == "aarch64" else [])
    return MATH_FLAGS[:1] + target + MATH_FLAGS[1:]


def build_tag(arch: str | None = None) -> str:
    """Names the build folder: the CPU's feature flags for ``native`` (it runs only on its kind),
    the architecture alone for ``portable``."""
    arch = arch or kernel_arch()
    return _cpu_tag() if arch == "native" else f"portable_{platform.machine().lower()}"


def _cpu_tag() -> str:
    """A short name for this CPU's instruction set: a -march=native build runs only on its kind."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            flags += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


@functools.cache
def compiled_kernels():
    """The compiled module, or ``None`` with one logged warning when it cannot be built here.

    Differentiable (C++ autograd nodes): ``attention``, ``dropout_autograd``,
    ``relu_dropout_autograd``, ``layer_norm_autograd``, and ``stacks`` (independent transformer
    stacks, run side by side on torch's threads). The plain kernels under them: attention ``forward``
    and ``backward``, ``dropout``, ``relu_dropout`` and its backward, ``layer_norm`` and its
    backward, ``column_sums``, and ``dropout_factors`` (the factors a dropout key gives, for tests)."""
    build_dir = kernel_build_dir()
    name = build_dir.name
    library, stamp = build_dir / f"{name}.so", build_dir / "source.sha1"
    digest = _source_digest()
    if _built(library, stamp, digest):
        # Built from this very source, flags and torch: import it directly. torch's loader would
        # spend ~2 s (its own import, hashing, a ninja run) in every process, CLI runs included.
        return _import_library(name, library)
    try:
        from torch.utils.cpp_extension import load

        build_dir.mkdir(parents=True, exist_ok=True)
        with _build_lock(build_dir):
            if _built(library, stamp, digest):  # another process built it while this one waited
                return _import_library(name, library)
            # torch's own lock file is left behind by a builder that was killed, and then every later
            # load waits for it forever; holding our lock, no live mskt process is building here.
            (build_dir / "lock").unlink(missing_ok=True)
            # Expected, and nothing to do: a note, not a warning (a notebook shows it as a plain line).
            note(log, "building mskt's compiled CPU kernels (%s build) into %s (once per machine and source, about a minute)",
                 kernel_arch(), build_dir)
            module = load(name, [str(SOURCE)], extra_cflags=cflags(), extra_ldflags=["-fopenmp"], build_directory=str(build_dir),
                          verbose=os.environ.get("MSKT_VERBOSE_BUILD") == "1")
            partial = stamp.with_suffix(f".{os.getpid()}.tmp")  # written whole, then renamed: never half a stamp
            partial.write_text(digest)
            partial.replace(stamp)
    except Exception as e:  # noqa: BLE001 -- no compiler, no ninja, a failed build: torch's operations compute the same
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = " (set MSKT_KERNEL_CACHE to a writable folder)" if isinstance(e, OSError) else ""
        log.warning("mskt's compiled CPU kernels are not available (%s: %s%s); torch's operations compute the same function, slower",
                    type(e).__name__, first_line, hint)
        return None
    return module


def kernel_cache() -> Path:
    """The folder of every kernel build on this machine: ``$MSKT_KERNEL_CACHE``, else
    ``$XDG_CACHE_HOME/mskt/kernels``, else ``~/.cache/mskt/kernels``. Relative values are taken
    from the project root, like every other path mskt is given."""
    env = os.environ.get("MSKT_KERNEL_CACHE", "").strip()
    if env:
        from mskt.paths import resolve_path

        return resolve_path(env)
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"  # the XDG spec ignores a relative value
    return base / "mskt" / "kernels"


def kernel_build_dir() -> Path:
    """This build's folder (also the library's name): the CPU or target (:func:`build_tag`) and
    the first 12 hex digits of :func:`_source_digest`. It depends on nothing of the working
    folder or the checkout's path, so a second checkout of the same source imports the same build."""
    return kernel_cache() / f"mskt_kernels_{build_tag()}_{_source_digest()[:12]}"


def _built(library: Path, stamp: Path, digest: str) -> bool:
    try:
        return library.exists() and stamp.read_text() == digest
    except OSError:
        return False


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """An exclusive lock on ``build_dir`` held while one process builds; the others wait on it.
    ``flock`` is dropped by the kernel when its holder dies, so a killed build never blocks the next."""
    try:
        import fcntl
    except ImportError:  # Windows: torch's own lock file only
        yield
        return
    with open(build_dir / "build.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _source_digest() -> str:
    """What the library's bits depend on: the C++ source, the flags, torch's version (its headers
    and ABI) and Python's (the extension module's ABI)."""
    import sys

    import torch

    key = " ".join([*cflags(), torch.__version__, sys.implementation.cache_tag, platform.machine()])
    return hashlib.sha1(SOURCE.read_bytes() + key.encode()).hexdigest()


def _import_library(name: str, library: Path):
    import importlib.util

    import torch  # noqa: F401 -- the library links against the torch already loaded

    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
