"""The MulT backbone every variant shares: modality encoders, CTC alignment, cross-modal fusion,
the self-attention decoders and the head. A variant (``mskt/model/variants/``) subclasses it and
says what it reads, what it fuses and what it reconstructs, and how (``build_transfer``,
``reconstruct``, ``transfer_loss``).

Paper: Liu et al., "Multimodal sentiment analysis with missing modality: a knowledge-transfer
approach". Backbone: MulT (Tsai et al., ACL 2019). Shapes: B batch, T steps, d model width.

- **Padding.** Sequences are left-padded (see ``mskt.data.dataset``); the last step is always real
  and is what MulT's head reads. Keys at padded steps are masked in every attention.
- **Missing modalities.** ``batch["missing"]`` (B, 3) marks, per sample, which modalities are
  missing; the first thing forward does is replace their values by zeros with ``torch.where``
  (never read, NaN-safe): the zero-imputation baseline of every variant that does not reconstruct.
  In training, a missing protocol (``mskt.data.missing.TrainingProtocol``, drawn by the training
  loop for any variant) adds ``batch["dropped"]`` (B, 3) and ``batch["dropped_steps"]``
  {m: (B, T_m)}: removed from the prediction path in the same way, but their real values stay in
  the batch as training targets.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mskt.modalities import MODALITIES
from mskt.model.base import Model, Output  # noqa: F401 -- Output: its historical home
from mskt.model.config import ModelConfig
from mskt.model.encoders import CTCAligner, ModalityEncoder
from mskt.model.layers import TORCH_KERNELS, Transformer, dropout_key, key_mask, run_stacks
from mskt.model.losses import task_loss

# The order the encoders run in.
ENCODING_ORDER = ("text", "vision", "audio")


class MulT(Model):
    """MulT: cross-modal transformers among the fused modalities feed a self-attention decoder per
    target modality, whose last steps a residual MLP head reads.

    What a variant declares (``inputs``, ``fuses``, ``reconstructs``, ``test_missing``) and the
    hooks the rest of mskt asks are those of :class:`mskt.model.base.Model`.
    """

    has_attention = True

    @classmethod
    def searched_fields(cls, cfg: ModelConfig) -> tuple:
        # Widths, depths and dropouts; a temporal kernel per modality read; an attention dropout per
        # non-text modality fused (text's is attn_dropout); the transfer depth when it reconstructs.
        fields = ("d_model", "heads", "crossmodal_layers", "memory_layers", "encoder_layers", "attn_dropout", "relu_dropout",
                  "res_dropout", "embed_dropout", "out_dropout")
        fields += tuple(f"{m}_kernel" for m in cls.inputs)
        fields += tuple(f"attn_dropout_{m}" for m in cls.fuses if m != "text")
        return fields + (("kt_layers",) if cls.reconstructs else ())

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.kernels = TORCH_KERNELS
        d = cfg.d_model
        self.encoders = nn.ModuleDict({m: ModalityEncoder(cfg, m) for m in MODALITIES if m in self.encoded_modalities()})
        self.build_transfer()
        self.ctc = None
        if cfg.ctc_align:  # onto the text grid: the sources that the prediction path reads besides text
            self.ctc = nn.ModuleDict({m: CTCAligner(cfg.dim(m), cfg.text_steps) for m in self.fuses if m in self.inputs and m != "text"})

        # Cross-modal transformers: for each target, one from each other fused modality.
        self.targets = cfg.target_modalities()
        self.crossmodal = nn.ModuleDict()
        for t in self.targets:
            for s in self.fuses:
                if s != t:
                    self.crossmodal[f"{s}->{t}"] = self.stack(cfg.crossmodal_layers, cfg.attn_dropout_for(s), cross=True)
        # Self-attention decoder ("memory") per target, over the concatenated cross-modal outputs.
        self.memory = nn.ModuleDict()
        head_in = 0
        for t in self.targets:
            width = d * max(1, len(self.fuses) - 1)
            heads = cfg.heads if width % cfg.heads == 0 else 1
            self.memory[t] = Transformer(width, heads, cfg.memory_layers, cfg.attn_dropout, cfg.relu_dropout, cfg.res_dropout, cfg.embed_dropout)
            head_in += width
        self.proj1 = nn.Linear(head_in, head_in)
        self.proj2 = nn.Linear(head_in, head_in)
        self.out = nn.Linear(head_in, cfg.n_outputs)

    def stack(self, layers: int, attn_dropout: float, cross: bool = False) -> Transformer:
        """A transformer stack of the model's width, heads and dropouts."""
        cfg = self.cfg
        return Transformer(cfg.d_model, cfg.heads, layers, attn_dropout, cfg.relu_dropout, cfg.res_dropout, cfg.embed_dropout, cross)

    # -- what a variant adds --------------------------------------------------------------------

    def encoded_modalities(self) -> tuple:
        """The modalities that get an encoder (f_m)."""
        return self.inputs

    def build_transfer(self) -> None:
        """Create the variant's own modules (called after the encoders, before the fusion)."""

    def reconstruct(self, batch: dict, encoded: dict, masks: dict, lengths: dict, missing, given, return_internals: bool) -> tuple[dict, dict]:
        """Reconstruct what the variant reconstructs: update ``encoded`` / ``masks`` / ``lengths`` in
        place (e.g. put A' in ``encoded["audio"]``); return (internals, aux for the loss)."""
        return {}, {}

    def transfer_loss(self, out: Output, labels: torch.Tensor, terms: dict) -> list:
        """Put the variant's loss terms into ``terms`` and return the weighted ones to add to the total, in order."""
        return []

    # -- forward ------------------------------------------------------------------------------

    def forward(self, batch: dict, return_attention: bool = False, return_internals: bool = False) -> Output:
        """``batch``: text / audio / vision (B, T_m, D_m), lengths {m: (B,)}.

        Only the modalities in ``inputs`` are read on the prediction path; a variant may read others
        as training targets (in training, or when internals are asked for).

        ``batch["missing"]`` (optional): (B, 3) bool in MODALITIES order, True = that modality is
        missing for that sample. Its values are never read: they are replaced by zeros before
        anything else (zero imputation); a variant that reconstructs them replaces their features.
        A modality given as None is missing for every sample.

        ``batch["dropped"]`` (B, 3) and ``batch["dropped_steps"]`` {m: (B, T_m)} (optional, from a
        training protocol): missing / zeroed for the prediction path in the same way, while their real
        values may still serve as training targets (kt_any's consistency terms).
        """
        cfg = self.cfg
        lengths = dict(batch["lengths"])
        feats = {m: batch[m] for m in ENCODING_ORDER if m in self.inputs}
        missing, given = self._missing_inputs(batch, feats, lengths)  # (B, 3) bool each, or None
        if missing is not None:  # first of all: where, never multiply (NaN * 0 is NaN)
            for m in feats:
                feats[m] = torch.where(missing[:, MODALITIES.index(m), None, None], 0.0, feats[m])
        for m, drop in (batch.get("dropped_steps") or {}).items():  # a training protocol's dropped steps
            if m in feats and batch.get(m) is not None:
                feats[m] = torch.where(drop.to(feats[m].device)[..., None], 0.0, feats[m])
        if "text" in feats:  # MulT's input dropout on the word vectors
            feats["text"] = self.kernels.dropout(feats["text"], cfg.embed_dropout, dropout_key(self, "text_input", cfg.embed_dropout, feats["text"]))
        aux = {}
        if self.ctc is not None:
            for m, aligner in self.ctc.items():
                feats[m], logits = aligner(feats[m])  # (B, T_l, D_m)
                aux[f"ctc_{m}"] = aligner.loss(logits)
                lengths[m] = lengths["text"]
        masks = {m: key_mask(lengths[m], x.shape[1]) for m, x in feats.items()}
        encoded = {m: self.encoders[m](x, masks[m]) for m, x in feats.items()}  # each (B, T_m, d)

        internals, transfer_aux = self.reconstruct(batch, encoded, masks, lengths, missing, given, return_internals)
        aux.update(transfer_aux)
        if return_internals:
            internals.update({f"f_{m}": encoded[m] for m in self.fuses if m in self.inputs})

        attention = {} if return_attention else None
        # Independent stacks go to run_stacks together: an accelerator may run them side by side.
        pairs = [(s, t) for t in self.targets for s in self.fuses if s != t]
        crossed = run_stacks([(self.crossmodal[f"{s}->{t}"], encoded[t], masks[t], encoded[s], masks[s]) for s, t in pairs],
                             return_attention)
        decoder_inputs = []
        for t in self.targets:
            if len(self.fuses) == 1:
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
        h = self.proj1(z)  # (B, head_in)
        z = z + self.proj2(self.kernels.relu_dropout(h, cfg.out_dropout, dropout_key(self, "head", cfg.out_dropout, h)))
        pred = self.out(z)  # (B, n_outputs)
        pred = pred.squeeze(1) if cfg.task == "regression" else pred.view(-1, 4, 2)  # (B,) or (B, 4, 2)
        grids = {m: mask.sum(dim=1) for m, mask in masks.items() if m in self.fuses} if return_attention or return_internals else None
        return Output(pred=pred, internals=internals, attention=attention, aux=aux, lengths=grids)

    # -- loss ---------------------------------------------------------------------------------

    def loss(self, out: Output, labels: torch.Tensor) -> dict:
        """Every loss term (each a scalar tensor) and their weighted sum under "total".

        Task: L1 for sentiment regression (MulT), cross-entropy over 2 classes per emotion (IEMOCAP).
        Then the variant's terms (:meth:`transfer_loss`), then CTC's.
        """
        terms = {"task": task_loss(out.pred, labels, self.cfg.task, self.loss_denominator())}
        total = terms["task"]
        for weighted in self.transfer_loss(out, labels, terms):
            total = total + weighted
        for key, value in out.aux.items():
            if key.startswith("ctc_"):
                terms[key] = value
                total = total + value
        terms["total"] = total
        return terms
