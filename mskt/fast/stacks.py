"""Transformer stacks as one compiled autograd node, where that node is verified to compute what the
stack's Python code computes.

The node (``stacks`` in ``csrc/cpu_kernels.cpp``) re-implements :class:`~mskt.model.layers.Transformer`'s
layers and final norm in C++ from a fixed list of parameters; ``Transformer.embed`` still runs in
Python. A stack runs compiled only when all of this holds, checked when :func:`mskt.fast.accelerate`
is called and again whenever something it checked changes (every call compares a cheap signature):

1. **Structure.** The stack, its layers, their attention, norms and linears are exactly the stock
   classes (a subclass is an edit), no module has its own ``forward`` (a monkeypatched method), no
   forward hook is registered, the parameters are exactly the stock ones (a new parameter is an
   edit), and the settings the node reads once per stack (heads, dropout rates, LayerNorm eps) are
   the same in every layer.
2. **Source.** A digest of the source of the Python code the node mirrors (``Transformer.forward``,
   ``TransformerLayer.forward``, ``Attention.forward``, the ``Kernels`` functions, and every function
   of ``mskt.model`` they reach), comments and docstrings left out, equals :data:`MIRRORED_SOURCE`,
   the digest of the code the C++ was written from (``mskt.fast.source``). An edited source file, a class-level
   monkeypatch or a replaced helper changes it.
3. **Numbers.** On a random input, in evaluation mode, the node's output equals the Python
   forward's within 1e-4 (relative), once per stack.

Otherwise the stack's Python code runs (with the compiled kernel functions under it), and the log
says once, in one line, which stacks fell back and why. Changing the model's code on purpose, with
the C++ changed to match, means updating ``mskt.fast.source.MIRRORED_SOURCE`` (the test that checks the stock
model runs compiled prints the new digest).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from mskt.fast.build import compiled_kernels
from mskt.fast.kernels import fused_kernels_available
from mskt.fast.source import source_verified
from mskt.model.layers import Attention, Transformer, TransformerLayer, dropout_key, padding_bias

log = logging.getLogger("mskt.fast")

_NO_SAMPLES = torch.zeros(0, dtype=torch.int64)  # a stack without dropout: the node never reads them
LAYER_PARAMETERS = ("norm_x.weight", "norm_x.bias", "attn.q.weight", "attn.q.bias", "attn.kv.weight", "attn.kv.bias",
                    "attn.out.weight", "attn.out.bias", "norm_ff.weight", "norm_ff.bias", "ff1.weight", "ff1.bias",
                    "ff2.weight", "ff2.bias")
CROSS_PARAMETERS = ("norm_source.weight", "norm_source.bias")


# ----------------------------------------------------------------------------------------------
# Point 1: the structure


def _signature(stack: nn.Module) -> tuple:
    """What a stack's structure check read: classes, their forwards, per-module forwards, hooks, parameters."""
    sig = []
    for name, m in stack.named_modules():
        sig.append((name, type(m), getattr(type(m), "forward", None), m.__dict__.get("forward"),
                    len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(getattr(m, "_backward_pre_hooks", ())),
                    tuple(m._parameters)))
    return tuple(sig)


def structure_problem(stack: nn.Module) -> str:
    """Why the compiled node cannot stand in for this stack's structure ('' if it can)."""
    if type(stack) is not Transformer:
        return f"it is a {type(stack).__name__}, not a Transformer"
    if not len(stack.layers):
        return "it has no layers"
    first = stack.layers[0]
    cross = first.norm_source is not None
    expected = {"norm": nn.LayerNorm, "layers": nn.ModuleList}
    for i, layer in enumerate(stack.layers):
        p = f"layers.{i}"
        expected.update({p: TransformerLayer, f"{p}.attn": Attention, f"{p}.attn.q": nn.Linear, f"{p}.attn.kv": nn.Linear,
                         f"{p}.attn.out": nn.Linear, f"{p}.norm_x": nn.LayerNorm, f"{p}.norm_ff": nn.LayerNorm, f"{p}.ff1": nn.Linear,
                         f"{p}.ff2": nn.Linear})
        if cross:
            expected[f"{p}.norm_source"] = nn.LayerNorm
    modules = dict(stack.named_modules())
    modules.pop("")
    for name, m in modules.items():
        if name not in expected:
            return f"{name} ({type(m).__name__}) is not part of the stock stack"
        if type(m) is not expected[name]:
            return f"{name} is a {type(m).__name__}, not a {expected[name].__name__}"
    missing = sorted(set(expected) - set(modules))
    if missing:
        return f"{missing[0]} is missing"
    for name, m in stack.named_modules():
        if "forward" in m.__dict__:
            return f"{name or 'the stack'} has its own forward (a patched method)"
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None):
            return f"{name or 'the stack'} has hooks, which the compiled node would not call"
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return "global module hooks are registered"
    names = ["norm.weight", "norm.bias"] + [f"layers.{i}.{n}" for i in range(len(stack.layers))
                                            for n in LAYER_PARAMETERS + (CROSS_PARAMETERS if cross else ())]
    own = [n for n, _ in stack.named_parameters()]
    if sorted(own) != sorted(names):
        extra = sorted(set(own) - set(names))
        return f"parameter {extra[0]} is not one the compiled node reads" if extra else "parameters differ from the stock stack"
    if list(stack.buffers()):
        return "it has buffers, which the compiled node does not read"
    for i, layer in enumerate(stack.layers):
        if (layer.attn.heads, layer.attn.dropout, layer.relu_dropout, layer.res_dropout) != (first.attn.heads, first.attn.dropout, first.relu_dropout, first.res_dropout):
            return f"layer {i}'s heads or dropout rates differ from layer 0's (the node reads them once per stack)"
        if (layer.norm_source is not None) != cross:
            return f"layer {i} is {'not ' if cross else ''}cross-modal unlike layer 0"
        if layer.kernels is not stack.kernels or layer.attn.kernels is not stack.kernels:
            return f"layer {i} has kernel functions of its own"
    norms = [m for m in stack.modules() if isinstance(m, nn.LayerNorm)]
    if any(n.eps != stack.norm.eps or not n.elementwise_affine or n.bias is None or n.normalized_shape != (stack.d,) for n in norms):
        return "its LayerNorms differ in eps, affinity or width (the node reads one eps per stack)"
    d = stack.d
    if d % first.attn.heads:
        return f"width {d} is not divisible by {first.attn.heads} heads"
    return ""


# ----------------------------------------------------------------------------------------------
# The compiled node


def compiled_inputs(stack: Transformer, x, mask, source, source_mask, last_only) -> tuple[list, list, list, list]:
    """The node's tensors, ints, doubles and dropout keys for one stack: the embedded inputs
    (``stack.embed``, in Python), the keys' padding bias, the batch rows' sample indices, every
    layer's parameters, the final norm's, the settings (dropout rates 0 in evaluation), and each
    layer's four dropout call keys, made in the order the Python forward makes them."""
    x = stack.embed(x, mask)
    source = stack.embed(source, source_mask, "embed_source") if source is not None else x.new_empty(0)
    key_bias = padding_bias(mask if source_mask is None else source_mask, x.dtype)  # (B, S)
    first = stack.layers[0]
    rates = (first.attn.dropout, first.relu_dropout, first.res_dropout) if stack.training else (0.0, 0.0, 0.0)
    keys, samples = [], _NO_SAMPLES
    for layer in stack.layers:
        for module, tag, p in ((layer.attn, "weights", rates[0]), (layer, "attention_residual", rates[2]),
                               (layer, "relu", rates[1]), (layer, "feed_forward_residual", rates[2])):
            key = dropout_key(module, tag, p, x)
            keys.append(key.call if key is not None else 0)
            samples = key.samples if key is not None else samples
    tensors = [x, source, key_bias, samples]
    for layer in stack.layers:
        norm_s = layer.norm_source
        no_source = (x.new_empty(0), x.new_empty(0))
        tensors += [layer.norm_x.weight, layer.norm_x.bias, *((norm_s.weight, norm_s.bias) if norm_s is not None else no_source),
                    layer.attn.q.weight, layer.attn.q.bias, layer.attn.kv.weight, layer.attn.kv.bias, layer.attn.out.weight,
                    layer.attn.out.bias, layer.norm_ff.weight, layer.norm_ff.bias, layer.ff1.weight, layer.ff1.bias,
                    layer.ff2.weight, layer.ff2.bias]
    tensors += [stack.norm.weight, stack.norm.bias]
    return tensors, [len(stack.layers), first.attn.heads, int(last_only)], [stack.norm.eps, *rates], keys


def compiled_stacks(calls, last_only: bool) -> list:
    """Run ``calls`` (stack, x, mask, source, source_mask) as one node: one Python-to-C++ crossing per
    group. When the stacks' estimated costs balance across torch's threads they run side by side,
    each on one thread; otherwise one at a time on all of them."""
    tensors, ints, doubles, keys = [], [], [], []
    for stack, x, mask, source, source_mask in calls:
        stack_tensors, stack_ints, stack_doubles, stack_keys = compiled_inputs(stack, x, mask, source, source_mask, last_only)
        tensors += stack_tensors
        ints += stack_ints
        doubles += stack_doubles
        keys += stack_keys
    return [(y, None) for y in compiled_kernels().stacks(tensors, ints, doubles, keys)]


class StackAccelerator:
    """Held by each :class:`~mskt.model.layers.Transformer` of an accelerated model (``stack.accelerator``).

    It knows the stack's name in the model, and what it verified: the stack runs compiled only while
    the signature it verified holds (``takes``)."""

    def __init__(self, name: str):
        self.name = name
        self.signature = None  # the structure signature that passed verification
        self.failed = None  # (signature, reason) of the last failed verification: logged once
        self.checking = False  # True while the numeric check runs the Python forward

    def verify(self, stack: nn.Module, quiet: bool = False) -> str:
        """Verify ``stack`` (points 1-3); '' if the node may stand in for it, else why not (logged once
        unless ``quiet``: :func:`accelerate` logs its findings grouped)."""
        signature = _signature(stack)
        ok, why = source_verified()
        if ok:
            why = structure_problem(stack) or _numeric_problem(stack, self)
        self.signature = signature if not why else None
        if why and (self.failed is None or self.failed[0] != signature or self.failed[1] != why):
            self.failed = (signature, why)
            if not quiet:
                log.warning("stack %s runs its Python code: %s", self.name, why)
        return why

    def takes(self, stack: nn.Module, x: torch.Tensor) -> bool:
        """Whether the compiled node runs this call of ``stack``."""
        if self.checking or not fused_kernels_available(x):
            return False
        if not source_verified()[0]:
            if self.signature is not None:
                self.signature = None
                self.verify(stack)  # logs why, once
            return False
        signature = _signature(stack)
        if signature != self.signature and (self.failed is None or self.failed[0] != signature):
            self.verify(stack)
        if signature != self.signature:
            return False
        mode = stack.training
        return all(m.training == mode for m in stack.modules())  # the node reads one mode per stack

    def run_stacks(self, calls, last_only: bool) -> list:
        """``run_stacks`` of an accelerated model: the calls whose stacks the node verified run as one
        compiled node; the others call their own ``forward``. Outputs in the order of ``calls``."""
        fast = [i for i, (stack, x, *_) in enumerate(calls)
                if getattr(stack, "accelerator", None) is not None and stack.accelerator.takes(stack, x)]
        out = [None] * len(calls)
        if fast:
            for i, result in zip(fast, compiled_stacks([calls[i] for i in fast], last_only)):
                out[i] = result
        for i, (stack, x, mask, source, source_mask) in enumerate(calls):
            if out[i] is None:
                out[i] = stack(x, mask, source, source_mask, False, last_only)
        return out


def _numeric_problem(stack: Transformer, accelerator: StackAccelerator, tolerance: float = 1e-4) -> str:
    """Point 3: the node against the Python forward on a random input, dropout off. Draws from a
    generator of its own and leaves torch's global one as it was, so training runs repeat."""
    if compiled_kernels() is None:
        return "the compiled kernels are not available"
    cross = stack.layers[0].norm_source is not None
    g = torch.Generator().manual_seed(0)
    B, T, S, d = 2, 5, 7, stack.d
    x = torch.randn(B, T, d, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :2] = False  # left padding
    source = torch.randn(B, S, d, generator=g) if cross else None
    source_mask = torch.ones(B, S, dtype=torch.bool) if cross else None
    if cross:
        source_mask[1, :3] = False
    modes = [(m, m.training) for m in stack.modules()]
    param = next(stack.parameters())
    try:
        stack.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            x, source = x.to(param), source.to(param) if cross else None
            accelerator.checking = True
            try:
                plain, _ = stack(x, mask, source, source_mask)
            finally:
                accelerator.checking = False
            (fast, _), = compiled_stacks([(stack, x, mask, source, source_mask)], last_only=False)
    except Exception as e:  # noqa: BLE001 -- any failure to compare means: not verified
        return f"the numeric check failed to run ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    finally:
        for m, mode in modes:
            m.training = mode
    error = float((fast - plain).abs().max())
    scale = float(plain.abs().max()) + 1.0
    if not error <= tolerance * scale:
        return f"the compiled node differs from its Python forward by {error:.3g} on a random input"
    return ""
