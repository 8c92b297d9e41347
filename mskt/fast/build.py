"""Compiled CPU kernels (``mskt/fast/csrc``), built on first use and cached under ``build/``.

The C++ kernels (``csrc/cpu_kernels.cpp``: attention, dropout, relu-dropout, LayerNorm, and
groups of independent transformer stacks as one autograd node) are built with
``torch.utils.cpp_extension`` the first time a process asks for them (about a minute on two
cores), into ``<project>/build/torch_extensions/``; later processes import the cached build
directly (a few milliseconds) when a stamp beside it says it was built from the same source,
flags and torch.
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
    from mskt.paths import project_root

    name = f"mskt_kernels_{build_tag()}"
    build_dir = project_root() / "build" / "torch_extensions" / name
    library, stamp = build_dir / f"{name}.so", build_dir / "source.sha1"
    digest = _source_digest()
    if library.exists() and stamp.exists() and stamp.read_text() == digest:
        # Built from this very source, flags and torch: import it directly. torch's loader would
        # spend ~2 s (its own import, hashing, a ninja run) in every process, CLI runs included.
        return _import_library(name, library)
    try:
        from torch.utils.cpp_extension import load

        build_dir.mkdir(parents=True, exist_ok=True)
        if not library.exists():
            # Expected, and nothing to do: a note, not a warning (a notebook shows it as a plain line).
            note(log, "building mskt's compiled CPU kernels (%s build) into %s (once per machine, about a minute)", kernel_arch(), build_dir)
        module = load(name, [str(SOURCE)], extra_cflags=cflags(), extra_ldflags=["-fopenmp"], build_directory=str(build_dir),
                      verbose=os.environ.get("MSKT_VERBOSE_BUILD") == "1")
    except Exception as e:  # noqa: BLE001 -- no compiler, no ninja, a failed build: torch's operations compute the same
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        log.warning("mskt's compiled CPU kernels are not available (%s: %s); torch's operations compute the same function, slower",
                    type(e).__name__, first_line)
        return None
    partial = stamp.with_suffix(f".{os.getpid()}.tmp")  # written whole, then renamed: never half a stamp
    partial.write_text(digest)
    partial.replace(stamp)
    return module


def _source_digest() -> str:
    import torch

    return hashlib.sha1(SOURCE.read_bytes() + " ".join(cflags()).encode() + torch.__version__.encode()).hexdigest()


def _import_library(name: str, library: Path):
    import importlib.util

    import torch  # noqa: F401 -- the library links against the torch already loaded

    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
