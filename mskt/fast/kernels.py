"""The compiled kernel functions, as a table the layers call (``mskt.model.layers.Kernels``).

Each compiled function computes what the Python one it replaces computes: attention with key
padding and dropout, dropout, relu then dropout. Their dropout masks are the model's own
(``mskt.model.layers.dropout_mask``): the same hash of the same key, bit for bit.
``tests/test_kernels.py`` checks each against the Python function (values, gradients, masks).
Where an input is not for them (not float32 on CPU, a torch.compile trace, the
library did not build), they call the Python function.
"""

from __future__ import annotations

import torch

from mskt.fast.build import compiled_kernels
from mskt.fast.source import source_verified
from mskt.model.layers import Kernels, padding_bias


def fused_kernels_available(x: torch.Tensor) -> bool:
    """Whether the compiled kernels can take ``x``: float32 on CPU, they build here, and no
    torch.compile graph is being traced (it cannot trace them; it gets torch's operations)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.compiler.is_compiling():
        return False
    return compiled_kernels() is not None


def _stock_kernels() -> bool:
    """Whether the Python kernel functions are still the ones the compiled ones were checked
    against (a later edit or patch of ``Kernels`` or its helpers shows here)."""
    return source_verified()[0]


class CompiledKernels(Kernels):
    """:class:`~mskt.model.layers.Kernels` with compiled CPU functions where they can run, and the
    Python functions wherever those were edited since (``_stock_kernels``)."""

    name = "compiled"

    def dropout(self, x, p, key):
        if key is not None and p > 0 and fused_kernels_available(x) and _stock_kernels():
            return compiled_kernels().dropout_autograd(x, p, key.call, key.samples)
        return Kernels.dropout(self, x, p, key)

    def relu_dropout(self, x, p, key):
        # One pass each way: the backward reads only the output (where it is not 0, x was positive and kept).
        if key is not None and p > 0 and fused_kernels_available(x) and _stock_kernels():
            return compiled_kernels().relu_dropout_autograd(x, p, key.call, key.samples)
        return Kernels.relu_dropout(self, x, p, key)

    def attention(self, q, kv, source_mask, heads, p, key):
        # Each query row's scores, softmax, dropout and weighted sum in a row buffer; the backward
        # recomputes the weights from the saved log-sum-exp and the mask from its key, so nothing of
        # size (T, S) is stored. It reads q (B, T, d) and kv (B, S, 2d) as the projections lay them out.
        if fused_kernels_available(q) and _stock_kernels():
            d = q.shape[2]
            call, samples, p = (key.call, key.samples, p) if key is not None and p > 0 else (0, _NO_SAMPLES, 0.0)
            return compiled_kernels().attention(q, kv, padding_bias(source_mask, q.dtype), heads, (d // heads) ** -0.5, p, call, samples)  # (B, T, d)
        return Kernels.attention(self, q, kv, source_mask, heads, p, key)


_NO_SAMPLES = torch.zeros(0, dtype=torch.int64)  # the samples of a call without dropout: never read
COMPILED_KERNELS = CompiledKernels()
