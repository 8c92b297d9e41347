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
- **Padding.** Sequences are left-padded (see ``mskt.dataset``); the last step is always real and is
  what MulT's head reads. Keys at padded steps are masked in every attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

MODALITIES = ("text", "audio", "vision")
VARIANTS = ("full", "kt", "language_vision", "language", "vision")
# Which inputs each variant fuses. "audio" is real audio for full, the reconstruction A' for kt.
VARIANT_MODALITIES = {
    "full": ("text", "audio", "vision"),
    "kt": ("text", "audio", "vision"),
    "language_vision": ("text", "vision"),
    "language": ("text",),
    "vision": ("vision",),
}


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
    # Unaligned data: MulT's baseline recipe, a learned CTC pseudo-alignment onto the text grid.
    ctc_align: bool = False

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
            if getattr(self, key) < 1 or getattr(self, key) % 2 == 0:  # "same" padding needs an odd kernel
                raise ConfigError(f"{key} must be an odd number >= 1, found {getattr(self, key)}")
        if self.encoder_layers < 0:
            raise ConfigError(f"encoder_layers must be >= 0, found {self.encoder_layers}")


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

    The default path is torch's fused ``scaled_dot_product_attention``; ``return_attention=True``
    takes the explicit path, which computes the same function and also returns the weights.
    """

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x, source, source_mask, return_attention=False):
        B, T, d = x.shape
        S = source.shape[1]
        h, dh = self.heads, d // self.heads
        q = self.q(x).view(B, T, h, dh).transpose(1, 2)  # (B, h, T, dh)
        k, v = self.kv(source).view(B, S, 2, h, dh).permute(2, 0, 3, 1, 4)  # each (B, h, S, dh)
        mask = source_mask[:, None, None, :]  # (B, 1, 1, S), True = attend
        p = self.dropout if self.training else 0.0
        if return_attention:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(dh)  # (B, h, T, S)
            weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            y = F.dropout(weights, p, self.training) @ v  # (B, h, T, dh)
        else:
            weights = None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, h, T, dh)
        y = y.transpose(1, 2).reshape(B, T, d)  # (B, T, d)
        return self.out(y), weights


class TransformerLayer(nn.Module):
    """Pre-LayerNorm layer. Cross-modal when given a source: queries from x, keys/values from the
    (separately normalised) source, residual back onto x, as MulT does."""

    def __init__(self, d: int, heads: int, attn_dropout: float, relu_dropout: float, res_dropout: float, cross: bool):
        super().__init__()
        self.norm_x = nn.LayerNorm(d)
        self.norm_source = nn.LayerNorm(d) if cross else None
        self.attn = Attention(d, heads, attn_dropout)
        self.norm_ff = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, 4 * d)
        self.ff2 = nn.Linear(4 * d, d)
        self.relu_dropout = relu_dropout
        self.res_dropout = res_dropout

    def forward(self, x, x_mask, source=None, source_mask=None, return_attention=False):
        h = self.norm_x(x)
        if source is None:
            kv, kv_mask = h, x_mask
        else:
            kv, kv_mask = self.norm_source(source), source_mask
        a, weights = self.attn(h, kv, kv_mask, return_attention)
        x = x + F.dropout(a, self.res_dropout, self.training)
        h = F.dropout(F.relu(self.ff1(self.norm_ff(x))), self.relu_dropout, self.training)
        x = x + F.dropout(self.ff2(h), self.res_dropout, self.training)
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
        self.layers = nn.ModuleList(
            TransformerLayer(d, heads, attn_dropout, relu_dropout, res_dropout, cross) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d)

    def embed(self, x, mask):
        B, T, d = x.shape
        table = sinusoidal_table(T, d).to(x)  # (T, d)
        first_real = T - mask.sum(dim=1, keepdim=True)  # (B, 1)
        pos = (torch.arange(T, device=x.device)[None, :] - first_real).clamp(min=0)  # (B, T)
        x = math.sqrt(d) * x + table[pos] * mask[..., None]  # (B, T, d); padding gets no position
        return F.dropout(x, self.embed_dropout, self.training)

    def forward(self, x, mask, source=None, source_mask=None, return_attention=False):
        x = self.embed(x, mask)
        if source is not None:
            source = self.embed(source, source_mask)
        maps = []
        for layer in self.layers:
            x, w = layer(x, mask, source, source_mask, return_attention)
            maps.append(w)
        return self.norm(x), (maps if return_attention else None)


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
                cfg.relu_dropout, cfg.res_dropout, cfg.embed_dropout,
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
            return Transformer(d, cfg.heads, layers, dropout, cfg.relu_dropout, cfg.res_dropout, cfg.embed_dropout, cross)

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
                width, heads, cfg.memory_layers, cfg.attn_dropout, cfg.relu_dropout, cfg.res_dropout, cfg.embed_dropout
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
        from_vision, _ = self.theta(f_vision, masks["vision"])  # (B, T_v, d)
        from_language, _ = self.phi(f_text, masks["text"])  # (B, T_l, d)
        T_l = f_text.shape[1]
        from_vision_on_text = from_vision
        if from_vision.shape[1] != T_l:
            from_vision_on_text = resample(from_vision, lengths["vision"], T_l, lengths["text"])  # (B, T_l, d)
        fused = self.delta_in(torch.cat([from_vision_on_text, from_language], dim=2))  # (B, T_l, 2d) -> (B, T_l, d)
        reconstruction, _ = self.delta(fused, masks["text"])  # (B, T_l, d)
        return from_vision, from_language, reconstruction

    # -- forward ------------------------------------------------------------------------------

    def forward(self, batch: dict, return_attention: bool = False, return_internals: bool = False) -> Output:
        """``batch``: text / audio / vision (B, T_m, D_m), lengths {m: (B,)}.

        Audio is read only by ``full`` (as an input) and, in training or when internals are asked
        for, by ``kt`` (as the consistency target). The prediction never depends on it otherwise.
        """
        cfg = self.cfg
        present = VARIANT_MODALITIES[cfg.variant]
        lengths = dict(batch["lengths"])
        feats = {}
        for m in ("text", "vision") + (("audio",) if cfg.variant == "full" else ()):
            if m in self.encoders:
                feats[m] = batch[m]
        if "text" in feats:  # MulT's input dropout on the word vectors
            feats["text"] = F.dropout(feats["text"], cfg.embed_dropout, self.training)
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
        if return_internals:
            internals.update({f"f_{m}": encoded[m] for m in present if m != "audio" or cfg.variant == "full"})

        attention = {} if return_attention else None
        last_steps = []
        for t in self.targets:
            if len(present) == 1:
                h = encoded[t]  # (B, T_t, d): a single modality goes straight to the decoder
            else:
                outs = []
                for s in present:
                    if s == t:
                        continue
                    y, maps = self.crossmodal[f"{s}->{t}"](encoded[t], masks[t], encoded[s], masks[s], return_attention)
                    outs.append(y)  # (B, T_t, d)
                    if return_attention:
                        attention[f"{s}->{t}"] = maps
                h = torch.cat(outs, dim=2)  # (B, T_t, d * (n - 1))
            h, maps = self.memory[t](h, masks[t], return_attention=return_attention)
            if return_attention:
                attention[f"{t}->{t}"] = maps
            last_steps.append(h[:, -1])  # (B, width): left padding makes the last step real
        z = torch.cat(last_steps, dim=1)  # (B, head_in)
        z = z + self.proj2(F.dropout(F.relu(self.proj1(z)), cfg.out_dropout, self.training))
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
