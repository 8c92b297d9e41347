"""What the rest of mskt needs of a model: the base class of every variant.

The training loop, evaluation, the analyses, the experiments and the accelerators call a model only
through what is declared here. The MulT backbone (``mskt.model.backbone``) is one such model; a
variant that is not MulT at all (``mctn``: recurrent seq2seq translations) subclasses this class
directly and is trained, evaluated, swept and loaded the same way.

What a model declares (class attributes; code outside the model reads these, never names):

- ``inputs``: the modalities the prediction path reads from the batch.
- ``fuses``: the modalities the cross-modal transformers attend among (a reconstruction counts as
  the modality it stands for); () for a model without them.
- ``reconstructs``: the modalities it rebuilds from the others. Its internals then hold
  ``{m}_reconstruction``, in training or with ``return_internals`` its target ``{m}_features``,
  and :meth:`read_out` maps a reconstruction to the units of that target where it can.
- ``test_missing``: the modalities missing in its default (the paper's) test setting.
- ``has_attention``: whether ``forward(batch, return_attention=True)`` returns attention maps
  (what ``mskt.viz.analysis.attention_maps`` draws).
- ``Options``: the dataclass of the options it owns (``mskt.model.options``).
- ``renamed_modules``: {old attribute: new module path} of modules the variant has renamed. The old
  name still reads and assigns the module, checkpoints saved under it load, and the module keeps
  its dropout draws (a site is keyed by its old path), so a rename changes no number.

What it computes: ``forward(batch, return_attention=False, return_internals=False) -> Output`` and
``loss(out, labels) -> {term: scalar tensor, ..., "total": weighted sum}``.

Hooks the training loop asks (each has a default here): :meth:`check_config`, :meth:`uses_teacher`,
:meth:`searched_options`, :meth:`standardises` / :meth:`set_statistics`, :meth:`drops_modalities`,
:meth:`check_missing`; the analyses ask :meth:`reconstruction_sources` and :meth:`read_out`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from mskt.modalities import MODALITIES
from mskt.model.config import ModelConfig
from mskt.model.layers import key_mask, renamed_path, set_dropout_context
from mskt.model.options import Options, option_fields


def renamed_state(state_dict, renamed: dict):
    """``state_dict`` with its keys under old module names moved to the new ones (same order); the
    same object when no key needs it."""
    keys = [renamed_path(k, renamed) for k in state_dict]
    if keys == list(state_dict):
        return state_dict
    out = type(state_dict)(zip(keys, state_dict.values()))
    if hasattr(state_dict, "_metadata"):  # nn.Module's per-module versions, keyed by module path
        out._metadata = type(state_dict._metadata)((renamed_path(k, renamed), v) for k, v in state_dict._metadata.items())
    return out


@dataclass
class Output:
    pred: torch.Tensor  # (B,) regression or (B, 4, 2) emotion logits
    internals: dict = field(default_factory=dict)  # f_*, reconstructions and their targets (return_internals)
    attention: dict | None = None  # "source->target" -> list over layers of (B, heads, T, S)
    aux: dict = field(default_factory=dict)  # training-only tensors the loss needs
    # With return_attention or return_internals: {m: (B,)} real steps of the grid each fused modality
    # lived on in this forward (A' of kt on the text grid; every grid the text's under CTC).
    lengths: dict | None = None


class Model(nn.Module):
    """A multimodal model as mskt trains and evaluates it (see the module docstring)."""

    name = "base"
    inputs: tuple = ()
    fuses: tuple = ()
    reconstructs: tuple = ()
    test_missing: tuple = ("audio",)
    has_attention: bool = False
    Options = Options  # the variant's own options (mskt.model.options); the base has none
    renamed_modules: dict = {}  # {old attribute: new module path}, e.g. kt's {"theta": "transfer.vision->audio"}

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        """Raise ``ConfigError`` for settings this variant cannot take."""

    @classmethod
    def uses_teacher(cls, cfg: ModelConfig) -> bool:
        """Whether training must load a teacher run's audio encoder into it (``freeze_audio_encoder``)."""
        return False

    @classmethod
    def searched_fields(cls, cfg: ModelConfig) -> tuple:
        """The shared config fields (``ModelConfig``'s) this model reads that ``mskt tune`` searches
        beside the learning rate and batch size (their ranges: mskt.experiments.tune.FIELD_KNOBS).
        A model that reads none of them, as MCTN, searches only those and its options."""
        return ()

    @classmethod
    def searched_options(cls, cfg: ModelConfig) -> tuple:
        """The variant's options that ``mskt tune`` searches under ``cfg`` (beside the backbone's
        fields): by default each option that declares a ``search`` range (mskt.model.options)."""
        return tuple(name for name, f in option_fields(cls.Options).items() if f.metadata.get("search"))

    # -- modules under an old name (renamed_modules) --------------------------------------------

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # A property per old name reads the module (no cost to any other attribute lookup).
        for old, path in cls.__dict__.get("renamed_modules", {}).items():
            setattr(cls, old, property(lambda self, path=path: self.get_submodule(path), doc=f"renamed: the module at {path}"))

    def __setattr__(self, name: str, value) -> None:
        path = type(self).renamed_modules.get(name)
        if path is not None and isinstance(value, nn.Module):  # code written against the old name replaces the module
            parent, _, leaf = path.rpartition(".")
            setattr(self.get_submodule(parent) if parent else self, leaf, value)
            return
        super().__setattr__(name, value)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module's, after renaming the keys of a checkpoint saved under old module names."""
        return super().load_state_dict(renamed_state(state_dict, type(self).renamed_modules), strict=strict, assign=assign)

    def forward(self, batch: dict, return_attention: bool = False, return_internals: bool = False) -> Output:
        raise NotImplementedError

    def loss(self, out: Output, labels: torch.Tensor) -> dict:
        """Every loss term (each a scalar tensor) and their weighted sum under "total"."""
        raise NotImplementedError

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

    # -- missing inputs -----------------------------------------------------------------------

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

    # -- training mode and loss means ---------------------------------------------------------

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
