"""AROMA (arXiv 2504.05343): rank grows one component at a time until each module stops changing.

    y = W0 x + sum_p s b_p a_p x + s B A dropout(x) + b        (accepted components + the live one)

Inner loop, per module (``check_lora_change`` in ShuDun23/AROMA fb7610e): every ``check_every``
optimizer steps, delta = ||B_t A_t - B_{t-D} A_{t-D}||_F / ||B_{t-D} A_{t-D}||_F; the module is done
when delta < eps_in ("stabilized", sticky until the next reset), after ``max_inner_steps``, or once
converged. A global reset fires only when every module is done.

Outer loop at each reset (``merge_check_and_reinit``): c = ||s B A||_F / ||W0 + sum_p s b_p a_p||_F,
averaged over ``window`` resets. If c < eps_out the module has converged: the candidate is discarded
and the module stops growing. The paper's test, ||a b_p a_p|| / ||W0 + a B_{p-1} A_{p-1}|| < eps_out,
is defined for p = 1 too (B_0 A_0 = 0, so the denominator is ||W0||), and it is applied there
(``check_first``): a module whose first component moves W0 by less than eps_out exports nothing. The
released code always merges the first component (its ``previous_weight`` starts as None), so every
adapted module keeps rank >= 1 and the file can never be smaller than one rank-1 pair per module
(12.5% of LoRA r=8 on the same targets); ``check_first=false`` restores that. A candidate that passes is
accepted, A is re-drawn Kaiming-uniform and B zeroed, and (controller) 99.9% of the Adam moments of
every live lora parameter are zeroed in place, at random (``optimizer_reset``); Adam's step count is
kept. Training stops when every module has converged for ``patience`` consecutive resets.
The learning rate follows the repo's ``cosine_restarts`` schedule (ReLoRA's cosine with multiple
warmups), restarting on a fixed cadence of ``cycle_length`` steps, not at the adaptive resets.

Deliberate differences from the released code, each to follow the paper rather than an accident:
- the first component is judged like the others (``check_first``, above).
- accepted components are kept stacked, not added into W0: the file carries B = [s b_1 .. s b_P],
  A = [a_1; ..; a_P] (no SVD, no rounding drift), plus the live component of a module that never
  converged (the released code saves that too, unmerged). All-zero components are left out.
- the inner check compares against the product at the previous check; the released code subtracts
  in place (``current.sub_(previous)``) and then stores the *difference* as the next reference, and
  it keeps the reference across resets. Here the reference is the product, cleared at each reset.
- the merge runs without DDP (the released trainer only merges when DDP-wrapped).
- the classify head stays trainable (the released GLUE script freezes the whole classifier except the
  LoRA on its dense layer); rankserve heads are one linear layer trained by every method alike.
Defaults are the GLUE scripts' (r=1, alpha=4, dropout 0.1, eps_in 0.1, check 10, max 200 = cycle,
window 1, patience 1, warmups 100/50, min lr ratio 0.1) with eps_out 0.005 (CoLA/QNLI/MNLI/QQP/STS-B).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from adapters_store.format import ModuleWeights
from trainer.methods.base import AdapterLayer, Controller, MethodConfig, check, fp32, register
from trainer.methods.lora import kaiming_a


@dataclass(frozen=True)
class AROMAConfig(MethodConfig):
    rank: int = 1
    alpha: float = 4.0
    dropout: float = 0.1
    eps_in: float = 0.1
    eps_out: float = 0.005
    check_every: int = 10
    max_inner_steps: int = 200
    window: int = 1
    patience: int = 1
    cycle_length: int | None = None  # lr restart cadence; None: max_inner_steps
    first_warmup: int | None = None  # None: min(100, cycle // 2)
    restart_warmup: int | None = None  # None: min(50, cycle // 4)
    min_lr_ratio: float = 0.1
    moment_prune: float = 0.999
    check_first: bool = True  # the paper's outer test also judges p=1 (against ||W0||); False: the repo's

    def problems(self) -> list[str]:
        return super().problems() + check(
            eps_in=(self.eps_in, 0.0, None), eps_out=(self.eps_out, 0.0, None), check_every=(self.check_every, 1, None),
            max_inner_steps=(self.max_inner_steps, 1, None), window=(self.window, 1, None),
            patience=(self.patience, 1, None), cycle_length=(self.cycle_length, 1, None),
            first_warmup=(self.first_warmup, 0, None), restart_warmup=(self.restart_warmup, 0, None),
            min_lr_ratio=(self.min_lr_ratio, 0.0, 1.0), moment_prune=(self.moment_prune, 0.0, 1.0))


def relative_change(now: torch.Tensor, before: torch.Tensor) -> float:
    return float((now - before).norm() / (before.norm() + 1e-9))


@register("aroma")
class AROMALinear(AdapterLayer):
    Config = AROMAConfig

    def __init__(self, base: nn.Linear, cfg: AROMAConfig):
        super().__init__(base, cfg)
        w = base.weight
        self.lora_A = nn.Parameter(kaiming_a(cfg.rank, self.d_in).to(w))  # [r, d_in], the live component
        self.lora_B = nn.Parameter(torch.zeros(self.d_out, cfg.rank).to(w))  # [d_out, r]
        self.scale = cfg.alpha / cfg.rank
        self.register_buffer("acc_a", torch.zeros(0, self.d_in).to(w))  # [P*r, d_in] accepted a_p
        self.register_buffer("acc_b", torch.zeros(self.d_out, 0).to(w))  # [d_out, P*r] accepted s*b_p
        self.converged = False
        self.stabilized = False
        self.inner_steps = 0
        self.reference: torch.Tensor | None = None  # B A at the previous check
        self.window: list[float] = []  # outer ratios c over the last `window` resets
        self.ratios: list[float] = []  # every outer ratio, for the log

    @property
    def num_components(self) -> int:
        return int(self.acc_a.shape[0]) // self.cfg.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.acc_a.shape[0]:
            y = y + (x @ self.acc_a.T) @ self.acc_b.T
        if not self.converged:
            y = y + self.scale * ((self.dropout(x) @ self.lora_A.T) @ self.lora_B.T)
        return y

    @torch.no_grad()
    def inner_done(self) -> bool:
        """Advance the inner loop by one optimizer step; True once this module's component is done."""
        if self.converged or self.stabilized:
            return True
        self.inner_steps += 1
        if self.inner_steps >= self.cfg.max_inner_steps:
            return True
        if self.inner_steps % self.cfg.check_every:
            return False
        product = self.lora_B @ self.lora_A  # [d_out, d_in]
        before, self.reference = self.reference, product
        if before is not None and relative_change(product, before) < self.cfg.eps_in:
            self.stabilized = True
        return self.stabilized

    @torch.no_grad()
    def merge_check_and_reinit(self) -> str:
        """The outer step at a global reset: 'accepted', 'converged' (candidate discarded) or 'idle'."""
        if self.converged:
            return "idle"
        self.stabilized, self.inner_steps, self.reference = False, 0, None
        cand_b, cand_a = self.scale * self.lora_B.detach().clone(), self.lora_A.detach().clone()
        if self.num_components > 0 or self.cfg.check_first:
            merged = self.weight.float() + self.acc_b.float() @ self.acc_a.float()  # W0 + sum s b_p a_p
            ratio = float((cand_b.float() @ cand_a.float()).norm() / merged.norm())
            self.ratios.append(ratio)
            self.window = (self.window + [ratio])[-self.cfg.window :]
            if len(self.window) == self.cfg.window and sum(self.window) / len(self.window) < self.cfg.eps_out:
                self.converged = True
                self.lora_A.requires_grad_(False)
                self.lora_B.requires_grad_(False)
                return "converged"
        self.acc_a = torch.cat([self.acc_a, cand_a], dim=0)
        self.acc_b = torch.cat([self.acc_b, cand_b], dim=1)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        return "accepted"

    def held_rank(self) -> int:
        """The rank this module would export now: accepted components plus a live, non-zero one."""
        live = not self.converged and bool(self.lora_B.detach().any())
        return int(self.acc_a.shape[0]) + (self.cfg.rank if live else 0)

    def compile(self) -> ModuleWeights | None:
        r = self.cfg.rank
        blocks = [(self.acc_a[p * r : (p + 1) * r], self.acc_b[:, p * r : (p + 1) * r]) for p in range(self.num_components)]
        if not self.converged:
            blocks.append((self.lora_A, self.scale * self.lora_B))
        blocks = [(a, b) for a, b in blocks if bool(b.detach().any())]
        if not blocks:
            return None
        return ModuleWeights(lora_a=fp32(torch.cat([a for a, _ in blocks], dim=0)),
                             lora_b=fp32(torch.cat([b for _, b in blocks], dim=1)))

    @classmethod
    def make_controller(cls, layers, cfg, total_steps):
        return AROMAController(layers, cfg, total_steps)


def cosine_restarts(step: int, *, total: int, first_warmup: int, restart_warmup: int, cycle: int,
                    min_ratio: float) -> float:
    """ReLoRA/AROMA ``cosine_restarts``: one cosine decay over the run, re-warmed every ``cycle`` steps."""
    if step < first_warmup:
        return step / max(1, first_warmup)
    restart_step, restart_number = step % cycle, step // cycle
    if restart_step < restart_warmup and step >= cycle:
        end = (restart_number * cycle + restart_warmup - first_warmup) / max(1, total - first_warmup)
        peak = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * end))
        return restart_step / max(1, restart_warmup) * peak
    progress = (step - first_warmup) / max(1, total - first_warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def prune_moments(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], ratio: float) -> None:
    """Zero a random ``ratio`` of each Adam moment entry of ``params``, in place (optimizer_reset)."""
    for p in params:
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key].mul_(torch.rand_like(state[key]) > ratio)


class AROMAController(Controller):
    def __init__(self, layers: dict[str, AROMALinear], cfg: AROMAConfig, total_steps: int):
        self.layers = dict(sorted(layers.items()))
        self.cfg = cfg
        self.cycle = cfg.cycle_length or cfg.max_inner_steps
        self.first_warmup = cfg.first_warmup if cfg.first_warmup is not None else min(100, self.cycle // 2)
        self.restart_warmup = cfg.restart_warmup if cfg.restart_warmup is not None else min(50, self.cycle // 4)
        if self.first_warmup > self.cycle:
            raise ValueError(f"aroma: first_warmup ({self.first_warmup}) must be <= cycle_length ({self.cycle})")
        self.resets: list[dict] = []
        self.streak = 0
        self.stopped = False

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        done = [layer.inner_done() for layer in self.layers.values()]  # every module ticks each step
        if not all(done):
            return
        outcome = {path: layer.merge_check_and_reinit() for path, layer in self.layers.items()}
        live = [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]
        prune_moments(optimizer, live, self.cfg.moment_prune)
        converged = sum(layer.converged for layer in self.layers.values())
        self.resets.append({"step": step, "accepted": sum(v == "accepted" for v in outcome.values()),
                            "converged": converged, "total_rank": self.total_rank()})
        self.streak = self.streak + 1 if converged == len(self.layers) else 0
        self.stopped = self.streak >= self.cfg.patience

    def should_stop(self) -> bool:
        return self.stopped

    def lr_lambda(self, total_steps: int):
        return partial(cosine_restarts, total=total_steps, first_warmup=self.first_warmup,
                       restart_warmup=self.restart_warmup, cycle=self.cycle, min_ratio=self.cfg.min_lr_ratio)

    def total_rank(self) -> int:
        return sum(layer.held_rank() for layer in self.layers.values())

    def summary(self) -> dict:
        return {"resets": self.resets, "stopped_early": self.stopped, "cycle_length": self.cycle,
                "first_warmup": self.first_warmup, "restart_warmup": self.restart_warmup,
                "components": {p: m.num_components for p, m in self.layers.items()},
                "converged": sorted(p for p, m in self.layers.items() if m.converged),
                "outer_ratios": {p: [round(c, 6) for c in m.ratios] for p, m in self.layers.items()}}
