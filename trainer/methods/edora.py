"""EDoRA (arXiv 2501.12067): DoRA with frozen SVD factors and a small trainable r x r core.

    W0 ~ P_r S_r Q_r^T  (top-r SVD);  B = P_r [d_out, r] (frozen, orthonormal), A = S_r Q_r^T [r, d_in]
    (frozen), so BA is the best rank-r approximation of W0; R [r, r] ~ N(0, sigma^2), sigma = 1e-5
    y = (m / n) * (W0 x + s B R A x) + b,   n = ||W0 + s B R A||_row (detached),   s = alpha / r

Trainable per module: R and the DoRA magnitude m [d_out] (r^2 + d_out). m starts at ||W0||_row, as in
the EDoRA repo, which builds a DoRA layer first (B = 0 then) and only afterwards replaces A and B.

Choice [I]: the repo runs sklearn's randomized TruncatedSVD (n_iter=10, random_state=42) on W0^T; here
``torch.linalg.svd`` computes the exact top-r factors in fp32: deterministic with no seed, the same
subspace the randomized method approximates, and well under a second for these layer sizes. Singular
vector signs are arbitrary and irrelevant (R starts random and trains).

Serving form: R folded into B, ``lora_b = s B R``, ``lora_a = A``, ``out_scale = m / ||W0 + s B R A||_row``
computed once in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adapters_store.format import ModuleWeights
from trainer.methods.base import AdapterLayer, MethodConfig, check, fp32, lowrank_scale, register
from trainer.methods.dora import magnitude_out_scale, row_norm


@dataclass(frozen=True)
class EDoRAConfig(MethodConfig):
    r_std: float = 1e-5

    def problems(self) -> list[str]:
        return super().problems() + check(r_std=(self.r_std, 0.0, None))


def svd_factors(w0: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B = P_r [d_out, r], A = S_r Q_r^T [r, d_in]) from the exact SVD of W0 in fp32."""
    if r > min(w0.shape):
        raise ValueError(f"edora rank {r} exceeds min(d_out, d_in) = {min(w0.shape)} of a {tuple(w0.shape)} weight")
    u, s, vh = torch.linalg.svd(w0.detach().float(), full_matrices=False)
    return u[:, :r].contiguous(), (s[:r, None] * vh[:r]).contiguous()


@register("edora")
class EDoRALinear(AdapterLayer):
    Config = EDoRAConfig

    def __init__(self, base: nn.Linear, cfg: EDoRAConfig):
        super().__init__(base, cfg)
        w = base.weight
        b, a = svd_factors(w, cfg.rank)
        self.register_buffer("lora_B", b.to(w))  # [d_out, r], frozen
        self.register_buffer("lora_A", a.to(w))  # [r, d_in], frozen
        self.lora_R = nn.Parameter(torch.randn(cfg.rank, cfg.rank).mul_(cfg.r_std).to(w))  # [r, r]
        self.magnitude = nn.Parameter(row_norm(w, torch.zeros_like(w)).to(w))  # [d_out]
        self.scale = lowrank_scale(cfg.alpha, cfg.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.lora_B @ self.lora_R  # [d_out, r]
        n = row_norm(self.weight, self.scale * (up @ self.lora_A)).detach().to(x.dtype)  # [d_out]
        lowrank = (self.dropout(x) @ self.lora_A.T) @ up.T  # [..., d_out]
        y = (self.magnitude / n) * (x @ self.weight.T + self.scale * lowrank)
        return y if self.bias is None else y + self.bias

    def compile(self) -> ModuleWeights:
        b = fp32(self.lora_B) @ fp32(self.lora_R) * self.scale
        a = fp32(self.lora_A)
        return ModuleWeights(lora_a=a, lora_b=b, out_scale=magnitude_out_scale(self.magnitude, self.weight, b @ a))
