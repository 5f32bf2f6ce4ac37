"""Where and in what precision the trainer runs: ``--device``, ``--dtype``, ``--gradient-checkpointing``.

Mixed precision the way PEFT users run it: the frozen base's parameters are cast to the low dtype
(bf16), the adapter's parameters stay fp32 (so AdamW's moments are fp32 too), and the forward runs
under ``torch.autocast``, which casts the fp32 adapter weights to bf16 inside each matmul. The method
files need no change: they are initialised on the fp32 base before anything is cast (EDoRA's SVD and
DoRA's magnitude see the exact W0), and compile() writes fp32.

The base's original fp32 parameters are kept on the host while training in a low dtype and put back
afterwards, so the export computes DoRA/EDoRA ``out_scale`` against the exact weights the server loads
(the fingerprint's), not their bf16 rounding.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """auto: cuda when available, else cpu; cuda without a CUDA device is an error naming the flag."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA device here (use --device cpu or auto)")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA, fp32 on CPU. float16 is refused: it needs loss scaling, which bf16 does not."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name in ("float16", "fp16", "half"):
        raise ValueError("--dtype float16 needs loss scaling, which this trainer does not do: use bfloat16")
    if name not in DTYPES:
        raise ValueError(f"--dtype must be auto, float32 or bfloat16, got {name!r}")
    return DTYPES[name]


@dataclass
class Placement:
    device: torch.device
    dtype: torch.dtype
    originals: dict[str, torch.Tensor]  # base parameter name -> its fp32 host copy (low dtype only)
    checkpointing: bool = False

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def place(model: nn.Module, adapter_params: set[int], device: torch.device, dtype: torch.dtype,
          gradient_checkpointing: bool = False) -> Placement:
    """Move the (already wrapped) model to ``device``; cast every base parameter (not the adapter's,
    whose ids are in ``adapter_params``) to ``dtype``."""
    originals = {}
    if dtype != torch.float32:
        for name, p in model.named_parameters():
            if id(p) not in adapter_params:
                originals[name] = p.detach().clone()
                p.data = p.data.to(dtype)
    model.to(device)
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
        # non-reentrant: works with a frozen base (the inputs need no grad) and keeps dropout's RNG.
        # transformers >= 5.x names it activation checkpointing; older ones (the GPU machine's) do not.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return Placement(device, dtype, originals, gradient_checkpointing)


def restore(model: nn.Module, placement: Placement) -> None:
    """Back to the host, with the base's exact original fp32 parameters."""
    model.to("cpu")
    if placement.originals:
        for name, p in model.named_parameters():
            if name in placement.originals:
                p.data = placement.originals[name]
    if placement.checkpointing:
        off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        off()
