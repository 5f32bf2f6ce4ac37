"""Apply a compiled adapter to a (copied) base model through the one plain forward definition."""

from __future__ import annotations

import copy

import torch
from torch import nn

from adapters_store.format import CompiledAdapter
from adapters_store.semantics import module_forward


def apply_adapter(model: nn.Module, adapter: CompiledAdapter) -> nn.Module:
    """A deep copy of ``model`` whose adapted linears run ``semantics.module_forward`` (never mutates model)."""
    model = copy.deepcopy(model)
    for path, mw in adapter.modules.items():
        lin = model.get_submodule(path)

        def forward(x: torch.Tensor, lin: nn.Linear = lin, mw=mw) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1])  # [T, d_in]
            return module_forward(flat, lin.weight, lin.bias, mw).reshape(*x.shape[:-1], -1)

        lin.forward = forward
    return model


def hf_greedy(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens from the plain HF forward, re-run on the whole sequence each step (no KV cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]
