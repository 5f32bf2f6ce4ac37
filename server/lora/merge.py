"""Merge mode: fold ONE adapter into the base weights, and restore the base exactly afterwards.

    W = g * (W0 + B A)          adapters_store.semantics.merged_weight (fp32 math, weight dtype out)

Restoring copies back a kept copy of W0 (bitwise), never subtracts: ``(W0 + BA) - BA`` is not W0 in
floating point, and g may have rounded. The copies of device weights live in pinned host memory, not
on the device: merge mode must not need a second copy of the adapted weights in GPU memory (for an
adapter on every linear that is nearly the whole model). MoR has an input-dependent router and is refused.

The copies are taken the first time a module is merged and kept (``kept``, owned by the pool): the base
weights change nowhere else, so every later merge is one in-place pass per module (fp32: ``addmm_`` then
the g row scale; other dtypes: the fp32 merged weight, cast) and every unmerge one copy back.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from adapters_store.format import CompiledAdapter, ModuleWeights
from adapters_store.semantics import merged_weight


class NotMergeable(ValueError):
    """The adapter has no exact merge (MoR)."""


def merge_into(layers: Mapping[str, nn.Linear], adapter: CompiledAdapter,
               kept: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Overwrite the weight of every layer the adapter touches with the merged weight, in place (same
    storage). ``kept`` holds W0 copies by module path from earlier merges (missing ones are taken now and
    added). Returns the W0 copies of the modules this merge changed, for ``restore``."""
    mor = sorted(p for p, m in adapter.modules.items() if m.gate is not None)
    if mor:
        raise NotMergeable(f"{adapter.meta.method} adapter cannot be merged: modules {mor[:3]} carry a MoR router "
                           "(gate), whose output depends on the input")
    missing = sorted(set(adapter.modules) - set(layers))
    if missing:
        raise ValueError(f"cannot merge: the base has no target modules {missing[:3]}")
    kept = {} if kept is None else kept
    changed: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for path, mw in sorted(adapter.modules.items()):
                weight = layers[path].weight
                if path not in kept:
                    kept[path] = _host_copy(weight)
                changed[path] = kept[path]
                _merge_in_place(weight, _to(mw, weight.device))
    except BaseException:
        restore(layers, changed)
        raise
    return changed


def restore(layers: Mapping[str, nn.Linear], saved: Mapping[str, torch.Tensor]) -> None:
    """Copy every kept W0 back into its layer's weight storage (bitwise exact)."""
    with torch.no_grad():
        for path, w0 in saved.items():
            layers[path].weight.copy_(w0)


def _merge_in_place(weight: torch.Tensor, mw: ModuleWeights) -> None:
    """weight <- g * (weight + B A): in place for fp32 (no temporary of the weight's size), else through
    ``merged_weight``'s fp32 math."""
    if weight.dtype != torch.float32:
        weight.copy_(merged_weight(weight, mw))
        return
    weight.addmm_(mw.lora_b.float(), mw.lora_a.float())
    if mw.out_scale is not None:
        weight.mul_(mw.out_scale.float()[:, None])


def _host_copy(weight: torch.Tensor) -> torch.Tensor:
    if weight.device.type == "cpu":
        return weight.detach().clone()
    kept = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=True)
    kept.copy_(weight.detach())  # synchronous: the weight is overwritten right after
    return kept


def _to(mw: ModuleWeights, device: torch.device) -> ModuleWeights:
    scale = None if mw.out_scale is None else mw.out_scale.to(device)
    return ModuleWeights(mw.lora_a.to(device), mw.lora_b.to(device), out_scale=scale)
