"""Compile every wrapped module into the serving form and write one CompiledAdapter file.

Each method's ``compile()`` owns its scale folding; this module only gathers the results, the head
and the metadata, and validates the bytes read back against the base (``adapters_store.validate``,
as the server will) before the file is written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

from adapters_store.basemodels import BaseModel
from adapters_store.format import AdapterMeta, CompiledAdapter, ModuleWeights, loads
from adapters_store.validate import Limits, validate
from trainer.methods.base import fp32


def compile_modules(layers: dict) -> dict[str, ModuleWeights]:
    """Module path -> serving form; rank-0 modules (AdaLoRA fully masked, AROMA empty) are left out."""
    out = {}
    for path, layer in sorted(layers.items()):
        mw = layer.compile()
        if mw is not None and mw.rank > 0:
            out[path] = mw
    return out


def build_adapter(base: BaseModel, result, method: str, task: str) -> CompiledAdapter:
    """A CompiledAdapter from a TrainResult (see trainer.loop)."""
    modules = compile_modules(result.layers)
    log = result.log
    exported = sum(t.numel() for mw in modules.values() for t in mw.tensors().values())
    training = {k: log[k] for k in ("steps", "total_steps", "stopped_early", "train_examples", "eval_examples",
                                    "adapter_trainable_params", "head_params", "train_seconds", "initial_eval",
                                    "final_eval", "targets") if k in log}
    training["exported_adapter_params"] = exported
    training["config"] = log.get("config", {})
    training["method_summary"] = {k: v for k, v in log.get("method_summary", {}).items() if k != "outer_ratios"}
    training["tokenization"] = "tokenizer(text) with its default special tokens, truncated, right-padded"
    meta = AdapterMeta(
        method=method, task=task, base_model=base.name, base_fingerprint=base.fingerprint,
        labels=list(result.labels) if task == "classify" else None,
        pooling=result.pooling if task == "classify" else None,
        ranks={p: mw.rank for p, mw in modules.items()},
        trainable_params=int(log.get("trainable_params", 0)),
        training=training,
    )
    head_w = head_b = None
    if task == "classify":
        head_w, head_b = fp32(result.head.weight), fp32(result.head.bias)
    return CompiledAdapter(meta=meta, modules=modules, head_weight=head_w, head_bias=head_b)


def write_adapter(adapter: CompiledAdapter, path: str | Path, base: BaseModel | None = None) -> int:
    """Serialise, read back, validate, then write atomically (temp file + rename). Returns the size."""
    data = adapter.to_bytes()
    validate(loads(data), base, Limits())  # what the server will check: shapes, fingerprint, finite, caps
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return len(data)
