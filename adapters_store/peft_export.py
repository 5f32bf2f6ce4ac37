"""Compiled adapter -> a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``).

The inverse of peft_import.py, so a rankserve adapter runs in any PEFT-compatible stack:

    LoRA, rsLoRA       LoRA: lora_A = A, lora_B = B' (the file's, scale already folded in)
    AdaLoRA, AROMA     the same, with ``rank_pattern`` for the modules whose rank differs from ``r``
    DoRA, EDoRA        LoRA with ``use_dora``: lora_magnitude_vector m = g * ||W0 + B'A||_row
    MoR                refused (see MOR_REFUSAL)

Every module gets ``lora_alpha = r_M`` (``alpha_pattern`` beside ``rank_pattern``), so PEFT's scaling
alpha/r is exactly 1 and the folded B' is used as saved: no division that could round. DoRA's magnitude
is recomputed from the base's exact weights, in float64 (PEFT's forward divides m by the same row norm,
so it recovers g to fp32 rounding); the base's fingerprint must match the file's. Pattern keys are the
full module paths, regex-escaped, so each matches its own module only (PEFT matches
``(.*\\.)?{key}$``). A classify adapter's head has no PEFT form for rankserve's pooling: it is written
beside the adapter as ``classifier_head.safetensors`` with ``classifier_head.json`` (labels, pooling).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapters_store.basemodels import BaseModel
from adapters_store.format import AdapterFormatError, CompiledAdapter
from adapters_store.peft_import import CONFIG, WEIGHTS
from adapters_store.validate import Limits, validate

PREFIX = "base_model.model."
HEAD_WEIGHTS = "classifier_head.safetensors"
HEAD_CONFIG = "classifier_head.json"
MOR_REFUSAL = ("MoR has no PEFT form: its router softmax(G x) weighs the experts per token, so its update "
               "depends on the input and is not one fixed low-rank matrix, and PEFT's LoRA/DoRA layers have no "
               "router. Serve it with rankserve (or keep the trainer's per-expert form).")


def magnitude(weight: torch.Tensor, mw) -> torch.Tensor:
    """PEFT's lora_magnitude_vector m [d_out] with m / ||W0 + B'A||_row = g (float64, then fp32)."""
    w = weight.double() + mw.lora_b.double() @ mw.lora_a.double()  # [d_out, d_in]
    return (mw.out_scale.double() * w.norm(dim=1)).float()


def peft_config(adapter: CompiledAdapter, base: BaseModel, use_dora: bool) -> dict:
    ranks = {path: mw.rank for path, mw in sorted(adapter.modules.items())}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(path): rank for path, rank in ranks.items() if rank != r}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if adapter.meta.task == "generate" else None,
        "base_model_name_or_path": base.name,
        "r": r,
        "lora_alpha": r,  # scaling alpha / r = 1: the file's B already carries the method's scale
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": use_dora,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def export_peft(adapter: CompiledAdapter, base: BaseModel, out_dir: str | Path) -> dict:
    """Write ``adapter`` as a PEFT directory for ``base``; returns the config written."""
    if adapter.meta.method == "mor" or any(mw.gate is not None for mw in adapter.modules.values()):
        raise AdapterFormatError(MOR_REFUSAL)
    validate(adapter, base, Limits())  # the base's exact weights: DoRA's magnitude is only valid against them
    if not adapter.modules:
        raise AdapterFormatError("the adapter adapts no module: there is nothing to export")
    scaled = [p for p, mw in adapter.modules.items() if mw.out_scale is not None]
    if scaled and len(scaled) != len(adapter.modules):
        raise AdapterFormatError(f"{len(scaled)} of {len(adapter.modules)} modules carry out_scale: PEFT's DoRA "
                                 "flag is per adapter, so a mix has no PEFT form")
    params = dict(base.model.named_parameters())
    tensors: dict[str, torch.Tensor] = {}
    for path, mw in sorted(adapter.modules.items()):
        tensors[f"{PREFIX}{path}.lora_A.weight"] = mw.lora_a.float().contiguous()  # [r, d_in]
        tensors[f"{PREFIX}{path}.lora_B.weight"] = mw.lora_b.float().contiguous()  # [d_out, r]
        if mw.out_scale is not None:
            tensors[f"{PREFIX}{path}.lora_magnitude_vector"] = magnitude(params[path + ".weight"].detach(), mw)
    config = peft_config(adapter, base, use_dora=bool(scaled))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    if adapter.meta.task == "classify":
        save_file({"weight": adapter.head_weight.float().contiguous(), "bias": adapter.head_bias.float().contiguous()},
                  str(out / HEAD_WEIGHTS))
        (out / HEAD_CONFIG).write_text(json.dumps({
            "labels": adapter.meta.labels, "pooling": adapter.meta.pooling,
            "apply": "logits = weight @ pool(final hidden state) + bias; pooling 'last' = the last non-pad token "
                     "after the final norm, 'mean' = the mean over non-pad tokens of the last hidden state"}, indent=2))
    return config
