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
import math

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


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout`` with a mask that is several times cheaper to draw on CPU.

    torch's CPU Bernoulli sampler costs ~6 ns per element, a fifth of this model's training time.
    Here one 64-bit draw gives four 16-bit uniforms, and an element is kept when its uniform is at
    least round(p * 2**16): a drop rate within 2**-17 of ``p``, with kept values scaled by the exact
    inverse keep rate, so the expectation is unchanged. CUDA keeps torch's own fused kernel.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    keep, scale = dropout_mask(x.shape, p, x.dtype)
    # A float multiply, not ``where``: torch's CPU ``where`` with a scalar costs ~4x a same-dtype
    # multiply, and the backward pass is one more multiply by the same mask.
    return x * keep.mul_(scale)


def dropout_mask(shape, p: float, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, float]:
    """A CPU keep mask for dropout rate ``p``: ``dtype`` 1.0 where kept, 0.0 where dropped, of
    ``shape``; and the scale of kept values (the exact inverse of the keep rate)."""
    threshold = round(p * 65536)  # drop when the 16-bit uniform (0..65535) is below it
    n = math.prod(shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # all 64 bits uniform
    uniform = bits.view(torch.int16)[:n].view(shape)  # uniform on -32768..32767
    # Convert, then compare in place (writing 1.0 / 0.0): 2.3x faster than ``ge`` into a float
    # ``out``, which goes through a bool tensor and a converting copy.
    return uniform.to(dtype).ge_(threshold - 32768), 65536 / (65536 - threshold)


def relu_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``dropout(F.relu(x), p, training)``."""
    return dropout(F.relu(x), p, training)


class DropoutAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) with dropout on the weights, times v, for training on CPU.

    torch's fused CPU kernel has no dropout, and autograd's version of these steps materialises
    more (T, S) tensors than it needs and computes two gradients in slow layouts. This one makes
    each pass over the (B*h, T, S) weights count: the key mask is added inside the score GEMM,
    dropout's 1/(1-p) goes onto the small (T, dh) output, only the weights and the 0/1 mask are kept
    for backward, and the transposed products are taken as (dh, S) results.
    Inputs: q (BH, T, dh), k and v (BH, S, dh), key_bias (BH, S): 0 at real keys and a large
    negative number at masked ones (its softmax weight is exactly 0, as with -inf).
    """

    @staticmethod
    def forward(ctx, q, k, v, key_bias, p: float, scale: float):
        # The key mask rides inside the score GEMM as one more channel: [q * scale, 1] . [k, bias]
        # = q . k * scale + bias. A broadcast bias (``baddbmm``) would first be copied into the
        # whole (T, S) output; this costs one column more of a (T, dh) and an (S, dh) matrix.
        BH, T, _ = q.shape
        q_aug = torch.cat([q * scale, q.new_ones(BH, T, 1)], dim=2)  # (BH, T, dh + 1)
        k_aug = torch.cat([k, key_bias[..., None]], dim=2)  # (BH, S, dh + 1)
        scores = torch.bmm(q_aug, k_aug.transpose(1, 2))  # (BH, T, S)
        weights = scores.softmax(dim=-1)  # (BH, T, S)
        keep, keep_scale = dropout_mask(weights.shape, p, weights.dtype)  # (BH, T, S), 0/1
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
        return grad_q, grad_k, grad_v, None, None, None


class Kernels:
    """The kernel functions the layers call, on torch's operations.

    Every module that calls one holds a ``kernels`` attribute (this table by default).
    ``mskt.fast.accelerate`` hands a model's modules a table of compiled functions that compute the
    same (Hugging Face's ``attn_implementation``): the layers' own code runs either way, only the
    kernel under it changes.
    """

    name = "torch"

    def dropout(self, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        return dropout(x, p, training)

    def relu_dropout(self, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        return relu_dropout(x, p, training)

    def attention(self, q: torch.Tensor, kv: torch.Tensor, source_mask: torch.Tensor, heads: int, p: float) -> torch.Tensor:
        """softmax(q k^T / sqrt(dh), real keys only), dropout ``p`` on the weights, times v.
        q (B, T, d) and kv (B, S, 2d) as the projections lay them out, heads side by side; (B, T, d)."""
        B, T, d = q.shape
        S = kv.shape[1]
        h, dh = heads, d // heads
        q = q.view(B, T, h, dh).transpose(1, 2)  # (B, h, T, dh)
        k, v = kv.view(B, S, 2, h, dh).permute(2, 0, 3, 1, 4)  # each (B, h, S, dh)
        if p > 0 and q.device.type == "cpu":  # torch's fused CPU kernel has no dropout
            key_bias = padding_bias(source_mask, q.dtype)  # (B, S)
            y = DropoutAttention.apply(
                q.reshape(B * h, T, dh), k.reshape(B * h, S, dh), v.reshape(B * h, S, dh),
                key_bias.repeat_interleave(h, dim=0), p, dh**-0.5,  # key_bias (B * h, S)
            ).view(B, h, T, dh)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=source_mask[:, None, None, :], dropout_p=p)  # (B, h, T, dh)
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
    when training on CPU, or a compiled kernel that ``mskt.fast`` verified).
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
        if not return_attention:
            y = self.kernels.attention(self.q(x), self.kv(source), source_mask, h, p)  # (B, T, d)
            return self.out(y), None
        q = self.q(x).view(B, T, h, dh).transpose(1, 2)  # (B, h, T, dh)
        k, v = self.kv(source).view(B, S, 2, h, dh).permute(2, 0, 3, 1, 4)  # each (B, h, S, dh)
        bias = torch.zeros(B, 1, 1, S, dtype=q.dtype, device=q.device).masked_fill_(~source_mask[:, None, None, :], float("-inf"))
        weights = ((q * dh**-0.5) @ k.transpose(-2, -1) + bias).softmax(dim=-1)  # (B, h, T, S)
        dropped = weights
        if p > 0:
            keep, scale = dropout_mask(weights.shape, p, weights.dtype) if x.device.type == "cpu" else ((torch.rand_like(weights) >= p).to(weights.dtype), 1 / (1 - p))
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
        x = x + self.kernels.dropout(a, self.res_dropout, self.training)
        h = self.kernels.relu_dropout(self.ff1(self.norm_ff(x)), self.relu_dropout, self.training)
        x = x + self.kernels.dropout(self.ff2(h), self.res_dropout, self.training)
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

    def embed(self, x, mask):
        B, T, d = x.shape
        # Cached in eager mode; a compiled graph computes it once and folds it in as a constant.
        table = sinusoidal_table(T, d).to(x) if torch.compiler.is_compiling() else _sinusoidal_table(T, d, x.device, x.dtype)  # (T, d)
        first_real = T - mask.sum(dim=1, keepdim=True)  # (B, 1)
        pos = (torch.arange(T, device=x.device)[None, :] - first_real).clamp(min=0)  # (B, T)
        x = math.sqrt(d) * x + table[pos] * mask[..., None]  # (B, T, d); padding gets no position
        return self.kernels.dropout(x, self.embed_dropout, self.training)

    def forward(self, x, mask, source=None, source_mask=None, return_attention=False, last_only=False):
        """``last_only``: compute the last step's output only, (B, 1, d); the same values as
        ``forward(...)[0][:, -1:]`` with the last layer's queries and feed-forward on one step."""
        if self.accelerator is not None and not return_attention and self.accelerator.takes(self, x):  # verified fast path
            return self.accelerator.run_stacks([(self, x, mask, source, source_mask)], last_only)[0]
        x = self.embed(x, mask)
        if source is not None:
            source = self.embed(source, source_mask)
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
