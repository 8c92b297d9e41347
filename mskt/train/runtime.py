"""Runtime settings of training that change speed, never results: glibc's malloc, bf16 autocast,
torch.compile with an eager fallback (``training_step`` sets them)."""

from __future__ import annotations

import ctypes
import functools
import logging
import sys

import torch

from mskt.errors import ConfigError

log = logging.getLogger(__name__)


def keep_freed_memory(device: torch.device) -> bool:
    """On CPU under glibc, keep large freed blocks in the process instead of returning them to the
    operating system; True if the setting was made (or already was).

    glibc serves every block above a (dynamic, at most 32 MB) threshold with a fresh ``mmap`` and
    unmaps it on free, so each of the (B, heads, T, S) attention tensors of unaligned data, ~120 MB
    a layer, is faulted in page by page on every step: measured, 1.3 M page faults and 4 of 11
    seconds of kernel time per training step of unaligned MOSI at MulT's config. Serving all
    blocks from the heap, which is never trimmed, makes those tensors reuse warm memory. The cost:
    the process keeps its peak memory until it exits. It changes no result. A no-op elsewhere
    (CUDA has its own caching allocator; other C libraries are left alone).
    """
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    return _keep_glibc_freed_memory()



@functools.cache
def _keep_glibc_freed_memory() -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): leave its allocator as it is
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
    # mallopt returns 1 on success. -1 as the trim threshold becomes SIZE_MAX: never trim.
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))



def autocast(cfg: Config, device: torch.device):
    """bf16 autocast on CUDA when ``cfg.precision == "bf16"``; otherwise a no-op context."""
    import contextlib

    if cfg.precision == "bf16":
        if device.type != "cuda":
            raise ConfigError(f"precision='bf16' is for CUDA devices; this run is on {device} (use fp32)")
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()



class CompiledOrEager:
    """``torch.compile(module)``, falling back to the eager module (with one warning) if compiling
    fails, e.g. on a machine without a C++ compiler: a run never dies of an optimisation."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.compiled = torch.compile(module)
        self.failed = False

    def __call__(self, *args, **kwargs):
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 -- any compiler failure: the eager module computes the same
                self.failed = True
                log.warning("torch.compile failed (%s: %s); training continues in eager mode", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return self.module(*args, **kwargs)
