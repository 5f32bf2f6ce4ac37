"""LowRankLinear: a target nn.Linear of the base model, plus the batched low-rank correction.

    y = g * (W0 x + B h') + bias       per token, with the adapter of the token's slot (bias OUTSIDE g)

It IS an ``nn.Linear`` holding the original weight and bias Parameters (state-dict keys, merge and
fingerprints see the same tensors); the per-module slot buffers belong to the pool. The step's plan is
read from a context shared by every wrapped layer and set by ``pool.step(token_slots)``. Without a plan,
or with a plan without adapter tokens (or with the adapter merged), it is exactly ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.lora.ops import LowRankOp, ModuleSlots
from server.lora.plan import BatchPlan


class StepContext:
    """The plan of the step in progress (None between steps); one object shared by every layer."""

    def __init__(self) -> None:
        self.plan: BatchPlan | None = None


class LowRankLinear(nn.Linear):
    def __init__(self, base: nn.Linear, path: str, slots: ModuleSlots, context: StepContext, op: LowRankOp):
        nn.Module.__init__(self)  # no nn.Linear.__init__: it would allocate a fresh weight
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.path = path
        self.slots = slots
        self.context = context
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.context.plan
        if plan is None or not plan.has_adapters:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, self.in_features)  # [T, d_in] from [T, d] or [B, L, d]
        if flat.shape[0] != plan.num_tokens:
            raise ValueError(f"{self.path}: input has {flat.shape[0]} tokens but the step's plan has "
                             f"{plan.num_tokens} (token_slots must give one slot per row of x)")
        y = F.linear(flat, self.weight)  # [T, d_out], W0 x without bias: the bias goes outside g
        y = self.op(flat, y, plan, self.slots)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, path={self.path!r}, op={self.op.name}"
