"""The packed slot write (server/lora/image.py) against the per-module write: the same buffers, bitwise.

A pool whose adapters arrive through ``put_cpu`` (the loader threads' path: checked and packed there, then
written as one copy per shape group) must hold exactly what a pool fed through ``acquire``'s loader (the
per-module staged write, the plain reference) holds, after any sequence of occupants of one slot: wider
and narrower ranks (rows an earlier occupant left must be cleared), per-module ranks and absent modules
(AdaLoRA, AROMA, a subset of modules), DoRA's out_scale before a packed adapter (ones again), bf16 files.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from adapters_store.format import ModuleWeights
from adapters_store.synth import random_adapter
from server.lora.image import Layout, pack
from server.lora.pool import AdapterPool


def _pool(base) -> AdapterPool:
    return AdapterPool(base, "cpu", torch.float32, buckets=[(8, 1), (16, 1)], cpu_bytes=1 << 30)


def _state(pool: AdapterPool) -> list[torch.Tensor]:
    out = [pool._ranks.clone(), pool._occupied.clone(), pool._scaled.clone(), pool._slot_rank.clone(),
           pool._mor_index.clone()]
    for ms in pool.slots.values():
        out += [ms.a_flat.clone(), ms.bt_flat.clone(), ms.out_scale.clone()]
    return out


def _sequence(base):
    some = sorted(base.targets)[::3]
    return [
        random_adapter(base, "lora", 8, seed=1),
        random_adapter(base, "adalora", 6, seed=2, variable_rank=True),
        random_adapter(base, "dora", 4, seed=3),
        random_adapter(base, "lora", 3, seed=4, modules=some),
        random_adapter(base, "aroma", 5, seed=5, variable_rank=True),
        _bf16(random_adapter(base, "lora", 8, seed=6)),
        random_adapter(base, "lora", 8, seed=7),
    ]


def _bf16(adapter):
    modules = {p: ModuleWeights(lora_a=mw.lora_a.bfloat16(), lora_b=mw.lora_b.bfloat16())
               for p, mw in adapter.modules.items()}
    return replace(adapter, modules=modules)


def test_packed_writes_equal_the_per_module_writes(tiny_llama):
    packed_pool, staged_pool = _pool(tiny_llama), _pool(tiny_llama)
    used_packed = 0
    for i, adapter in enumerate(_sequence(tiny_llama)):
        key = f"k{i}"
        packed_pool.put_cpu(key, adapter)
        prepared = packed_pool._cpu.prepared(key)
        used_packed += prepared is not None and prepared[1] is not None
        s1 = packed_pool.acquire(key, lambda: (_ for _ in ()).throw(AssertionError("read again")))
        s2 = staged_pool.acquire(key, lambda a=adapter: a)
        assert s1 == s2
        for got, want in zip(_state(packed_pool), _state(staged_pool), strict=True):
            assert torch.equal(got, want)
        # the adapter the tier keeps has the same values as the one read (views of the packed tensors)
        kept = packed_pool.adapter(key)
        for path, mw in adapter.modules.items():
            assert torch.equal(kept.modules[path].lora_a, mw.lora_a)
            assert torch.equal(kept.modules[path].lora_b, mw.lora_b)
        for pool in (packed_pool, staged_pool):
            pool.release(key)
            pool.forget(key)
    assert used_packed >= 4  # LoRA, AdaLoRA, AROMA, the subset: the packed path really ran


def test_pack_declines_what_the_per_module_write_must_serve(tiny_llama):
    layout = Layout.of(sorted(tiny_llama.targets.items()))
    assert pack(random_adapter(tiny_llama, "dora", 4, seed=1), layout) is None  # out_scale
    assert pack(random_adapter(tiny_llama, "mor", 4, seed=1), layout) is None  # router
    adapter, packed = pack(random_adapter(tiny_llama, "adalora", 6, seed=2, variable_rank=True), layout)
    ranks = dict(zip(layout.paths, packed.ranks.tolist(), strict=True))
    assert ranks == {p: (adapter.modules[p].rank if p in adapter.modules else 0) for p in layout.paths}
    assert packed.rows == max(ranks.values())
    for mw in adapter.modules.values():
        assert mw.lora_b.T.is_contiguous()  # the serving layout: B^T rows contiguous
