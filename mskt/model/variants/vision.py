"""``vision``: vision alone, through its encoder and a self-attention decoder."""

from mskt.model.backbone import MulT
from mskt.model.registry import register


@register("vision")
class Vision(MulT):
    inputs = ("vision",)
    fuses = ("vision",)
