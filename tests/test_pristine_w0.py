"""DoRA/EDoRA magnitudes at upload come from the pristine fp32 host copy of W0 (kept once, checked against
the base's fingerprint), never from the live serving weights: merged into, cast to bf16, or on a device."""

from __future__ import annotations

import copy

import pytest
import torch

from adapters_store.basemodels import keep_pristine
from adapters_store.peft_import import import_peft
from adapters_store.synth import random_adapter
from server.lora.pool import AdapterPool
from tests.util_server import peft_files


@pytest.fixture()
def llama(tiny_llama):
    base = copy.copy(tiny_llama)
    base.model = copy.deepcopy(tiny_llama.model)
    base.pristine = None
    return base


def dora_files(base):
    return peft_files(base.model, seed=7, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])


def served_logits(base, adapter, ids, pool=None):
    if pool is None:
        pool = AdapterPool(base, "cpu", torch.float32, max_slots=2, max_rank=16)
        pool.install()
    slot = pool.acquire("dora", lambda: adapter)
    with torch.no_grad(), pool.step(torch.full((ids.numel(),), slot)):
        return base.model(input_ids=ids).logits


def test_upload_while_another_adapter_is_merged_serves_as_on_an_unmerged_server(llama, tiny_llama):
    files = dora_files(llama)
    fresh = copy.copy(tiny_llama)
    fresh.model = copy.deepcopy(tiny_llama.model)
    fresh.pristine = None
    keep_pristine(fresh)
    want = import_peft(files, fresh)

    keep_pristine(llama)
    pool = AdapterPool(llama, "cpu", torch.float32, max_slots=4, max_rank=16)
    pool.install()
    other = random_adapter(llama, "lora", rank=8, seed=3, std=0.2)
    pool.acquire("other", lambda: other)
    pool.merge("other")
    assert pool.merged == "other"
    got = import_peft(files, llama)  # uploaded while "other" is folded into the live weights
    live, llama.pristine = llama.pristine, None
    wrong = import_peft(files, llama)  # what reading the live weights would give
    llama.pristine = live
    pool.unmerge()
    for path, mw in want.modules.items():
        assert torch.equal(got.modules[path].out_scale, mw.out_scale), path
    assert any(not torch.equal(wrong.modules[p].out_scale, mw.out_scale) for p, mw in want.modules.items())
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(served_logits(llama, got, ids, pool), served_logits(fresh, want, ids))


def test_magnitudes_do_not_depend_on_the_serving_dtype(llama):
    files = dora_files(llama)
    want = import_peft(files, llama)  # fp32 live weights, nothing kept: they are the pristine ones
    keep_pristine(llama)
    llama.model.to(torch.bfloat16)
    got = import_peft(files, llama)
    for path, mw in want.modules.items():
        assert got.modules[path].out_scale.dtype == torch.float32
        assert torch.equal(got.modules[path].out_scale, mw.out_scale), path


def test_the_copy_is_refused_once_the_weights_changed(llama):
    with torch.no_grad():
        llama.model.model.layers[0].self_attn.q_proj.weight[0, 0] += 1
    with pytest.raises(ValueError, match="no longer the ones loaded"):
        keep_pristine(llama)
    assert llama.pristine is None


def test_the_copy_is_fp32_on_the_host_and_kept_once(llama):
    keep_pristine(llama)
    kept = llama.pristine
    w = llama.model.model.layers[1].mlp.down_proj.weight
    assert set(kept) == set(llama.targets)
    p = "model.layers.1.mlp.down_proj"
    assert kept[p].dtype == torch.float32 and kept[p].device.type == "cpu"
    assert kept[p].data_ptr() != w.data_ptr() and torch.equal(kept[p], w)
    keep_pristine(llama)
    assert llama.pristine is kept


def test_the_engine_keeps_the_copy_before_it_casts(llama):
    from server.engine import Engine, EngineConfig

    engine = Engine(llama, store=None, config=EngineConfig(dtype="bfloat16", max_model_len=64))
    assert llama.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    kept = llama.pristine["model.layers.0.self_attn.q_proj"]
    assert kept.dtype == torch.float32
    assert torch.equal(kept.bfloat16(), llama.model.model.layers[0].self_attn.q_proj.weight)
    engine.shutdown()


def test_a_placeholder_fingerprint_is_not_fatal_outside_strict_mode(llama):
    llama.fingerprint = "dummy"
    assert keep_pristine(llama, strict=False) is False
    assert llama.pristine is not None
