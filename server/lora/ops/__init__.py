"""The batched low-rank op and its backends, chosen ONCE at start-up (``select_backend``).

Semantics (DESIGN.md section 3; ``reference.reference_forward`` is the oracle), for T tokens:

    for t in range(T):
        y[t] = W0 @ x[t]                                  # computed by the caller, without bias
        if slot[t] >= 0:
            y[t] += B[slot[t]] @ gate(x[t], A[slot[t]] @ x[t])
            y[t] *= g[slot[t]]
    # the caller adds the bias afterwards (bias is outside g)

A backend is a callable ``op(x [T, d_in], y [T, d_out], plan, slots) -> y`` that updates y in place.
"""

from __future__ import annotations

import importlib.util
from typing import Protocol

import torch

from server.lora.buffers import ModuleSlots
from server.lora.plan import BatchPlan

__all__ = ["LowRankOp", "ModuleSlots", "select_backend"]


class LowRankOp(Protocol):
    name: str

    def __call__(self, x: torch.Tensor, y: torch.Tensor, plan: BatchPlan, slots: ModuleSlots) -> torch.Tensor: ...


def select_backend(device: torch.device | str, name: str | None = None) -> LowRankOp:
    """``name``: None (triton on CUDA when importable, else torch), "triton", "torch" (= "torch-auto"),
    "torch-grouped", "torch-gather", "torch-dense", "torch-segments", "torch-bgmv" (the torch path's formulations, see ``torch_cpu``)."""
    device = torch.device(device)
    if name is None:
        # find_spec, not an import: the kernels are only defined (jit-decorated) when triton is chosen
        name = "triton" if device.type == "cuda" and importlib.util.find_spec("triton") else "torch"
    if name == "triton":
        from server.lora.ops.triton_kernels import TritonLowRank

        return TritonLowRank()
    from server.lora.ops.torch_cpu import TorchLowRank

    if name == "torch":
        return TorchLowRank()
    if name in ("torch-auto", "torch-grouped", "torch-gather", "torch-dense", "torch-segments", "torch-bgmv"):
        return TorchLowRank(name.removeprefix("torch-"))
    raise ValueError(f"low-rank backend {name!r} is not one of triton, torch, torch-auto, torch-grouped, "
                     "torch-gather, torch-dense, torch-segments, torch-bgmv")
