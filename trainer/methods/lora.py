"""LoRA (Hu et al. 2021) and rsLoRA (Kalajdzievski 2023).

    y = W0 x + s * B A dropout(x) + b,   s = alpha / r   (rsLoRA: alpha / sqrt(r))

A [r, d_in] is Kaiming-uniform (a=sqrt(5)), B [d_out, r] is zero, so the adapter starts as the
identity (PEFT ``lora/layer.py``). Serving form: ``lora_a = A``, ``lora_b = s * B``; folding s into B
is exact because s is a scalar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from adapters_store.format import ModuleWeights
from trainer.methods.base import AdapterLayer, MethodConfig, fp32, lowrank_scale, register


@dataclass(frozen=True)
class LoRAConfig(MethodConfig):
    rslora: bool = False


def kaiming_a(r: int, d_in: int) -> torch.Tensor:
    """The LoRA/AROMA A init: nn.Linear's Kaiming-uniform with a=sqrt(5)."""
    a = torch.empty(r, d_in)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return a


@register("lora")
class LoRALinear(AdapterLayer):
    Config = LoRAConfig

    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        super().__init__(base, cfg)
        w = base.weight
        self.lora_A = nn.Parameter(kaiming_a(cfg.rank, self.d_in).to(w))  # [r, d_in]
        self.lora_B = nn.Parameter(torch.zeros(self.d_out, cfg.rank).to(w))  # [d_out, r]
        self.scale = lowrank_scale(cfg.alpha, cfg.rank, cfg.rslora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (self.dropout(x) @ self.lora_A.T) @ self.lora_B.T  # [..., d_out]
        return self.base(x) + self.scale * delta

    def compile(self) -> ModuleWeights:
        return ModuleWeights(lora_a=fp32(self.lora_A), lora_b=fp32(self.lora_B) * self.scale)
