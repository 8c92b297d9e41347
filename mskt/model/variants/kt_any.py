"""``kt_any`` (beyond the paper): reconstruct whichever modalities are missing, per sample.

It encodes all three; for each target m and other source s a stack predicts m from f_s (on s's
grid); the present sources' predictions, resampled onto m's grid, are averaged per sample and a
delta_m stack gives m', which replaces f_m where m is missing. Each prediction and m' is read out
(one linear map per target) to m's real features, standardised with training statistics, by a
consistency loss behind a stop-gradient (like ``kt``'s ``kt_target="raw"``). Training drops
modalities at random: its own training protocol (``train_missing="auto"``) gives a share
``modality_dropout`` of the samples one of the six patterns, which is ``train_missing="patterns"`` at
that rate, the same protocol any other variant can train under; dropped modalities stay targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from mskt.modalities import MODALITIES
from mskt.model.backbone import MulT, Output
from mskt.model.options import TransferOptions, option
from mskt.model.layers import resample
from mskt.model.losses import consistency_loss
from mskt.model.registry import register


@dataclass
class KTAnyOptions(TransferOptions):
    lambda_any: float = option(1.0, low=(0.0, "["), help="the weight of kt_any's consistency terms (per target modality, the mean of its terms)",
                               search=dict(low=0.1, high=10.0, log=True, why="ours; no paper gives one"))
    modality_dropout: float = option(0.5, low=(0.0, "["), high=(1.0, "]"),
                                     help="train_missing=auto: the share of training samples given one of the six missing patterns")


@register("kt_any")
class KTAny(MulT):
    Options = KTAnyOptions
    inputs = ("text", "audio", "vision")
    fuses = ("text", "audio", "vision")
    reconstructs = MODALITIES

    def standardises(self) -> tuple:
        return MODALITIES

    def drops_modalities(self) -> float:
        """``modality_dropout``: its ``train_missing="auto"`` gives this share of the training samples one of the six missing patterns."""
        return self.cfg.modality_dropout

    def check_missing(self, given: torch.Tensor) -> None:
        if bool(given.all(dim=1).any()):
            raise ValueError('batch["missing"]: a sample misses all three modalities; at least one must be present')

    def build_transfer(self) -> None:
        cfg, d = self.cfg, self.cfg.d_model
        # For each target m and each other source s, a stack predicting m from f_s on s's grid
        # (like theta, phi); a delta per target fuses the present sources' mean into m'.
        self.transfer = nn.ModuleDict(
            {f"{s}->{m}": self.stack(cfg.kt_layers, cfg.attn_dropout_for(s)) for m in MODALITIES for s in MODALITIES if s != m}
        )
        self.fuse = nn.ModuleDict({m: self.stack(cfg.kt_layers, cfg.attn_dropout_for(m)) for m in MODALITIES})
        # One readout per target, shared by its predictions and m': d -> m's standardised features.
        self.readout = nn.ModuleDict({m: nn.Linear(d, cfg.dim(m)) for m in MODALITIES})
        for m in MODALITIES:  # training-set statistics per feature (set by train()); saved with the weights
            self.register_buffer(f"{m}_mean", torch.zeros(cfg.dim(m)))
            self.register_buffer(f"{m}_std", torch.ones(cfg.dim(m)))

    def read_out(self, modality, reconstruction):
        return self.readout[modality](reconstruction)  # (B, T, d) -> (B, T, D_m)

    def reconstruct(self, batch, encoded, masks, lengths, missing, given, return_internals):
        everything = self.training or return_internals  # the consistency loss needs every reconstruction
        internals = self.reconstruct_missing(encoded, masks, lengths, missing, everything)
        aux = {}
        if everything:
            aux.update(self.any_targets(batch, given, lengths, encoded, masks, missing))
            internals.update({f"{m}_features": aux[f"{m}_features"] for m in MODALITIES if f"{m}_features" in aux})
        if missing is not None:
            internals["missing"] = missing
        return internals, aux

    def reconstruct_missing(self, encoded, masks, lengths, missing, everything: bool) -> dict:
        """For each target m: each other source s predicts m from f_s on s's grid (``{m}_from_{s}``);
        the predictions of the sources present for a sample, resampled onto m's grid, are averaged and
        fused by delta_m into m' (``{m}_reconstruction``, on m's grid). Where m is missing for a
        sample, m' replaces f_m in ``encoded`` (in place). ``everything``: reconstruct every modality
        (training, internals); else only those missing for some sample."""
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
            out[f"{m}_reconstruction"] = reconstruction
            encoded[m] = torch.where(absent[:, i, None, None], reconstruction, encoded[m])
        return out

    def any_targets(self, batch, given, lengths, encoded, masks, missing) -> dict:
        """The consistency targets: each modality's real features, standardised, on the grid of each
        prediction of it (``target_{m}_from_{s}`` on s's grid, ``target_{m}_fused`` on m's), behind a
        stop-gradient, with masks of the real steps of the samples that count: the target is real
        (not in ``given``: dropped modalities still have their features in training) and the source
        was present. ``{m}_features``: the standardised target on its own grid."""
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

    def transfer_loss(self, out: Output, labels, terms) -> list:
        """For each target m, ``consistency_{m}_from_{s}`` (each other source s, on samples where s is
        present) and ``consistency_{m}_fused`` (m'), on samples whose m is real; lambda_any times the
        mean of a target's three terms is added per target."""
        cfg = self.cfg
        weighted = []
        for m in MODALITIES:
            if f"target_{m}_fused" not in out.aux:
                continue
            names = [f"from_{s}" for s in MODALITIES if s != m] + ["fused"]
            for name in names:
                key = f"{m}_reconstruction" if name == "fused" else f"{m}_{name}"
                pred = self.readout[m](out.internals[key])  # (B, T, d) -> (B, T, D_m)
                terms[f"consistency_{m}_{name}"] = consistency_loss(pred, out.aux[f"target_{m}_{name}"], out.aux[f"mask_{m}_{name}"], cfg.consistency,
                                                                          self.loss_denominator())
            weighted.append(cfg.lambda_any * sum(terms[f"consistency_{m}_{name}"] for name in names) / len(names))
        return weighted
