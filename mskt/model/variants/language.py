"""``language``: text alone, through its encoder and a self-attention decoder."""

from mskt.model.backbone import MulT
from mskt.model.registry import register


@register("language")
class Language(MulT):
    inputs = ("text",)
    fuses = ("text",)
