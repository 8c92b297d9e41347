"""The public MulT code's training computation, re-expressed: the baseline ``mskt bench --reference`` times.

The speed targets of this project are ratios against the public MulT implementation (Tsai et al.,
ACL 2019). Its code cannot be run here as it is (it breaks on current PyTorch, see REFERENCE.md),
so this module does, op for op, what its training step does, written for timing and nothing else:

- time-major tensors (T, B, d); a kernel-1 Conv1d projection per modality, no bias;
- each transformer: input scaled by sqrt(d), sinusoidal positions looked up per call from the
  input's non-zero entries (``masked_scatter`` of a range), dropout; for a cross-modal one the
  source is embedded twice, once as keys and once as values, each with its own dropout;
- pre-LayerNorm layers; the key and the value inputs normalised by the same LayerNorm, called
  twice; attention from a packed ``in_proj`` weight (one projection for self-attention, three for
  cross-modal), queries scaled, ``bmm``, softmax in float, ``F.dropout`` on the weights, ``bmm``,
  and the head-averaged weights computed whether used or not; FFN 4d with ReLU;
- the memory transformers run over every step, and the head reads the last;
- L1 loss, ``clip_grad_norm_`` 0.8 and ``torch.optim.Adam`` with torch's default implementation
  for CPU tensors (one parameter at a time).

No padding mask (the public code has none), so it is timed on full-length batches, as ``mskt bench``
does for every record. It is not used for training and not tested against mskt's model for values:
its dropout draws differ, and it has no knowledge transfer.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _positions(tokens: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """MulT's per-call position lookup: position i + 1 at non-zero entries, 0 (padding) elsewhere.
    tokens (B, T) -> (B, T, d)."""
    B, T = tokens.shape
    mask = tokens.ne(0)
    positions = torch.arange(1, T + 1, device=tokens.device).expand(B, T)
    positions = tokens.clone().long().masked_scatter_(mask, positions[mask])  # (B, T)
    return table.index_select(0, positions.reshape(-1)).view(B, T, -1).detach()


def _sinusoid(rows: int, d: int) -> torch.Tensor:
    half = d // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000) / (half - 1)))
    angles = torch.arange(rows, dtype=torch.float)[:, None] * freq[None, :]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if d % 2:
        table = torch.cat([table, torch.zeros(rows, 1)], dim=1)
    table[0] = 0  # the padding row
    return table


class MultiheadAttention(nn.Module):
    def __init__(self, d: int, heads: int, attn_dropout: float):
        super().__init__()
        self.d, self.heads, self.head_dim = d, heads, d // heads
        self.scaling = self.head_dim**-0.5
        self.attn_dropout = attn_dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d))
        nn.init.xavier_uniform_(self.in_proj_weight)
        self.out_proj = nn.Linear(d, d)

    def _proj(self, x, part):
        d = self.d
        return F.linear(x, self.in_proj_weight[part * d : (part + 1) * d], self.in_proj_bias[part * d : (part + 1) * d])

    def forward(self, query, key, value):
        T, B, d = query.shape
        if query is key and key is value:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            q, k, v = self._proj(query, 0), self._proj(key, 1), self._proj(value, 2)
        q = q * self.scaling
        q = q.contiguous().view(T, B * self.heads, self.head_dim).transpose(0, 1)  # (B * h, T, dh)
        k = k.contiguous().view(-1, B * self.heads, self.head_dim).transpose(0, 1)  # (B * h, S, dh)
        v = v.contiguous().view(-1, B * self.heads, self.head_dim).transpose(0, 1)  # (B * h, S, dh)
        S = k.shape[1]
        weights = torch.bmm(q, k.transpose(1, 2))  # (B * h, T, S)
        weights = F.softmax(weights.float(), dim=-1).type_as(weights)
        weights = F.dropout(weights, p=self.attn_dropout, training=self.training)
        attn = torch.bmm(weights, v)  # (B * h, T, dh)
        attn = attn.transpose(0, 1).contiguous().view(T, B, d)  # (T, B, d)
        attn = self.out_proj(attn)
        averaged = weights.view(B, self.heads, T, S).sum(dim=1) / self.heads  # returned by the public code
        return attn, averaged


class EncoderLayer(nn.Module):
    def __init__(self, d, heads, attn_dropout, relu_dropout=0.1, res_dropout=0.1):
        super().__init__()
        self.self_attn = MultiheadAttention(d, heads, attn_dropout)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.layer_norms = nn.ModuleList([nn.LayerNorm(d), nn.LayerNorm(d)])
        self.relu_dropout, self.res_dropout = relu_dropout, res_dropout

    def forward(self, x, x_k=None, x_v=None):
        residual = x
        x = self.layer_norms[0](x)
        if x_k is None:
            x, _ = self.self_attn(x, x, x)
        else:
            x_k, x_v = self.layer_norms[0](x_k), self.layer_norms[0](x_v)
            x, _ = self.self_attn(x, x_k, x_v)
        x = residual + F.dropout(x, p=self.res_dropout, training=self.training)
        residual = x
        x = F.relu(self.fc1(self.layer_norms[1](x)))
        x = F.dropout(x, p=self.relu_dropout, training=self.training)
        x = F.dropout(self.fc2(x), p=self.res_dropout, training=self.training)
        return residual + x


class Encoder(nn.Module):
    def __init__(self, d, heads, layers, attn_dropout, embed_dropout=0.25, max_steps=1024):
        super().__init__()
        self.d, self.embed_dropout = d, embed_dropout
        self.register_buffer("table", _sinusoid(max_steps + 1, d), persistent=False)
        self.layers = nn.ModuleList(EncoderLayer(d, heads, attn_dropout) for _ in range(layers))
        self.layer_norm = nn.LayerNorm(d)

    def _embed(self, x_in):
        x = math.sqrt(self.d) * x_in
        x = x + _positions(x_in.transpose(0, 1)[:, :, 0], self.table).transpose(0, 1)  # (T, B, d)
        return F.dropout(x, p=self.embed_dropout, training=self.training)

    def forward(self, x_in, x_in_k=None, x_in_v=None):
        x = self._embed(x_in)
        x_k = x_v = None
        if x_in_k is not None:
            x_k, x_v = self._embed(x_in_k), self._embed(x_in_v)
        for layer in self.layers:
            x = layer(x, x_k, x_v)
        return self.layer_norm(x)


class MULTModel(nn.Module):
    """MulT with all three modalities (mskt's ``full`` variant), the public defaults."""

    def __init__(self, dims: dict, d: int = 30, heads: int = 5, layers: int = 5, attn_dropout: float = 0.1,
                 attn_dropout_audio: float = 0.0, attn_dropout_vision: float = 0.0, embed_dropout: float = 0.25,
                 out_dropout: float = 0.0, n_outputs: int = 1):
        super().__init__()
        self.embed_dropout, self.out_dropout = embed_dropout, out_dropout
        self.proj = nn.ModuleDict({m: nn.Conv1d(dims[m], d, kernel_size=1, bias=False) for m in ("text", "audio", "vision")})
        # Attention dropout follows the source (keys) modality; the memories use the text's.
        source_dropout = {"text": attn_dropout, "audio": attn_dropout_audio, "vision": attn_dropout_vision}
        self.cross = nn.ModuleDict({
            f"{s}->{t}": Encoder(d, heads, layers, source_dropout[s])
            for t in ("text", "audio", "vision") for s in ("text", "audio", "vision") if s != t
        })
        self.memory = nn.ModuleDict({t: Encoder(2 * d, heads, max(layers, 3), attn_dropout) for t in ("text", "audio", "vision")})
        width = 6 * d
        self.proj1, self.proj2, self.out_layer = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, n_outputs)

    def forward(self, text, audio, vision):
        inputs = {"text": F.dropout(text.transpose(1, 2), p=self.embed_dropout, training=self.training),
                  "audio": audio.transpose(1, 2), "vision": vision.transpose(1, 2)}
        proj = {m: self.proj[m](x).permute(2, 0, 1) for m, x in inputs.items()}  # each (T_m, B, d)
        last = []
        for t in ("text", "audio", "vision"):
            h = torch.cat([self.cross[f"{s}->{t}"](proj[t], proj[s], proj[s]) for s in ("text", "audio", "vision") if s != t], dim=2)
            last.append(self.memory[t](h)[-1])  # (B, 2d): the last step of every step computed
        z = torch.cat(last, dim=1)  # (B, 6d)
        z = z + self.proj2(F.dropout(F.relu(self.proj1(z)), p=self.out_dropout, training=self.training))
        return self.out_layer(z)


def training_step(model: MULTModel, task: str = "regression", clip: float = 0.8, lr: float = 1e-3):
    """``step(batch)``: forward, loss (L1, or cross-entropy per emotion), backward, clipping, Adam,
    as the public code trains."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def step(batch: dict):
        model.zero_grad()
        pred = model(batch["text"], batch["audio"], batch["vision"])
        if task == "regression":
            loss = F.l1_loss(pred.view(-1), batch["labels"].float().view(-1))
        else:  # (B, 8) logits: two per emotion
            loss = F.cross_entropy(pred.view(-1, 2), batch["labels"].long().view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        return loss

    return step
