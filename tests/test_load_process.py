"""Cold loads in a loader process (server/lora/load_process.py) against the loader thread's path, the plain
reference: the same adapter (modules bitwise, metadata), the same fit and the same packed form; everything
the process does not serve falls back to the thread, and a dead worker only turns the process path off."""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace

import pytest
import torch
from test_engine import collect, greedy, prompts

from adapters_store.basemodels import load_base
from adapters_store.format import ModuleWeights
from adapters_store.store import AdapterStore
from adapters_store.synth import random_adapter
from server.engine import Engine, EngineConfig
from server.lora.image import prepare
from server.lora.load_process import LoaderProcesses, init_message
from server.lora.pool import AdapterPool


def _bf16(adapter):
    return replace(adapter, modules={p: ModuleWeights(lora_a=mw.lora_a.bfloat16(), lora_b=mw.lora_b.bfloat16())
                                     for p, mw in adapter.modules.items()})


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory):
    store = AdapterStore(tmp_path_factory.mktemp("load-process") / "store")
    some = sorted(tiny_llama.targets)[::3]
    served = {
        "lora": random_adapter(tiny_llama, "lora", 8, seed=1),
        "adalora": random_adapter(tiny_llama, "adalora", 6, seed=2, variable_rank=True),
        "aroma": random_adapter(tiny_llama, "aroma", 5, seed=3, variable_rank=True),
        "subset": random_adapter(tiny_llama, "lora", 3, seed=4, modules=some),
        "bf16": _bf16(random_adapter(tiny_llama, "lora", 8, seed=5)),
    }
    declined = {
        "dora": random_adapter(tiny_llama, "dora", 4, seed=6),
        "mor": random_adapter(tiny_llama, "mor", 4, seed=7),
        "edora": random_adapter(tiny_llama, "edora", 4, seed=8),
        "classify": random_adapter(tiny_llama, "lora", 4, seed=9, task="classify", labels=["a", "b"]),
    }
    for k, a in {**served, **declined}.items():
        store.put(k, a.to_bytes(), base=tiny_llama)
    pool = AdapterPool(tiny_llama, "cpu", torch.float32, buckets=[(8, 2), (16, 2)], cpu_bytes=1 << 30)
    procs = LoaderProcesses(1, init_message(store, tiny_llama, pool.layout, pool.max_rank, pool.max_experts))
    assert procs.wait_ready(120)
    yield store, pool, procs, served, declined
    procs.close()


def test_process_loads_equal_the_thread_loads(setup, tiny_llama):
    store, pool, procs, served, _ = setup
    for key in served:
        digest = store.get(key).digest
        got = procs.load(key, digest)
        assert got is not None, key
        adapter, (need, packed) = got
        ref, (ref_need, ref_packed) = prepare(store.load(key, base=tiny_llama, digest=digest), pool.slots,
                                              pool.layout, pool.max_rank, pool.max_experts)
        assert adapter.meta == ref.meta and need == ref_need and packed.rows == ref_packed.rows, key
        assert list(adapter.modules) == list(ref.modules), key
        for path, mw in ref.modules.items():
            assert torch.equal(adapter.modules[path].lora_a, mw.lora_a), (key, path)
            assert torch.equal(adapter.modules[path].lora_b, mw.lora_b), (key, path)
            assert adapter.modules[path].lora_a.dtype == mw.lora_a.dtype
        for mine, theirs in zip(packed.a + packed.bt, ref_packed.a + ref_packed.bt, strict=True):
            assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), key
        assert torch.equal(packed.ranks, ref_packed.ranks), key
    assert procs.served == len(served)


def test_what_the_process_does_not_serve_falls_back(setup, tiny_llama, tmp_path):
    store, _, procs, served, declined = setup
    before = procs.served
    for key in declined:  # MoR, out_scale, a classify head: the loader thread's own path
        assert procs.load(key, store.get(key).digest) is None, key
    assert procs.load("lora", hashlib.sha256(b"another version").hexdigest()) is None  # digest moved on
    assert procs.load("no-such-adapter", "0" * 64) is None
    # a stored file that fails validation (here: against another base) is declined, not half-served
    other = random_adapter(tiny_llama, "lora", 4, seed=11)
    other.meta.base_fingerprint = "not-this-base"
    bad = AdapterStore(store.root)
    bad.put("wrong-base", other.to_bytes())  # no base given: the store itself does not check the fingerprint
    assert procs.load("wrong-base", bad.get("wrong-base").digest) is None
    assert procs.served == before and procs.alive()  # none of these ended the worker
    assert procs.load("lora", store.get("lora").digest) is not None


def test_a_dead_worker_turns_the_process_path_off(tiny_llama, tmp_path):
    store = AdapterStore(tmp_path / "store")
    store.put("x", random_adapter(tiny_llama, "lora", 4, seed=1).to_bytes(), base=tiny_llama)
    pool = AdapterPool(tiny_llama, "cpu", torch.float32, buckets=[(8, 2)], cpu_bytes=1 << 30)
    procs = LoaderProcesses(1, init_message(store, tiny_llama, pool.layout, pool.max_rank, pool.max_experts))
    try:
        assert procs.wait_ready(120)
        procs._workers[0].proc.kill()
        procs._workers[0].proc.wait()
        assert procs.load("x", store.get("x").digest) is None
        assert not procs.alive() and procs.load("x", store.get("x").digest) is None
    finally:
        procs.close()


def test_engine_with_a_loader_process_equals_the_thread_loads(tiny_llama, tmp_path):
    store = AdapterStore(tmp_path / "store")
    ids = []
    for i, (m, r, v) in enumerate([("lora", 8, False), ("adalora", 6, True), ("dora", 4, False), ("lora", 4, False),
                                   ("aroma", 5, True), ("mor", 4, False)]):
        store.put(f"a{i}", random_adapter(tiny_llama, m, r, seed=20 + i, variable_rank=v, std=0.1).to_bytes(),
                  base=tiny_llama)
        ids.append(f"a{i}")
    cfg = dict(max_batch_tokens=96, max_running=16, max_model_len=128, kv_block_size=8, max_slots=4)
    outs = {}
    for n in (0, 1):
        eng = Engine(load_base("tiny-llama"), AdapterStore(tmp_path / "store"),
                     EngineConfig(**cfg, loader_processes=n))
        eng.start()
        try:
            if n:  # start the worker and let it come up, so the loads below really go through it
                eng.residency._processes().wait_ready(120)
            ps = prompts([5, 9, 3, 7, 6, 4, 8, 5, 9, 3, 7, 6], seed=3)
            reqs = [eng.submit_generate(greedy(p, 5, adapter_id=ids[i % len(ids)])) for i, p in enumerate(ps)]
            outs[n] = [collect(r).tokens for r in reqs]
            if n:
                assert eng.residency._procs.served >= 4  # the LoRA-shaped ones; DoRA and MoR fell back
        finally:
            eng.shutdown()
    assert outs[0] == outs[1]
    deadline = time.monotonic() + 10
    while eng.residency._procs._workers[0].proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert eng.residency._procs._workers[0].proc.poll() is not None  # shutdown ends the worker


def test_a_worker_that_fails_to_start_turns_the_process_path_off(tiny_llama, tmp_path):
    store = AdapterStore(tmp_path / "store")
    store.put("x", random_adapter(tiny_llama, "lora", 4, seed=1).to_bytes(), base=tiny_llama)
    pool = AdapterPool(tiny_llama, "cpu", torch.float32, buckets=[(8, 2)], cpu_bytes=1 << 30)
    init = init_message(store, tiny_llama, pool.layout, pool.max_rank, pool.max_experts)
    (tmp_path / "a-file").write_text("")
    procs = LoaderProcesses(1, {**init, "root": str(tmp_path / "a-file")})  # its store root cannot be opened
    try:
        assert not procs.wait_ready(120)
        assert procs.load("x", store.get("x").digest) is None and not procs.alive()
    finally:
        procs.close()


def test_damaged_files_never_end_the_worker_and_agree_with_the_thread_path(tiny_llama, tmp_path):
    """Files damaged on disk after they were stored (random byte flips, truncations), each asked for with
    the digest of its damaged bytes: the worker serves exactly those the in-process path accepts, declines
    the rest, and is still alive after all of them."""
    import random

    from adapters_store.backend import FILE
    from adapters_store.validate import validate_bytes

    store = AdapterStore(tmp_path / "store")
    good = random_adapter(tiny_llama, "adalora", 6, seed=3, variable_rank=True).to_bytes()
    store.put("x", good, base=tiny_llama)
    path = store.backend.adapters / "x" / FILE
    pool = AdapterPool(tiny_llama, "cpu", torch.float32, buckets=[(8, 2)], cpu_bytes=1 << 30)
    procs = LoaderProcesses(1, init_message(store, tiny_llama, pool.layout, pool.max_rank, pool.max_experts))
    rng = random.Random(7)
    served = declined = 0
    try:
        assert procs.wait_ready(120)
        for i in range(40):
            data = bytearray(good)
            if i % 4 == 3:
                data = data[:rng.randrange(len(data))]
            else:
                for _ in range(rng.randint(1, 8)):  # header and body alike
                    at = rng.randrange(min(len(data), 600)) if i % 2 else rng.randrange(len(data))
                    data[at] = rng.randrange(256)
            path.write_bytes(bytes(data))
            digest = hashlib.sha256(data).hexdigest()
            try:
                ok = prepare(validate_bytes(bytes(data), tiny_llama, store.limits, digest), pool.slots, pool.layout,
                             pool.max_rank, pool.max_experts)[1] is not None
            except Exception:
                ok = False
            got = procs.load("x", digest)
            assert (got is not None) == ok, i
            served += got is not None
            declined += got is None
            assert procs.alive(), i
    finally:
        procs.close()
    assert declined > 0 and served > 0  # the damage was real; flipped values can still be a valid adapter
