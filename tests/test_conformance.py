"""One table runs every method x {tiny-llama generate, tiny-llama classify, tiny-bert classify} through
the same checks: the loss goes down, the exported file reads back and fits the base, and the compiled
adapter applied through ``adapters_store.semantics`` gives the training module's logits (fp32, 1e-5)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from adapters_store.format import CompiledAdapter, load_file, read_header
from adapters_store.semantics import module_forward
from adapters_store.validate import Limits, validate
from trainer.data import build_datasets, collate, toy_records
from trainer.export import build_adapter, write_adapter
from trainer.loop import TrainConfig, train
from trainer.methods.base import AdapterLayer
from trainer.tasks import logits as training_logits

# Small, fast settings per method (the defaults are sized for real runs).
FAST = {
    "lora": {"rank": 4},
    "dora": {"rank": 4},
    "adalora": {"rank": 2, "init_r": 4, "delta_t": 1},
    "aroma": {"rank": 2, "check_every": 2, "max_inner_steps": 10, "restart_warmup": 3, "eps_out": 0.02, "dropout": 0.0},
    "mor": {"rank": 4, "num_experts": 3},
    "edora": {"rank": 4},
}
CASES = [("tiny-llama", "generate"), ("tiny-llama", "classify"), ("tiny-bert", "classify")]


def fresh(base):
    """A private copy of a session fixture: the loop wraps linears in place."""
    return dataclasses.replace(base, model=copy.deepcopy(base.model))


def apply_compiled(base, adapter: CompiledAdapter):
    """A copy of the base whose adapted linears run ``semantics.module_forward`` with the file's weights."""
    model = copy.deepcopy(base.model)
    for path, mw in adapter.modules.items():
        linear = model.get_submodule(path)
        assert isinstance(linear, nn.Linear), path

        def forward(x, linear=linear, mw=mw):
            flat = x.reshape(-1, x.shape[-1])  # [T, d_in]
            return module_forward(flat, linear.weight, linear.bias, mw).reshape(*x.shape[:-1], -1)

        linear.forward = forward
    return dataclasses.replace(base, model=model)


def served_logits(base, adapter: CompiledAdapter, batch) -> torch.Tensor:
    """What a server computes from the file alone: LM logits, or head(pooled hidden) per the metadata."""
    if adapter.meta.task == "generate":
        return base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    backbone = base.model.model if base.is_decoder else base.model
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"]
    if adapter.meta.pooling == "last":
        pooled = torch.stack([hidden[i, int(mask[i].sum()) - 1] for i in range(hidden.shape[0])])
    elif adapter.meta.pooling == "mean":
        pooled = torch.stack([hidden[i, mask[i].bool()].mean(dim=0) for i in range(hidden.shape[0])])
    else:
        pooled = hidden[:, 0]
    return pooled @ adapter.head_weight.T + adapter.head_bias


@pytest.mark.parametrize("base_name,task", CASES, ids=[f"{b}-{t}" for b, t in CASES])
@pytest.mark.parametrize("method", sorted(FAST))
def test_method_conformance(method, base_name, task, request, tmp_path):
    pristine = request.getfixturevalue(base_name.replace("-", "_"))
    base = fresh(pristine)
    records = toy_records(task, 48, seed=1)
    train_set, _, labels = build_datasets(task, base.tokenizer, records, records[:1], 48)
    cfg = TrainConfig(method=method, task=task, method_options=FAST[method], lr=1e-2, max_steps=30,
                      batch_size=8, warmup_ratio=None if method == "aroma" else 0.1, seed=0, progress=False)
    result = train(base, train_set, train_set, cfg, labels)

    # 1. it learns
    assert result.log["final_eval"]["loss"] < result.log["initial_eval"]["loss"]

    # 2. the file reads back, carries the metadata, and fits the base
    path = tmp_path / "adapter.safetensors"
    write_adapter(build_adapter(base, result, method, task), path, base)
    adapter = load_file(path)
    validate(adapter, pristine, Limits())
    meta = adapter.meta
    assert (meta.method, meta.task, meta.base_model, meta.base_fingerprint) == (method, task, base_name, pristine.fingerprint)
    assert meta.ranks == {p: mw.rank for p, mw in adapter.modules.items()} and adapter.modules
    assert meta.trainable_params == result.log["trainable_params"] > 0
    for p, mw in adapter.modules.items():
        d_in, d_out = pristine.targets[p]
        assert mw.lora_a.shape == (mw.rank, d_in) and mw.lora_b.shape[0] == d_out
        assert (mw.gate is not None) == (method == "mor") and (mw.out_scale is not None) == (method in ("dora", "edora"))
    if method == "mor":  # the file holds the compact form (sB and lamB; read, it expands to B'): what was trained
        entries, _ = read_header(path)
        for p, mw in adapter.modules.items():
            n, d_out = mw.num_experts, pristine.targets[p][1]
            assert entries[f"{p}.lora_b"]["shape"] == [d_out, mw.rank] and mw.lora_b.shape == (d_out, n * mw.rank)
            assert entries[f"{p}.expert_out_scale"]["shape"] == [n, d_out]
        assert meta.training["exported_adapter_params"] == result.log["adapter_trainable_params"]
    if task == "classify":
        assert meta.labels == sorted({r["label"] for r in records})
        assert meta.pooling == ("last" if pristine.is_decoder else "mean")
        assert adapter.head_weight.shape == (len(meta.labels), pristine.hidden_size)
    else:
        assert meta.labels is None and adapter.head_weight is None

    # 3. the compiled adapter computes what the training module computes
    served = apply_compiled(pristine, adapter)
    batch = collate(train_set[:6], base.tokenizer.pad_token_id)
    with torch.no_grad():
        want = training_logits(base, batch, result.head, result.pooling)
        got = served_logits(served, adapter, batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    # the session fixture was not touched
    assert not any(isinstance(m, AdapterLayer) for m in pristine.model.modules())
