"""AdapterPool residency: buckets, LRU eviction of idle adapters only, pins, CPU tier bound, buffer reuse."""

from __future__ import annotations

import pytest
import torch

from adapters_store.format import AdapterFormatError
from server.lora.pool import AdapterPool, PoolExhausted, default_buckets
from tests.test_ops import adapter_of, module_of, one_linear_base


def make_pool(buckets=((8, 2), (16, 1)), cpu_bytes=1 << 20, **kw) -> AdapterPool:
    base = one_linear_base(16, 12, torch.float32, 0)
    pool = AdapterPool(base, "cpu", torch.float32, buckets=list(buckets), cpu_bytes=cpu_bytes, **kw)
    pool.install()
    return pool


def loader(rank: int, form: str = "plain", seed: int = 0, calls: list | None = None):
    def load():
        if calls is not None:
            calls.append(rank)
        return adapter_of(module_of(form, rank, 16, 12, torch.Generator().manual_seed(seed)), form)
    return load


def test_default_buckets_cover_the_slots_and_the_max_rank():
    assert default_buckets(32, 64) == [(8, 8), (16, 8), (32, 8), (64, 8)]
    assert default_buckets(2, 64) == [(32, 1), (64, 1)]
    assert default_buckets(5, 12) == [(8, 3), (12, 2)]
    assert sum(n for _, n in default_buckets(7, 100)) == 7


def test_smallest_fitting_bucket_then_spill_upward():
    pool = make_pool()
    assert pool.acquire("a", loader(4)) in (0, 1)
    assert pool.acquire("b", loader(8)) in (0, 1)
    assert pool.acquire("c", loader(3)) == 2  # bucket 8 is full: spills into the rank-16 bucket
    with pytest.raises(PoolExhausted, match="pinned"):
        pool.acquire("d", loader(2))


def test_lru_evicts_only_idle_adapters():
    pool = make_pool(buckets=[(8, 3)])
    for key in "abc":
        pool.acquire(key, loader(4))
    pool.release("a")
    pool.release("c")
    pool.acquire("a", loader(4))  # hit: "a" becomes most recent, pinned again
    pool.release("a")
    slot_c = pool.slot_of("c")
    assert pool.acquire("d", loader(4)) == slot_c  # "c" is the least recently used idle adapter
    assert pool.slot_of("c") is None and pool.slot_of("b") is not None  # "b" is pinned: never evicted
    stats = pool.stats
    assert stats.evictions["gpu"] == 1 and stats.hits["gpu"] == 1 and stats.misses["gpu"] == 4
    assert stats.resident["gpu"] == 3


def test_exhausted_when_every_fitting_slot_is_pinned_and_recovers_after_release():
    pool = make_pool(buckets=[(8, 1), (16, 1)])
    pool.acquire("small", loader(4))
    pool.acquire("big", loader(16))
    with pytest.raises(PoolExhausted, match=">= 12 rank rows"):
        pool.acquire("big2", loader(12))
    pool.release("small")  # an idle rank-8 slot cannot hold rank 12
    with pytest.raises(PoolExhausted):
        pool.acquire("big2", loader(12))
    pool.release("big")
    assert pool.acquire("big2", loader(12)) == 1


def test_release_of_unpinned_adapter_raises():
    pool = make_pool()
    pool.acquire("a", loader(4))
    pool.release("a")
    with pytest.raises(KeyError, match="not pinned"):
        pool.release("a")


def test_residency_reuses_preallocated_buffers():
    pool = make_pool(buckets=[(8, 2)])
    slots = pool.slots["proj"]
    before = [t.data_ptr() for t in (*slots.a, *slots.bt, slots.out_scale, slots.gate)]
    for i in range(6):
        pool.acquire(f"k{i}", loader(1 + i, "out_scale" if i % 2 else "plain", seed=i))
        pool.release(f"k{i}")
    assert [t.data_ptr() for t in (*slots.a, *slots.bt, slots.out_scale, slots.gate)] == before
    assert pool.stats.evictions["gpu"] == 4


def test_rank_padding_and_absent_modules_contribute_nothing():
    pool = make_pool(buckets=[(8, 1)])
    pool.acquire("wide", loader(8, seed=1))
    pool.release("wide")
    slot = pool.acquire("absent", lambda: adapter_of(None, "plain"))  # evicts "wide", reuses its rows
    x = torch.randn(3, 16)
    layer = pool.layers["proj"]
    with pool.step(torch.full((3,), slot)):
        y = layer(x)
    assert torch.equal(y, torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_a_slot_reused_after_a_scaled_adapter_serves_the_next_one_exactly():
    """Slot writes skip what would change nothing (an out_scale row already at ones, an empty tail), and
    read lora_b in the CPU tier's column-major layout: a plain adapter landing where a DoRA-style one was
    gets ones again, and every step equals the reference of the adapter now in the slot."""
    from server.lora.ops.reference import reference_forward

    pool = make_pool(buckets=[(8, 1)])
    x = torch.randn(5, 16)
    layer = pool.layers["proj"]
    for i, (form, rank) in enumerate([("out_scale", 8), ("plain", 3), ("out_scale", 5), ("plain", 8), ("plain", 2)]):
        load = loader(rank, form, seed=10 + i)
        slot = pool.acquire(f"k{i}", load)
        adapter = pool.adapter(f"k{i}")
        assert adapter.modules["proj"].lora_b.T.is_contiguous()  # the CPU tier's layout
        assert torch.equal(adapter.modules["proj"].lora_b, load().modules["proj"].lora_b)  # same values
        with torch.no_grad(), pool.step(torch.full((5,), slot)):
            got = layer(x)
        want = reference_forward(x, layer.weight, layer.bias, torch.full((5,), slot), {slot: load().modules["proj"]})
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        if form == "plain":
            assert torch.equal(pool.slots["proj"].out_scale[slot], torch.ones(12))
        # the buffers themselves: the rank recorded, and no row of an earlier occupant left past it
        slots = pool.slots["proj"]
        assert int(slots.ranks[slot]) == rank
        assert not slots.a[0][0][rank:].any() and not slots.bt[0][0][rank:].any()
        pool.release(f"k{i}")
        pool.forget(f"k{i}")


def test_cpu_tier_is_bounded_in_bytes_and_serves_hits():
    one = loader(8)().num_bytes()
    calls: list[int] = []
    pool = make_pool(buckets=[(8, 1)], cpu_bytes=2 * one)
    for key in ("a", "b", "c"):
        pool.acquire(key, loader(8, calls=calls))
        pool.release(key)
    stats = pool.stats
    assert stats.resident_bytes["cpu"] <= 2 * one and stats.resident["cpu"] == 2
    assert stats.evictions["cpu"] == 1 and stats.misses["cpu"] == 3
    pool.acquire("b", loader(8, calls=calls))  # evicted from the device, still in the CPU tier
    assert len(calls) == 3 and pool.stats.hits["cpu"] == 1
    pool.release("b")
    pool.acquire("a", loader(8, calls=calls))  # gone from both tiers: loaded again
    assert len(calls) == 4
    assert pool.stats.capacity_bytes["cpu"] == 2 * one and pool.stats.capacity_bytes["gpu"] > 0


def test_prefetched_adapters_stay_in_the_cpu_tier_until_their_first_acquire():
    """Prefetches for waiting requests are never evicted before use, even past the tier's bytes; once
    acquired (or once the hold lapses) they are ordinary LRU entries again."""
    import time

    one = loader(8)().num_bytes()
    calls: list[int] = []
    pool = make_pool(buckets=[(8, 2)], cpu_bytes=one)  # room for ONE adapter
    for key, seed in (("a", 1), ("b", 2), ("c", 3)):
        pool.put_cpu(key, loader(8, seed=seed)(), hold_s=60)
    assert pool.stats.resident["cpu"] == 3 and pool.stats.evictions["cpu"] == 0  # held: over budget
    for key in ("a", "b"):
        pool.acquire(key, loader(8, calls=calls))  # served from the CPU tier: no read
        pool.release(key)
    assert calls == []
    pool.put_cpu("d", loader(8, seed=4)())  # unheld entries (a, b, d) go back to the budget; c is still held
    assert pool.cached("c") and not pool.cached("d") and pool.stats.resident["cpu"] == 1
    pool.acquire("c", loader(8, calls=calls))
    assert calls == []
    pool.put_cpu("e", loader(8, seed=5)(), hold_s=0.01)
    time.sleep(0.02)
    pool.put_cpu("f", loader(8, seed=6)())  # e's hold lapsed: evictable
    assert pool.stats.resident_bytes["cpu"] <= one


def test_forget_drops_idle_now_and_pinned_at_last_release():
    calls: list[int] = []
    pool = make_pool(buckets=[(8, 2)])
    pool.acquire("idle", loader(4, calls=calls))
    pool.release("idle")
    pool.acquire("busy", loader(4, calls=calls))
    pool.forget("idle")
    assert pool.slot_of("idle") is None
    with pytest.raises(KeyError):
        pool.adapter("idle")
    pool.forget("busy")
    assert pool.slot_of("busy") is not None  # pinned: stays until released
    pool.release("busy")
    assert pool.slot_of("busy") is None
    pool.acquire("busy", loader(4, calls=calls))
    assert len(calls) == 3  # forgotten from the CPU tier as well


def test_misfits_are_reported_together_and_leave_the_pool_unchanged():
    pool = make_pool(buckets=[(8, 1)], max_experts=2)
    with pytest.raises(AdapterFormatError) as err:
        pool.acquire("big", loader(12))
    assert "max_rank is 8" in str(err.value)
    bad = adapter_of(module_of("plain", 4, 16, 12, torch.Generator()), "plain")
    bad.modules["elsewhere"] = bad.modules["proj"]
    bad.modules["proj"].lora_a = torch.zeros(4, 15)
    with pytest.raises(AdapterFormatError) as err:
        pool.acquire("bad", lambda: bad)
    assert len(err.value.problems) == 2 and "proj.lora_a" in str(err.value) and "'elsewhere'" in str(err.value)
    assert pool.acquire("ok", loader(8)) == 0
    # prefetched (put_cpu: the fit is checked there, off the engine thread): a misfit is still reported at
    # acquire with every problem, and a fitting one keeps the rank rows it was checked for
    pool.release("ok")
    pool.put_cpu("big", loader(12)())
    assert pool._cpu.prepared("big") is None
    with pytest.raises(AdapterFormatError, match="max_rank is 8"):
        pool.acquire("big", loader(12))
    pool.put_cpu("fits", loader(5)())
    need, packed = pool._cpu.prepared("fits")
    assert need == 5 and packed is not None and packed.rows == 5 and pool.acquire("fits", loader(5)) == 0
    assert int(pool.slots["proj"].ranks[0]) == 5


def test_mor_entries_are_a_separate_budget():
    pool = make_pool(buckets=[(64, 3)], mor_entries=1)
    pool.acquire("m1", loader(4, "mor", seed=1))
    with pytest.raises(PoolExhausted, match="MoR entries"):
        pool.acquire("m2", loader(4, "mor", seed=2))
    pool.acquire("plain", loader(4))  # plain adapters do not need an entry
    pool.release("m1")
    pool.acquire("m2", loader(4, "mor", seed=2))  # evicts the idle MoR adapter for its entry
    assert pool.slot_of("m1") is None


def test_a_repeated_step_reuses_its_plan_until_a_slot_changes():
    """Steady decoding repeats the token slots: the plan is reused (same tensors and choices, a fresh
    per-step scratch); a new adapter in a slot, a freed slot, or other token slots build a new one."""
    pool = make_pool(buckets=[(8, 2)])
    s0 = pool.acquire("a", loader(4, seed=1))
    s1 = pool.acquire("b", loader(8, seed=2))
    slots = torch.tensor([s0, s1, s1, -1])
    first = pool.plan(slots)
    first.shared["scratch"] = 1
    again = pool.plan(slots)
    assert again.order is first.order and again.choices is first.choices and again.kept_rows is first.kept_rows
    assert again.shared == {} and again.kept_key == first.kept_key
    assert pool.plan(torch.tensor([s1, s0, s1, -1])).order is not first.order  # other token slots
    pool.release("a")
    pool.forget("a")  # frees slot s0
    s2 = pool.acquire("c", loader(8, seed=3))  # lands in the freed slot
    assert s2 == s0
    rebuilt = pool.plan(slots)
    assert rebuilt.order is not first.order and rebuilt.kept_key != first.kept_key
    x = torch.randn(4, 16)
    layer = pool.layers["proj"]
    with torch.no_grad(), pool.step(slots):
        got = layer(x)
    from server.lora.ops.reference import reference_forward

    want = reference_forward(x, layer.weight, layer.bias, slots, {s0: loader(8, seed=3)().modules["proj"],
                                                                  s1: loader(8, seed=2)().modules["proj"]})
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
