"""The compiled CPU kernels, applied to a built model from outside; the model's Python code stays the one truth.

- :func:`accelerate`: compiled CPU kernels in place of the layers' kernel functions, and transformer
  stacks as one compiled node, each only where verified to compute the same function
  (``mskt.fast.stacks`` says how); elsewhere the Python code runs and the log says so, once.
- ``mskt.fast.build``: builds and loads the C++ library (``csrc/cpu_kernels.cpp``).

What training sets up for speed besides (``FlatAdam``, glibc's malloc setting, bf16 autocast,
torch.compile with an eager fallback) lives where training uses it: ``mskt.train.optim`` and
``mskt.train.runtime``.
"""

from __future__ import annotations

import logging

import torch.nn as nn

from mskt.fast.build import compiled_kernels
from mskt.fast.kernels import COMPILED_KERNELS, CompiledKernels, fused_kernels_available
from mskt.fast.source import source_verified
from mskt.fast.stacks import StackAccelerator
from mskt.model.layers import TORCH_KERNELS, Transformer

log = logging.getLogger("mskt.fast")

__all__ = ["COMPILED_KERNELS", "CompiledKernels", "accelerate", "accelerated_stacks", "compiled_kernels", "fused_kernels_available"]


def accelerate(model: nn.Module) -> nn.Module:
    """Hand ``model`` (in place; returned for chaining) the compiled CPU kernels where they compute
    the same function as its Python code.

    - Modules whose ``kernels`` is the stock table get :data:`COMPILED_KERNELS` (attention, dropout,
      relu-dropout), provided the stock functions are the ones the kernels were checked against.
    - Every :class:`~mskt.model.layers.Transformer` gets a ``StackAccelerator``: it runs compiled
      where verified (structure, source digest, a numeric check), and calls its Python ``forward``
      otherwise. The stacks that run their Python code are logged now, one line per reason, and any
      stack whose code changes later is re-verified and logged when it next runs.

    A model on another device than the CPU, or a machine where the kernels do not build, keeps its
    Python code throughout (the kernel functions fall back per call too). A model with neither
    stacks nor kernel tables (mctn) is left as it is, with one line at INFO, and builds nothing.
    """
    if not any(isinstance(m, Transformer) or getattr(m, "kernels", None) is TORCH_KERNELS for m in model.modules()):
        # A model without the stock layers (mctn's recurrent seq2seq): nothing here mirrors it.
        log.info("%s has no transformer stacks or kernel tables: nothing to accelerate, its Python code runs", type(model).__name__)
        return model
    if compiled_kernels() is None:
        return model  # compiled_kernels() has said why, once
    if any(p.device.type != "cpu" for p in model.parameters()):
        log.info("the model is not on the CPU; the compiled CPU kernels are not used")
        return model
    ok, why = source_verified()
    if ok:
        for m in model.modules():
            if getattr(m, "kernels", None) is TORCH_KERNELS:
                m.kernels = COMPILED_KERNELS
    fell_back = {}
    for name, m in model.named_modules():
        if isinstance(m, Transformer):
            m.accelerator = StackAccelerator(name)
            reason = m.accelerator.verify(m, quiet=True)
            if reason:
                fell_back.setdefault(reason, []).append(name)
    for reason, names in fell_back.items():
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        what = f"{len(names)} stacks run their" if len(names) > 1 else "1 stack runs its"
        log.warning("%s Python code (%s): %s", what, shown, reason)  # the log format names the logger, mskt.fast
    return model


def accelerated_stacks(model: nn.Module) -> dict:
    """{stack name: True if the compiled node stands in for it now, else the reason it does not}."""
    return {name: "not accelerated" if m.accelerator is None else (m.accelerator.verify(m, quiet=True) or True)
            for name, m in model.named_modules() if isinstance(m, Transformer)}
