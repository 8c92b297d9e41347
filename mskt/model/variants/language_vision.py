"""``language_vision``: MulT on text and vision only, the baseline without audio or its reconstruction."""

from mskt.model.backbone import MulT
from mskt.model.registry import register


@register("language_vision")
class LanguageVision(MulT):
    inputs = ("text", "vision")
    fuses = ("text", "vision")
