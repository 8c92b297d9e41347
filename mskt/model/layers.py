"""The layers, on torch's operations: masks, dropout, attention, the transformer layer and stack.

This is the one truth of what the model computes. ``mskt.fast`` may stand in for parts of it, but
only where it verified that it computes the same function (see ``docs/architecture.md``): it swaps
the kernel functions in :class:`Kernels` for compiled ones, and runs a :class:`Transformer` whose
code it mirrors as one compiled node. Edit anything here and the edited code is what trains; the
accelerator then falls back to it and says so once in the log.

Shapes: B batch, T query steps, S key steps, d width, h heads, dh = d / h.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def key_mask(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """True at real steps of left-padded sequences. (B, T) bool.

    A sample of length 0 keeps its last step, so no attention row is all-masked (softmax of
    nothing is NaN); that step holds padding zeros and carries no information.
    """
    lengths = lengths.clamp(min=1, max=steps)
    t = torch.arange(steps, device=lengths.device)
    return t[None, :] >= (steps - lengths)[:, None]


def padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S): 0 at real keys, -1e30 at padded ones. Finite, unlike -inf: a compiled kernel's exp
    of (-1e30 - max) is exactly 0, and DropoutAttention's GEMM padding products 0 * bias stay 0."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -1e30)


# ----------------------------------------------------------------------------------------------
# Dropout masks: one definition, a counter-based hash, on every path
#
# An element's mask bit is a function of (seed, step, site, sample, position) only, never of a
# random generator's state: the compiled CPU kernels (mskt/fast/csrc/cpu_kernels.cpp) compute the
# same bits, CUDA computes them with these torch operations, and a run's masks do not depend on
# which path ran, on the batch a sample shares, or on how many processes share the batch.
#
# A dropout call's tensor is read as (B, R, C): sample b (its key: ``samples[b]``, the training
# loop's dataset index), row r of that sample (all middle dims flattened; for attention weights
# (B, h, T, S) row head * T + t), column c (the last dim). Then, all in uint32 arithmetic:
#   sample_key = mix32(c_lo ^ mix32(s_lo + mix32(c_hi ^ mix32(s_hi + G))))   per sample
#   row_key    = mix32(sample_key + r * G2)                                  per row
#   bits       = mix32(row_key + c * G)                                      per element
# with (c_hi, c_lo) the 64-bit call key (the seed, step and site, mixed in Python) and (s_hi, s_lo)
# the sample's index. An element is kept when bits >= round(p * 2**32): a drop rate within 2**-33
# of p. Kept values are scaled by the exact inverse keep rate, 2**32 / (2**32 - round(p * 2**32)),
# in float32.

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_GOLDEN = 0x9E3779B9  # the columns' stride (and the sample key's offset)
_GOLDEN2 = 0x85EBCA6B  # the rows' stride


def _i32(v: int) -> int:
    """A uint32 value's bit pattern as a signed int32 (how int32 tensors hold it)."""
    return v - (1 << 32) if v >= 1 << 31 else v


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' "lowbias32" integer mixer (full avalanche; the compiled kernels' ``mix32``), in place
    on an int32 tensor holding uint32 bit patterns. Its products wrap mod 2**32, as uint32's do;
    its right shifts are arithmetic, so each is masked to the logical shift."""
    x ^= (x >> 16) & 0xFFFF
    x.mul_(_i32(0x7FEB352D))
    x ^= (x >> 15) & 0x1FFFF
    x.mul_(_i32(0x846CA68B))
    x ^= (x >> 16) & 0xFFFF
    return x


def _mix64(x: int) -> int:
    """splitmix64's finaliser on a Python int: mixes a call's seed, step and site into its key."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _M64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _M64
    return x ^ (x >> 31)


@functools.lru_cache(maxsize=4096)
def site_id(site: str) -> int:
    """A dropout site's name (module path in the model and which of its dropouts) as 64 bits."""
    return int.from_bytes(hashlib.blake2b(site.encode(), digest_size=8).digest(), "little")


def call_key(seed: int, step: int, site: int) -> int:
    """The 64-bit key of one dropout call, as a signed int64 (how the compiled kernels take it)."""
    key = _mix64((_mix64((_mix64(seed & _M64) ^ (step & _M64)) + 0x9E3779B97F4A7C15 & _M64) ^ site) + 0xD1B54A32D192ED03 & _M64)
    return key - (1 << 64) if key >= 1 << 63 else key


@dataclass
class DropoutContext:
    """What one training step's dropout masks are a function of, besides the site: the run's seed,
    the step, and each batch row's sample index (B,) int64. ``step`` and ``samples`` together must
    name each draw of a sample once: the training loop passes the epoch and the dataset index of
    each row, so masks depend neither on the batch a sample is in nor on the world size."""

    seed: int
    step: int
    samples: torch.Tensor  # (B,) int64, on the model's device
    # Not a dropout key: in a distributed step, a rank's loss means divide by the global batch's
    # count scaled to its share (``mskt.model.losses``); None in a single process.
    shared_count: Callable | None = None


@dataclass
class DropoutKey:
    """The key of one dropout call: its 64-bit call key and the sample index of each batch row."""

    call: int  # signed int64
    samples: torch.Tensor  # (B,) int64


def renamed_path(path: str, renamed: dict) -> str:
    """``path`` (a module path or state key) with a leading ``old`` module path replaced by ``new``
    (``renamed``: {old: new}); unchanged where none leads it."""
    for old, new in renamed.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    return path


def set_dropout_context(model: nn.Module, context: DropoutContext | None) -> None:
    """Give every module of ``model`` that calls a kernel function (``kernels``) this step's
    ``context`` and its site (its path in ``model``); None: back to fresh seeds per call. A module
    the model has renamed (``renamed_modules``: {old: new}) keeps its old path as its site, so a
    rename draws the same masks."""
    back = {new: old for old, new in getattr(type(model), "renamed_modules", {}).items()}
    for name, m in model.named_modules():
        if hasattr(m, "kernels"):
            m.dropout_context, m.dropout_site = context, renamed_path(name, back)


@functools.lru_cache(maxsize=16)
def _positions(batch: int, device: torch.device) -> torch.Tensor:
    return torch.arange(batch, device=device)


def dropout_key(module: nn.Module, tag: str, p: float, x: torch.Tensor) -> DropoutKey | None:
    """The key of ``module``'s dropout ``tag`` (which of its dropouts) on ``x`` (B, ...); None when
    it drops nothing (evaluation, or p = 0).

    Under a :class:`DropoutContext` (``set_dropout_context``: the training loop sets one per step)
    the key is a function of (seed, step, site) and rows are keyed by the context's sample indices.
    Without one (a forward in training mode outside the loop), each call takes a fresh seed from
    torch's generator and rows are keyed by their position in the batch."""
    if p == 0 or not module.training:
        return None
    context = getattr(module, "dropout_context", None)
    if context is None:
        seed = int(torch.empty((), dtype=torch.int64).random_())
        return DropoutKey(call_key(seed, 0, 0), _positions(x.shape[0], x.device))
    site = site_id(f"{getattr(module, 'dropout_site', '')}:{tag}")
    return DropoutKey(call_key(context.seed, context.step, site), context.samples)


def dropout_threshold(p: float) -> tuple[int, float]:
    """Drop when the 32-bit hash is below the first; the second scales kept values (float32's
    rounding of the exact inverse keep rate, as the compiled kernels hold it)."""
    threshold = round(p * 2**32)
    return threshold, float(torch.tensor(2**32 / (2**32 - threshold), dtype=torch.float32))


def dropout_mask(shape, p: float, key: DropoutKey, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, float]:
    """The keep mask of dropout rate ``p`` under ``key`` for a tensor of ``shape`` (B, ..., C):
    ``dtype`` 1.0 where kept, 0.0 where dropped, on the samples' device; and the scale of kept
    values (the exact inverse of the keep rate)."""
    samples = key.samples
    B, C = shape[0], shape[-1]
    R = math.prod(shape[1:-1])
    assert samples.shape == (B,), f"dropout: {B} batch rows but {tuple(samples.shape)} sample indices"
    call = key.call & _M64
    c_lo, c_hi = _i32(call & _M32), _i32(call >> 32)
    as_i32 = lambda v: ((v & _M32) ^ (1 << 31)).sub_(1 << 31).to(torch.int32)  # noqa: E731 -- low 32 bits of int64 values
    s_lo, s_hi = as_i32(samples), as_i32(samples >> 32)  # (B,) each
    sample_key = mix32(c_lo ^ mix32(s_lo + mix32(c_hi ^ mix32(s_hi + _i32(_GOLDEN)))))  # (B,)
    rows = torch.arange(R, dtype=torch.int32, device=samples.device).mul_(_i32(_GOLDEN2))  # (R,)
    row_key = mix32(sample_key[:, None] + rows)  # (B, R)
    cols = torch.arange(C, dtype=torch.int32, device=samples.device).mul_(_i32(_GOLDEN))  # (C,)
    bits = mix32(row_key[:, :, None] + cols)  # (B, R, C)
    threshold, scale = dropout_threshold(p)
    # bits >= threshold as uint32: flip the sign bit of both sides and compare as int32.
    return bits.bitwise_xor_(-(1 << 31)).ge_(threshold - (1 << 31)).to(dtype).view(shape), scale


def dropout(x: torch.Tensor, p: float, key: DropoutKey | None) -> torch.Tensor:
    """Dropout of rate ``p`` with the mask of ``key`` (:func:`dropout_mask`); the identity for
    ``key`` None (evaluation, p = 0). The same function on every device."""
    if key is None or p == 0.0:
        return x
    keep, scale = dropout_mask(x.shape, p, key, x.dtype)
    # Float multiplies, not ``where``. The scale goes on last, as a Python float: a bfloat16 x is
    # scaled in float32 and rounded once (a bfloat16 mask holding it would round the scale itself);
    # a float32 x gets x * float32(scale), the compiled kernels' product, bit for bit.
    return (x * keep).mul_(scale)


def relu_dropout(x: torch.Tensor, p: float, key: DropoutKey | None) -> torch.Tensor:
    """``dropout(F.relu(x), p, key)``."""
    return dropout(F.relu(x), p, key)


class DropoutAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) with dropout on the weights (the mask of ``key``), times v, in
    training on any device.

    torch's fused kernels draw their own dropout masks (CPU's has no dropout at all), and autograd's version of these steps materialises
    more (T, S) tensors than it needs and computes two gradients in slow layouts. This one makes
    each pass over the (B*h, T, S) weights count: the key mask is added inside the score GEMM,
    dropout's 1/(1-p) goes onto the small (T, dh) output, only the weights and the 0/1 mask are kept
    for backward, and the transposed products are taken as (dh, S) results.
    Inputs: q (BH, T, dh), k and v (BH, S, dh), key_bias (BH, S): 0 at real keys and a large
    negative number at masked ones (its softmax weight is exactly 0, as with -inf).
    """

    @staticmethod
    def forward(ctx, q, k, v, key_bias, p: float, scale: float, key: DropoutKey):
        # The key mask rides inside the score GEMM as one more channel: [q * scale, 1] . [k, bias]
        # = q . k * scale + bias. A broadcast bias (``baddbmm``) would first be copied into the
        # whole (T, S) output; this costs one column more of a (T, dh) and an (S, dh) matrix.
        BH, T, _ = q.shape
        q_aug = torch.cat([q * scale, q.new_ones(BH, T, 1)], dim=2)  # (BH, T, dh + 1)
        k_aug = torch.cat([k, key_bias[..., None]], dim=2)  # (BH, S, dh + 1)
        scores = torch.bmm(q_aug, k_aug.transpose(1, 2))  # (BH, T, S)
        weights = scores.softmax(dim=-1)  # (BH, T, S)
        B = key.samples.shape[0]
        keep, keep_scale = dropout_mask((B, BH // B * T, weights.shape[2]), p, key, weights.dtype)  # (B, h * T, S), 0/1
        keep = keep.view(weights.shape)  # (BH, T, S): row head * T + t of sample b is row t of bh = b * h + head
        dropped = torch.mul(weights, keep, out=scores)  # the scores are spent: reuse their memory
        ctx.save_for_backward(q, k, v, weights, keep)
        ctx.scale, ctx.keep_scale = scale, keep_scale
        return torch.bmm(dropped, v).mul_(keep_scale)  # (BH, T, dh)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, weights, keep = ctx.saved_tensors
        grad = grad * ctx.keep_scale  # (BH, T, dh)
        dropped = weights * keep  # recomputed: one pass, and one (T, S) tensor fewer to keep
        grad_v = torch.bmm(grad.transpose(1, 2), dropped).transpose(1, 2)  # (BH, S, dh)
        del dropped
        grad_weights = torch.bmm(grad, v.transpose(1, 2)).mul_(keep)  # (BH, T, S)
        grad_scores = torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype)  # (BH, T, S)
        grad_q = torch.bmm(grad_scores, k).mul_(ctx.scale)  # (BH, T, dh)
        grad_k = torch.bmm(q.transpose(1, 2), grad_scores).transpose(1, 2).mul_(ctx.scale)  # (BH, S, dh)
        return grad_q, grad_k, grad_v, None, None, None, None


class Kernels:
    """The kernel functions the layers call, on torch's operations.

    Every module that calls one holds a ``kernels`` attribute (this table by default).
    ``mskt.fast.accelerate`` hands a model's modules a table of compiled functions that compute the
    same (Hugging Face's ``attn_implementation``): the layers' own code runs either way, only the
    kernel under it changes.
    """

    name = "torch"

    def dropout(self, x: torch.Tensor, p: float, key: DropoutKey | None) -> torch.Tensor:
        return dropout(x, p, key)

    def relu_dropout(self, x: torch.Tensor, p: float, key: DropoutKey | None) -> torch.Tensor:
        return relu_dropout(x, p, key)

    def attention(self, q: torch.Tensor, kv: torch.Tensor, source_mask: torch.Tensor, heads: int, p: float, key: DropoutKey | None) -> torch.Tensor:
        """softmax(q k^T / sqrt(dh), real keys only), dropout ``p`` with the mask of ``key`` on the
        weights (none for ``key`` None), times v. q (B, T, d) and kv (B, S, 2d) as the projections
        lay them out, heads side by side; (B, T, d)."""
        B, T, d = q.shape
        S = kv.shape[1]
        h, dh = heads, d // heads
        q = q.view(B, T, h, dh).transpose(1, 2)  # (B, h, T, dh)
        k, v = kv.view(B, S, 2, h, dh).permute(2, 0, 3, 1, 4)  # each (B, h, S, dh)
        if key is not None and p > 0:  # the hashed mask on every device: SDPA's dropout draws its own
            key_bias = padding_bias(source_mask, q.dtype)  # (B, S)
            y = DropoutAttention.apply(
                q.reshape(B * h, T, dh), k.reshape(B * h, S, dh), v.reshape(B * h, S, dh),
                key_bias.repeat_interleave(h, dim=0), p, dh**-0.5, key,  # key_bias (B * h, S)
            ).view(B, h, T, dh)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=source_mask[:, None, None, :])  # (B, h, T, dh)
        return y.transpose(1, 2).reshape(B, T, d)  # (B, T, d)


TORCH_KERNELS = Kernels()


@functools.lru_cache(maxsize=64)
def _sinusoidal_table(steps: int, d: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return sinusoidal_table(steps, d).to(device=device, dtype=dtype)


def sinusoidal_table(steps: int, d: int) -> torch.Tensor:
    """Fixed sinusoidal positions, (steps, d): sin on even channels, cos on odd (Vaswani et al.)."""
    pos = torch.arange(steps, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(steps, d)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: d // 2])
    return table


class Attention(nn.Module):
    """Multi-head attention: queries from ``x`` (the target), keys and values from ``source``.

    ``return_attention=True`` takes the explicit steps, which also return the weights; otherwise
    the ``kernels.attention`` function computes the same (torch's fused kernel, DropoutAttention
    with dropout, or a compiled kernel that ``mskt.fast`` verified).
    """

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.kernels = TORCH_KERNELS
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x, source, source_mask, return_attention=False):
        B, T, d = x.shape
        S = source.shape[1]
        h, dh = self.heads, d // self.heads
        p = self.dropout if self.training else 0.0
        key = dropout_key(self, "weights", p, x)
        if not return_attention:
            y = self.kernels.attention(self.q(x), self.kv(source), source_mask, h, p, key)  # (B, T, d)
            return self.out(y), None
        q = self.q(x).view(B, T, h, dh).transpose(1, 2)  # (B, h, T, dh)
        k, v = self.kv(source).view(B, S, 2, h, dh).permute(2, 0, 3, 1, 4)  # each (B, h, S, dh)
        bias = torch.zeros(B, 1, 1, S, dtype=q.dtype, device=q.device).masked_fill_(~source_mask[:, None, None, :], float("-inf"))
        weights = ((q * dh**-0.5) @ k.transpose(-2, -1) + bias).softmax(dim=-1)  # (B, h, T, S)
        dropped = weights
        if key is not None:
            keep, scale = dropout_mask(weights.shape, p, key, weights.dtype)  # (B, h, T, S)
            dropped = weights * keep * scale
        y = (dropped @ v).transpose(1, 2).reshape(B, T, d)  # (B, h, T, dh) -> (B, T, d)
        return self.out(y), weights


class TransformerLayer(nn.Module):
    """Pre-LayerNorm layer. Cross-modal when given a source: queries from x, keys/values from the
    (separately normalised) source, residual back onto x, as MulT does."""

    def __init__(self, d: int, heads: int, attn_dropout: float, relu_dropout: float, res_dropout: float, cross: bool):
        super().__init__()
        self.kernels = TORCH_KERNELS
        self.norm_x = nn.LayerNorm(d)
        self.norm_source = nn.LayerNorm(d) if cross else None
        self.attn = Attention(d, heads, attn_dropout)
        self.norm_ff = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, 4 * d)
        self.ff2 = nn.Linear(4 * d, d)
        self.relu_dropout = relu_dropout
        self.res_dropout = res_dropout

    def forward(self, x, x_mask, source=None, source_mask=None, return_attention=False, last_only=False):
        h = self.norm_x(x)
        if source is None:
            kv, kv_mask = h, x_mask
        else:
            kv, kv_mask = self.norm_source(source), source_mask
        if last_only:  # only the last step's output will be read: query from it alone
            x, h = x[:, -1:], h[:, -1:]  # (B, 1, d)
        a, weights = self.attn(h, kv, kv_mask, return_attention)
        x = x + self.kernels.dropout(a, self.res_dropout, dropout_key(self, "attention_residual", self.res_dropout, a))
        f = self.ff1(self.norm_ff(x))
        h = self.kernels.relu_dropout(f, self.relu_dropout, dropout_key(self, "relu", self.relu_dropout, f))
        f = self.ff2(h)
        x = x + self.kernels.dropout(f, self.res_dropout, dropout_key(self, "feed_forward_residual", self.res_dropout, f))
        return x, weights


class Transformer(nn.Module):
    """MulT's encoder: input scaled by sqrt(d), sinusoidal positions, dropout, pre-LN layers,
    final LayerNorm. Cross-modal (``cross=True``) layers attend from x to a fixed source.

    Positions count from each sample's first real step, so left padding does not shift them.
    """

    def __init__(self, d, heads, layers, attn_dropout, relu_dropout, res_dropout, embed_dropout, cross=False):
        super().__init__()
        self.d = d
        self.embed_dropout = embed_dropout
        self.kernels = TORCH_KERNELS
        self.accelerator = None  # set by mskt.fast.accelerate: runs this stack compiled where it verified it
        self.layers = nn.ModuleList(TransformerLayer(d, heads, attn_dropout, relu_dropout, res_dropout, cross) for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def embed(self, x, mask, tag="embed"):
        """``tag`` names the dropout site: the stack embeds its input and, cross-modal, its source."""
        B, T, d = x.shape
        # Cached in eager mode; a compiled graph computes it once and folds it in as a constant.
        table = sinusoidal_table(T, d).to(x) if torch.compiler.is_compiling() else _sinusoidal_table(T, d, x.device, x.dtype)  # (T, d)
        first_real = T - mask.sum(dim=1, keepdim=True)  # (B, 1)
        pos = (torch.arange(T, device=x.device)[None, :] - first_real).clamp(min=0)  # (B, T)
        x = math.sqrt(d) * x + table[pos] * mask[..., None]  # (B, T, d); padding gets no position
        return self.kernels.dropout(x, self.embed_dropout, dropout_key(self, tag, self.embed_dropout, x))

    def forward(self, x, mask, source=None, source_mask=None, return_attention=False, last_only=False):
        """``last_only``: compute the last step's output only, (B, 1, d); the same values as
        ``forward(...)[0][:, -1:]`` with the last layer's queries and feed-forward on one step."""
        if self.accelerator is not None and not return_attention and self.accelerator.takes(self, x):  # verified fast path
            return self.accelerator.run_stacks([(self, x, mask, source, source_mask)], last_only)[0]
        x = self.embed(x, mask)
        if source is not None:
            source = self.embed(source, source_mask, "embed_source")
        maps = []
        for i, layer in enumerate(self.layers):
            last = last_only and i == len(self.layers) - 1
            x, w = layer(x, mask, source, source_mask, return_attention, last_only=last)
            maps.append(w)
        return self.norm(x), (maps if return_attention else None)


def run_stacks(calls, return_attention=False, last_only=False) -> list[tuple]:
    """Independent stacks: ``calls`` holds (stack, x, mask, source, source_mask); returns each one's
    (output, attention maps or None), as its ``forward`` would.

    A stack is any module with ``forward(x, mask, source, source_mask, return_attention, last_only)``
    returning (output, maps). Plainly they run one after the other. Where ``mskt.fast`` accelerated
    the stacks, it runs those it verified as one compiled node (side by side on torch's threads) and
    calls ``forward`` on the rest.
    """
    accelerator = next((s.accelerator for s, *_ in calls if getattr(s, "accelerator", None) is not None), None)
    if accelerator is not None and not return_attention:
        return accelerator.run_stacks(calls, last_only)
    return [stack(x, mask, source, source_mask, return_attention, last_only) for stack, x, mask, source, source_mask in calls]


def resample(x: torch.Tensor, len_x: torch.Tensor, steps: int, len_out: torch.Tensor) -> torch.Tensor:
    """Linearly resample each sample's real steps onto another left-padded grid.

    x (B, S, d) with true lengths len_x -> (B, steps, d) with true lengths len_out; output step j of
    a sample covers the same fraction of the utterance as the input positions it interpolates.
    """
    B, S, d = x.shape
    len_x = len_x.clamp(min=1, max=S).to(x.dtype)
    len_out = len_out.clamp(min=1, max=steps).to(x.dtype)
    j = torch.arange(steps, device=x.device, dtype=x.dtype)[None, :]  # (1, steps)
    frac = (j - (steps - len_out[:, None]) + 0.5) / len_out[:, None]  # (B, steps), in (0, 1) on real steps
    src = (S - len_x[:, None]) + frac * len_x[:, None] - 0.5  # (B, steps), fractional input index
    src = torch.maximum(src, S - len_x[:, None]).clamp(max=S - 1)  # edges clamp to real steps, never padding
    lo = src.floor().long()
    hi = (lo + 1).clamp(max=S - 1)
    w = (src - lo.to(x.dtype))[..., None]  # (B, steps, 1)
    gather = lambda idx: x.gather(1, idx[..., None].expand(B, steps, d))  # (B, steps, d)
    return gather(lo) * (1 - w) + gather(hi) * w
