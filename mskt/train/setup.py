"""The one place a device is chosen, and seeding."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from mskt.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """The one place a device is chosen: "auto" is CUDA when present, else CPU. Under torchrun,
    "auto" and "cuda" mean this process's own GPU, cuda:LOCAL_RANK."""
    local_rank = os.environ.get("LOCAL_RANK")
    if name in ("auto", "cuda") and local_rank is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(local_rank)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} asked for CUDA, but torch sees no CUDA device here")
    return device



def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
