"""Merge mode: merged forward == unmerged forward, bitwise restore of W0, MoR refused, mixed batch refused."""

from __future__ import annotations

import copy

import pytest
import torch

from adapters_store.synth import random_adapter
from server.lora.merge import NotMergeable
from server.lora.plan import MergedBatchError
from server.lora.pool import AdapterPool


@pytest.fixture()
def llama(tiny_llama):
    base = copy.copy(tiny_llama)
    base.model = copy.deepcopy(tiny_llama.model)
    return base


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["lora", "dora", "edora", "adalora"])
def test_merged_forward_equals_batched_forward_and_unmerge_is_bitwise(llama, method):
    pool = AdapterPool(llama, "cpu", torch.float32, max_slots=4, max_rank=16)
    pool.install()
    adapter = random_adapter(llama, method, rank=8, seed=3, variable_rank=method == "adalora", std=0.1)
    slot = pool.acquire("k", lambda: adapter)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    before = weights(llama.model)
    ptrs = {k: v.data_ptr() for k, v in llama.model.state_dict().items()}
    with torch.no_grad(), pool.step(torch.full((ids.numel(),), slot)):
        batched = llama.model(input_ids=ids).logits
    base_logits = llama.model(input_ids=ids).logits.detach()
    pool.merge("k")
    assert pool.merged == "k"
    changed = [k for k, v in llama.model.state_dict().items() if not torch.equal(v, before[k])]
    assert sorted(changed) == sorted(p + ".weight" for p in adapter.modules)
    with torch.no_grad(), pool.step(torch.full((ids.numel(),), slot)) as plan:
        assert plan.merged and not plan.has_adapters  # the op must not add the correction twice
        merged = llama.model(input_ids=ids).logits
    torch.testing.assert_close(merged, batched, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(merged, base_logits, atol=1e-3)
    pool.unmerge()
    after = llama.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(after[k].data_ptr() == ptrs[k] for k in before)  # restored in place, same storage
    with torch.no_grad():
        assert torch.equal(llama.model(input_ids=ids).logits, base_logits)


def test_later_merges_reuse_the_kept_w0_and_start_from_it(llama):
    """A second merge reads no weight copy again (the kept W0 are the same tensors) and folds the adapter
    into W0, not into what an earlier merge left: after merge a, unmerge, merge b, each weight equals
    ``merged_weight(W0, b)`` (the plain fp32 reference) and unmerge restores W0 bitwise."""
    from adapters_store.semantics import merged_weight

    pool = AdapterPool(llama, "cpu", torch.float32, max_slots=4, max_rank=16)
    pool.install()
    a = random_adapter(llama, "dora", rank=8, seed=3, std=0.1)
    b = random_adapter(llama, "lora", rank=8, seed=4, std=0.1)
    pool.acquire("a", lambda: a)
    pool.acquire("b", lambda: b)
    w0 = weights(llama.model)
    pool.merge("a")
    kept = dict(pool._w0)
    assert set(kept) == set(a.modules)
    pool.unmerge()
    pool.merge("b")
    assert all(pool._w0[p] is kept[p] for p in kept)  # no second copy of the weights
    for path, mw in b.modules.items():
        want = merged_weight(w0[path + ".weight"], mw)
        torch.testing.assert_close(llama.model.get_submodule(path).weight, want, atol=1e-6, rtol=1e-6)
    pool.unmerge()
    assert all(torch.equal(v, w0[k]) for k, v in llama.model.state_dict().items())


def test_mor_is_refused_and_nothing_changes(llama):
    pool = AdapterPool(llama, "cpu", torch.float32, max_slots=2, max_rank=64)
    pool.install()
    pool.acquire("mor", lambda: random_adapter(llama, "mor", rank=4, seed=1))
    before = weights(llama.model)
    with pytest.raises(NotMergeable, match="router"):
        pool.merge("mor")
    assert pool.merged is None
    assert all(torch.equal(v, before[k]) for k, v in llama.model.state_dict().items())


def test_mixed_batch_while_merged_raises_and_merged_adapter_stays_pinned(llama):
    pool = AdapterPool(llama, "cpu", torch.float32, buckets=[(8, 2)])
    pool.install()
    a = pool.acquire("a", lambda: random_adapter(llama, "lora", rank=4, seed=1))
    b = pool.acquire("b", lambda: random_adapter(llama, "lora", rank=4, seed=2))
    pool.merge("a")
    pool.release("a")  # the request finished; merge still pins it
    pool.release("b")
    with pytest.raises(MergedBatchError):
        pool.plan(torch.tensor([a, b]))
    with pytest.raises(MergedBatchError):
        pool.plan(torch.tensor([a, -1]))
    with pytest.raises(RuntimeError, match="already merged"):
        pool.merge("b")
    pool.acquire("c", lambda: random_adapter(llama, "lora", rank=4, seed=3))  # evicts idle "b", never "a"
    assert pool.slot_of("a") == a and pool.slot_of("b") is None
    pool.unmerge()
    assert pool.plan(torch.tensor([a, -1])).has_adapters


@pytest.mark.gpu
def test_merge_on_cuda_keeps_w0_in_pinned_host_memory_and_restores_bitwise(llama):
    from server.lora.merge import merge_into, restore

    model = llama.model.to("cuda", torch.bfloat16)
    adapter = random_adapter(llama, "dora", rank=8, seed=5, std=0.1)
    layers = {p: model.get_submodule(p) for p in adapter.modules}
    before = {p: m.weight.detach().clone() for p, m in layers.items()}
    allocated = torch.cuda.memory_allocated()
    saved = merge_into(layers, adapter)
    assert all(t.device.type == "cpu" and t.is_pinned() for t in saved.values())
    assert torch.cuda.memory_allocated() - allocated < sum(t.numel() for t in saved.values())  # no device copy
    assert any(not torch.equal(layers[p].weight, before[p]) for p in layers)
    restore(layers, saved)
    assert all(torch.equal(layers[p].weight, before[p]) for p in layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_restores_from_the_pristine_copy_bitwise_without_a_second_copy(llama, dtype):
    """A server's base keeps one fp32 host copy of W0 before any cast (keep_pristine): merge mode uses it
    instead of copying the weights again, and copying it back equals the cast weights bitwise."""
    from adapters_store.basemodels import keep_pristine

    llama.pristine = None
    keep_pristine(llama, strict=False)
    assert llama.pristine is not None
    llama.model.to(dtype)
    pool = AdapterPool(llama, "cpu", dtype, max_slots=2, max_rank=16)
    pool.install()
    adapter = random_adapter(llama, "dora", rank=8, seed=6, std=0.1)
    pool.acquire("d", lambda: adapter)
    before = weights(llama.model)
    pool.merge("d")
    assert all(pool._w0[p] is llama.pristine[p] for p in adapter.modules)  # no copy of its own
    assert any(not torch.equal(v, before[k]) for k, v in llama.model.state_dict().items())
    pool.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in llama.model.state_dict().items())
