"""Checkpoints that resume a run exactly: adapter state, head, optimizer, scheduler, controller, RNG.

A method's training state is more than its parameters: AROMA keeps accepted components in buffers that
grow and plain attributes (converged, inner step counts, the previous product), AdaLoRA's controller
keeps importance averages. Both are captured generically: every parameter and buffer of a wrapped layer
except the frozen base, every public plain attribute of the layer and of the controller (minus the
references to layers and config). A test checks that a resumed run equals an uninterrupted one.

Files are written with ``torch.save`` (temp file, fsync, rename) and read with ``weights_only=True``:
only tensors, numbers, strings and containers, never arbitrary objects.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

SKIP_ATTRS = {"cfg", "training", "layers", "base"}


def to_device(value, device: torch.device | str):
    """Move every tensor inside nested dicts/lists/tuples."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def plain_attrs(obj) -> dict:
    return {k: to_device(v, "cpu") for k, v in vars(obj).items()
            if not k.startswith("_") and k not in SKIP_ATTRS and not isinstance(v, nn.Module)}


def own_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The layer's parameters and buffers, except the wrapped base linear's."""
    found = dict(layer.named_parameters())
    found.update(layer.named_buffers())
    return {n: t for n, t in found.items() if not n.startswith("base.")}


def layer_state(layer: nn.Module) -> dict:
    tensors = own_tensors(layer)
    return {"tensors": {n: t.detach().to("cpu", copy=True) for n, t in tensors.items()},
            "requires_grad": {n: t.requires_grad for n, t in tensors.items() if isinstance(t, nn.Parameter)},
            "attrs": plain_attrs(layer)}


def load_layer_state(layer: nn.Module, state: dict, device: torch.device) -> None:
    """Restore in place; a parameter keeps its identity (the optimizer's state is keyed by it), buffers
    may change shape (AROMA's stacked components)."""
    current = own_tensors(layer)
    if set(current) != set(state["tensors"]):
        raise ValueError(f"checkpoint holds tensors {sorted(state['tensors'])}, the layer has {sorted(current)}")
    for name, saved in state["tensors"].items():
        t = current[name]
        if isinstance(t, nn.Parameter):
            t.data = saved.to(device=device, dtype=t.dtype)
            t.requires_grad_(state["requires_grad"][name])
        else:
            owner_name, _, leaf = name.rpartition(".")
            setattr(layer.get_submodule(owner_name) if owner_name else layer, leaf, saved.to(device))
    for k, v in state["attrs"].items():
        setattr(layer, k, to_device(v, device))


def adapter_state(layers: dict[str, nn.Module], head: nn.Module | None) -> dict:
    """Everything that defines the adapter now (layers and head), on the CPU."""
    return {"layers": {p: layer_state(layer) for p, layer in layers.items()},
            "head": None if head is None else {k: v.detach().to("cpu", copy=True) for k, v in head.state_dict().items()}}


def load_adapter_state(layers: dict[str, nn.Module], head: nn.Module | None, state: dict, device) -> None:
    if set(state["layers"]) != set(layers):
        raise ValueError("checkpoint adapts other modules than this run: "
                         f"{sorted(set(state['layers']) ^ set(layers))[:5]}")
    for path, layer in layers.items():
        load_layer_state(layer, state["layers"][path], device)
    if head is not None:
        head.load_state_dict(state["head"])


def controller_state(controller) -> dict:
    return plain_attrs(controller)


def load_controller_state(controller, state: dict, device) -> None:
    for k, v in state.items():
        setattr(controller, k, to_device(v, device))


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(payload: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def load(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        found = latest(path)
        if found is None:
            raise FileNotFoundError(f"--resume {path}: no step-*.pt checkpoint in this directory")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)


STEP_FILE = re.compile(r"step-(\d+)\.pt$")


def checkpoints(directory: Path) -> list[Path]:
    """step-*.pt files in step order."""
    found = [(int(m.group(1)), p) for p in directory.glob("step-*.pt") if (m := STEP_FILE.search(p.name))]
    return [p for _, p in sorted(found)]


def latest(directory: Path) -> Path | None:
    found = checkpoints(directory)
    return found[-1] if found else None


def prune(directory: Path, keep: int) -> None:
    """Keep the newest ``keep`` step checkpoints (0: keep all)."""
    if keep > 0:
        for old in checkpoints(directory)[:-keep]:
            old.unlink(missing_ok=True)
