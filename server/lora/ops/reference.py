"""The oracle for the batched low-rank op: DESIGN.md section 3's loop, vectorised only trivially.

    for t in range(T):
        y[t] = W0 @ x[t]
        if slot[t] >= 0:
            a = slot[t]
            y[t] += B[a] @ gate_a(x[t], A[a] @ x[t])
            y[t] *= g[a]
        y[t] += bias

It reads the adapters' own ``ModuleWeights`` (not the pool's packed buffers), so a test that compares a
fast path with it also checks the packing. It groups tokens by slot and calls
``adapters_store.semantics.module_forward`` once per distinct slot: clarity over speed.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from adapters_store.format import ModuleWeights
from adapters_store.semantics import module_forward


def reference_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, token_slots: torch.Tensor,
                      adapters: Mapping[int, ModuleWeights | None]) -> torch.Tensor:
    """x [T, d_in], token_slots [T] (-1 = base) -> y [T, d_out]; ``adapters[slot]`` None = module absent."""
    if x.shape[0] != token_slots.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but token_slots has {token_slots.shape[0]} entries")
    y = x.new_empty(x.shape[0], weight.shape[0])  # [T, d_out]
    slots = token_slots.to(x.device)
    for slot in torch.unique(slots).tolist():
        rows = (slots == slot).nonzero().squeeze(1)
        mw = adapters.get(slot) if slot >= 0 else None
        y[rows] = module_forward(x[rows], weight, bias, mw)
    return y
