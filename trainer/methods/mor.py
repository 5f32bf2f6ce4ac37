"""MoR (arXiv 2410.13408): a mixture of rank-wise experts over ONE shared low-rank pair.

    D_i = s diag(lamB_i) B diag(lamA_i) A,    y = W0 x + sum_i softmax(W_g x)_i D_i x + b,   s = alpha/r

Shared A [r, d_in] (Kaiming-uniform) and B [d_out, r] (zero, so the adapter starts as the identity);
expert i owns only lamA_i [r] and lamB_i [d_out], stacked as lam_a [N, r] and lam_b [N, d_out], both
ones at init. The router is dense (no top-k, no load-balancing loss: the paper's ablation preferred
the plain learnable softmax router).

Choices the paper leaves open [I]: the router is a linear gate W_g [N, d_in] on the same token x, per
token, initialised Kaiming-uniform like nn.Linear. It must not start at zero: with a uniform router
and identical experts every expert gets the same gradient and they never diverge.

Training computes the mixture in its serving form, which is the same sum regrouped (and costs
[T, N*r] activations instead of [T, N, d_out]):
    h' = concat_i( softmax(W_g x)_i * lamA_i * (A x) )     [N*r]
    y  = W0 x + B' h' + b,   B' = [diag(lamB_1) sB | ... | diag(lamB_N) sB]   [d_out, N*r]
B' is a function of sB and lamB, so ``compile`` exports the compact form (docs/FORMAT.md): lora_a = A,
lora_b = sB [d_out, r], expert_out_scale = lam_b, gate = W_g, rank_scale = lam_a: r*d_out + N*d_out values
instead of B''s N*r*d_out. The loader expands B' with ``mor_form.expert_up``, the function training uses
here, so the served B' is bitwise the trained one. No exact merge exists (the router depends on x). The
tests check this against the per-expert sum written literally.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from adapters_store.format import ModuleWeights
from adapters_store.mor_form import expert_up
from trainer.methods.base import AdapterLayer, MethodConfig, check, fp32, lowrank_scale, register
from trainer.methods.lora import kaiming_a


@dataclass(frozen=True)
class MoRConfig(MethodConfig):
    num_experts: int = 8

    def problems(self) -> list[str]:
        return super().problems() + check(num_experts=(self.num_experts, 1, None))


@register("mor")
class MoRLinear(AdapterLayer):
    Config = MoRConfig

    def __init__(self, base: nn.Linear, cfg: MoRConfig):
        super().__init__(base, cfg)
        w, n = base.weight, cfg.num_experts
        self.lora_A = nn.Parameter(kaiming_a(cfg.rank, self.d_in).to(w))  # [r, d_in]
        self.lora_B = nn.Parameter(torch.zeros(self.d_out, cfg.rank).to(w))  # [d_out, r]
        self.lam_a = nn.Parameter(torch.ones(n, cfg.rank).to(w))  # [N, r]
        self.lam_b = nn.Parameter(torch.ones(n, self.d_out).to(w))  # [N, d_out]
        gate = torch.empty(n, self.d_in)
        nn.init.kaiming_uniform_(gate, a=math.sqrt(5))
        self.gate = nn.Parameter(gate.to(w))  # [N, d_in]
        self.scale = lowrank_scale(cfg.alpha, cfg.rank)

    def expert_up(self) -> torch.Tensor:
        """B' = [diag(lamB_1) sB | ... | diag(lamB_N) sB]  [d_out, N*r], as the loader expands it."""
        return expert_up(self.scale * self.lora_B, self.lam_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x) @ self.lora_A.T  # [..., r]
        v = torch.softmax(x @ self.gate.T, dim=-1)  # [..., N]
        hh = v[..., :, None] * self.lam_a * h[..., None, :]  # [..., N, r]
        return self.base(x) + hh.flatten(-2) @ self.expert_up().T  # [..., d_out]

    def compile(self) -> ModuleWeights:
        """The compact form; ``.expanded()`` of it is fp32(expert_up()) bitwise."""
        return ModuleWeights(lora_a=fp32(self.lora_A), lora_b=fp32(self.scale * self.lora_B), gate=fp32(self.gate),
                             rank_scale=fp32(self.lam_a), expert_out_scale=fp32(self.lam_b))
