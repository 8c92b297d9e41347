"""The model's configuration: what the data look like, which variant, widths, dropouts, the
knowledge-transfer weights. Variant-specific rules live with each variant (``check_config``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mskt.errors import ConfigError
from mskt.modalities import MODALITIES
from mskt.model.options import Options, check_options, check_ranges, make_options, option_fields  # noqa: F401 -- check_ranges: mskt.model.config.check_ranges
from mskt.model.registry import VARIANTS, option_owners, variant_class


# init, eq and repr are ModelConfig's own (below): they take and show the variant's options too.
@dataclass(init=False, eq=False, repr=False)
class ModelConfig:
    # What the data looks like (filled in from the dataset).
    text_dim: int = 300
    audio_dim: int = 5
    vision_dim: int = 20
    text_steps: int = 50  # steps of the text grid: the target length of ctc_align
    task: str = "regression"  # "regression" (1 output) or "emotions" (4 emotions x 2 logits)
    # Which row of the paper's tables.
    variant: str = "kt"
    targets: str = "all"  # Table 4: cross-modal transformers serve "all" targets, or only text / audio / vision
    # Widths and depths. The paper: "transformer blocks of three layers"; d=40 is its Table's width.
    d_model: int = 40
    heads: int = 4
    encoder_layers: int = 1  # modality encoders (MulT has none; the paper's are transformer-based)
    kt_layers: int = 3  # each of theta, phi, delta
    crossmodal_layers: int = 3
    memory_layers: int = 3  # self-attention decoder after the cross-modal transformers
    text_kernel: int = 1  # Conv1d kernel of the temporal projection (MulT's public code: 1)
    audio_kernel: int = 1
    vision_kernel: int = 1
    # Dropouts: MulT's public defaults.
    attn_dropout: float = 0.1
    attn_dropout_audio: float = 0.0
    attn_dropout_vision: float = 0.0
    relu_dropout: float = 0.1
    res_dropout: float = 0.1
    embed_dropout: float = 0.25
    out_dropout: float = 0.0
    # The variant's own options (kt's loss weights, kt_any's modality dropout, ...) are not fields:
    # each variant declares them (its ``Options``, mskt.model.options) and ``cfg.options`` holds them.
    # Unaligned data: MulT's baseline recipe, a learned CTC pseudo-alignment onto the text grid.
    ctc_align: bool = False

    def __init__(self, **values):
        """Every field by keyword (the rest at their defaults); the other keys are options of the
        variant (its ``Options``): ``ModelConfig(variant="kt", lambda_vision=0.5)``."""
        for name, f in self.fields().items():
            if name in values:
                setattr(self, name, values.pop(name))
            else:
                setattr(self, name, f.default_factory() if f.default is dataclasses.MISSING else f.default)
        self.options = self.options_class()()
        if values:
            self.options = make_options(self.options_class(), values, self.variant, check=False) if isinstance(self.variant, str) and self.variant in VARIANTS else None
            if self.options is None:
                raise ConfigError(f"variant={self.variant!r} is not allowed; choose one of {', '.join(VARIANTS)}")

    @classmethod
    def fields(cls) -> dict:
        return {f.name: f for f in dataclasses.fields(cls)}

    def types(self) -> dict:
        """``{key: type name}`` of every field and every option of the variant."""
        return {name: str(f.type) for name, f in {**self.fields(), **option_fields(self.options_class())}.items()}

    def options_class(self) -> type:
        """The variant's ``Options`` dataclass (no options: ``mskt.model.options.Options``)."""
        return getattr(VARIANTS.get(self.variant) if isinstance(self.variant, str) else None, "Options", Options)

    def __getattr__(self, name):
        # Called only when a field lookup fails: the variant's options answer as if they were fields.
        if name.startswith("__"):  # pickling and copy probe dunders: never an option
            raise AttributeError(name)
        options = self.__dict__.get("options")
        if options is not None and name in option_fields(type(options)):
            return getattr(options, name)
        owners = option_owners(name)
        if owners:
            raise AttributeError(f"{name!r} is an option of variant {', '.join(owners)}, not of {self.__dict__.get('variant')!r}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def to_dict(self) -> dict:
        """Every field, then the variant's options: what config.json holds (flat)."""
        return {**{f: getattr(self, f) for f in self.fields()}, **dataclasses.asdict(self.options)}

    def __eq__(self, other):
        return type(self) is type(other) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    def __reduce__(self):
        # Rebuilt from its values, so that a variant from a plugin file pickles into a worker that
        # has not imported that file yet (``_rebuild`` imports the config's plugins first).
        return (_rebuild, (type(self), self.to_dict()))

    @property
    def n_outputs(self) -> int:
        return 1 if self.task == "regression" else 8

    def dim(self, modality: str) -> int:
        return getattr(self, f"{modality}_dim")

    def attn_dropout_for(self, modality: str) -> float:
        return {"text": self.attn_dropout, "audio": self.attn_dropout_audio, "vision": self.attn_dropout_vision}[modality]

    def target_modalities(self) -> tuple:
        """The modalities the cross-modal transformers serve (Table 4), as the variant fuses them."""
        fuses = variant_class(self.variant).fuses
        if self.targets == "all" or len(fuses) < 2:
            return fuses
        return (self.targets,)

    def check(self) -> None:
        check_ranges(self, MODEL_RANGES)
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant={self.variant!r} is not allowed; choose one of {', '.join(VARIANTS)}")
        allowed = {
            "task": ("regression", "emotions"),
            "targets": ("all", *MODALITIES),
        }
        for key, values in allowed.items():
            if getattr(self, key) not in values:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not allowed; choose one of {', '.join(values)}")
        if self.targets != "all" and self.targets not in variant_class(self.variant).fuses:
            raise ConfigError(f"targets={self.targets!r} is not a modality variant {self.variant!r} fuses")
        if self.d_model % self.heads:
            raise ConfigError(f"d_model={self.d_model} must be divisible by heads={self.heads}")
        for key in ("text_kernel", "audio_kernel", "vision_kernel"):
            if getattr(self, key) < 1 or getattr(self, key) % 2 == 0:
                raise ConfigError(
                    f"{key} must be an odd integer >= 1 (the Conv1d projection pads (k-1)//2 per side, so an even "
                    f"kernel would change the number of steps), found {getattr(self, key)}"
                )
        if type(self.options) is not self.options_class():
            raise ConfigError(f"the options of variant {self.variant!r} are {self.options_class().__name__}, found {type(self.options).__name__}")
        check_options(self.options, self.variant)
        variant_class(self.variant).check_config(self)  # the variant's own rules


# The allowed range of every numeric model field: (low, high, note), each bound (value, "[" or "(")
# for inclusive or exclusive, None for unbounded. The run Config adds its own fields' (mskt.config.RANGES).
MODEL_RANGES = {
    "text_dim": ((1, "["), None, ""),
    "audio_dim": ((1, "["), None, ""),
    "vision_dim": ((1, "["), None, ""),
    "text_steps": ((1, "["), None, ""),
    "d_model": ((1, "["), None, ""),
    "heads": ((1, "["), None, " (and must divide d_model)"),
    "encoder_layers": ((0, "["), None, " (0: no self-attention in the modality encoders)"),
    "kt_layers": ((1, "["), None, ""),
    "crossmodal_layers": ((1, "["), None, ""),
    "memory_layers": ((1, "["), None, ""),
    "attn_dropout": ((0.0, "["), (1.0, ")"), ""),
    "attn_dropout_audio": ((0.0, "["), (1.0, ")"), ""),
    "attn_dropout_vision": ((0.0, "["), (1.0, ")"), ""),
    "relu_dropout": ((0.0, "["), (1.0, ")"), ""),
    "res_dropout": ((0.0, "["), (1.0, ")"), ""),
    "embed_dropout": ((0.0, "["), (1.0, ")"), ""),
    "out_dropout": ((0.0, "["), (1.0, ")"), ""),
}


def _rebuild(cls, values: dict):
    from mskt.plugins import load_plugins

    load_plugins(values.get("plugins", ()))
    return cls(**values)
