"""The model's configuration: what the data look like, which variant, widths, dropouts, the
knowledge-transfer weights. Variant-specific rules live with each variant (``check_config``)."""

from __future__ import annotations

from dataclasses import dataclass

from mskt.errors import ConfigError
from mskt.modalities import MODALITIES
from mskt.model.registry import VARIANTS, variant_class


@dataclass
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
    # Knowledge transfer.
    consistency: str = "l2"  # "l2" (the paper's best) or "l1" (Table 5)
    lambda_vision: float = 1.0  # lambda1, weight of L_c(V -> A)
    lambda_language: float = 1.0  # lambda2, weight of L_c(L -> A)
    lambda_fused: float = 0.0  # beyond the paper: consistency on delta's output A' too
    kt_target: str = "raw"  # "raw" (standardised audio features), "aux" (encoder + training-only head) or "teacher"
    lambda_aux: float = 1.0  # weight of the training-only audio head's task loss (kt_target="aux")
    # kt_any (beyond the paper): reconstruct whichever modalities are missing, per sample.
    lambda_any: float = 1.0  # weight of kt_any's consistency terms (per target modality, the mean of its terms)
    modality_dropout: float = 0.5  # kt_any training (train_missing="auto"): the share of samples given one of the six missing patterns
    # Unaligned data: MulT's baseline recipe, a learned CTC pseudo-alignment onto the text grid.
    ctc_align: bool = False

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
            "consistency": ("l1", "l2"),
            "kt_target": ("raw", "aux", "teacher"),
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
    "lambda_vision": ((0.0, "["), None, " (a loss weight; 0 turns the term off)"),
    "lambda_language": ((0.0, "["), None, " (a loss weight; 0 turns the term off)"),
    "lambda_fused": ((0.0, "["), None, " (a loss weight; 0 turns the term off)"),
    "lambda_aux": ((0.0, "["), None, " (a loss weight; 0 turns the term off)"),
    "lambda_any": ((0.0, "["), None, " (a loss weight; 0 turns the term off)"),
    "modality_dropout": ((0.0, "["), (1.0, "]"), " (kt_any: the share of training samples given a random missing pattern)"),
}


def check_ranges(cfg, ranges: dict) -> None:
    """``ConfigError`` naming the first field of ``cfg`` outside its range in ``ranges``."""
    for name, (low, high, note) in ranges.items():
        value = getattr(cfg, name)
        low_ok = low is None or (value > low[0] if low[1] == "(" else value >= low[0])
        high_ok = high is None or (value < high[0] if high[1] == ")" else value <= high[0])
        if not (low_ok and high_ok):
            raise ConfigError(f"{name} must be in {_interval(low, high)}{note}, found {value!r}")


def _interval(low, high) -> str:
    """``[1, inf)``, ``(0.0, 100.0]``: the allowed range, as the error message prints it."""
    return f"{low[1]}{low[0]}, " + (f"{high[0]}{high[1]}" if high is not None else "inf)")
