"""What every adapter method provides, and the one-line registry.

A method is a training-time layer class that wraps one frozen ``nn.Linear``:

    @register("lora")
    class LoRALinear(AdapterLayer):
        Config = LoRAConfig            # frozen dataclass; CLI flags and --set key=value fill it
        def forward(self, x): ...      # the method's training forward (the paper's equation)
        def compile(self): ...         # -> ModuleWeights in serving form, or None (rank 0)

Methods whose training needs more than the optimizer (AdaLoRA's budget allocation, AROMA's
check/merge/reset) override ``make_controller`` and return a :class:`Controller`: the loop calls its
hooks at fixed points and knows nothing else about the method.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from adapters_store.format import ModuleWeights

REGISTRY: dict[str, type[AdapterLayer]] = {}


@dataclass(frozen=True)
class MethodConfig:
    """Fields shared by every method; subclasses add their own (always with defaults)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    positive_alpha: ClassVar[bool] = True  # AdaLoRA reads alpha <= 0 as "use r" (PEFT)

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:  # every bad option in one message, before anything is built
            raise ValueError(f"{type(self).__name__}: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every invalid option, each naming the option, its value and the allowed range; subclasses
        extend the list (``super().problems() + [...]``)."""
        out = check(rank=(self.rank, 1, None))
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not math.isfinite(self.alpha) or (self.positive_alpha and self.alpha <= 0):
            out.append(f"alpha must be {'> 0' if self.positive_alpha else 'finite'}, got {self.alpha}")
        return out


def check(**ranges: tuple[float | None, float | None, float | None]) -> list[str]:
    """``check(delta_t=(value, lo, hi))``: a problem for each value outside [lo, hi] (None: unbounded;
    a value of None is an unset option and passes)."""
    out = []
    for name, (value, lo, hi) in ranges.items():
        if value is None:
            continue
        if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            bound = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
            out.append(f"{name} must be {bound}, got {value}")
    return out


class Controller:
    """Method-wide hooks, called by the loop; the defaults do nothing (LoRA, DoRA, MoR, EDoRA)."""

    def regularizer(self) -> torch.Tensor | None:
        """An extra loss term added to the task loss (AdaLoRA's orthogonality penalty)."""
        return None

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Called after ``optimizer.step()`` and before ``zero_grad()``; ``step`` counts from 0."""

    def should_stop(self) -> bool:
        return False

    def lr_lambda(self, total_steps: int) -> Any | None:
        """A step -> multiplier function replacing the loop's linear warmup/decay, or None."""
        return None

    def total_rank(self) -> int | None:
        """The adapter's current total rank, for the rank-over-time record (rank-adaptive methods)."""
        return None

    def summary(self) -> dict:
        return {}


class AdapterLayer(nn.Module, metaclass=abc.ABCMeta):
    """A frozen base linear plus a method's trainable low-rank parameters; a method must define
    ``forward`` and ``compile`` (a class missing either cannot be instantiated)."""

    Config: ClassVar[type[MethodConfig]] = MethodConfig
    method: ClassVar[str] = ""

    def __init__(self, base: nn.Linear, cfg: MethodConfig):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps nn.Linear, got {type(base).__name__}")
        base.requires_grad_(False)
        self.base = base
        self.cfg = cfg
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:  # [d_out, d_in], the frozen W0
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def d_in(self) -> int:
        return self.base.in_features

    @property
    def d_out(self) -> int:
        return self.base.out_features

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The method's training forward: base(x) plus its correction."""

    @abc.abstractmethod
    def compile(self) -> ModuleWeights | None:
        """The serving form of DESIGN.md section 2 (scale folded in, fp32 out_scale), or None at rank 0."""

    @classmethod
    def make_controller(cls, layers: dict[str, AdapterLayer], cfg: MethodConfig, total_steps: int) -> Controller:
        return Controller()


def register(name: str):
    """Class decorator: ``@register("lora")`` makes the method available to the loop and the CLI."""

    def wrap(cls: type[AdapterLayer]) -> type[AdapterLayer]:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        cls.method = name
        REGISTRY[name] = cls
        return cls

    return wrap


def get_method(name: str) -> type[AdapterLayer]:
    import trainer.methods  # noqa: F401  (registers every method)

    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}: expected one of {sorted(REGISTRY)}") from None


def make_config(name: str, **values: Any) -> MethodConfig:
    """Build a method's config from keyword values; unknown keys are an error naming the valid ones."""
    cls = get_method(name).Config
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{name} has no option(s) {unknown}; valid: {sorted(fields)}")
    return cls(**values)


def lowrank_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """s = alpha / r (LoRA), or alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023)."""
    return alpha / (rank**0.5) if rslora else alpha / rank


def fp32(t: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous fp32 CPU copy: the form compile() hands to the file format."""
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
