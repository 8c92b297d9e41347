"""``kt``: the paper's knowledge transfer. L and V predict the audio features (the paper's theta:
V -> A and phi: L -> A, ``transfer["vision->audio"]`` and ``transfer["text->audio"]``), its delta
(``fuse["audio"]``) fuses them into A', and MulT fuses L, V and A'. Audio is a training target only,
never read on the prediction path. The roles and their names are kt_any's: ``transfer[s->m]``
predicts m from f_s, ``fuse[m]`` makes m', ``readout[m]`` maps d to m's features; the paper's names
(``theta``, ``phi``, ``delta``, and ``delta_in``, ``audio_readout``) still read and replace them.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from mskt.model.backbone import MulT, Output
from mskt.model.options import TransferOptions, option
from mskt.model.layers import key_mask, resample, run_stacks
from mskt.model.losses import consistency_loss, task_loss
from mskt.model.registry import register


_WEIGHT = dict(low=(0.0, "["), search=dict(low=0.1, high=10.0, log=True, why="this paper gives no value; 1.0 is ours"))


@dataclass
class KTOptions(TransferOptions):
    lambda_vision: float = option(1.0, help="lambda1 of the paper's Eq. 6: the weight of L_c(V -> A) (0 turns it off)", **_WEIGHT)
    lambda_text: float = option(1.0, help="lambda2 of the paper's Eq. 6: the weight of L_c(L -> A) (0 turns it off)",
                                aliases=("lambda_language",), **_WEIGHT)
    lambda_fused: float = option(0.0, low=(0.0, "["), help="beyond the paper: the weight of a consistency term on delta's output A' too")
    kt_target: str = option("raw", choices=("raw", "aux", "teacher"),
                            help="f_A: raw (standardised audio features), aux (encoder + training-only head) or teacher (a full run's frozen encoder)")
    lambda_aux: float = option(1.0, help="kt_target=aux: the weight of the training-only audio head's task loss", **_WEIGHT)


@register("kt")
class KT(MulT):
    Options = KTOptions
    inputs = ("text", "vision")
    fuses = ("text", "audio", "vision")  # audio: A'
    reconstructs = ("audio",)
    renamed_modules = {"theta": "transfer.vision->audio", "phi": "transfer.text->audio", "delta_in": "fuse_in.audio",
                       "delta": "fuse.audio", "audio_readout": "readout.audio"}

    @classmethod
    def uses_teacher(cls, cfg) -> bool:
        return cfg.kt_target == "teacher"

    @classmethod
    def searched_options(cls, cfg) -> tuple:
        # lambda1, lambda2 of the paper's Eq. 6; lambda_fused (beyond the paper) stays at its default;
        # the audio head's weight matters only where there is one.
        return tuple(k for k in super().searched_options(cfg) if k != "lambda_aux" or cfg.kt_target == "aux")

    def encoded_modalities(self) -> tuple:
        # Real audio gets an encoder only as a learned consistency target (aux, teacher), never raw.
        return self.inputs + (("audio",) if self.cfg.kt_target != "raw" else ())

    def standardises(self) -> tuple:
        return ("audio",) if self.cfg.kt_target == "raw" else ()

    def build_transfer(self) -> None:
        cfg, d = self.cfg, self.cfg.d_model
        # Built in the paper's order (theta, phi, delta), so a seed draws the same initial weights.
        self.transfer = nn.ModuleDict({"vision->audio": self.stack(cfg.kt_layers, cfg.attn_dropout_vision),  # theta
                                       "text->audio": self.stack(cfg.kt_layers, cfg.attn_dropout)})  # phi
        self.fuse_in = nn.ModuleDict({"audio": nn.Linear(2 * d, d)})  # [theta(f_V) || phi(f_L)] -> d
        self.fuse = nn.ModuleDict({"audio": self.stack(cfg.kt_layers, cfg.attn_dropout_audio)})  # delta
        if cfg.kt_target == "aux":
            self.aux_head = nn.Linear(d, cfg.n_outputs)  # training-only: keeps f_A informative
        if cfg.kt_target == "raw":
            self.readout = nn.ModuleDict({"audio": nn.Linear(d, cfg.audio_dim)})  # shared by theta, phi, delta: d -> audio features
            # Training-set statistics per audio feature (set by train()); saved with the weights.
            self.register_buffer("audio_mean", torch.zeros(cfg.audio_dim))
            self.register_buffer("audio_std", torch.ones(cfg.audio_dim))

    def read_out(self, modality, reconstruction):
        if modality == "audio" and self.cfg.kt_target == "raw":
            return self.readout["audio"](reconstruction)  # (B, T, d) -> (B, T, D_a)
        return None  # aux / teacher: A' lives in the audio encoder's space, where its target is

    def reconstruction_sources(self, modality):
        # theta's prediction stays on the vision grid; phi's and A' live on the text grid.
        return {"vision": ("audio_from_vision", "vision"), "text": ("audio_from_text", "text"),
                "fused": ("audio_reconstruction", "text")}

    def set_audio_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-feature training-set mean and std of audio, the standardisation of kt_target='raw'."""
        self.set_statistics("audio", mean, std)

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

    # -- the knowledge-transfer network -------------------------------------------------------

    def reconstruct_audio(self, f_text, f_vision, masks, lengths):
        """theta(f_V), phi(f_L) and A' = delta([theta(f_V) || phi(f_L)]), all (B, T_text, d) except
        theta's own output, which stays on the vision grid for its consistency loss."""
        (from_vision, _), (from_text, _) = run_stacks(
            [(self.transfer["vision->audio"], f_vision, masks["vision"], None, None),
             (self.transfer["text->audio"], f_text, masks["text"], None, None)]
        )  # (B, T_v, d), (B, T_l, d)
        T_l = f_text.shape[1]
        from_vision_on_text = from_vision
        if from_vision.shape[1] != T_l:
            from_vision_on_text = resample(from_vision, lengths["vision"], T_l, lengths["text"])  # (B, T_l, d)
        fused = self.fuse_in["audio"](torch.cat([from_vision_on_text, from_text], dim=2))  # (B, T_l, 2d) -> (B, T_l, d)
        reconstruction, _ = self.fuse["audio"](fused, masks["text"])  # (B, T_l, d)
        return from_vision, from_text, reconstruction

    def reconstruct(self, batch, encoded, masks, lengths, missing, given, return_internals):
        from_vision, from_text, reconstruction = self.reconstruct_audio(encoded["text"], encoded["vision"], masks, lengths)
        encoded["audio"] = reconstruction  # A' on the text grid
        masks["audio"] = masks["text"]
        internals = dict(audio_from_vision=from_vision, audio_from_text=from_text, audio_reconstruction=reconstruction)
        aux = {}
        if batch.get("audio") is not None and (self.training or return_internals):
            aux.update(self.audio_targets(batch, lengths, encoded, masks))
            internals["audio_features"] = aux["f_audio"]
        return internals, aux

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
        for name, m in (("vision", "vision"), ("text", "text")):
            T = encoded[m].shape[1]
            out[f"target_on_{name}"] = target if T == target.shape[1] else resample(target, len_a, T, lengths[m])
            out[f"mask_on_{name}"] = masks[m]  # real steps of the grid the prediction lives on (text grid under CTC)
        return out

    def transfer_loss(self, out: Output, labels, terms) -> list:
        """L2 or L1 between theta(f_V), phi(f_L) (and, with lambda_fused, A') and f_A on real steps."""
        cfg = self.cfg
        if "f_audio" not in out.aux:  # evaluation without audio: nothing to be consistent with
            return []
        weighted = []
        for name, key, weight, on in (
            ("consistency_vision", "audio_from_vision", cfg.lambda_vision, "vision"),
            ("consistency_text", "audio_from_text", cfg.lambda_text, "text"),
            ("consistency_fused", "audio_reconstruction", cfg.lambda_fused, "text"),
        ):
            pred = out.internals[key]
            if cfg.kt_target == "raw":
                pred = self.readout["audio"](pred)  # (B, T, d) -> (B, T, D_a)
            mask = out.aux[f"mask_on_{on}"]  # the grid's real steps, as the forward pass used them
            terms[name] = consistency_loss(pred, out.aux[f"target_on_{on}"], mask, cfg.consistency, self.loss_denominator())
            weighted.append(weight * terms[name])
        if "aux_pred" in out.aux:
            terms["aux_audio"] = task_loss(out.aux["aux_pred"], labels, cfg.task, self.loss_denominator())
            weighted.append(cfg.lambda_aux * terms["aux_audio"])
        return weighted
