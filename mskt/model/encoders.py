"""Per-modality encoders (f_m) and MulT's CTC pseudo-alignment of unaligned sequences."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mskt.model.config import ModelConfig
from mskt.model.layers import Transformer


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
