"""The model, on torch's operations only: config, layers, encoders, the MulT backbone, losses, and
the variants (one file each, registered by name). ``Model`` (``mskt.model.base``) is what the
rest of mskt needs of a model; MulT is one, and a variant need not be MulT (``mctn``). It imports
nothing of the accelerators (``mskt.fast``), which are applied to a built model from outside.

``build_model(cfg)`` builds the variant ``cfg.variant`` names.
"""

from mskt.modalities import MISSING_PATTERNS, MODALITIES
from mskt.model.backbone import MulT
from mskt.model.base import Model, Output
from mskt.model.config import ModelConfig
from mskt.model.encoders import CTCAligner, ModalityEncoder
from mskt.model.layers import (
    TORCH_KERNELS,
    Attention,
    DropoutAttention,
    DropoutContext,
    DropoutKey,
    Kernels,
    Transformer,
    TransformerLayer,
    dropout,
    dropout_key,
    dropout_mask,
    key_mask,
    padding_bias,
    relu_dropout,
    resample,
    run_stacks,
    set_dropout_context,
    sinusoidal_table,
)
from mskt.model.losses import consistency_loss, task_loss
from mskt.model.registry import VARIANTS, register, variant_class
from mskt.model import variants  # noqa: F401 -- registers the built-in variants

KTMulT = MulT  # the name earlier versions used for the model class


def build_model(cfg: ModelConfig, text_steps: int | None = None) -> Model:
    """The model of variant ``cfg.variant``; ``text_steps`` overrides the text grid length (ctc_align)."""
    if text_steps is not None:
        cfg.text_steps = text_steps
    return variant_class(cfg.variant)(cfg)


__all__ = [
    "MISSING_PATTERNS", "MODALITIES", "TORCH_KERNELS", "VARIANTS", "Attention", "CTCAligner", "DropoutAttention", "DropoutContext",
    "DropoutKey", "KTMulT",
    "Kernels", "Model", "ModalityEncoder", "ModelConfig", "MulT", "Output", "Transformer", "TransformerLayer", "build_model",
    "consistency_loss", "dropout", "dropout_key", "dropout_mask", "key_mask", "padding_bias", "register", "relu_dropout", "resample",
    "run_stacks", "set_dropout_context", "sinusoidal_table", "task_loss", "variant_class",
]
