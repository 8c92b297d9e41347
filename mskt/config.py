"""One flat, typed configuration for a run: the model's fields plus data and training, plus the
options of its variant (declared by the variant, mskt.model.options; ``cfg.lambda_text`` reads one).

It round-trips through a papermill parameters cell (``Config.from_dict(params)``), JSON
(``config.json`` in every run folder) and the CLI (``--key value`` for every field). Unknown keys,
wrong types and disallowed values are errors (``ConfigError``) that name the field and say what is
allowed: every numeric field has a range (``RANGES``; kernels must be odd), every float must be
finite, and the string fields are choices (or, for ``device``, a name torch can parse).

Presets (``preset(name)``) give each dataset's defaults and say where each one comes from.
``plugins`` (modules or .py files) are imported before the variant is looked up, wherever a config
is built or read back (mskt.plugins).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

from mskt.errors import ConfigError
from mskt.model import VARIANTS, ModelConfig, variant_class
from mskt.model.config import MODEL_RANGES, check_ranges
from mskt.model.options import _TYPES, coerce, option_aliases, option_fields, option_names  # noqa: F401 -- coerce: mskt.config.coerce
from mskt.model.registry import option_owners

# The options kt and kt_any owned as flat fields of every config until they moved to their variants
# (mskt.model.options). A stored config (config.json, a checkpoint, a study) of another variant still
# holds them, at values that variant never read: reading it back drops them.
MOVED_TO_VARIANTS = ("consistency", "lambda_vision", "lambda_language", "lambda_fused", "kt_target", "lambda_aux", "lambda_any", "modality_dropout")


@dataclass(init=False, eq=False, repr=False)
class Config(ModelConfig):
    # Modules or .py files that register variants of your own (mskt.plugins), imported before the
    # variant is looked up, wherever this config is read; file paths are recorded absolute.
    plugins: tuple = ()
    # Data: a path (.pkl MulT/MMSA, .h5 store) or a synthetic preset such as synthetic:mosi-unaligned.
    data: str = "synthetic:mosi"
    data_scale: float = 1.0  # synthetic only: multiplies the preset's split sizes
    data_seed: int = 0  # synthetic only: the data's seed (the run's seed is `seed`)
    dataset: str = "auto"  # which dataset the data are (paper rows, label range): auto (from the file), mosi, mosei, iemocap, sims, other
    # Training. The paper: Adam, constant lr 1e-3, 40 epochs. MulT: batch 24, clip 0.8, seed 1111.
    epochs: int = 40
    batch_size: int = 24
    lr: float = 1e-3
    weight_decay: float = 0.0
    scheduler: str = "none"  # "none" (the paper) or "plateau" (MulT: ReduceLROnPlateau, patience 20, factor 0.1)
    grad_clip: float = 0.8
    seed: int = 1111
    select_on: str = "valid_loss"  # "valid_loss" (task loss on validation, as MulT) or "valid_metric"
    # Which validation protocol selects the checkpoint (and feeds patience): "default" (each variant's
    # own test protocol: audio missing, nothing missing for `full`; the paper's), "none" (nothing
    # missing), "conditions" (the mean score over the six fixed missing conditions), or one condition
    # ("audio", "audio,vision", ...). Variants compared with each other must share one: robustness
    # comparisons (mskt.experiments.robustness.fair_configs) use "conditions" for every variant.
    select_missing: str = "default"
    # Convergence. patience: stop after this many epochs without a better validation score (0: off,
    # train all `epochs`). max_steps: stop after this many optimizer steps (0: no limit). min_steps:
    # go on past `epochs` until this many optimizer steps were taken (0: none). steps_like_full_labels:
    # with label_fraction < 1, min_steps becomes what the same run with every label takes
    # (epochs x batches per epoch), so fewer labels never mean fewer optimizer steps.
    patience: int = 0
    min_epochs: int = 0  # patience may end a run only after this many epochs (a slow start looks like a plateau; 0: from the first)
    max_steps: int = 0
    min_steps: int = 0
    steps_like_full_labels: bool = False
    label_fraction: float = 1.0  # keep a seeded, stratified share of the training labels; the rest train unlabelled (mskt.data.labels)
    teacher_run: str = ""  # kt_target="teacher": a finished `full` run folder whose audio encoder is frozen in
    # Missing modalities in training, for any variant (mskt.data.missing.TrainingProtocol): "auto" (the
    # variant's own: kt_any's modality_dropout, none for the others), "none", "patterns", "fixed",
    # "sample", "uniform" or "step". Baselines zero-impute what is dropped; kt_any reconstructs it.
    train_missing: str = "auto"
    train_missing_rate: float = 0.5  # patterns: share of samples; sample/step: probability; uniform: r ~ U(0, this)
    train_missing_modalities: str = "audio"  # train_missing="fixed": missing for every training sample
    # Execution.
    device: str = "auto"  # "auto" (CUDA if present, else CPU), "cpu", "cuda", "cuda:1", ...
    eval_batch_size: int = 256
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    progress: str = "auto"  # tqdm bars: "auto" (where a person watches: JupyterLab, a terminal; never papermill or CI: mskt.console), "on", "off"
    precision: str = "fp32"  # "fp32", or "bf16": autocast to bfloat16 on CUDA (weights and optimizer stay fp32)
    compile: bool = False  # torch.compile the training forward (eager fallback); helps on CUDA, not on small CPUs
    lazy: bool = False  # read an .h5 store's features batch by batch from disk: datasets larger than memory
    # CPU training: "fused" hands the model mskt.fast's compiled kernels where they are verified to
    # compute what its Python code computes (the Python code runs elsewhere, and the log says so);
    # "torch" runs the Python code throughout.
    cpu_kernels: str = "fused"

    def check(self) -> None:
        """Every field's type, then its range (beyond ModelConfig's checks, which run after these so
        that, e.g., heads=0 is a clear error rather than a division by zero), then the choices."""
        self._check_types()
        self._check_ranges()
        super().check()
        allowed = {"cpu_kernels": ("fused", "torch"), "scheduler": ("none", "plateau"), "select_on": ("valid_loss", "valid_metric"), "progress": ("auto", "on", "off"), "precision": ("fp32", "bf16"), "dataset": ("auto", "mosi", "mosei", "iemocap", "sims", "other")}
        for key, values in allowed.items():
            if getattr(self, key) not in values:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not allowed; choose one of {', '.join(values)}")
        if not self.data.strip():
            raise ConfigError("data must be a file path (.pkl, .h5) or synthetic:<preset>, found ''")
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except RuntimeError:
                raise ConfigError(f"device={self.device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
        self._check_train_missing()
        self._check_select_missing()
        if self.min_epochs > self.epochs:
            raise ConfigError(f"min_epochs={self.min_epochs} exceeds epochs={self.epochs}; patience may stop a run only after "
                              "min_epochs, so it must be at most epochs")
        if self.max_steps and self.min_steps > self.max_steps:
            raise ConfigError(f"min_steps={self.min_steps} exceeds max_steps={self.max_steps}; min_steps must be at most max_steps (0: no limit)")
        if variant_class(self.variant).uses_teacher(self) and not self.teacher_run:
            raise ConfigError(f"variant {self.variant!r} with these options needs teacher_run: the folder of a finished `full` run")

    def _check_train_missing(self) -> None:
        """The training protocol's choice, its rate (below 1 where it is a probability) and, for
        "fixed", its modalities (mskt.data.missing.TrainingProtocol draws the masks)."""
        from mskt.model import MODALITIES

        if self.train_missing not in TRAIN_PROTOCOLS:
            raise ConfigError(f"train_missing={self.train_missing!r} is not allowed; choose one of {', '.join(TRAIN_PROTOCOLS)}")
        if self.train_missing in ("sample", "step") and self.train_missing_rate >= 1.0:
            raise ConfigError(f"train_missing_rate must be in [0.0, 1.0) with train_missing={self.train_missing!r}, found {self.train_missing_rate!r}")
        if self.train_missing != "fixed":
            return
        key, value = "train_missing_modalities", self.train_missing_modalities
        names = [{"language": "text"}.get(n.strip(), n.strip()) for n in value.split(",") if n.strip()]
        if not names or any(n not in MODALITIES for n in names) or len(set(names)) != len(names) or len(names) == len(MODALITIES):
            raise ConfigError(f"{key}={value!r} must name one or two of {', '.join(MODALITIES)} (or language), comma-separated, each once")
        inputs = variant_class(self.variant).inputs
        if set(inputs) <= set(names):
            raise ConfigError(f"{key}={value!r} leaves variant {self.variant!r} nothing it reads ({', '.join(inputs)})")

    def _check_select_missing(self) -> None:
        """select_missing: one of SELECT_MISSING or one fixed condition (MISSING_PATTERNS, as
        mskt.data.missing.CONDITIONS names them: "audio", "text,vision"; "language" is "text")."""
        from mskt.model import MISSING_PATTERNS, MODALITIES

        if self.select_missing in SELECT_MISSING:
            return
        names = [{"language": "text"}.get(n.strip(), n.strip()) for n in self.select_missing.split(",") if n.strip()]
        if tuple(m for m in MODALITIES if m in names) not in MISSING_PATTERNS or len(set(names)) != len(names):
            conditions = ", ".join(",".join(p) for p in MISSING_PATTERNS)
            raise ConfigError(f"select_missing={self.select_missing!r} is not allowed; choose one of {', '.join(SELECT_MISSING)} "
                              f"or one condition: {conditions}")

    def _check_types(self) -> None:
        """A Config built directly (not through from_dict) gets the same type errors as from_dict."""
        for name, f in self.fields().items():
            value = getattr(self, name)
            if name == "plugins":
                if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"plugins must be a list of module names or .py file paths, found {value!r}")
                continue
            kind = _TYPES[f.type if isinstance(f.type, str) else f.type.__name__]
            if kind is bool:
                ok = isinstance(value, bool)
            elif kind is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            elif kind is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = isinstance(value, kind)
            if not ok:
                raise ConfigError(f"{name} must be {'true or false' if kind is bool else kind.__name__}, found {value!r}")

    def _check_ranges(self) -> None:
        for name, f in self.fields().items():
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, found {value!r}")
        check_ranges(self, RANGES)

    # -- round trips ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: dict, base: "Config | None" = None) -> "Config":
        """A Config from ``values`` (on top of ``base`` or the defaults); strict about keys and types.

        ``values`` may hold the options of the variant it names (or inherits from ``base``): an
        option of another variant is an error naming its owner. The base's options carry over where
        the variant owns them (``base.replace(variant="kt_any")`` keeps ``consistency``)."""
        from mskt.plugins import load_entry_points, load_plugins

        load_entry_points()  # installed packages' variants (once per process)
        fields = cls.fields()
        merged = {k: v for k, v in base.to_dict().items() if k in fields} if base is not None else {}
        if "plugins" in values:
            merged["plugins"] = _plugins(values["plugins"])
        load_plugins(merged.get("plugins", ()))  # before the variant is looked up: it may be theirs
        variant = values.get("variant", merged.get("variant", fields["variant"].default))
        if not isinstance(variant, str):
            raise ConfigError(f"variant must be str, found {variant!r}")
        if variant not in VARIANTS:
            raise ConfigError(f"variant={variant!r} is not allowed; choose one of {', '.join(VARIANTS)}")
        options_cls = variant_class(variant).Options
        owned, aliases = option_fields(options_cls), option_aliases(options_cls)
        values = {aliases.get(k, k): v for k, v in values.items()}
        unknown = sorted(set(values) - set(fields) - set(owned))
        if unknown:
            for key in unknown:
                if option_owners(key):
                    raise ConfigError(f"{key} is an option of variant {', '.join(option_owners(key))}, not of {variant!r}; "
                                      f"its options: {', '.join(owned) or 'none'}")
            raise ConfigError(f"unknown config key(s) {unknown}; allowed: {', '.join(fields)} and the options of variant {variant!r}: {', '.join(owned) or 'none'}")
        options = {k: v for k, v in base.to_dict().items() if k in owned} if base is not None else {}
        for key, value in values.items():
            if key == "plugins":
                continue
            if key in owned:
                options[key] = coerce(key, value, owned[key].type)
            else:
                merged[key] = coerce(key, value, fields[key].type)
        cfg = cls(**merged, **options)
        cfg.check()
        return cfg

    @classmethod
    def from_stored(cls, values: dict, where: str = "") -> "Config":
        """A Config from what an earlier mskt stored (config.json, a checkpoint, a study): as
        ``from_dict``, less the options that moved to their variants (``MOVED_TO_VARIANTS``) where the
        stored variant does not own them; ``lambda_language`` reads as ``lambda_text``."""
        variant = values.get("variant")
        if isinstance(variant, str):
            try:
                load_plugins = __import__("mskt.plugins", fromlist=["load_plugins"]).load_plugins
                load_plugins(_plugins(values.get("plugins", ())))
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}" if where else str(e)) from None
            if variant in VARIANTS:
                owned = set(option_names(variant_class(variant).Options))
                values = {k: v for k, v in values.items() if k not in MOVED_TO_VARIANTS or k in owned}
        return cls.from_dict(values)

    def replace(self, **changes) -> "Config":
        return Config.from_dict(changes, base=self)

    def save(self, path) -> None:
        from mskt.paths import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path) -> "Config":
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read the config ({e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the config must be a JSON object, found {type(values).__name__}")
        return cls.from_stored(values, where=str(path))


# train_missing's choices: "auto" (the variant's own protocol) and mskt.data.missing.TrainingProtocol's kinds.
TRAIN_PROTOCOLS = ("auto", "none", "patterns", "fixed", "sample", "uniform", "step")
# select_missing's named choices (besides one fixed condition such as "audio,vision").
SELECT_MISSING = ("default", "none", "conditions")

# The allowed range of every numeric field (the model's, MODEL_RANGES, and the run's), in the form
# ``mskt.model.config.check_ranges`` reads. Kernels (odd, >= 1) are checked by ModelConfig.check;
# every float must also be finite.
_SEED_MAX = 2**63 - 1  # torch.manual_seed takes 64 bits; the headroom keeps seed + i (grid, ranks) in range
RANGES = {
    **MODEL_RANGES,
    "data_scale": ((0.0, "("), (100.0, "]"), " (a multiple of the synthetic preset's split sizes; 100x MOSEI would not fit in memory)"),
    "data_seed": ((0, "["), (_SEED_MAX, "]"), ""),
    "epochs": ((1, "["), None, ""),
    "batch_size": ((1, "["), None, ""),
    "lr": ((0.0, "("), None, ""),
    "weight_decay": ((0.0, "["), None, " (0: none)"),
    "grad_clip": ((0.0, "["), None, " (0: no clipping)"),
    "seed": ((0, "["), (_SEED_MAX, "]"), ""),
    "label_fraction": ((0.0, "("), (1.0, "]"), " (the share of training labels kept; 1: all)"),
    "eval_batch_size": ((1, "["), None, ""),
    "threads": ((0, "["), (1024, "]"), " (0: torch's default)"),
    "train_missing_rate": ((0.0, "["), (1.0, "]"), " (below 1 for train_missing sample and step)"),
    "patience": ((0, "["), None, " (epochs without improvement; 0: off)"),
    "min_epochs": ((0, "["), None, " (patience may stop a run only after this many epochs; 0: from the first)"),
    "max_steps": ((0, "["), None, " (0: no limit)"),
    "min_steps": ((0, "["), None, " (0: none)"),
}


# ----------------------------------------------------------------------------------------------
# Presets: each dataset's defaults. Where the paper states a setting we use it; the rest is
# MulT's public configuration or our documented choice.

_PAPER = {
    # "transformer blocks consist of three transformer layers"; "Adam ... 40 training epochs ...
    # constant learning rate of 1e-3".
    "kt_layers": 3,
    "crossmodal_layers": 3,
    "memory_layers": 3,
    "lr": 1e-3,
    "epochs": 40,
    "scheduler": "none",
}

PRESETS = {
    # MulT's public code: batch 24, clip 0.8, seed 1111; d=40 from the paper's hyperparameter table.
    # Text projection kernel 1, audio/vision 1: MulT's code.
    "mosi": {**_PAPER, "data": "synthetic:mosi"},
    "mosi-unaligned": {**_PAPER, "data": "synthetic:mosi-unaligned"},
    # MOSEI is 13x larger than MOSI: a larger batch keeps epochs affordable (our choice).
    "mosei": {**_PAPER, "data": "synthetic:mosei", "batch_size": 64},
    "mosei-unaligned": {**_PAPER, "data": "synthetic:mosei-unaligned", "batch_size": 64},
    # IEMOCAP: cross-entropy per emotion (MulT); 20 aligned steps.
    "iemocap": {**_PAPER, "data": "synthetic:iemocap"},
    "iemocap-unaligned": {**_PAPER, "data": "synthetic:iemocap-unaligned"},
}


def _plugins(value) -> tuple:
    """``plugins`` as a tuple of normalised entries, from a list, a tuple or a comma-separated string."""
    from mskt.plugins import normalise

    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"plugins must be a list of module names or .py file paths, found {value!r}")
    return tuple(normalise(v) for v in value)


def preset(name: str, **overrides) -> Config:
    """The preset ``name`` (see PRESETS) with ``overrides`` applied."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    return Config.from_dict({**PRESETS[name], **overrides})


# A model and data small enough that every notebook runs in seconds: checks that code paths work,
# not results.
SMOKE = {
    "data_scale": 0.03,
    "epochs": 2,
    "batch_size": 16,
    "d_model": 8,
    "heads": 2,
    "encoder_layers": 1,
    "kt_layers": 1,
    "crossmodal_layers": 1,
    "memory_layers": 1,
}
