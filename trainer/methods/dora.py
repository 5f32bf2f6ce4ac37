"""DoRA (Liu et al. 2024): weight-decomposed low-rank adaptation.

    W' = m * (W0 + s B A) / ||W0 + s B A||_row          (DoRA eq. 5; "column norm" in the paper's
    y  = (m / n) * (W0 x + s B A x) + b                  layout = per output row in PyTorch's)

m [d_out] is trainable and starts at ||W0||_row (B = 0, so W' = W0 at init). n is detached from the
graph (DoRA section 4.3), as PEFT does. The bias stays outside the rescale (PEFT adds it through
``base(x)``). With dropout, the rescaled base term uses the un-dropped x, so the train-mode forward
differs from PEFT's (which routes dropped x through W0 in the (g-1) term); eval is identical.

Serving form: ``lora_b = s * B`` and ``out_scale = m / ||W0 + s B A||_row``, computed once in fp32
from the exact base weight (the file records the base fingerprint because g is only valid for it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adapters_store.format import ModuleWeights
from trainer.methods.base import AdapterLayer, MethodConfig, fp32, lowrank_scale, register
from trainer.methods.lora import kaiming_a


@dataclass(frozen=True)
class DoRAConfig(MethodConfig):
    rslora: bool = False


def row_norm(w0: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||W0 + delta||_row [d_out], computed in fp32 whatever the weights' dtype."""
    return (w0.float() + delta.float()).norm(dim=1)


def magnitude_out_scale(m: torch.Tensor, w0: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """g = m / ||W0 + delta||_row in fp32: the serving form of a DoRA-style magnitude."""
    return m.detach().float() / row_norm(w0.detach(), delta.detach())


@register("dora")
class DoRALinear(AdapterLayer):
    Config = DoRAConfig

    def __init__(self, base: nn.Linear, cfg: DoRAConfig):
        super().__init__(base, cfg)
        w = base.weight
        self.lora_A = nn.Parameter(kaiming_a(cfg.rank, self.d_in).to(w))  # [r, d_in]
        self.lora_B = nn.Parameter(torch.zeros(self.d_out, cfg.rank).to(w))  # [d_out, r]
        self.magnitude = nn.Parameter(row_norm(w, torch.zeros_like(w)).to(w))  # [d_out]
        self.scale = lowrank_scale(cfg.alpha, cfg.rank, cfg.rslora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta_w = self.scale * (self.lora_B @ self.lora_A)  # [d_out, d_in]
        n = row_norm(self.weight, delta_w).detach().to(x.dtype)  # [d_out], no gradient (section 4.3)
        lowrank = (self.dropout(x) @ self.lora_A.T) @ self.lora_B.T  # [..., d_out]
        y = x @ self.weight.T + self.scale * lowrank
        y = (self.magnitude / n) * y
        return y if self.bias is None else y + self.bias

    def compile(self) -> ModuleWeights:
        b = fp32(self.lora_B) * self.scale
        a = fp32(self.lora_A)
        return ModuleWeights(lora_a=a, lora_b=b, out_scale=magnitude_out_scale(self.magnitude, self.weight, b @ a))
