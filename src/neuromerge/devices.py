"""Where a merge computes, and in which dtype."""

from __future__ import annotations

import torch

from neuromerge.errors import ConfigError
from neuromerge.io.dtypes import NAME_TO_TORCH


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return dev


def compute_dtype(name: str | torch.dtype) -> torch.dtype:
    dtype = NAME_TO_TORCH[name] if isinstance(name, str) else name
    # Half-precision subtraction loses the small θt − θ0 differences a merge is made of.
    return torch.float64 if dtype == torch.float64 else torch.float32
