"""AdaLoRA (Zhang et al. 2023): SVD-form triplets with a global, importance-driven rank budget.

    y = W0 x + B diag(E) A dropout(x) * alpha / (ranknum + 1e-5) + b

A [init_r, d_in] and B [d_out, init_r] start N(0, 0.02), E [init_r, 1] starts at zero (so dW = 0), and
``ranknum`` is init_r for the whole run: masking zeroes entries of E, it never rescales (PEFT
``adalora/layer.py``; PEFT copies ranknum back on reload "so the scaling is exactly as the previous").

Training (:class:`AdaLoRAController`, PEFT's ``RankAllocator``):
- loss += orth_reg_weight * mean over every A and B of ||A A^T - I||_F, ||B^T B - I||_F (not squared);
- after each optimizer step: I = |w * dL/dw| per entry, I_bar <- b1 I_bar + (1-b1) I,
  U_bar <- b2 U_bar + (1-b2) |I - I_bar|, score = I_bar * U_bar; a triplet's score is its E score plus
  the mean over its row of A plus the mean over its column of B;
- budget (eq. 10): init for t <= tinit; target + (init - target)(1 - (t - tinit)/(T - tfinal - tinit))^3
  until T - tfinal, masking every deltaT steps below ONE global threshold (the k-th smallest triplet
  score, k = init - budget); at t = T - tfinal a forced final mask to the target budget; afterwards
  the final mask is re-applied every step. Masked triplets may regrow between masks, as in PEFT.

Choices where PEFT/the paper leave them open [I]: init_r defaults to ceil(1.5 * rank) (PEFT's 12 -> 8);
tinit/tfinal default to 10% / 50% of the run (the original repo's GLUE scripts: CoLA 800/3500 of about
6.7k steps, MNLI 8000/50000 of about 86k); deltaT 10 and orth weight 0.1 as in those scripts.

Serving form: the kept triplets only (E != 0): ``lora_a = diag(E) A``, ``lora_b = B * alpha/(init_r +
1e-5)``, so each module's rank is what the allocator kept (0: the module is left out of the file).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from adapters_store.format import ModuleWeights
from trainer.methods.base import AdapterLayer, Controller, MethodConfig, check, fp32, register


@dataclass(frozen=True)
class AdaLoRAConfig(MethodConfig):
    """``rank`` is the target rank per module (PEFT's target_r)."""

    init_r: int | None = None
    tinit: int | None = None
    tfinal: int | None = None
    delta_t: int = 10
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    positive_alpha = False  # alpha <= 0: scaling = r, as in PEFT

    def problems(self) -> list[str]:
        out = super().problems() + check(init_r=(self.init_r, 1, None), tinit=(self.tinit, 0, None),
                                         tfinal=(self.tfinal, 0, None), delta_t=(self.delta_t, 1, None),
                                         beta1=(self.beta1, 0.0, 1.0), beta2=(self.beta2, 0.0, 1.0),
                                         orth_reg_weight=(self.orth_reg_weight, 0.0, None))
        if self.initial_rank < self.rank:
            out.append(f"init_r ({self.initial_rank}) must be >= the target rank ({self.rank})")
        return out

    @property
    def initial_rank(self) -> int:
        return self.init_r if self.init_r is not None else math.ceil(1.5 * self.rank)


@register("adalora")
class AdaLoRALinear(AdapterLayer):
    Config = AdaLoRAConfig

    def __init__(self, base: nn.Linear, cfg: AdaLoRAConfig):
        super().__init__(base, cfg)
        r, w = cfg.initial_rank, base.weight
        self.lora_A = nn.Parameter(torch.randn(r, self.d_in).mul_(0.02).to(w))  # [init_r, d_in]
        self.lora_E = nn.Parameter(torch.zeros(r, 1).to(w))  # [init_r, 1]
        self.lora_B = nn.Parameter(torch.randn(self.d_out, r).mul_(0.02).to(w))  # [d_out, init_r]
        self.ranknum = float(r)  # never changes, even when triplets are masked
        self.scaling = cfg.alpha if cfg.alpha > 0 else float(r)
        self.register_buffer("kept", torch.ones(r, dtype=torch.bool), persistent=False)  # last mask

    @property
    def scale(self) -> float:
        return self.scaling / (self.ranknum + 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x) @ (self.lora_A * self.lora_E).T  # [..., init_r]
        return self.base(x) + (h @ self.lora_B.T) * self.scale

    def compile(self) -> ModuleWeights | None:
        e = self.lora_E.detach().squeeze(1)  # [init_r]
        keep = e != 0
        if not bool(keep.any()):
            return None
        a = fp32(self.lora_A * self.lora_E)[keep]  # [r_kept, d_in]
        b = fp32(self.lora_B)[:, keep] * self.scale  # [d_out, r_kept]
        return ModuleWeights(lora_a=a, lora_b=b)

    @classmethod
    def make_controller(cls, layers, cfg, total_steps):
        return AdaLoRAController(layers, cfg, total_steps)


def resolve_schedule(cfg: AdaLoRAConfig, total_steps: int) -> tuple[int, int]:
    """(tinit, tfinal) in optimizer steps; the budget phase must have at least one step."""
    tinit = cfg.tinit if cfg.tinit is not None else int(0.1 * total_steps)
    tfinal = cfg.tfinal if cfg.tfinal is not None else int(0.5 * total_steps)
    if total_steps - tfinal - tinit <= 0:
        raise ValueError(f"adalora: total_steps ({total_steps}) must exceed tinit ({tinit}) + tfinal ({tfinal})")
    return tinit, tfinal


class AdaLoRAController(Controller):
    """PEFT's RankAllocator and AdaLoraModel.update_and_allocate over the wrapped layers."""

    def __init__(self, layers: dict[str, AdaLoRALinear], cfg: AdaLoRAConfig, total_steps: int):
        self.layers = dict(sorted(layers.items()))
        self.cfg = cfg
        self.total = total_steps
        self.tinit, self.tfinal = resolve_schedule(cfg, total_steps)
        self.init_budget = sum(int(layer.lora_E.shape[0]) for layer in self.layers.values())
        self.target_budget = cfg.rank * len(self.layers)
        self.reset_importance()

    def reset_importance(self) -> None:
        self.ipt_avg: dict[str, torch.Tensor] = {}  # smoothed sensitivity I_bar, per parameter
        self.unc_avg: dict[str, torch.Tensor] = {}  # uncertainty U_bar

    def regularizer(self) -> torch.Tensor | None:
        if self.cfg.orth_reg_weight <= 0:
            return None
        terms = []
        for layer in self.layers.values():
            a, b = layer.lora_A, layer.lora_B
            terms.append(torch.linalg.matrix_norm(a @ a.T - torch.eye(a.shape[0], device=a.device), "fro"))
            terms.append(torch.linalg.matrix_norm(b.T @ b - torch.eye(b.shape[1], device=b.device), "fro"))
        return self.cfg.orth_reg_weight * torch.stack(terms).mean()

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, mask now?) at optimizer step ``step`` (eq. 10, PEFT's budget_schedule)."""
        if step <= self.tinit:
            return self.init_budget, False
        if step > self.total - self.tfinal:
            return self.target_budget, True
        coeff = 1 - (step - self.tinit) / (self.total - self.tfinal - self.tinit)
        budget = int((self.init_budget - self.target_budget) * coeff**3 + self.target_budget)
        return budget, step % self.cfg.delta_t == 0

    def params(self):
        for path, layer in self.layers.items():
            for name in ("lora_A", "lora_E", "lora_B"):
                yield f"{path}.{name}", getattr(layer, name)

    @torch.no_grad()
    def update_importance(self) -> None:
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for key, p in self.params():
            if p.grad is None:
                continue
            ipt = (p * p.grad).abs()
            avg = self.ipt_avg.get(key, torch.zeros_like(p))
            unc = self.unc_avg.get(key, torch.zeros_like(p))
            avg = b1 * avg + (1 - b1) * ipt
            self.ipt_avg[key] = avg
            self.unc_avg[key] = b2 * unc + (1 - b2) * (ipt - avg).abs()

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Per module, the score of each triplet [init_r]: s(E_k) + mean_j s(A_kj) + mean_i s(B_ik)."""
        scores = {}
        for path, layer in self.layers.items():
            def entry(name: str, like: torch.Tensor, path=path) -> torch.Tensor:
                key = f"{path}.{name}"
                if key not in self.ipt_avg:
                    return torch.zeros_like(like)
                return self.ipt_avg[key] * self.unc_avg[key]

            s_a = entry("lora_A", layer.lora_A).mean(dim=1)  # [init_r]
            s_b = entry("lora_B", layer.lora_B).mean(dim=0)  # [init_r]
            s_e = entry("lora_E", layer.lora_E).view(-1)  # [init_r]
            scores[path] = s_e + s_a + s_b
        return scores

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        k = self.init_budget - budget
        if k <= 0:
            return
        scores = self.triplet_scores()
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k).values.item()
        for path, layer in self.layers.items():
            layer.kept.copy_(scores[path] > threshold)
            layer.lora_E.masked_fill_(~layer.kept[:, None], 0.0)

    @torch.no_grad()
    def apply_kept(self) -> None:
        for layer in self.layers.values():
            layer.lora_E.masked_fill_(~layer.kept[:, None], 0.0)

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        self.update_and_allocate(step)

    def update_and_allocate(self, step: int) -> None:
        """PEFT's AdaLoraModel.update_and_allocate: call after optimizer.step(), before zero_grad().

        One deliberate difference: the forced final mask runs at T - tfinal or at the last step, whichever
        comes first. With tfinal = 0 (PEFT's default) step T - tfinal never comes (steps count 0..T-1), so
        PEFT saves an adapter over budget; here the file never holds more than the target budget."""
        final = min(self.total - self.tfinal, self.total - 1)
        if step < final:
            self.update_importance()
            budget, mask_now = self.budget_schedule(step)
            if mask_now:
                self.mask_to_budget(budget)
        elif step == final:
            self.mask_to_budget(self.target_budget)
            self.reset_importance()
        else:
            self.apply_kept()

    def total_rank(self) -> int:
        return int(sum(int(layer.kept.sum()) for layer in self.layers.values()))

    def summary(self) -> dict:
        return {"init_budget": self.init_budget, "target_budget": self.target_budget, "tinit": self.tinit,
                "tfinal": self.tfinal, "delta_t": self.cfg.delta_t, "total_steps": self.total,
                "ranknum": self.cfg.initial_rank}
