"""Missing modalities at evaluation time: which modalities, for which samples, at which steps.

Three protocols from the missing-modality literature, each a mask built once for a whole split from
its own seeded ``torch.Generator`` (independent of the model's RNG and of batch sizes and DDP
shards), so an evaluation is reproducible by ``seed``:

* **fixed** (MMIN's six conditions): the named modalities are missing for every sample;
* **per sample** (``rate``, IMDer / GCNet style): each modality of each sample is missing
  independently with probability ``rate``; a sample left with nothing present is drawn again;
* **per step** (``mode="step"``, TFR-Net style): each time step of each modality is zeroed with
  probability ``rate`` (the modality stays "present": nothing is reconstructed).

A sample mask is (N, 3) bool in ``MODALITIES`` order, True = missing; the model receives it as
``batch["missing"]`` and never reads the values behind it (see ``mskt.model``). All three
modalities missing for a sample is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    """(n, 3) bool, True = missing: the ``fixed`` modalities for every sample, and each other
    modality of each sample independently with probability ``rate`` (seeded); a sample left with
    nothing present is drawn again, so every sample keeps at least one modality."""
    fixed = parse_missing(fixed)
    rate = check_rate(rate)
    g = torch.Generator().manual_seed(int(seed))
    base = torch.tensor([m in fixed for m in MODALITIES])  # (3,)
    mask = base.expand(n, len(MODALITIES)).clone()
    if rate == 0.0:
        return mask
    free = ~base

    def draw(k):
        return base | ((torch.rand(k, len(MODALITIES), generator=g) < rate) & free)  # (k, 3)

    mask = draw(n)
    bad = mask.all(dim=1)
    while bad.any():  # P(all missing) <= rate < 1: this ends
        mask[bad] = draw(int(bad.sum()))
        bad = mask.all(dim=1)
    return mask


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
