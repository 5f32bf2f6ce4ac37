"""The engine with adapters: mixed-adapter batches against the plain reference forward, residency faults,
version safety, merge mode and batched classification."""

import asyncio
import copy
import threading
import time

import pytest
import torch
from test_engine import Gate, MemStore, collect, greedy, hf_greedy, prompts, wait_for

from adapters_store.basemodels import load_base
from adapters_store.synth import random_adapter
from server.common.errors import AdapterLoadFailed, Unavailable, UnknownAdapter
from server.common.metrics import Metrics
from server.engine import Engine, EngineConfig
from server.engine.classify import encode
from tests.util_apply import apply_adapter

MIX = [("lora", 4, False), ("dora", 8, False), ("adalora", 8, True), ("aroma", 6, True),
       ("mor", 4, False), ("edora", 4, False), ("lora", 16, False), ("dora", 6, True)]


@pytest.fixture(scope="module")
def adapters(tiny_llama):
    return {f"a{i}": random_adapter(tiny_llama, m, r, seed=10 + i, variable_rank=v, std=0.1)
            for i, (m, r, v) in enumerate(MIX)}


@pytest.fixture
def engines():
    made = []

    def make(store, metrics=None, **cfg):
        opts = dict(max_batch_tokens=96, max_running=32, max_queue=128, max_model_len=128, kv_block_size=8)
        opts.update(cfg)
        e = Engine(load_base("tiny-llama"), store, EngineConfig(**opts), metrics)
        e.start()
        made.append(e)
        return e

    yield make
    for e in made:
        e.shutdown()


def store_with(adapters, owner=None):
    s = MemStore()
    for k, a in adapters.items():
        s.put(k, a, owner=owner)
    return s


def test_each_adapter_matches_the_reference_forward(engines, adapters, tiny_llama):
    eng = engines(store_with(adapters))
    p = prompts([7], seed=11)[0]
    base_tokens = hf_greedy(tiny_llama.model, p, 6)
    changed = 0
    for name, adapter in adapters.items():
        got = collect(eng.submit_generate(greedy(p, 6, adapter_id=name))).tokens
        assert got == hf_greedy(apply_adapter(tiny_llama.model, adapter), p, 6), name
        changed += got != base_tokens
    assert changed >= 6  # the adapters really change the output


def test_32_concurrent_requests_over_8_adapters_equal_each_alone(engines, adapters):
    m = Metrics()
    eng = engines(store_with(adapters), metrics=m)
    names = [None, *adapters]
    jobs = [(names[i % len(names)], p, 4 + i % 5) for i, p in enumerate(prompts([3 + (i * 7) % 23 for i in range(32)], 12))]
    alone = [collect(eng.submit_generate(greedy(p, n, adapter_id=a))).tokens for a, p, n in jobs]
    handles = [eng.submit_generate(greedy(p, n, adapter_id=a)) for a, p, n in jobs]
    together = [collect(h).tokens for h in handles]
    assert together == alone
    assert m.batch_distinct_adapters._sum.get() > m.batch_distinct_adapters._buckets[0].get()  # batches mixed


@pytest.mark.parametrize("fault", ["bytes_damaged_on_disk", "foreign_base_fingerprint"])
def test_corrupt_adapter_fails_only_its_requests(engines, adapters, tmp_path, fault):
    from adapters_store.store import AdapterStore

    store = AdapterStore(tmp_path)
    store.put("good", adapters["a0"].to_bytes())
    bad = copy.deepcopy(adapters["a1"])
    if fault == "foreign_base_fingerprint":
        bad.meta.base_fingerprint = "0" * 32  # the store took it without a base; the engine's load checks it
    store.put("bad", bad.to_bytes())
    if fault == "bytes_damaged_on_disk":
        path = tmp_path / "adapters" / "bad" / "adapter.safetensors"
        data = bytearray(path.read_bytes())
        data[-8:] = b"\xff" * 8
        path.write_bytes(bytes(data))
    eng = engines(store)
    gate = Gate(eng.runner)
    good = [eng.submit_generate(greedy([5, 6, 7], 4, adapter_id="good"))]
    assert gate.entered.wait(10)  # the engine is inside a step: the next ones queue together
    bad_handles = [eng.submit_generate(greedy([5, 6, 7], 4, adapter_id="bad")) for _ in range(3)]
    good.append(eng.submit_generate(greedy([5, 6, 7], 4)))
    gate.open.set()
    for h in bad_handles:
        last = collect(h).last
        assert last.finish_reason == "error" and isinstance(last.error, AdapterLoadFailed)
        assert "bad" in last.error.message and last.error.http_status == 424
    assert all(collect(h).last.finish_reason == "length" for h in good)
    with pytest.raises(AdapterLoadFailed):  # marked errored: later requests fail at submit
        eng.submit_generate(greedy([5], 2, adapter_id="bad"))
    wait_for(lambda: eng.num_running == 0)


def test_more_adapters_than_slots_wait_then_run(engines, adapters):
    eng = engines(store_with(adapters), max_slots=2, max_rank=16)
    names = ["a0", "a1", "a4", "a5", "a6"]  # 5 adapters through 2 slots
    alone = {a: collect(eng.submit_generate(greedy([9, 8, 7], 5, adapter_id=a))).tokens for a in names}
    handles = {a: eng.submit_generate(greedy([9, 8, 7], 5, adapter_id=a)) for a in names}
    assert {a: collect(h).tokens for a, h in handles.items()} == alone
    stats = eng.pool.stats
    assert stats.evictions["gpu"] >= 3 and stats.resident["gpu"] <= 2


def test_slot_wait_is_bounded(engines, adapters):
    eng = engines(store_with(adapters), max_slots=1, max_rank=16, slot_wait_s=0.2)
    inner = eng.runner.forward
    eng.runner.forward = lambda chunks, **kw: (time.sleep(0.01), inner(chunks, **kw))[1]  # ~1 s for 100 steps
    holder = eng.submit_generate(greedy([5, 6], 100, adapter_id="a0"))
    stream = holder.events_sync(timeout=10)
    next(stream)  # running; keep the stream open (dropping it would cancel the request)
    waiter = eng.submit_generate(greedy([5, 6], 3, adapter_id="a1"))  # the only slot stays pinned
    last = collect(waiter).last
    assert last.finish_reason == "error" and isinstance(last.error, Unavailable) and "slot" in last.error.message
    assert list(stream)[-1].finish_reason == "length"


def test_cancel_releases_the_adapter_pin(engines, adapters):
    eng = engines(store_with(adapters), max_slots=1, max_rank=16)
    h = eng.submit_generate(greedy([5, 6], 100, adapter_id="a0"))
    next(h.events_sync(timeout=10))
    h.cancel()
    wait_for(lambda: eng.num_running == 0)
    # the single slot is free again: another adapter can evict a0 and run
    assert collect(eng.submit_generate(greedy([5, 6], 3, adapter_id="a1"))).last.finish_reason == "length"


def test_delete_and_reupload_never_mixes_versions(engines, adapters, tiny_llama):
    store = store_with({"x": adapters["a0"]})
    eng = engines(store)
    p = [11, 12, 13]
    v1 = hf_greedy(apply_adapter(tiny_llama.model, adapters["a0"]), p, 8)
    v2 = hf_greedy(apply_adapter(tiny_llama.model, adapters["a1"]), p, 8)
    gate = Gate(eng.runner)
    running = eng.submit_generate(greedy(p, 8, adapter_id="x"))
    assert gate.entered.wait(10)  # v1 is pinned and in its first step
    queued_old = eng.submit_generate(greedy(p, 8, adapter_id="x"))  # captured v1's digest, still queued
    store.delete("x")
    with pytest.raises(UnknownAdapter):
        eng.submit_generate(greedy(p, 8, adapter_id="x"))
    store.put("x", adapters["a1"])
    fresh = eng.submit_generate(greedy(p, 8, adapter_id="x"))
    gate.open.set()
    assert collect(running).tokens == v1
    assert collect(queued_old).tokens == v1  # v1 is still resident (pinned): it runs with v1, never v2
    assert collect(fresh).tokens == v2


def test_merge_mode_matches_unmerged_and_restores_the_base(engines, adapters, tiny_llama):
    eng = engines(store_with(adapters), merge_single_adapter=True)
    merges = []
    inner_merge = eng.pool.merge
    eng.pool.merge = lambda key: (merges.append(key), inner_merge(key))[1]
    p = prompts([6], seed=13)[0]
    ref = hf_greedy(apply_adapter(tiny_llama.model, adapters["a1"]), p, 8)  # DoRA: out_scale merged too
    assert collect(eng.submit_generate(greedy(p, 8, adapter_id="a1"))).tokens == ref
    assert merges  # the single-adapter batch ran merged
    mixed = [eng.submit_generate(greedy(p, 8, adapter_id=a)) for a in ("a1", "a1", None, "a4")]
    outs = [collect(h).tokens for h in mixed]
    assert outs[0] == outs[1] == ref and outs[2] == hf_greedy(tiny_llama.model, p, 8)
    assert collect(eng.submit_generate(greedy(p, 8))).tokens == hf_greedy(tiny_llama.model, p, 8)
    assert eng.pool.merged is None
    for name, w in tiny_llama.model.named_parameters():  # W0 restored bitwise
        assert torch.equal(eng.base.model.get_parameter(name), w), name


def test_traffic_flipping_between_merged_and_mixed_stays_exact(engines, adapters, tiny_llama):
    """Merge mode under traffic that alternates single-adapter runs (merged) with mixed batches (unmerged,
    W0 restored) and classify-free base steps: every output equals its adapter's reference."""
    m = Metrics()
    eng = engines(store_with(adapters), metrics=m, merge_single_adapter=True)
    p, q = prompts([6, 5], seed=17)
    refs = {a: hf_greedy(apply_adapter(tiny_llama.model, adapters[a]), p, 10) for a in ("a0", "a1", "a5")}
    refs[None] = hf_greedy(tiny_llama.model, p, 10)
    for round_ in range(3):
        for a in ("a0", "a1", "a5"):  # LoRA, DoRA, EDoRA alone: long enough to merge
            assert collect(eng.submit_generate(greedy(p, 10, adapter_id=a))).tokens == refs[a], (round_, a)
        mixed = [eng.submit_generate(greedy(p, 10, adapter_id=a)) for a in ("a1", None, "a0", "a5")]
        assert [collect(h).tokens for h in mixed] == [refs["a1"], refs[None], refs["a0"], refs["a5"]]
    merges = m.adapter_merges._value.get()
    assert merges >= 3 and merges == eng.merging.merges  # the single-adapter runs did run merged
    assert eng.pool.merged is None  # the last batch was mixed: W0 is back
    assert collect(eng.submit_generate(greedy(q, 3))).tokens == hf_greedy(tiny_llama.model, q, 3)


def test_merge_policy_backs_off_when_merges_do_not_pay():
    class Pool:
        def __init__(self):
            self.merged, self.log = None, []

        def adapter(self, key):
            return type("A", (), {"mergeable": True})()

        def merge(self, key):
            self.merged = key
            self.log.append("merge")

        def unmerge(self):
            self.merged = None
            self.log.append("unmerge")

    from server.lora.merge_policy import LONG_MERGE_STEPS, MergePolicy

    pool = Pool()
    policy = MergePolicy(pool, enabled=True, after_steps=3)
    for _ in range(50):  # flickers: five steps of one adapter, then one mixed step
        for _ in range(5):
            policy.before_step(["a"])
        policy.before_step(["a", "b"])
    assert pool.log.count("merge") == 1 and policy.wait == 6  # the first merge did not pay: no more
    for _ in range(LONG_MERGE_STEPS + 10):  # a long single-adapter run merges and pays off
        policy.before_step(["a"])
    policy.before_step([None])
    assert pool.log.count("merge") == 2 and policy.wait == 3 and pool.log[-1] == "unmerge"


def reference_classify(base, adapter, texts):
    model = apply_adapter(base.model, adapter)
    out = []
    for t in texts:
        ids = torch.tensor([base.tokenizer(t)["input_ids"]])
        with torch.no_grad():
            h = (model.model if base.is_decoder else model)(input_ids=ids).last_hidden_state[0]
        pooled = {"last": h[-1], "first": h[0], "mean": h.mean(0)}[adapter.meta.pooling]
        probs = (pooled @ adapter.head_weight.T + adapter.head_bias).softmax(-1)
        out.append(probs)
    return out


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-bert"])
def test_classify_mixed_adapters_in_one_batch(family):
    ref_base = load_base(family)
    labels = [["neg", "pos"], ["a", "b", "c"]]
    ads = {f"c{i}": random_adapter(ref_base, m, 4, seed=30 + i, task="classify", labels=labels[i], std=0.1)
           for i, m in enumerate(["lora", "dora"])}
    eng = Engine(load_base(family), store_with(ads), EngineConfig(max_model_len=64))
    eng.start()
    texts = [["good day", "a bad thing happened to us", "ok"], ["the cat", "sat on the mat today"]]
    try:
        async def run():
            return await asyncio.gather(*(eng.classify(k, encode(ref_base.tokenizer, t))
                                          for k, t in zip(ads, texts, strict=True)))

        results = asyncio.run(run())
        with pytest.raises(UnknownAdapter):
            asyncio.run(eng.classify("missing", [[5]]))
    finally:
        eng.shutdown()
    for adapter, res, tx in zip(ads.values(), results, texts, strict=True):
        want = reference_classify(ref_base, adapter, tx)
        for (label, scores), probs in zip(res, want, strict=True):
            got = torch.tensor([scores[lab] for lab in adapter.meta.labels])
            torch.testing.assert_close(got, probs, atol=1e-4, rtol=1e-4)
            assert label == adapter.meta.labels[int(probs.argmax())]


def test_pool_activity_reaches_the_metrics(engines, adapters):
    m = Metrics()
    eng = engines(store_with(adapters), metrics=m, max_slots=2, max_rank=16)
    for a in ("a0", "a1", "a4", "a1"):  # 2 slots (ranks 8 and 16): a4 (MoR, 16 rows) evicts a1
        collect(eng.submit_generate(greedy([5, 6], 2, adapter_id=a)))
    wait_for(lambda: eng.num_running == 0)
    assert m.cache_misses.labels(tier="gpu")._value.get() == 4
    assert m.evictions.labels(tier="gpu")._value.get() >= 1
    assert m.adapter_loads.labels(result="ok")._value.get() == 3  # a1 came back from the CPU tier
    # 3 store reads on the loader threads, each landing in the CPU tier; 4 copies from there into a slot
    assert sum(b.get() for b in m.adapter_load_duration.labels(source="disk")._buckets) == 3
    assert sum(b.get() for b in m.adapter_load_duration.labels(source="cpu")._buckets) == 4
    assert m.adapters_resident.labels(tier="gpu")._value.get() == 2


class SlowStore(MemStore):
    """A store whose reads of `slow_id` wait for `release`, like a cold read from a busy disk."""

    def __init__(self, slow_id):
        super().__init__()
        self.slow_id = slow_id
        self.release = threading.Event()
        self.read_on: list[str] = []

    def load(self, adapter_id, base=None, digest=None):
        self.read_on.append(threading.current_thread().name)
        if adapter_id == self.slow_id:
            self.release.wait(30)
        return super().load(adapter_id, base, digest)


@pytest.mark.parametrize("async_loads", [True, False])
def test_a_slow_cold_load_stalls_only_its_own_request(engines, adapters, tiny_llama, async_loads):
    """The store read runs on a loader thread: while it is stuck, requests for the base and for a resident
    adapter keep generating; with loads on the engine thread (async_adapter_loads=False) they all wait."""
    store = SlowStore("a1")
    for k in ("a0", "a1"):
        store.put(k, adapters[k])
    eng = engines(store, async_adapter_loads=async_loads)
    p = prompts([6], seed=3)[0]
    collect(eng.submit_generate(greedy(p, 2, adapter_id="a0")))  # a0 resident
    slow = eng.submit_generate(greedy(p, 5, adapter_id="a1"))
    time.sleep(0.2)  # the read of a1 has started
    others = [eng.submit_generate(greedy(p, 5, adapter_id=a)) for a in (None, "a0")]
    if async_loads:  # they finish while a1's read is still stuck
        assert [list(h.events_sync(timeout=5))[-1].finish_reason for h in others] == ["length", "length"]
    else:  # the engine thread is inside the read: nothing else gets a token
        time.sleep(1.0)
        assert all(h._sink.tq.empty() for h in others)
    store.release.set()
    got = collect(slow).tokens
    assert got == hf_greedy(apply_adapter(tiny_llama.model, adapters["a1"]), p, 5)  # the right adapter, once loaded
    if async_loads:
        assert store.read_on[-1].startswith("rankserve-adapter-load")
    else:
        assert store.read_on[-1] == "rankserve-engine"
        assert [collect(h).last.finish_reason for h in others] == ["length", "length"]
