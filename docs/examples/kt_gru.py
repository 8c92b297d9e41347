"""``kt_gru``: the paper's kt with theta (V -> A) and phi (L -> A) as GRUs: a variant of your own, in a
file of your own, with an option of its own. docs/extending.md walks through it:

    mskt train --plugin docs/examples/kt_gru.py --variant kt_gru --gru-layers 2 --out runs/kt_gru
"""

from dataclasses import dataclass

import torch.nn as nn

from mskt.model import register
from mskt.model.options import option
from mskt.model.variants.kt import KT


@dataclass
class KTGRUOptions(KT.Options):  # kt's options (lambda_vision, lambda_text, kt_target, ...) and one more
    gru_layers: int = option(1, low=(1, "["), help="GRU layers in theta and phi", search=dict(low=1, high=2))


class StepGRU(nn.Module):
    """A GRU in the stack call signature, (x, mask, ...) -> (y, attention maps or None)."""

    def __init__(self, d: int, layers: int):
        super().__init__()
        self.gru = nn.GRU(d, d, num_layers=layers, batch_first=True)

    def forward(self, x, mask, source=None, source_mask=None, return_attention=False, last_only=False):
        y, _ = self.gru(x * mask[..., None])  # (B, T, d); sequences are left-padded, so the last step is real
        y = y * mask[..., None]
        return (y[:, -1:] if last_only else y), None


@register("kt_gru")
class KTGRU(KT):
    """kt whose theta (V -> A) and phi (L -> A) are GRUs."""

    Options = KTGRUOptions

    def build_transfer(self) -> None:
        super().build_transfer()  # kt's fuse (delta), readout and statistics buffers
        self.transfer["vision->audio"] = StepGRU(self.cfg.d_model, self.cfg.gru_layers)  # theta
        self.transfer["text->audio"] = StepGRU(self.cfg.d_model, self.cfg.gru_layers)  # phi
