"""``full``: MulT on all three real modalities, audio included at test time (the upper bound)."""

from mskt.model.backbone import MulT
from mskt.model.registry import register


@register("full")
class Full(MulT):
    inputs = ("text", "audio", "vision")
    fuses = ("text", "audio", "vision")
    test_missing = ()  # the upper bound: audio is there at test time
