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
from trainer.methods.base import MethodConfig, fp32

SERVER_MAX_RANK = 64  # `rankserve serve --max-rank`'s default


def planned_width(cfg: MethodConfig) -> int:
    """Rank rows per module the server will need for this config, as far as it is known before training:
    r, AdaLoRA's init_r (a module may keep all of them), MoR's r x N; AROMA's rank grows while it trains
    (checked again on the file)."""
    rows = getattr(cfg, "initial_rank", cfg.rank)
    return rows * getattr(cfg, "num_experts", 1)


def fit_problem(method: str, width: int, max_rank: int, when: str) -> str | None:
    """None if ``width`` rank rows fit the server's max rank, else a message naming the flags to change."""
    if width <= max_rank:
        return None
    what = {"mor": "rank x num_experts", "adalora": "init_r"}.get(method, "rank")
    return (f"{when} the adapter needs {width} rank rows per module ({what}), more than the server's max rank "
            f"{max_rank}: lower --rank{' or --set num_experts' if method == 'mor' else ''}"
            f"{' or --set init_r' if method == 'adalora' else ''}, or start the server with --max-rank {width} "
            f"(and pass --server-max-rank {width} here)")


def served_width(adapter: CompiledAdapter) -> int:
    """The widest module of a compiled adapter (lora_b's columns: r, or N*r for MoR)."""
    return max((mw.effective_rank for mw in adapter.modules.values()), default=0)


def compile_modules(layers: dict) -> dict[str, ModuleWeights]:
    """Module path -> serving form; rank-0 modules (AdaLoRA fully masked, AROMA empty) are left out."""
    out = {}
    for path, layer in sorted(layers.items()):
        mw = layer.compile()
        if mw is not None and mw.rank > 0:
            out[path] = mw
    return out


def build_adapter(base: BaseModel, result, method: str, task: str, picked: dict | None = None) -> CompiledAdapter:
    """A CompiledAdapter from a TrainResult (see trainer.loop); ``picked``: the evaluation whose adapter
    state the layers hold now, when it is not the final one (the best checkpoint)."""
    modules = compile_modules(result.layers)
    log = result.log
    exported = sum(t.numel() for mw in modules.values() for t in mw.tensors().values())
    training = {k: log[k] for k in ("steps", "total_steps", "stopped_early", "train_examples", "eval_examples",
                                    "adapter_trainable_params", "head_params", "train_seconds", "initial_eval",
                                    "final_eval", "targets") if k in log}
    training["exported_adapter_params"] = exported
    if picked is not None:
        training["picked_eval"] = picked
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
