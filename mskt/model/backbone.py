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

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from mskt.modalities import MODALITIES
from mskt.model.config import ModelConfig
from mskt.model.encoders import CTCAligner, ModalityEncoder
from mskt.model.layers import TORCH_KERNELS, Transformer, dropout_key, key_mask, run_stacks, set_dropout_context
from mskt.model.losses import task_loss
from mskt.model.options import Options, option_fields

# The order the encoders run in.
ENCODING_ORDER = ("text", "vision", "audio")


@dataclass
class Output:
    pred: torch.Tensor  # (B,) regression or (B, 4, 2) emotion logits
    internals: dict = field(default_factory=dict)  # f_*, reconstructions and their targets (return_internals)
    attention: dict | None = None  # "source->target" -> list over layers of (B, heads, T, S)
    aux: dict = field(default_factory=dict)  # training-only tensors the loss needs
    # With return_attention or return_internals: {m: (B,)} real steps of the grid each fused modality
    # lived on in this forward (A' of kt on the text grid; every grid the text's under CTC).
    lengths: dict | None = None


class MulT(nn.Module):
    """MulT: cross-modal transformers among the fused modalities feed a self-attention decoder per
    target modality, whose last steps a residual MLP head reads.

    What a variant declares (class attributes; code outside the model reads these, never names):

    - ``inputs``: the modalities the prediction path reads from the batch.
    - ``fuses``: the modalities the cross-modal transformers attend among (a reconstruction counts
      as the modality it stands for).
    - ``reconstructs``: the modalities it rebuilds from the others. Its internals then hold
      ``{m}_reconstruction`` (B, T, d), its per-source predictions ``{m}_from_*``, in training or
      with ``return_internals`` its target ``{m}_features``, and :meth:`read_out` maps a
      reconstruction to the units of that target where it can.
    - ``test_missing``: the modalities missing in its default (the paper's) test setting.
    """

    name = "base"
    Options = Options  # the variant's own options (mskt.model.options); the backbone has none
    inputs: tuple = ()
    fuses: tuple = ()
    reconstructs: tuple = ()
    test_missing: tuple = ("audio",)

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        """Raise ``ConfigError`` for settings this variant cannot take."""

    @classmethod
    def uses_teacher(cls, cfg: ModelConfig) -> bool:
        """Whether training must load a teacher run's audio encoder into it (``freeze_audio_encoder``)."""
        return False

    @classmethod
    def searched_options(cls, cfg: ModelConfig) -> tuple:
        """The variant's options that ``mskt tune`` searches under ``cfg`` (beside the backbone's
        fields): by default each option that declares a ``search`` range (mskt.model.options)."""
        return tuple(name for name, f in option_fields(cls.Options).items() if f.metadata.get("search"))

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

    def drops_modalities(self) -> float:
        """The variant's own training protocol (``train_missing="auto"``), as a float in [0, 1]: the
        share of training samples the loop gives one of the six missing patterns
        (``TrainingProtocol("patterns", share)``); 0.0, the default, gives none."""
        return 0.0

    def check_missing(self, given: torch.Tensor) -> None:
        """Refuse missing patterns the variant cannot predict from (``given``: (B, 3) bool)."""

    def reconstruction_sources(self, modality: str) -> dict:
        """{label: (internals key, grid modality)} of each reconstruction of ``modality``: the
        prediction from each other modality (``{m}_from_{s}``, on s's grid) and the fused one
        (``{m}_reconstruction``, on m's grid). Analyses read these; a variant that names or places
        them otherwise overrides it."""
        sources = {s: (f"{modality}_from_{s}", s) for s in MODALITIES if s != modality}
        sources["fused"] = (f"{modality}_reconstruction", modality)
        return sources

    def read_out(self, modality: str, reconstruction: torch.Tensor) -> torch.Tensor | None:
        """A reconstruction of ``modality`` (B, T, d) read out to its real features (B, T, D_m) in the
        units of ``{modality}_features``, or None where the variant reconstructs in another space."""
        return None

    # -- statistics the consistency targets are standardised with -----------------------------

    def standardises(self) -> tuple:
        """The modalities whose training-set feature statistics ``set_statistics`` wants (train() sets them)."""
        return ()

    def set_statistics(self, modality: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-feature training-set mean and std of ``modality``, the standardisation of its targets."""
        getattr(self, f"{modality}_mean").copy_(mean)
        getattr(self, f"{modality}_std").copy_(std.clamp(min=1e-6))

    def standardised(self, modality: str, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, D_m) standardised per feature with the training statistics, 0 at padded steps."""
        real = key_mask(lengths, x.shape[1])[..., None]  # (B, T, 1)
        return torch.where(real, (x - getattr(self, f"{modality}_mean")) / getattr(self, f"{modality}_std"), 0.0)

    # -- forward ------------------------------------------------------------------------------

    def _missing_inputs(self, batch, feats, lengths):
        """(missing, given), each (B, 3) bool in MODALITIES order, True = missing; (None, None) when
        nothing can be missing. ``given``: ``batch["missing"]`` and modalities given as None (whose
        zeros are put in ``feats``, on the grid of a present modality). ``missing``: ``given`` plus
        ``batch["dropped"]`` (a training protocol's drops, which keep their values as targets) for
        the samples that miss nothing in the data.
        """
        cfg = self.cfg
        given = batch.get("missing")
        dropped = batch.get("dropped")
        absent = [m for m, x in feats.items() if x is None]
        if given is None and not absent and dropped is None:
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
        self.check_missing(given)
        missing = given
        if dropped is not None:
            dropped = dropped.to(device=device, dtype=torch.bool)
            if tuple(dropped.shape) != (B, len(MODALITIES)):
                raise ValueError(f'batch["dropped"] must be (batch, 3) bool in the order {MODALITIES}, found {tuple(dropped.shape)}')
            missing = given | (dropped & ~given.any(dim=1, keepdim=True))  # only samples missing nothing
            self.check_missing(missing)
        return missing, given

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

    def train(self, mode: bool = True):
        """Also ends the training loop's dropout context (``set_dropout_context``): it keys one
        step's masks, and the loop sets it anew for each step. A forward in training mode outside
        the loop then draws fresh masks per call, as without one."""
        set_dropout_context(self, None)
        return super().train(mode)

    def loss_denominator(self):
        """How this step's loss means divide (``mskt.model.losses``): None (by their own count), or,
        in a distributed training step, the function its :class:`~mskt.model.layers.DropoutContext`
        carries from the training loop (``shared_count``)."""
        context = getattr(self, "dropout_context", None)
        return None if context is None or not self.training else context.shared_count

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
