"""Freeze the base and wrap its target linears in a method's training layer."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from adapters_store.basemodels import TARGETS, BaseModel
from trainer.methods.base import AdapterLayer, MethodConfig


def select_targets(base: BaseModel, names: Sequence[str] | None = None) -> list[str]:
    """Module paths to adapt: every target of the base, or those whose path ends with one of ``names``
    (leaf names such as ``q_proj`` or ``attention.output.dense``)."""
    paths = sorted(base.targets)
    if not names:
        return paths

    def matches(path: str, name: str) -> bool:
        return path == name or path.endswith("." + name)

    unknown = [n for n in names if not any(matches(p, n) for p in paths)]
    if unknown:
        raise ValueError(f"targets {unknown} match no adaptable linear of {base.name!r}; "
                         f"its target names are {list(TARGETS[base.family])}")
    return [p for p in paths if any(matches(p, n) for n in names)]


def inject(model: nn.Module, layer_cls: type[AdapterLayer], cfg: MethodConfig, paths: Sequence[str]) -> dict[str, AdapterLayer]:
    """Freeze every parameter of ``model`` and replace each linear at ``paths`` (in place, in sorted
    order so that seeded initialisation does not depend on the caller's order)."""
    model.requires_grad_(False)
    layers: dict[str, AdapterLayer] = {}
    for path in sorted(paths):
        parent_name, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, leaf)
        if isinstance(linear, AdapterLayer):
            raise ValueError(f"{path} is already wrapped by {type(linear).__name__}: inject into a fresh base")
        layer = layer_cls(linear, cfg)
        setattr(parent, leaf, layer)
        layers[path] = layer
    return layers
