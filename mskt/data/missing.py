"""Missing modalities at evaluation time: which modalities, for which samples, at which steps.

Three protocols from the missing-modality literature, each a mask built once for a whole split from
its own seeded ``torch.Generator`` (independent of the model's RNG and of batch sizes and DDP
shards), so an evaluation is reproducible by ``seed``:

* **fixed** (MMIN's six conditions): the named modalities are missing for every sample;
* **per sample** (``rate``, IMDer / GCNet style): each modality of each sample is missing with
  probability ``rate``, and exactly that share of the modality slots is missing, never every
  modality of one sample (:func:`missing_mask`; :func:`realised_rate` measures it);
* **per step** (``mode="step"``, TFR-Net style): each time step of each modality is zeroed with
  probability ``rate`` (the modality stays "present": nothing is reconstructed).

A sample mask is (N, 3) bool in ``MODALITIES`` order, True = missing; the model receives it as
``batch["missing"]`` and never reads the values behind it (see ``mskt.model``). All three
modalities missing for a sample is an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from mskt.console import note
from mskt.errors import MsktError
from mskt.modalities import MISSING_PATTERNS, MODALITIES

MODES = ("sample", "step")
# The six fixed conditions, named as the CLI takes them: "audio", "audio,vision", ...
CONDITIONS = tuple(",".join(p) for p in MISSING_PATTERNS)
RATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
ALIASES = {"language": "text"}  # the paper's word for the text modality


class MissingError(MsktError, ValueError):
    """A missing-modality setting that is not allowed (unknown modality, rate out of range, all missing)."""


def parse_missing(value) -> tuple:
    """``"audio,vision"`` (or a sequence of names; "language" is "text") -> ("audio", "vision") in MODALITIES order;
    ``""``, ``"none"`` or None -> (). Unknown names, repeats and all three are errors."""
    if value is None:
        return ()
    if isinstance(value, str):
        names = [v.strip() for v in value.split(",") if v.strip()]
        if names == ["none"]:
            return ()
    else:
        names = list(value)
    names = [ALIASES.get(n, n) for n in names]
    unknown = [n for n in names if n not in MODALITIES]
    if unknown:
        raise MissingError(f"missing modality {', '.join(map(repr, unknown))} is not one of {', '.join(MODALITIES)} (or language)")
    if len(set(names)) != len(names):
        raise MissingError(f"missing modalities {','.join(names)} name one twice")
    if len(names) == len(MODALITIES):
        raise MissingError("all three modalities missing leaves nothing to predict from; name at most two")
    return tuple(m for m in MODALITIES if m in names)


def check_rate(rate) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= float(rate) < 1.0:
        raise MissingError(f"missing rate must be a number in [0, 1), found {rate!r}")
    return float(rate)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise MissingError(f"missing mode {mode!r} is not allowed; choose one of {', '.join(MODES)}")
    return mode


def missing_mask(n: int, rate: float = 0.0, seed: int = 0, fixed=()) -> torch.Tensor:
    """(n, 3) bool, True = missing: the ``fixed`` modalities for every sample, and of the other
    (free) modality slots exactly ``round(rate x n x free)`` (seeded), never every slot of a sample.

    How: each sample keeps one free modality, chosen uniformly (so none is left with nothing), and
    the slots to drop are drawn uniformly without replacement among the rest. Each free slot is
    then missing with probability ``rate`` and the realised share of missing free slots equals
    ``rate`` up to rounding (:func:`realised_rate`). Drawing each slot independently and redrawing
    the samples left empty, as before, realised 0.099, 0.359 and 0.543 at 0.1, 0.4 and 0.7. A rate
    above ``(free - 1) / free`` (2/3 with every modality free) cannot be realised without emptying
    a sample: every sample then keeps exactly one modality (the most that can go), with a note."""
    fixed = parse_missing(fixed)
    rate = check_rate(rate)
    base = torch.tensor([m in fixed for m in MODALITIES])  # (3,)
    if rate == 0.0 or n == 0:
        return base.expand(n, len(MODALITIES)).clone()
    return _exact_mask(n, base, rate, torch.Generator().manual_seed(int(seed)), warn=True)


_NOTED: set = set()  # (rate, samples, free modalities) already noted as unrealisable in this process


def _exact_mask(n: int, base: torch.Tensor, rate: float, g: torch.Generator, warn: bool = False) -> torch.Tensor:
    """(n, 3) bool: ``base`` (3,) for every sample and exactly round(rate x free slots) of the other
    slots, never all of a sample's (:func:`missing_mask`), drawn from ``g``."""
    mask = base.expand(n, len(MODALITIES)).clone()
    free = torch.nonzero(~base).flatten()  # (F,)
    k_free = len(free)
    slots = n * (k_free - 1)  # droppable once each sample keeps one free modality
    want = int(round(rate * n * k_free))
    if want > slots and warn and (rate, n, k_free) not in _NOTED:
        # Expected at high rates and handled (the realised rate is recorded, and the curves stand at
        # it): a note, once per rate and split size, not a warning per mask draw.
        _NOTED.add((rate, n, k_free))
        note(logging.getLogger("mskt"),
             "missing rate %g leaves some sample with nothing: at most %.3f of its %d free modality slots can be missing; "
             "using that (missing_rate_realised records it)", rate, slots / (n * k_free) if k_free else 0.0, n * k_free)
    want = min(want, slots)
    kept = torch.randint(k_free, (n,), generator=g)  # (n,) which free modality each sample keeps
    droppable = torch.ones(n, k_free, dtype=torch.bool)
    droppable[torch.arange(n), kept] = False
    rows, cols = torch.nonzero(droppable, as_tuple=True)  # (slots,) each
    chosen = torch.randperm(slots, generator=g)[:want]
    mask[rows[chosen], free[cols[chosen]]] = True
    return mask


def realised_rate(masks: "EvalMasks | None", fixed=()) -> float:
    """The share of what a protocol could remove that it did remove: for a sample mask, the missing
    slots among the modalities not ``fixed`` missing; for a step mask, the zeroed steps among all
    steps of those modalities; 0.0 when nothing is asked (``masks`` None)."""
    if masks is None:
        return 0.0
    fixed = parse_missing(fixed)
    if masks.steps:
        total = sum(d.numel() for d in masks.steps.values())
        return float(sum(int(d.sum()) for d in masks.steps.values()) / total) if total else 0.0
    free = torch.tensor([m not in fixed for m in MODALITIES])  # (3,)
    slots = masks.sample[:, free]  # (N, F)
    return float(slots.float().mean()) if slots.numel() else 0.0


def step_mask(n: int, steps: dict, rate: float, seed: int = 0) -> dict:
    """{modality: (n, T_m) bool}, True = that time step is zeroed; each step of each modality
    independently with probability ``rate`` (seeded; drawn in MODALITIES order)."""
    rate = check_rate(rate)
    g = torch.Generator().manual_seed(int(seed))
    return {m: torch.rand(n, steps[m], generator=g) < rate for m in MODALITIES if m in steps}


@dataclass
class EvalMasks:
    """What one evaluation removes: ``sample`` (N, 3) bool (True = missing), and for mode "step"
    ``steps`` {m: (N, T_m) bool} (True = zeroed step)."""

    sample: torch.Tensor
    steps: dict | None = None

    def apply(self, batch: dict, index: torch.Tensor) -> dict:
        """``batch`` (the samples ``index`` of the split) with its ``missing`` mask and zeroed steps."""
        index = index.cpu()
        device = batch["lengths"]["text"].device
        out = {**batch, "missing": self.sample[index].to(device)}
        for m, drop in (self.steps or {}).items():
            out[m] = torch.where(drop[index].to(device)[..., None], 0.0, batch[m])  # where, never *: NaN * 0 is NaN
        return out


def evaluation_masks(n: int, steps: dict, missing=None, rate: float = 0.0, mode: str = "sample", seed: int = 0) -> EvalMasks | None:
    """The masks of one evaluation of ``n`` samples (``steps``: {modality: T_m}); None when nothing is
    asked (``missing`` None and ``rate`` 0), which keeps ``mskt.train.evaluate``'s default protocol.
    ``missing`` (names or "audio,vision") are missing for every sample; ``rate`` applies per sample
    (mode "sample") or per time step (mode "step") to the other modalities."""
    check_mode(mode)
    rate = check_rate(rate)
    if missing is None and rate == 0.0:
        return None
    fixed = parse_missing(missing)
    if mode == "sample":
        return EvalMasks(missing_mask(n, rate, seed, fixed))
    drops = step_mask(n, {m: T for m, T in steps.items() if m not in fixed}, rate, seed) if rate > 0 else None
    return EvalMasks(missing_mask(n, 0.0, seed, fixed), drops)


def describe(missing=None, rate: float = 0.0, mode: str = "sample", seed: int = 0) -> str:
    """A short label of an evaluation protocol, for printed lines and tables."""
    parts = []
    fixed = parse_missing(missing)
    if fixed:
        parts.append(f"missing {','.join(fixed)}")
    if rate > 0:
        parts.append(f"missing rate {rate:g} per {'sample and modality' if mode == 'sample' else 'time step'} (seed {seed})")
    if not parts:
        parts.append("nothing missing" if missing is not None else "default protocol (audio missing except for full)")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# Missing modalities in training: one protocol for every variant.

# The kinds of TrainingProtocol. Config.train_missing adds "auto": the variant's own protocol
# (kt_any: "patterns" at its modality_dropout; every other variant: none).
TRAIN_KINDS = ("none", "patterns", "fixed", "sample", "uniform", "step")


@dataclass(frozen=True)
class TrainingProtocol:
    """What a training protocol removes from each training batch, for any variant.

    ``kind``:

    * ``"none"``: nothing;
    * ``"patterns"`` (kt_any's modality dropout; MMIN trains on its six conditions): with
      probability ``rate`` a sample gets one of the six ``MISSING_PATTERNS``, chosen uniformly;
    * ``"fixed"``: the ``fixed`` modalities are missing for every sample;
    * ``"sample"`` (IMDer / DiCMoR: the test rate in training): each modality of each sample is
      missing with probability ``rate``, exactly that share of the batch's slots and never all of a
      sample's (the masks :func:`missing_mask` draws; above 2/3 each sample keeps one modality);
    * ``"uniform"`` (LNLN: one model for every rate): each sample draws its own rate r ~ U(0, ``rate``)
      and each of its modalities is missing with probability r (nothing left: drawn again);
    * ``"step"`` (TFR-Net): each time step of each modality is dropped with probability ``rate``.

    Masks come from a generator the caller owns (the training loop's, seeded from the run seed), so
    a run repeats exactly, and every variant trained with the same seed and protocol sees the same
    masks on the same batches. The model receives them as ``batch["dropped"]`` (B, 3) and
    ``batch["dropped_steps"]`` {m: (B, T_m)}: missing or zeroed for the prediction path, while the real
    values stay in the batch as training targets (kt_any's consistency loss). A variant that does not
    reconstruct sees zeros there (zero imputation); kt_any reconstructs the dropped modalities.
    """

    kind: str = "none"
    rate: float = 0.0
    fixed: tuple = ()

    def __post_init__(self):
        if self.kind not in TRAIN_KINDS:
            raise MissingError(f"training protocol {self.kind!r} is not one of {', '.join(TRAIN_KINDS)}")
        rate = self.rate
        high = 1.0 if self.kind in ("patterns", "uniform") else None
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (0.0 <= rate <= 1.0 if high else 0.0 <= rate < 1.0):
            raise MissingError(f"training protocol {self.kind!r}: rate must be a number in [0, {'1]' if high else '1)'}, found {rate!r}")
        object.__setattr__(self, "rate", float(rate))
        object.__setattr__(self, "fixed", parse_missing(self.fixed) if self.kind == "fixed" else ())
        if self.kind == "fixed" and not self.fixed:
            raise MissingError("training protocol 'fixed' needs the modalities missing for every sample, found none")

    @property
    def active(self) -> bool:
        """Whether it removes anything at all."""
        return self.kind == "fixed" or (self.kind != "none" and self.rate > 0)

    def draw(self, n: int, steps: dict, generator: torch.Generator) -> dict:
        """The masks of one batch of ``n`` samples (``steps``: {modality: T_m}), on the CPU:
        {"dropped": (n, 3) bool} (True = missing) or, for "step", {"dropped_steps": {m: (n, T_m) bool}}
        (True = zeroed step); {} when the protocol removes nothing. Draws from ``generator`` only."""
        k = len(MODALITIES)
        if not self.active:
            return {}
        if self.kind == "step":  # in MODALITIES order, as step_mask draws
            return {"dropped_steps": {m: torch.rand(n, steps[m], generator=generator) < self.rate for m in MODALITIES if m in steps}}
        if self.kind == "fixed":
            return {"dropped": torch.tensor([m in self.fixed for m in MODALITIES]).expand(n, k).clone()}
        if self.kind == "patterns":  # a pattern for every sample, then which samples get theirs
            patterns = torch.tensor([[m in p for m in MODALITIES] for p in MISSING_PATTERNS])  # (6, 3)
            chosen = patterns[torch.randint(len(MISSING_PATTERNS), (n,), generator=generator)]  # (n, 3)
            hit = torch.rand(n, generator=generator) < self.rate  # (n,)
            return {"dropped": chosen & hit[:, None]}
        if self.kind == "sample":  # as the evaluation draws it: the rate realised, not only expected
            return {"dropped": _exact_mask(n, torch.zeros(k, dtype=torch.bool), self.rate, generator)}
        # uniform: each sample its own rate in [0, rate), so never 1
        rates = torch.rand(n, 1, generator=generator) * self.rate
        mask = torch.rand(n, k, generator=generator) < rates  # (n, 3)
        bad = mask.all(dim=1)
        while bad.any():  # P(all three) = r^3 < 1: this ends
            mask[bad] = torch.rand(int(bad.sum()), k, generator=generator) < rates[bad]
            bad = mask.all(dim=1)
        return {"dropped": mask}

    def describe(self) -> str:
        """A short label, for printed lines and tables."""
        if not self.active:
            return "no missing modalities in training"
        if self.kind == "fixed":
            return f"training: {','.join(self.fixed)} missing for every sample"
        return {
            "patterns": f"training: one of the six missing patterns for a share {self.rate:g} of the samples",
            "sample": f"training: each modality of each sample missing with probability {self.rate:g}",
            "uniform": f"training: each sample's missing rate drawn from U(0, {self.rate:g})",
            "step": f"training: each time step dropped with probability {self.rate:g}",
        }[self.kind]


def select_drops(drops: dict, rows: torch.Tensor, device) -> dict:
    """The masks of ``TrainingProtocol.draw`` for the samples at positions ``rows``, on ``device``:
    the keys to merge into the batch of those samples."""
    rows = rows.cpu()
    out = {}
    if "dropped" in drops:
        out["dropped"] = drops["dropped"][rows].to(device)
    if "dropped_steps" in drops:
        out["dropped_steps"] = {m: d[rows].to(device) for m, d in drops["dropped_steps"].items()}
    return out


def training_protocol(cfg, model) -> TrainingProtocol:
    """The training protocol of a run ``cfg`` (``train_missing``, ``train_missing_rate``,
    ``train_missing_modalities``) for ``model``, built from ``cfg``; "auto" asks the model for its
    own: ``drops_modalities()`` > 0 means "patterns" at that share, else none."""
    kind = cfg.train_missing
    if kind == "auto":
        share = float(model.drops_modalities())
        return TrainingProtocol("patterns", share) if share > 0 else TrainingProtocol("none")
    if kind == "fixed":
        return TrainingProtocol("fixed", 0.0, cfg.train_missing_modalities)
    return TrainingProtocol(kind, cfg.train_missing_rate if kind != "none" else 0.0)


def training_generator(seed: int) -> torch.Generator:
    """The generator of a run's training masks: from the run seed, apart from the batch order's
    (which ``torch.Generator().manual_seed(seed)`` draws) and from torch's global one (dropout)."""
    return torch.Generator().manual_seed((int(seed) + 0x9E3779B97F4A7C15) % 2**64)
