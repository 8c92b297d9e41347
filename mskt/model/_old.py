"""The model, top to bottom: config, leaf modules, the knowledge-transfer network, the MulT fusion.

Paper: Liu et al., "Multimodal sentiment analysis with missing modality: a knowledge-transfer
approach". Backbone: MulT (Tsai et al., ACL 2019). Shapes: B batch, T steps, d model width.

Design decisions the paper leaves open (each is a config field):

- **Where A' lives in time.** theta runs on the vision grid, phi on the text grid. For the
  concatenation [theta(f_V) || phi(f_L)] both must share a grid, so theta's output is resampled onto
  the text grid (the word grid of aligned data); A' therefore has the text's steps and padding mask.
  Aligned data share one grid, and resampling is the identity. Consistency targets f_A are resampled
  onto each source's grid by the same per-sample linear interpolation over true (unpadded) steps.
- **Where f_A comes from, without collapse.** If an audio encoder were trained by the consistency
  loss, a constant f_A would satisfy it. So f_A never receives a consistency gradient:
  ``kt_target="raw"`` (default) takes the real audio features themselves, standardised per feature
  with training statistics, and reads theta, phi and delta out through one shared linear map to the
  audio features: a fixed target, in the units notebook 03 plots. ``kt_target="aux"`` uses a learned
  audio encoder behind a stop-gradient, kept informative by a training-only audio head on the task
  loss; ``kt_target="teacher"`` loads and freezes the audio encoder of a trained ``full`` run.
  Audio is a target only, never read on the prediction path of kt / language / vision /
  language_vision.
- **Padding.** Sequences are left-padded (see ``mskt.data.dataset``); the last step is always real and is
  what MulT's head reads. Keys at padded steps are masked in every attention.
- **Any missing modality (``kt_any``, beyond the paper).** ``batch["missing"]`` (B, 3) marks, per
  sample, which modalities are missing; the first thing forward does is replace their values by
  zeros with ``torch.where`` (never read, NaN-safe), which is also the zero-imputation baseline of
  every other variant. kt_any encodes all three; for each target m and other source s a stack
  predicts m from f_s (on s's grid); the present sources' predictions, resampled onto m's grid, are
  averaged per sample and a delta_m stack gives m', which replaces f_m where m is missing. Each
  prediction and m' is read out (one linear map per target) to m's real features, standardised with
  training statistics, by a consistency loss behind a stop-gradient (like ``kt_target="raw"``).
  Training drops modalities at random (``modality_dropout``: one of the six patterns per sample).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from mskt.fast.build import compiled_kernels

MODALITIES = ("text", "audio", "vision")
VARIANTS = ("full", "kt", "language_vision", "language", "vision", "kt_any")
# Which inputs each variant fuses. "audio" is real audio for full, the reconstruction A' for kt.
# kt_any (beyond the paper; the "kt-any") reads all three and reconstructs, per sample,
# whichever of them are missing (``batch["missing"]``) from the present ones.
VARIANT_MODALITIES = {
    "full": ("text", "audio", "vision"),
    "kt": ("text", "audio", "vision"),
    "kt_any": ("text", "audio", "vision"),
    "language_vision": ("text", "vision"),
    "language": ("text",),
    "vision": ("vision",),
}
# The six ways one or two of the three modalities can be missing (MMIN's fixed test conditions).
MISSING_PATTERNS = (("text",), ("audio",), ("vision",), ("text", "audio"), ("text", "vision"), ("audio", "vision"))


@dataclass
class ModelConfig:
    # What the data looks like (filled in from the dataset).
    text_dim: int = 300
    audio_dim: int = 5
    vision_dim: int = 20
    text_steps: int = 50  # steps of the text grid: the target length of ctc_align
    task: str = "regression"  # "regression" (1 output) or "emotions" (4 emotions x 2 logits)
    # Which row of the paper's tables.
    variant: str = "kt"
    targets: str = "all"  # Table 4: cross-modal transformers serve "all" targets, or only text / audio / vision
    # Widths and depths. The paper: "transformer blocks of three layers"; d=40 is its Table's width.
    d_model: int = 40
    heads: int = 4
    encoder_layers: int = 1  # modality encoders (MulT has none; the paper's are transformer-based)
    kt_layers: int = 3  # each of theta, phi, delta
    crossmodal_layers: int = 3
    memory_layers: int = 3  # self-attention decoder after the cross-modal transformers
    text_kernel: int = 1  # Conv1d kernel of the temporal projection (MulT's public code: 1)
    audio_kernel: int = 1
    vision_kernel: int = 1
    # Dropouts: MulT's public defaults.
    attn_dropout: float = 0.1
    attn_dropout_audio: float = 0.0
    attn_dropout_vision: float = 0.0
    relu_dropout: float = 0.1
    res_dropout: float = 0.1
    embed_dropout: float = 0.25
    out_dropout: float = 0.0
    # Knowledge transfer.
    consistency: str = "l2"  # "l2" (the paper's best) or "l1" (Table 5)
    lambda_vision: float = 1.0  # lambda1, weight of L_c(V -> A)
    lambda_language: float = 1.0  # lambda2, weight of L_c(L -> A)
    lambda_fused: float = 0.0  # beyond the paper: consistency on delta's output A' too
    kt_target: str = "raw"  # "raw" (standardised audio features), "aux" (encoder + training-only head) or "teacher"
    lambda_aux: float = 1.0  # weight of the training-only audio head's task loss (kt_target="aux")
    # kt_any (beyond the paper): reconstruct whichever modalities are missing, per sample.
    lambda_any: float = 1.0  # weight of kt_any's consistency terms (per target modality, the mean of its terms)
    modality_dropout: float = 0.5  # kt_any training: the share of samples given one of the six missing patterns
    # Unaligned data: MulT's baseline recipe, a learned CTC pseudo-alignment onto the text grid.
    ctc_align: bool = False
    # How attention, dropout and LayerNorm run on CPU in float32 (the same function either way):
    # "fused", the compiled kernels of mskt/csrc (torch's operations where they cannot be built),
    # or "torch".
    cpu_kernels: str = "fused"

    @property
    def n_outputs(self) -> int:
        return 1 if self.task == "regression" else 8

    def dim(self, modality: str) -> int:
        return getattr(self, f"{modality}_dim")

    def attn_dropout_for(self, modality: str) -> float:
        return {"text": self.attn_dropout, "audio": self.attn_dropout_audio, "vision": self.attn_dropout_vision}[modality]

    def target_modalities(self) -> tuple:
        present = VARIANT_MODALITIES[self.variant]
        if self.targets == "all" or len(present) < 2:
            return present
        return (self.targets,)

    def check(self) -> None:
        from mskt.errors import ConfigError

        allowed = {
            "variant": VARIANTS,
            "task": ("regression", "emotions"),
            "targets": ("all", *MODALITIES),
            "consistency": ("l1", "l2"),
            "kt_target": ("raw", "aux", "teacher"),
            "cpu_kernels": ("fused", "torch"),
        }
        for key, values in allowed.items():
            if getattr(self, key) not in values:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not allowed; choose one of {', '.join(values)}")
        if self.targets != "all" and self.targets not in VARIANT_MODALITIES[self.variant]:
            raise ConfigError(f"targets={self.targets!r} is not an input of variant {self.variant!r}")
        for key in ("d_model", "heads", "kt_layers", "crossmodal_layers", "memory_layers", "text_dim", "audio_dim", "vision_dim", "text_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, found {getattr(self, key)}")
        if self.d_model % self.heads:
            raise ConfigError(f"d_model={self.d_model} must be divisible by heads={self.heads}")
        for key in ("text_kernel", "audio_kernel", "vision_kernel"):
            if getattr(self, key) < 1 or getattr(self, key) % 2 == 0:
                raise ConfigError(
                    f"{key} must be an odd integer >= 1 (the Conv1d projection pads (k-1)//2 per side, so an even "
                    f"kernel would change the number of steps), found {getattr(self, key)}"
                )
        if self.encoder_layers < 0:
            raise ConfigError(f"encoder_layers must be >= 0, found {self.encoder_layers}")
        if self.variant == "kt_any" and self.kt_target != "raw":
            raise ConfigError(f"variant 'kt_any' reconstructs raw standardised features: kt_target must be 'raw', found {self.kt_target!r}")
        if not 0.0 <= self.modality_dropout <= 1.0:
            raise ConfigError(f"modality_dropout must be in [0.0, 1.0], found {self.modality_dropout!r}")


# ----------------------------------------------------------------------------------------------
# Leaf modules


def key_mask(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """True at real steps of left-padded sequences. (B, T) bool.

    A sample of length 0 keeps its last step, so no attention row is all-masked (softmax of
    nothing is NaN); that step holds padding zeros and carries no information.
    """
    lengths = lengths.clamp(min=1, max=steps)
    t = torch.arange(steps, device=lengths.device)
    return t[None, :] >= (steps - lengths)[:, None]


def dropout(x: torch.Tensor, p: float, training: bool, fused: bool = False) -> torch.Tensor:
    """``F.dropout`` with a mask that is several times cheaper to draw on CPU.

    ``fused`` (and a float32 CPU tensor, and the compiled kernels build here): the compiled
    kernel, whose mask is a hash of a seed and each element's index, never drawn into memory nor
    stored; its autograd function is C++ (``mskt/csrc``), as are those of the other kernels.
    Otherwise:

    torch's CPU Bernoulli sampler costs ~6 ns per element, a fifth of this model's training time.
    Here one 64-bit draw gives four 16-bit uniforms, and an element is kept when its uniform is at
    least round(p * 2**16): a drop rate within 2**-17 of ``p``, with kept values scaled by the exact
    inverse keep rate, so the expectation is unchanged. CUDA keeps torch's own fused kernel.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    if fused and fused_kernels_available(x):
        return compiled_kernels().dropout_autograd(x, p)
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


def relu_dropout(x: torch.Tensor, p: float, training: bool, fused: bool = False) -> torch.Tensor:
    """``dropout(F.relu(x), p, training, fused)``; with ``fused`` one compiled pass each way (the
    backward reads only the output: where it is not 0, x was positive and kept)."""
    if fused and training and p > 0 and fused_kernels_available(x):
        return compiled_kernels().relu_dropout_autograd(x, p)
    return dropout(F.relu(x), p, training, fused)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and state dict); with ``fused``, on CPU in float32, the
    compiled kernel, about twice as fast as torch's at widths of 30 to 120 channels."""

    def __init__(self, d: int, fused: bool = False):
        super().__init__(d)
        self.fused = fused

    def forward(self, x):
        if self.fused and fused_kernels_available(x):
            return compiled_kernels().layer_norm_autograd(x, self.weight, self.bias, self.eps)
        return super().forward(x)


def padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S): 0 at real keys, -1e30 at padded ones. Finite, unlike -inf: the compiled kernel's exp
    of (-1e30 - max) is exactly 0, and DropoutAttention's GEMM padding products 0 * bias stay 0."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -1e30)


def fused_kernels_available(x: torch.Tensor) -> bool:
    """Whether the compiled kernels can take ``x``: float32 on CPU, they build here, and no
    torch.compile graph is being traced (it cannot trace them; it gets torch's operations)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.compiler.is_compiling():
        return False
    return compiled_kernels() is not None


class Attention(nn.Module):
    """Multi-head attention: queries from ``x`` (the target), keys and values from ``source``.

    Four paths that compute the same function: on CPU in float32, the compiled kernel
    (``cpu_kernels="fused"``, where it builds; ``mskt/csrc/cpu_kernels.cpp``: each query row's
    scores, softmax, dropout and weighted sum in a row buffer, backward recomputing the weights from
    the saved log-sum-exp and the dropout mask from its seed, so nothing of size (T, S) is stored;
    1.2-8x faster than the others at this model's head widths, with or without dropout; its dropout
    mask differs from :func:`dropout_mask`'s, not its law); torch's fused ``scaled_dot_product_attention``
    (CUDA, and CPU without the kernel); :class:`DropoutAttention` for CPU training with attention
    dropout without the kernel, as torch's fused CPU kernel has no dropout; and, for
    ``return_attention=True``, the explicit steps, which also return the weights.
    """

    def __init__(self, d: int, heads: int, dropout: float, cpu_kernels: str = "fused"):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.cpu_kernels = cpu_kernels
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x, source, source_mask, return_attention=False):
        B, T, d = x.shape
        S = source.shape[1]
        h, dh = self.heads, d // self.heads
        p = self.dropout if self.training else 0.0
        if not return_attention and self.cpu_kernels == "fused" and fused_kernels_available(x):
            # The kernel reads q (B, T, d) and kv (B, S, 2d) as the projections lay them out, heads
            # side by side, and writes (B, T, d): no transposes around it.
            y = compiled_kernels().attention(self.q(x), self.kv(source), padding_bias(source_mask, x.dtype), h, dh**-0.5, p)  # (B, T, d)
            return self.out(y), None
        q = self.q(x).view(B, T, h, dh).transpose(1, 2)  # (B, h, T, dh)
        k, v = self.kv(source).view(B, S, 2, h, dh).permute(2, 0, 3, 1, 4)  # each (B, h, S, dh)
        mask = source_mask[:, None, None, :]  # (B, 1, 1, S), True = attend
        weights = None
        if return_attention:
            bias = torch.zeros(B, 1, 1, S, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
            weights = ((q * dh**-0.5) @ k.transpose(-2, -1) + bias).softmax(dim=-1)  # (B, h, T, S)
            dropped = weights
            if p > 0:
                keep, scale = dropout_mask(weights.shape, p, weights.dtype) if x.device.type == "cpu" else ((torch.rand_like(weights) >= p).to(weights.dtype), 1 / (1 - p))
                dropped = weights * keep * scale
            y = dropped @ v  # (B, h, T, dh)
        elif p > 0 and x.device.type == "cpu":
            key_bias = padding_bias(source_mask, q.dtype)  # (B, S)
            y = DropoutAttention.apply(
                q.reshape(B * h, T, dh), k.reshape(B * h, S, dh), v.reshape(B * h, S, dh),
                key_bias.repeat_interleave(h, dim=0), p, dh**-0.5,  # key_bias (B * h, S)
            ).view(B, h, T, dh)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, h, T, dh)
        y = y.transpose(1, 2).reshape(B, T, d)  # (B, T, d)
        return self.out(y), weights


class TransformerLayer(nn.Module):
    """Pre-LayerNorm layer. Cross-modal when given a source: queries from x, keys/values from the
    (separately normalised) source, residual back onto x, as MulT does.

    ``forward`` writes the steps out in torch operations. On the compiled path a ``Transformer``
    runs its layers in C++ instead (``run_stacks``); a test compares the two, outputs and every
    gradient."""

    def __init__(self, d: int, heads: int, attn_dropout: float, relu_dropout: float, res_dropout: float, cross: bool,
                 cpu_kernels: str = "fused"):
        super().__init__()
        self.fused = cpu_kernels == "fused"
        self.norm_x = LayerNorm(d, self.fused)
        self.norm_source = LayerNorm(d, self.fused) if cross else None
        self.attn = Attention(d, heads, attn_dropout, cpu_kernels)
        self.norm_ff = LayerNorm(d, self.fused)
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
        x = x + dropout(a, self.res_dropout, self.training, self.fused)
        h = relu_dropout(self.ff1(self.norm_ff(x)), self.relu_dropout, self.training, self.fused)
        x = x + dropout(self.ff2(h), self.res_dropout, self.training, self.fused)
        return x, weights


class Transformer(nn.Module):
    """MulT's encoder: input scaled by sqrt(d), sinusoidal positions, dropout, pre-LN layers,
    final LayerNorm. Cross-modal (``cross=True``) layers attend from x to a fixed source.

    Positions count from each sample's first real step, so left padding does not shift them.
    """

    def __init__(self, d, heads, layers, attn_dropout, relu_dropout, res_dropout, embed_dropout, cross=False, cpu_kernels="fused"):
        super().__init__()
        self.d = d
        self.embed_dropout = embed_dropout
        self.fused = cpu_kernels == "fused"
        self.layers = nn.ModuleList(
            TransformerLayer(d, heads, attn_dropout, relu_dropout, res_dropout, cross, cpu_kernels) for _ in range(layers)
        )
        self.norm = LayerNorm(d, self.fused)

    def embed(self, x, mask):
        B, T, d = x.shape
        # Cached in eager mode; a compiled graph computes it once and folds it in as a constant.
        table = sinusoidal_table(T, d).to(x) if torch.compiler.is_compiling() else _sinusoidal_table(T, d, x.device, x.dtype)  # (T, d)
        first_real = T - mask.sum(dim=1, keepdim=True)  # (B, 1)
        pos = (torch.arange(T, device=x.device)[None, :] - first_real).clamp(min=0)  # (B, T)
        x = math.sqrt(d) * x + table[pos] * mask[..., None]  # (B, T, d); padding gets no position
        return dropout(x, self.embed_dropout, self.training, self.fused)

    def compiled(self, x, return_attention=False) -> bool:
        """Whether ``forward`` runs as the compiled stack node (``run_stacks``)."""
        return self.fused and not return_attention and fused_kernels_available(x)

    def forward(self, x, mask, source=None, source_mask=None, return_attention=False, last_only=False):
        """``last_only``: compute the last step's output only, (B, 1, d); the same values as
        ``forward(...)[0][:, -1:]`` with the last layer's queries and feed-forward on one step."""
        if self.compiled(x, return_attention):
            return run_stacks([(self, x, mask, source, source_mask)], last_only=last_only)[0]
        x = self.embed(x, mask)
        if source is not None:
            source = self.embed(source, source_mask)
        maps = []
        for i, layer in enumerate(self.layers):
            last = last_only and i == len(self.layers) - 1
            x, w = layer(x, mask, source, source_mask, return_attention, last_only=last)
            maps.append(w)
        return self.norm(x), (maps if return_attention else None)

    def compiled_inputs(self, x, mask, source, source_mask, last_only) -> tuple[list, list, list]:
        """The compiled stack node's tensors, ints and doubles for this stack (``stacks`` in
        mskt/csrc/cpu_kernels.cpp): the embedded inputs, the keys' padding bias, every layer's
        parameters, the final norm's, and the settings (dropout rates 0 in evaluation)."""
        x = self.embed(x, mask)
        source = self.embed(source, source_mask) if source is not None else x.new_empty(0)
        key_bias = padding_bias(mask if source_mask is None else source_mask, x.dtype)  # (B, S)
        tensors = [x, source, key_bias]
        for layer in self.layers:
            norm_s = layer.norm_source
            no_source = (x.new_empty(0), x.new_empty(0))
            tensors += [layer.norm_x.weight, layer.norm_x.bias, *((norm_s.weight, norm_s.bias) if norm_s is not None else no_source),
                        layer.attn.q.weight, layer.attn.q.bias, layer.attn.kv.weight, layer.attn.kv.bias, layer.attn.out.weight,
                        layer.attn.out.bias, layer.norm_ff.weight, layer.norm_ff.bias, layer.ff1.weight, layer.ff1.bias,
                        layer.ff2.weight, layer.ff2.bias]
        tensors += [self.norm.weight, self.norm.bias]
        first = self.layers[0]
        rates = (first.attn.dropout, first.relu_dropout, first.res_dropout) if self.training else (0.0, 0.0, 0.0)
        return tensors, [len(self.layers), first.attn.heads, int(last_only)], [self.norm.eps, *rates]


def run_stacks(calls, return_attention=False, last_only=False) -> list[tuple]:
    """Independent transformer stacks: ``calls`` holds (transformer, x, mask, source, source_mask);
    returns each one's (output, attention maps or None), as its ``forward`` would.

    On the compiled path the stacks are one autograd node (``stacks`` in mskt/csrc/cpu_kernels.cpp):
    one Python-to-C++ crossing per group instead of several per layer. When the stacks' estimated
    costs balance across torch's threads they run side by side, each on one thread (MOSI's six
    cross-modal stacks: 60 ms against 65 ms one at a time on two threads); otherwise one at a time on
    all of them. Otherwise each runs its own ``forward``, one after the other.
    """
    if all(t.compiled(x, return_attention) for t, x, *_ in calls):
        tensors, ints, doubles = [], [], []
        for t, x, mask, source, source_mask in calls:
            stack_tensors, stack_ints, stack_doubles = t.compiled_inputs(x, mask, source, source_mask, last_only)
            tensors += stack_tensors
            ints += stack_ints
            doubles += stack_doubles
        return [(y, None) for y in compiled_kernels().stacks(tensors, ints, doubles)]
    return [t(x, mask, source, source_mask, return_attention, last_only) for t, x, mask, source, source_mask in calls]


class ModalityEncoder(nn.Module):
    """Temporal Conv1d projection to width d, then (optionally) self-attention layers: f_m."""

    def __init__(self, cfg: ModelConfig, modality: str):
        super().__init__()
        k = getattr(cfg, f"{modality}_kernel")
        self.proj = nn.Conv1d(cfg.dim(modality), cfg.d_model, kernel_size=k, padding=(k - 1) // 2, bias=False)
        self.transformer = None
        if cfg.encoder_layers:
            self.transformer = Transformer(
                cfg.d_model, cfg.heads, cfg.encoder_layers, cfg.attn_dropout_for(modality),
                cfg.relu_dropout, cfg.res_dropout, cfg.embed_dropout, cpu_kernels=cfg.cpu_kernels,
            )

    def forward(self, x, mask):
        x = self.proj(x.transpose(1, 2)).transpose(1, 2)  # (B, T, D) -> (B, T, d)
        if self.transformer is not None:
            x, _ = self.transformer(x, mask)
        return x


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


class CTCAligner(nn.Module):
    """MulT's baseline recipe for unaligned data: predict, for each target step, a distribution over
    source steps (plus blank) and take the expectation of the source; trained with torch's CTC loss
    so the source steps appear in order. Maps a (B, S, D) sequence onto ``steps`` target steps."""

    def __init__(self, in_dim: int, steps: int):
        super().__init__()
        self.steps = steps
        self.lstm = nn.LSTM(in_dim, steps + 1, batch_first=True)  # +1: the blank

    def forward(self, x):
        logits, _ = self.lstm(x)  # (B, S, steps + 1)
        probs = logits.softmax(dim=2)[:, :, 1:]  # (B, S, steps): drop the blank
        aligned = probs.transpose(1, 2) @ x  # (B, steps, D)
        return aligned, logits

    def loss(self, logits):
        """CTC over every source step, padding included, as MulT's baseline recipe does."""
        B, S, _ = logits.shape
        log_probs = logits.log_softmax(dim=2).transpose(0, 1)  # (S, B, steps + 1) as ctc_loss wants
        targets = torch.arange(1, self.steps + 1, device=logits.device).repeat(B, 1)  # (B, steps)
        in_len = torch.full((B,), S, dtype=torch.long, device=logits.device)
        tgt_len = torch.full((B,), self.steps, dtype=torch.long, device=logits.device)
        return F.ctc_loss(log_probs, targets, in_len, tgt_len, zero_infinity=True)


# ----------------------------------------------------------------------------------------------
# The model


@dataclass
class Output:
    pred: torch.Tensor  # (B,) regression or (B, 4, 2) emotion logits
    internals: dict = field(default_factory=dict)  # f_*, audio_from_vision / _language, audio_reconstruction
    attention: dict | None = None  # "source->target" -> list over layers of (B, heads, T, S)
    aux: dict = field(default_factory=dict)  # training-only tensors the loss needs


class KTMulT(nn.Module):
    """MulT with knowledge transfer: L and V predict the audio features (theta, phi), delta fuses them
    into A', and cross-modal transformers among L, V and A' (or real A) feed a self-attention decoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        d = cfg.d_model
        present = VARIANT_MODALITIES[cfg.variant]
        # Modality encoders for what the prediction path reads. kt's "audio" is A', built from text and
        # vision; it encodes real audio only as a learned consistency target (aux, teacher), never raw.
        encoded = set(present)
        if cfg.variant == "kt" and cfg.kt_target == "raw":
            encoded.discard("audio")
        self.encoders = nn.ModuleDict({m: ModalityEncoder(cfg, m) for m in MODALITIES if m in encoded})

        def stack(layers, dropout, cross=False):
            return Transformer(d, cfg.heads, layers, dropout, cfg.relu_dropout, cfg.res_dropout, cfg.embed_dropout, cross, cfg.cpu_kernels)

        if cfg.variant == "kt":
            self.theta = stack(cfg.kt_layers, cfg.attn_dropout_vision)  # V -> A
            self.phi = stack(cfg.kt_layers, cfg.attn_dropout)  # L -> A
            self.delta_in = nn.Linear(2 * d, d)  # [theta(f_V) || phi(f_L)] -> d
            self.delta = stack(cfg.kt_layers, cfg.attn_dropout_audio)
            if cfg.kt_target == "aux":
                self.aux_head = nn.Linear(d, cfg.n_outputs)  # training-only: keeps f_A informative
            if cfg.kt_target == "raw":
                self.audio_readout = nn.Linear(d, cfg.audio_dim)  # shared by theta, phi, delta: d -> audio features
                # Training-set statistics per audio feature (set by train()); saved with the weights.
                self.register_buffer("audio_mean", torch.zeros(cfg.audio_dim))
                self.register_buffer("audio_std", torch.ones(cfg.audio_dim))
        if cfg.variant == "kt_any":
            # For each target m and each other source s, a stack predicting m from f_s on s's grid
            # (like theta, phi); a delta per target fuses the present sources' mean into m'.
            self.transfer = nn.ModuleDict(
                {f"{s}->{m}": stack(cfg.kt_layers, cfg.attn_dropout_for(s)) for m in MODALITIES for s in MODALITIES if s != m}
            )
            self.fuse = nn.ModuleDict({m: stack(cfg.kt_layers, cfg.attn_dropout_for(m)) for m in MODALITIES})
            # One readout per target, shared by its predictions and m': d -> m's standardised features.
            self.readout = nn.ModuleDict({m: nn.Linear(d, cfg.dim(m)) for m in MODALITIES})
            for m in MODALITIES:  # training-set statistics per feature (set by train()); saved with the weights
                self.register_buffer(f"{m}_mean", torch.zeros(cfg.dim(m)))
                self.register_buffer(f"{m}_std", torch.ones(cfg.dim(m)))

        self.ctc = None
        if cfg.ctc_align:
            # Onto the text grid: the sources that the prediction path reads besides text.
            steps = cfg.text_steps
            # kt's audio is a consistency target only, never an input: it is not aligned.
            inputs = [m for m in present if m != "text" and not (cfg.variant == "kt" and m == "audio")]
            self.ctc = nn.ModuleDict({m: CTCAligner(cfg.dim(m), steps) for m in inputs})

        # Cross-modal transformers: for each target, one from each other present modality.
        self.targets = cfg.target_modalities()
        self.crossmodal = nn.ModuleDict()
        for t in self.targets:
            for s in present:
                if s != t:
                    self.crossmodal[f"{s}->{t}"] = stack(cfg.crossmodal_layers, cfg.attn_dropout_for(s), cross=True)
        # Self-attention decoder ("memory") per target, over the concatenated cross-modal outputs.
        self.memory = nn.ModuleDict()
        head_in = 0
        for t in self.targets:
            width = d * max(1, len(present) - 1)
            heads = cfg.heads if width % cfg.heads == 0 else 1
            self.memory[t] = Transformer(
                width, heads, cfg.memory_layers, cfg.attn_dropout, cfg.relu_dropout, cfg.res_dropout, cfg.embed_dropout,
                cpu_kernels=cfg.cpu_kernels,
            )
            head_in += width
        self.proj1 = nn.Linear(head_in, head_in)
        self.proj2 = nn.Linear(head_in, head_in)
        self.out = nn.Linear(head_in, cfg.n_outputs)

    def freeze_audio_encoder(self) -> None:
        """Freeze the audio encoder (a teacher's, for kt_target='teacher'): no gradient, no dropout."""
        for p in self.encoders["audio"].parameters():
            p.requires_grad_(False)
        self.audio_frozen = True
        self.encoders["audio"].eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "audio_frozen", False):
            self.encoders["audio"].eval()  # a frozen teacher gives the same target every epoch
        return self

    def set_audio_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-feature training-set mean and std of audio, the standardisation of kt_target='raw'."""
        self.audio_mean.copy_(mean)
        self.audio_std.copy_(std.clamp(min=1e-6))

    # -- the knowledge-transfer network -------------------------------------------------------

    def reconstruct_audio(self, f_text, f_vision, masks, lengths):
        """theta(f_V), phi(f_L) and A' = delta([theta(f_V) || phi(f_L)]), all (B, T_text, d) except
        theta's own output, which stays on the vision grid for its consistency loss."""
        (from_vision, _), (from_language, _) = run_stacks(
            [(self.theta, f_vision, masks["vision"], None, None), (self.phi, f_text, masks["text"], None, None)]
        )  # (B, T_v, d), (B, T_l, d)
        T_l = f_text.shape[1]
        from_vision_on_text = from_vision
        if from_vision.shape[1] != T_l:
            from_vision_on_text = resample(from_vision, lengths["vision"], T_l, lengths["text"])  # (B, T_l, d)
        fused = self.delta_in(torch.cat([from_vision_on_text, from_language], dim=2))  # (B, T_l, 2d) -> (B, T_l, d)
        reconstruction, _ = self.delta(fused, masks["text"])  # (B, T_l, d)
        return from_vision, from_language, reconstruction

    # -- kt_any: any missing modality, per sample (beyond the paper) ---------------------------

    def set_statistics(self, modality: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-feature training-set mean and std of ``modality``, kt_any's standardisation of its targets."""
        getattr(self, f"{modality}_mean").copy_(mean)
        getattr(self, f"{modality}_std").copy_(std.clamp(min=1e-6))

    def standardised(self, modality: str, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """kt_any's consistency target: ``x`` (B, T, D_m) standardised per feature with the training
        statistics, 0 at padded steps. What ``readout[modality]`` of a reconstruction is compared with."""
        real = key_mask(lengths, x.shape[1])[..., None]  # (B, T, 1)
        return torch.where(real, (x - getattr(self, f"{modality}_mean")) / getattr(self, f"{modality}_std"), 0.0)

    def _missing_inputs(self, batch, feats, lengths):
        """(missing, given), each (B, 3) bool in MODALITIES order, True = missing; (None, None) when
        nothing can be missing. ``given``: ``batch["missing"]`` and modalities given as None (whose
        zeros are put in ``feats``, on the grid of a present modality). ``missing``: ``given`` plus, for
        kt_any in training, modality dropout: with probability cfg.modality_dropout a sample that
        misses nothing gets one of the six MISSING_PATTERNS (torch's global RNG, so runs repeat by seed).
        """
        cfg = self.cfg
        given = batch.get("missing")
        absent = [m for m, x in feats.items() if x is None]
        drop = self.training and cfg.variant == "kt_any" and cfg.modality_dropout > 0
        if given is None and not absent and not drop:
            return None, None
        ref = next((m for m, x in feats.items() if x is not None), None)
        if ref is None:
            raise ValueError(f"variant {cfg.variant!r}: every modality it reads ({', '.join(feats)}) is None")
        B, device = feats[ref].shape[0], feats[ref].device
        if given is None:
            given = torch.zeros(B, len(MODALITIES), dtype=torch.bool, device=device)
        else:
            given = given.to(device=device, dtype=torch.bool).clone()
            if tuple(given.shape) != (B, len(MODALITIES)):
                raise ValueError(f'batch["missing"] must be (batch, 3) bool in the order {MODALITIES}, found {tuple(given.shape)}')
        for m in absent:  # missing for every sample: zeros on a present modality's grid
            given[:, MODALITIES.index(m)] = True
            feats[m] = feats[ref].new_zeros(B, feats[ref].shape[1], cfg.dim(m))
            lengths[m] = lengths[ref]
        if cfg.variant == "kt_any" and bool(given.all(dim=1).any()):
            raise ValueError('batch["missing"]: a sample misses all three modalities; at least one must be present')
        missing = given
        if drop:
            patterns = torch.tensor([[m in p for m in MODALITIES] for p in MISSING_PATTERNS], device=device)  # (6, 3)
            chosen = patterns[torch.randint(len(MISSING_PATTERNS), (B,), device=device)]  # (B, 3)
            hit = (torch.rand(B, device=device) < cfg.modality_dropout) & ~given.any(dim=1)  # only samples missing nothing
            missing = given | (chosen & hit[:, None])
        return missing, given

    def reconstruct_missing(self, encoded, masks, lengths, missing, everything: bool) -> dict:
        """kt_any's knowledge transfer. For each target m: each other source s predicts m from f_s on
        s's grid (``{m}_from_{s}``); the predictions of the sources present for a sample, resampled
        onto m's grid, are averaged and fused by delta_m into m' (``reconstruction_{m}``, on m's grid).
        Where m is missing for a sample, m' replaces f_m in ``encoded`` (in place). ``everything``:
        reconstruct every modality (training, internals); else only those missing for some sample."""
        B = next(iter(encoded.values())).shape[0]
        device = next(iter(encoded.values())).device
        absent = missing if missing is not None else torch.zeros(B, len(MODALITIES), dtype=torch.bool, device=device)
        out = {}
        for i, m in enumerate(MODALITIES):
            if not everything and not bool(absent[:, i].any()):
                continue
            T_m = encoded[m].shape[1]
            total = torch.zeros_like(encoded[m])  # (B, T_m, d)
            count = torch.zeros(B, device=device)
            for j, s in enumerate(MODALITIES):
                if s == m:
                    continue
                y, _ = self.transfer[f"{s}->{m}"](encoded[s], masks[s])  # (B, T_s, d): m predicted from f_s
                out[f"{m}_from_{s}"] = y
                if y.shape[1] != T_m:
                    y = resample(y, lengths[s], T_m, lengths[m])  # (B, T_m, d)
                has = ~absent[:, j]  # (B,): the source is present for the sample
                total = total + torch.where(has[:, None, None], y, 0.0)
                count = count + has.to(total.dtype)
            mean = total / count.clamp(min=1)[:, None, None]  # (B, T_m, d): no present source -> zeros
            reconstruction, _ = self.fuse[m](mean, masks[m])  # (B, T_m, d): m'
            out[f"reconstruction_{m}"] = reconstruction
            encoded[m] = torch.where(absent[:, i, None, None], reconstruction, encoded[m])
        return out

    def any_targets(self, batch, given, lengths, encoded, masks, missing) -> dict:
        """kt_any's consistency targets: each modality's real features, standardised, on the grid of
        each prediction of it (``target_{m}_from_{s}`` on s's grid, ``target_{m}_fused`` on m's),
        behind a stop-gradient, with masks of the real steps of the samples that count: the target
        is real (not in ``given``: dropped modalities still have their features in training) and the
        source was present. ``{m}_features``: the standardised target on its own grid."""
        B = masks["text"].shape[0]
        device = masks["text"].device
        given = given if given is not None else torch.zeros(B, len(MODALITIES), dtype=torch.bool, device=device)
        absent = missing if missing is not None else given
        out = {}
        for i, m in enumerate(MODALITIES):
            x = batch.get(m)
            if x is None:
                continue
            x = torch.where(given[:, i, None, None], 0.0, x)  # a missing modality's values are never read
            len_m = batch["lengths"][m]
            target = self.standardised(m, x, len_m).detach()  # (B, T_raw, D_m): stop-gradient
            out[f"{m}_features"] = target
            real = ~given[:, i]  # (B,)
            any_source = torch.zeros(B, dtype=torch.bool, device=device)
            for j, s in enumerate(MODALITIES):
                if s == m:
                    continue
                T = encoded[s].shape[1]
                out[f"target_{m}_from_{s}"] = target if T == target.shape[1] else resample(target, len_m, T, lengths[s])
                out[f"mask_{m}_from_{s}"] = masks[s] & (real & ~absent[:, j])[:, None]
                any_source = any_source | ~absent[:, j]
            T = encoded[m].shape[1]
            out[f"target_{m}_fused"] = target if T == target.shape[1] else resample(target, len_m, T, lengths[m])
            out[f"mask_{m}_fused"] = masks[m] & (real & any_source)[:, None]
        return out

    # -- forward ------------------------------------------------------------------------------

    def forward(self, batch: dict, return_attention: bool = False, return_internals: bool = False) -> Output:
        """``batch``: text / audio / vision (B, T_m, D_m), lengths {m: (B,)}.

        Audio is read only by ``full`` and ``kt_any`` (as an input) and, in training or when internals
        are asked for, by ``kt`` (as the consistency target). The prediction never depends on it otherwise.

        ``batch["missing"]`` (optional): (B, 3) bool in MODALITIES order, True = that modality is
        missing for that sample. Its values are never read: they are replaced by zeros before
        anything else (zero imputation), and kt_any replaces its features by the reconstruction.
        A modality given as None is missing for every sample.
        """
        cfg = self.cfg
        present = VARIANT_MODALITIES[cfg.variant]
        lengths = dict(batch["lengths"])
        feats = {}
        for m in ("text", "vision") + (("audio",) if cfg.variant in ("full", "kt_any") else ()):
            if m in self.encoders:
                feats[m] = batch[m]
        missing, given = self._missing_inputs(batch, feats, lengths)  # (B, 3) bool each, or None
        if missing is not None:  # first of all: where, never multiply (NaN * 0 is NaN)
            for m in feats:
                feats[m] = torch.where(missing[:, MODALITIES.index(m), None, None], 0.0, feats[m])
        if "text" in feats:  # MulT's input dropout on the word vectors
            feats["text"] = dropout(feats["text"], cfg.embed_dropout, self.training, cfg.cpu_kernels == "fused")
        aux = {}
        if self.ctc is not None:
            T_l = batch["text"].shape[1]
            for m, aligner in self.ctc.items():
                feats[m], logits = aligner(feats[m])  # (B, T_l, D_m)
                aux[f"ctc_{m}"] = aligner.loss(logits)
                lengths[m] = lengths["text"]
        masks = {m: key_mask(lengths[m], x.shape[1]) for m, x in feats.items()}
        encoded = {m: self.encoders[m](x, masks[m]) for m, x in feats.items()}  # each (B, T_m, d)

        internals = {}
        if cfg.variant == "kt":
            from_vision, from_language, reconstruction = self.reconstruct_audio(encoded["text"], encoded["vision"], masks, lengths)
            encoded["audio"] = reconstruction  # A' on the text grid
            masks["audio"] = masks["text"]
            lengths["audio_grid"] = lengths["text"]
            internals.update(audio_from_vision=from_vision, audio_from_language=from_language, audio_reconstruction=reconstruction)
            if batch.get("audio") is not None and (self.training or return_internals):
                aux.update(self.audio_targets(batch, lengths, encoded, masks))
                internals["audio_features"] = aux["f_audio"]
        if cfg.variant == "kt_any":
            everything = self.training or return_internals  # the consistency loss needs every reconstruction
            internals.update(self.reconstruct_missing(encoded, masks, lengths, missing, everything))
            if everything:
                aux.update(self.any_targets(batch, given, lengths, encoded, masks, missing))
                internals.update({f"{m}_features": aux[f"{m}_features"] for m in MODALITIES if f"{m}_features" in aux})
            if missing is not None:
                internals["missing"] = missing
        if return_internals:
            internals.update({f"f_{m}": encoded[m] for m in present if m != "audio" or cfg.variant in ("full", "kt_any")})

        attention = {} if return_attention else None
        # Independent stacks go to run_stacks together: on the compiled path they run side by side.
        pairs = [(s, t) for t in self.targets for s in present if s != t]
        crossed = run_stacks([(self.crossmodal[f"{s}->{t}"], encoded[t], masks[t], encoded[s], masks[s]) for s, t in pairs],
                             return_attention)
        decoder_inputs = []
        for t in self.targets:
            if len(present) == 1:
                decoder_inputs.append(encoded[t])  # (B, T_t, d): a single modality goes straight to the decoder
                continue
            outs = [y for (s, target), (y, _) in zip(pairs, crossed) if target == t]  # each (B, T_t, d)
            decoder_inputs.append(torch.cat(outs, dim=2))  # (B, T_t, d * (n - 1))
        # Only the last step is read, so the last layer computes it alone (all of it for the maps).
        decoded = run_stacks([(self.memory[t], h, masks[t], None, None) for t, h in zip(self.targets, decoder_inputs)],
                             return_attention, last_only=not return_attention)
        if return_attention:  # per target: its cross-modal maps, then its decoder's
            for t, (_, decoder_maps) in zip(self.targets, decoded):
                attention.update({f"{s}->{t}": maps for (s, target), (_, maps) in zip(pairs, crossed) if target == t})
                attention[f"{t}->{t}"] = decoder_maps
        z = torch.cat([h[:, -1] for h, _ in decoded], dim=1)  # (B, head_in): left padding makes the last step real
        z = z + self.proj2(relu_dropout(self.proj1(z), cfg.out_dropout, self.training, cfg.cpu_kernels == "fused"))
        pred = self.out(z)  # (B, n_outputs)
        pred = pred.squeeze(1) if cfg.task == "regression" else pred.view(-1, 4, 2)  # (B,) or (B, 4, 2)
        return Output(pred=pred, internals=internals, attention=attention, aux=aux)

    def audio_targets(self, batch, lengths, encoded, masks) -> dict:
        """The consistency target f_A from real audio (never moved by the consistency loss) and, for
        kt_target='aux', the training-only audio head's prediction that keeps f_A informative."""
        audio = batch["audio"]
        a_mask = key_mask(batch["lengths"]["audio"], audio.shape[1])
        if self.cfg.kt_target == "raw":
            f_audio = (audio - self.audio_mean) / self.audio_std * a_mask[..., None]  # (B, T_a, D_a), padding 0
        else:
            f_audio = self.encoders["audio"](audio, a_mask)  # (B, T_a, d)
        out = {"f_audio": f_audio}
        if self.cfg.kt_target == "aux":
            aux_pred = self.aux_head(f_audio[:, -1])  # (B, n_outputs)
            out["aux_pred"] = aux_pred.squeeze(1) if self.cfg.task == "regression" else aux_pred.view(-1, 4, 2)
        target = f_audio.detach()  # stop-gradient: the consistency loss cannot move its own target
        len_a = batch["lengths"]["audio"]
        for name, m in (("vision", "vision"), ("language", "text")):
            T = encoded[m].shape[1]
            out[f"target_on_{name}"] = target if T == target.shape[1] else resample(target, len_a, T, lengths[m])
            out[f"mask_on_{name}"] = masks[m]  # real steps of the grid the prediction lives on (text grid under CTC)
        return out

    # -- loss ---------------------------------------------------------------------------------

    def loss(self, out: Output, labels: torch.Tensor) -> dict:
        """Every loss term (each a scalar tensor) and their weighted sum under "total".

        Task: L1 for sentiment regression (MulT), cross-entropy over 2 classes per emotion (IEMOCAP).
        Consistency (kt, training): L2 or L1 between theta(f_V), phi(f_L) and f_A on real steps.
        Consistency (kt_any, training): for each target m, ``consistency_{m}_from_{s}`` (each other
        source s, on samples where s is present) and ``consistency_{m}_fused`` (m'), on samples whose
        m is real; lambda_any times the mean of a target's three terms is added per target.
        """
        cfg = self.cfg
        terms = {"task": task_loss(out.pred, labels, cfg.task)}
        total = terms["task"]
        if cfg.variant == "kt" and "f_audio" in out.aux:
            for name, key, weight, m in (
                ("consistency_vision", "audio_from_vision", cfg.lambda_vision, "vision"),
                ("consistency_language", "audio_from_language", cfg.lambda_language, "text"),
                ("consistency_fused", "audio_reconstruction", cfg.lambda_fused, "text"),
            ):
                pred = out.internals[key]
                if cfg.kt_target == "raw":
                    pred = self.audio_readout(pred)  # (B, T, d) -> (B, T, D_a)
                on = "language" if m == "text" else "vision"
                target = out.aux[f"target_on_{on}"]
                mask = out.aux[f"mask_on_{on}"]  # the grid's real steps, as the forward pass used them
                terms[name] = consistency_loss(pred, target, mask, cfg.consistency)
                total = total + weight * terms[name]
            if "aux_pred" in out.aux:
                terms["aux_audio"] = task_loss(out.aux["aux_pred"], labels, cfg.task)
                total = total + cfg.lambda_aux * terms["aux_audio"]
        if cfg.variant == "kt_any":
            # Per target modality: its prediction from each other source and its fusion m', read out to
            # m's standardised features; lambda_any weights the mean of the three terms of each target.
            for m in MODALITIES:
                if f"target_{m}_fused" not in out.aux:
                    continue
                names = [f"from_{s}" for s in MODALITIES if s != m] + ["fused"]
                for name in names:
                    key = f"reconstruction_{m}" if name == "fused" else f"{m}_{name}"
                    pred = self.readout[m](out.internals[key])  # (B, T, d) -> (B, T, D_m)
                    terms[f"consistency_{m}_{name}"] = consistency_loss(pred, out.aux[f"target_{m}_{name}"], out.aux[f"mask_{m}_{name}"], cfg.consistency)
                total = total + cfg.lambda_any * sum(terms[f"consistency_{m}_{name}"] for name in names) / len(names)
        for key, value in out.aux.items():
            if key.startswith("ctc_"):
                terms[key] = value
                total = total + value
        terms["total"] = total
        return terms


def task_loss(pred, labels, task):
    if task == "regression":
        return F.l1_loss(pred, labels)
    return F.cross_entropy(pred.reshape(-1, 2), labels.reshape(-1))  # (B*4, 2) logits vs (B*4,) 0/1


def consistency_loss(pred, target, mask, kind):
    """Mean over real steps and channels of (pred - target)^2 (l2) or |pred - target| (l1)."""
    diff = pred - target
    err = diff.pow(2) if kind == "l2" else diff.abs()  # (B, T, d)
    if mask is None:
        return err.mean()
    w = mask[..., None].to(err.dtype)  # (B, T, 1)
    return (err * w).sum() / (w.sum() * err.shape[2]).clamp(min=1)


def build_model(cfg: ModelConfig, text_steps: int | None = None) -> KTMulT:
    """The model for ``cfg``; ``text_steps`` overrides the text grid length (used by ctc_align)."""
    if text_steps is not None:
        cfg.text_steps = text_steps
    return KTMulT(cfg)
