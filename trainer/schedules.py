"""Learning-rate multipliers (step -> factor of --lr), as transformers' schedules with warmup."""

from __future__ import annotations

import math
from functools import partial

SCHEDULERS = ("linear", "cosine", "constant")


def linear_schedule(step: int, *, warmup: int, total: int) -> float:
    """transformers' get_linear_schedule_with_warmup as a multiplier."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def cosine_schedule(step: int, *, warmup: int, total: int) -> float:
    """transformers' get_cosine_schedule_with_warmup (half a cosine from 1 to 0 after the warmup)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def constant_schedule(step: int, *, warmup: int, total: int) -> float:
    """transformers' get_constant_schedule_with_warmup."""
    return step / max(1, warmup) if step < warmup else 1.0


def make_schedule(name: str, warmup: int, total: int):
    table = {"linear": linear_schedule, "cosine": cosine_schedule, "constant": constant_schedule}
    if name not in table:
        raise ValueError(f"--lr-scheduler must be one of {list(table)}, got {name!r}")
    return partial(table[name], warmup=warmup, total=total)
