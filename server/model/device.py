"""Where and in which dtype the base model runs."""

from __future__ import annotations

import torch

from server.common.config import EngineConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(cfg: EngineConfig) -> tuple[torch.device, torch.dtype]:
    """``auto`` device: CUDA when present; ``auto`` dtype: bfloat16 on CUDA, float32 on CPU."""
    dev = cfg.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.dtype == "auto":
        dt = torch.bfloat16 if dev == "cuda" else torch.float32
    elif cfg.dtype in DTYPES:
        dt = DTYPES[cfg.dtype]
    else:
        raise ValueError(f"dtype {cfg.dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return torch.device(dev), dt
