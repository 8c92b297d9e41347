"""``mctn``: the Multimodal Cyclic Translation Network (Pham et al., "Found in Translation:
Learning Robust Joint Representations by Cyclic Translations Between Modalities", AAAI 2019), the
paper's own missing-modality baseline (its Tables 1-3: "MCTN", and "CTC + MCTN" unaligned).

Not MulT: recurrent sequence-to-sequence translations, on :class:`mskt.model.base.Model` directly.
At test time it reads language only; vision and audio are translation targets in training.

- **Stage 1, cyclic translation L -> V -> L.** A bidirectional LSTM encoder (directions summed)
  reads L; an attention LSTM decoder writes V^ from it (the translation loss, MSE against V). The
  same encoder and decoder translate V^ back into L^ (the cycle loss, MSE against L). The encoder's
  outputs over L are the *joint representation*.
- **Stage 2, hierarchical, to audio.** A second encoder reads the joint representation and a second
  decoder writes A^ from it (MSE against A; no cycle, as in the authors' code).
- **Prediction.** An LSTM over the second encoder's outputs, attention pooling over time (a tanh
  score per step, softmax), a linear layer: sentiment, or 4 x 2 emotion logits.
- **Loss.** task + translation_weight * L(L->V) + cycle_weight * L(V^->L) + audio_weight *
  L(joint->A) + output_l2 * ||W_out||^2; the task loss is the project's (L1 / cross-entropy).

The facts come from the paper and the authors' code (hainow/MCTN, Keras; configs/hierarchical_mctn.yaml:
hidden 32, depth 1, bidirectional encoders, MSE translation and cycle losses weighted 0.1 each,
prediction LSTM of 32 with attention pooling, L2 0.01 on the output layer, MAE task loss). Departures,
each for a reason:

- **One encoder and decoder for both directions, with a linear map per modality** into and out of
  the LSTMs' width. The authors share them too, but zero-pad every modality's features to one
  width; a linear map per modality does the same job without the padding.
- **Standardised targets.** V and A are compared after per-feature standardisation with training
  statistics (``standardises``), as kt's consistency targets; raw COVAREP/Facet units would let one
  feature dominate the MSE. The cycle target is L as the encoder read it.
- **Time grid.** Every translation is written on the text grid (the decoder runs as many steps as
  the text has). Aligned data share that grid. For unaligned data the paper's row is "CTC + MCTN";
  here V and A are resampled onto the text grid per sample (linear interpolation over real steps,
  as kt resamples its consistency targets) instead of through a learned CTC aligner: MCTN never
  reads V or A on its prediction path, so there is nothing to align there, only targets to place.
  ``ctc_align=True`` is therefore refused rather than silently ignored.
- **No teacher forcing** in the decoders (the authors' Keras decoders feed back their own output;
  MultiBench's port uses 0.5). No dropout (the authors' configs use 0.0).
- **Optimiser and epochs** are the project's (Adam, lr 1e-3, 40 epochs); the authors' code used
  lr 1e-4 and 200 epochs.

Padding: mskt's sequences are left-padded; the LSTMs read each sample's real steps only (packed
sequences), so padding never enters a state. Missing inputs: text marked missing is zero-imputed
before anything reads it (the base class's protocol); text given as None for every sample is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from mskt.errors import ConfigError
from mskt.modalities import MODALITIES
from mskt.model.base import Model, Output
from mskt.model.layers import key_mask, resample
from mskt.model.losses import consistency_loss, task_loss
from mskt.model.options import Options, option
from mskt.model.registry import register


@dataclass
class MCTNOptions(Options):
    translation_weight: float = option(0.1, low=(0.0, "["), help="weight of the L -> V translation loss (MSE; the authors' 0.1)",
                                       search=dict(low=0.01, high=1.0, log=True, why="the authors' code: 0.1"))
    cycle_weight: float = option(0.1, low=(0.0, "["), help="weight of the V^ -> L cycle loss (MSE; the authors' 0.1; 0 turns the cycle off)",
                                 search=dict(low=0.01, high=1.0, log=True, why="the authors' code: 0.1"))
    audio_weight: float = option(0.1, low=(0.0, "["), help="weight of the second stage's translation, joint representation -> A (MSE; the authors' 0.1)",
                                 search=dict(low=0.01, high=1.0, log=True, why="the authors' code: 0.1"))
    rnn_hidden: int = option(32, low=(1, "["), help="width of the seq2seq LSTMs, encoders and decoders (the authors' 32)",
                             search=dict(choices=(16, 32, 64), why="the authors' code: 32"))
    regression_hidden: int = option(32, low=(1, "["), help="width of the prediction LSTM (the authors' 32)",
                                    search=dict(choices=(16, 32, 64), why="the authors' code: 32"))
    output_l2: float = option(0.01, low=(0.0, "["), help="L2 penalty on the output layer's weights (the authors' 0.01)")


def _real_first(x: torch.Tensor, lengths: torch.Tensor, back: bool = False) -> torch.Tensor:
    """Left-padded (B, T, ...) -> each sample's real steps first, padding after (``back``: the inverse)."""
    T = x.shape[1]
    shift = (T - lengths.clamp(1, T)).to(x.device)[:, None]  # (B, 1)
    t = torch.arange(T, device=x.device)[None, :]
    index = (t - shift if back else t + shift) % T  # (B, T)
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x))


class Encoder(nn.Module):
    """Bidirectional LSTM over each sample's real steps, directions summed (the authors' merge)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.rnn = nn.LSTM(width, hidden, batch_first=True, bidirectional=True)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x (B, T, width), real steps first -> (B, T, hidden), 0 after each sample's length."""
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=x.shape[1])
        return out[..., : self.hidden] + out[..., self.hidden :]


class AttentionDecoder(nn.Module):
    """An LSTM that writes one output step at a time from its previous output and additive
    attention over the encoder's outputs, starting from the encoder's last real step."""

    def __init__(self, hidden: int):
        super().__init__()
        self.cell = nn.LSTMCell(2 * hidden, hidden)
        self.query = nn.Linear(hidden, hidden, bias=False)
        self.key = nn.Linear(hidden, hidden)
        self.score = nn.Linear(hidden, 1, bias=False)

    def forward(self, memory: torch.Tensor, lengths: torch.Tensor, steps: int, embed: nn.Linear, readout: nn.Linear) -> torch.Tensor:
        """memory (B, S, hidden), real steps first -> (B, steps, D_out); ``embed`` maps an output
        back to the LSTM's width (the previous step's output is the next step's input)."""
        B, S, _ = memory.shape
        real = key_mask(lengths, S).flip(1)  # (B, S): real steps first
        keys = self.key(memory)  # (B, S, hidden)
        h = memory[torch.arange(B, device=memory.device), lengths.clamp(1, S) - 1]  # (B, hidden)
        c = torch.zeros_like(h)
        y = memory.new_zeros(B, readout.out_features)
        outputs = []
        for _ in range(steps):
            e = self.score(torch.tanh(keys + self.query(h)[:, None])).squeeze(2).masked_fill(~real, float("-inf"))  # (B, S)
            context = torch.einsum("bs,bsh->bh", e.softmax(dim=1), memory)  # (B, hidden)
            h, c = self.cell(torch.cat([embed(y), context], dim=1), (h, c))
            y = readout(h)  # (B, D_out)
            outputs.append(y)
        return torch.stack(outputs, dim=1)


@register("mctn")
class MCTN(Model):
    inputs = ("text",)  # language only at test time
    fuses = ()  # no cross-modal attention
    reconstructs = ("vision", "audio")  # translation targets, in training only
    test_missing = ("audio",)
    Options = MCTNOptions

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.ctc_align:
            raise ConfigError("ctc_align=True: mctn reads only text, so nothing on its prediction path needs aligning; its "
                              "translation targets are resampled onto the text grid instead (the 'CTC + MCTN' row); use ctc_align=False")

    def __init__(self, cfg):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        H, R = cfg.rnn_hidden, cfg.regression_hidden
        # Into and out of the shared seq2seq's width, per modality (the authors zero-pad instead).
        self.embed = nn.ModuleDict({m: nn.Linear(cfg.dim(m), H) for m in MODALITIES})
        # Text is written only by the cycle: without it, no unused readout (DDP refuses unused parameters).
        written = ("vision", "audio") + (("text",) if cfg.cycle_weight > 0 else ())
        self.readout = nn.ModuleDict({m: nn.Linear(H, cfg.dim(m)) for m in MODALITIES if m in written})
        self.encoder = Encoder(H, H)  # stage 1, both directions of the cycle
        self.decoder = AttentionDecoder(H)
        self.encoder2 = Encoder(H, H)  # stage 2: joint representation -> audio
        self.decoder2 = AttentionDecoder(H)
        self.regression = nn.LSTM(H, R, batch_first=True)
        self.pool = nn.Linear(R, 1)
        self.out = nn.Linear(R, cfg.n_outputs)
        for m in self.standardises():  # training-set statistics of the targets (train() sets them), saved with the weights
            self.register_buffer(f"{m}_mean", torch.zeros(cfg.dim(m)))
            self.register_buffer(f"{m}_std", torch.ones(cfg.dim(m)))

    def standardises(self) -> tuple:
        return ("vision", "audio")

    def read_out(self, modality, reconstruction):
        return reconstruction  # the decoders write standardised features already

    def reconstruction_sources(self, modality):
        # Both translations are written on the text grid: V^ from language, A^ from the joint representation.
        return {("language" if modality == "vision" else "joint"): (f"{modality}_reconstruction", "text")}

    # -- forward ------------------------------------------------------------------------------

    def forward(self, batch: dict, return_attention: bool = False, return_internals: bool = False) -> Output:
        """As :meth:`mskt.model.MulT.forward`; only text is read on the prediction path. Vision and
        audio are read as translation targets, in training or when internals are asked for."""
        if return_attention:
            raise ValueError(f"variant {self.cfg.variant!r} has no attention maps (recurrent seq2seq translations, not attention layers)")
        lengths = dict(batch["lengths"])
        feats = {"text": batch["text"]}
        missing, given = self._missing_inputs(batch, feats, lengths)
        text = feats["text"]
        if missing is not None:  # first of all: where, never multiply (NaN * 0 is NaN)
            text = torch.where(missing[:, MODALITIES.index("text"), None, None], 0.0, text)
        drop = (batch.get("dropped_steps") or {}).get("text")
        if drop is not None and batch.get("text") is not None:  # a training protocol's dropped steps
            text = torch.where(drop.to(text.device)[..., None], 0.0, text)
        len_l = lengths["text"].to(text.device).clamp(1, text.shape[1])
        T = text.shape[1]

        source = _real_first(text, len_l)  # (B, T, D_l)
        joint = self.encoder(self.embed["text"](source), len_l)  # (B, T, H): the joint representation
        encoded = self.encoder2(joint, len_l)  # (B, T, H)
        states, _ = self.regression(pack_padded_sequence(encoded, len_l.cpu(), batch_first=True, enforce_sorted=False))
        states, _ = pad_packed_sequence(states, batch_first=True, total_length=T)  # (B, T, R)
        real = key_mask(len_l, T).flip(1)  # (B, T): real steps first
        weights = torch.tanh(self.pool(states)).squeeze(2).masked_fill(~real, float("-inf")).softmax(dim=1)  # (B, T)
        pred = self.out(torch.einsum("bt,btr->br", weights, states))  # (B, n_outputs)
        pred = pred.squeeze(1) if self.cfg.task == "regression" else pred.view(-1, 4, 2)

        internals, aux = {}, {}
        if self.training or return_internals:
            aux = self.translate(batch, source, joint, len_l, given)
            internals = {f"{m}_reconstruction": _real_first(aux[f"{m}_pred"], len_l, back=True) for m in MODALITIES if f"{m}_pred" in aux}
            internals["joint"] = _real_first(joint, len_l, back=True)  # left-padded, as every other sequence
        for m in ("vision", "audio"):
            if return_internals and batch.get(m) is not None:
                internals[f"{m}_features"] = self.standardised(m, batch[m], batch["lengths"][m])  # on its own grid
        return Output(pred=pred, internals=internals, aux=aux, lengths={"text": len_l} if return_internals else None)

    def translate(self, batch, source, joint, len_l, given) -> dict:
        """The translations ``{m}_pred`` (B, T, D_m) on the text grid, real steps first, and, where
        the batch holds the real modalities, their targets ``{m}_target``, the real steps ``mask``
        and the samples that have a target ``{m}_keep``: what the loss reads."""
        T = source.shape[1]
        aux = {"mask": key_mask(len_l, T).flip(1)}  # (B, T): real steps of the text grid, first
        aux["vision_pred"] = self.decoder(joint, len_l, T, self.embed["vision"], self.readout["vision"])  # L -> V^
        if self.cfg.cycle_weight > 0:  # V^ -> L^ through the same encoder and decoder
            cycled = self.encoder(self.embed["vision"](aux["vision_pred"]), len_l)
            aux["text_pred"] = self.decoder(cycled, len_l, T, self.embed["text"], self.readout["text"])
            aux["text_target"] = source  # L as the encoder read it
        aux["audio_pred"] = self.decoder2(self.encoder2(joint, len_l), len_l, T, self.embed["audio"], self.readout["audio"])  # joint -> A^
        for m in ("vision", "audio"):
            if batch.get(m) is None:
                continue
            target = self.standardised(m, batch[m], batch["lengths"][m])  # (B, T_m, D_m), padding 0
            if target.shape[1] != T:  # unaligned: onto the text grid
                target = resample(target, batch["lengths"][m], T, len_l)
            aux[f"{m}_target"] = _real_first(target, len_l)
            if given is not None:  # a sample whose data miss the modality has no target (a protocol's drops still do)
                aux[f"{m}_keep"] = ~given[:, MODALITIES.index(m)]
        return aux

    # -- loss ---------------------------------------------------------------------------------

    def loss(self, out: Output, labels: torch.Tensor) -> dict:
        """The task loss, the three translation terms (MSE on the text grid's real steps) and the
        output layer's L2 penalty, each weighted by its option, and their sum under "total"."""
        cfg = self.cfg
        denominator = self.loss_denominator()
        terms = {"task": task_loss(out.pred, labels, cfg.task, denominator)}
        total = terms["task"]
        for name, m, weight in (("translation", "vision", "translation_weight"), ("cycle", "text", "cycle_weight"),
                                ("translation_audio", "audio", "audio_weight")):
            if f"{m}_target" not in out.aux:
                continue  # evaluation, or a batch without that modality: nothing to translate into
            mask = out.aux["mask"]
            if f"{m}_keep" in out.aux:
                mask = mask & out.aux[f"{m}_keep"][:, None]
            terms[name] = consistency_loss(out.aux[f"{m}_pred"], out.aux[f"{m}_target"], mask, "l2", denominator)
            total = total + getattr(cfg, weight) * terms[name]
        terms["output_l2"] = self.out.weight.pow(2).sum()
        total = total + cfg.output_l2 * terms["output_l2"]
        terms["total"] = total
        return terms
