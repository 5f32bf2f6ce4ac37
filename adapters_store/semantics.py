"""The forward of one compiled module, written once, plainly (DESIGN.md section 2).

    h  = A x                                               # [r]
    h' = h                                                 # LoRA, DoRA, EDoRA, AdaLoRA, AROMA
    h' = concat_i( softmax(G x)_i * lambda[i] * h )        # MoR: [N*r]
    y  = g * (W0 x + B h') + bias                          # bias OUTSIDE g

Everything else (the server's batched op, its kernels, merge, PEFT-import parity tests, the trainer's
conformance checks) is tested against these two functions. They favour clarity over speed.
"""

from __future__ import annotations

import torch

from adapters_store.format import ModuleWeights


def lowrank_delta(x: torch.Tensor, mw: ModuleWeights) -> torch.Tensor:
    """B h' for tokens x [T, d_in] -> [T, d_out], computed in x's dtype (MoR's compact form expanded first)."""
    mw = mw.expanded()
    a = mw.lora_a.to(x.dtype)
    b = mw.lora_b.to(x.dtype)
    h = x @ a.T  # [T, r]
    if mw.gate is not None:
        assert mw.rank_scale is not None
        v = torch.softmax(x @ mw.gate.to(x.dtype).T, dim=-1)  # [T, N]
        lam = mw.rank_scale.to(x.dtype)  # [N, r]
        h = (v[:, :, None] * lam[None, :, :] * h[:, None, :]).reshape(x.shape[0], -1)  # [T, N*r]
    return h @ b.T  # [T, d_out]


def module_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mw: ModuleWeights | None
) -> torch.Tensor:
    """y = g * (W0 x + B h') + bias for tokens x [T, d_in]; mw None means the base alone."""
    y = x @ weight.T  # [T, d_out]
    if mw is not None:
        y = y + lowrank_delta(x, mw)
        if mw.out_scale is not None:
            y = y * mw.out_scale.to(y.dtype)
    if bias is not None:
        y = y + bias
    return y


def merged_weight(weight: torch.Tensor, mw: ModuleWeights) -> torch.Tensor:
    """W = g * (W0 + B A), computed in fp32 and returned in weight's dtype. Refuses MoR (no exact merge)."""
    if mw.gate is not None:
        raise ValueError("MoR adapters have an input-dependent router and cannot be merged")
    w = weight.float() + mw.lora_b.float() @ mw.lora_a.float()
    if mw.out_scale is not None:
        w = w * mw.out_scale.float()[:, None]
    return w.to(weight.dtype)
