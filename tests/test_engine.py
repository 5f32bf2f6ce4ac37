"""The engine end to end on tiny-llama: outputs against a plain HF greedy loop, batch independence, the
request lifecycle (cancel, deadline, queue full, drain, death) and that no in-flight count ever leaks."""

import asyncio
import hashlib
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from adapters_store.basemodels import load_base
from adapters_store.format import loads
from server.common.errors import (
    ContextLengthExceeded,
    DeadlineExceeded,
    InvalidParameter,
    QueueFull,
    TaskMismatch,
    Unavailable,
    UnknownAdapter,
)
from server.common.metrics import Metrics
from server.engine import Engine, EngineConfig, GenerateParams
from tests.util_apply import hf_greedy


class NotFound(KeyError):
    http_status = 404


class MemStore:
    """The AdapterStore interface (get/load/delete) in memory."""

    def __init__(self):
        self.items = {}

    def put(self, adapter_id, adapter, owner=None, data=None):
        data = data if data is not None else adapter.to_bytes()
        rec = SimpleNamespace(id=adapter_id, digest=hashlib.sha256(data).hexdigest(), owner=owner,
                              task=adapter.meta.task if adapter else "generate",
                              labels=adapter.meta.labels if adapter else None)
        self.items[adapter_id] = (rec, data)
        return rec

    def get(self, adapter_id):
        if adapter_id not in self.items:
            raise NotFound(adapter_id)
        return self.items[adapter_id][0]

    def load(self, adapter_id, base=None, digest=None):
        rec = self.get(adapter_id)
        if digest is not None and digest != rec.digest:
            raise NotFound(f"version {digest} is gone")
        return loads(self.items[adapter_id][1])

    def delete(self, adapter_id):
        self.items.pop(adapter_id)


def record_preemptions(eng) -> list:
    """The requests the engine's scheduler preempts from now on, appended as it happens."""
    preempted: list = []
    inner = eng.scheduler.schedule

    def spy():
        batch = inner()
        preempted.extend(batch.preempted)
        return batch

    eng.scheduler.schedule = spy
    return preempted


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(6, 500, (n,), generator=g).tolist() for n in lengths]


def collect(handle, timeout=60):
    events = list(handle.events_sync(timeout=timeout))
    tokens = [t for e in events for t in e.token_ids]
    return SimpleNamespace(text="".join(e.text_delta for e in events), tokens=tokens, last=events[-1], events=events)


@pytest.fixture
def make_engine():
    engines = []

    def make(store=None, metrics=None, **cfg):
        opts = dict(max_batch_tokens=64, max_running=8, max_queue=64, max_model_len=256, kv_block_size=8)
        opts.update(cfg)
        e = Engine(load_base("tiny-llama"), store or MemStore(), EngineConfig(**opts), metrics)
        e.start()
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.shutdown()


def greedy(prompt, n=8, **kw):
    return GenerateParams(prompt_ids=prompt, max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def test_greedy_matches_hf_loop(make_engine, tiny_llama):
    eng = make_engine(max_batch_tokens=16)  # 20-token prompt: chunked prefill over two steps
    for p in prompts([5, 20]):
        out = collect(eng.submit_generate(greedy(p, 10)))
        assert out.tokens == hf_greedy(tiny_llama.model, p, 10)
        assert out.last.finish_reason == "length" and out.last.completion_tokens == 10
        assert out.text == tiny_llama.tokenizer.decode(out.tokens, skip_special_tokens=True)


def test_greedy_output_does_not_depend_on_the_batch(make_engine):
    eng = make_engine()
    target = prompts([9], seed=1)[0]
    alone = collect(eng.submit_generate(greedy(target, 12))).tokens
    others = prompts([3, 17, 5, 30, 2, 11, 8], seed=2)
    handles = [eng.submit_generate(greedy(p, 4 + i)) for i, p in enumerate(others[:3])]
    handles.append(eng.submit_generate(greedy(target, 12)))
    handles += [eng.submit_generate(greedy(p, 6)) for p in others[3:]]
    results = [collect(h) for h in handles]
    assert results[3].tokens == alone


def test_seeded_sampling_reproducible(make_engine):
    eng = make_engine()
    p = prompts([6], seed=3)[0]
    params = dict(prompt_ids=p, max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    a = collect(eng.submit_generate(GenerateParams(**params))).tokens
    noise = [eng.submit_generate(GenerateParams(prompt_ids=q, max_tokens=5, temperature=1.0)) for q in prompts([4, 7])]
    b = collect(eng.submit_generate(GenerateParams(**params))).tokens
    [collect(h) for h in noise]
    c = collect(eng.submit_generate(GenerateParams(**{**params, "seed": 99}))).tokens
    assert a == b and a != c


def test_stop_string_max_tokens_and_min_tokens(make_engine, tiny_llama):
    eng = make_engine()
    tok = tiny_llama.tokenizer
    p = prompts([7], seed=4)[0]
    full = collect(eng.submit_generate(greedy(p, 20)))
    text = full.text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), "the greedy text should have visible characters to stop on"
    cut = collect(eng.submit_generate(greedy(p, 20, stop=[stop])))
    assert cut.last.finish_reason == "stop" and cut.text == text[:text.index(stop)]
    assert collect(eng.submit_generate(greedy(p, 3))).last.completion_tokens == 3
    # EOS as the likeliest token: without min_tokens the request stops at once; with it, it continues
    eos_prompt = None
    for q in prompts([4] * 64, seed=5):
        if hf_greedy(tiny_llama.model, q, 1)[0] == tok.eos_token_id:
            eos_prompt = q
            break
    if eos_prompt is not None:
        stopped = collect(eng.submit_generate(GenerateParams(prompt_ids=eos_prompt, max_tokens=5, temperature=0.0)))
        assert stopped.last.finish_reason == "stop" and stopped.last.completion_tokens == 1
        held = collect(eng.submit_generate(GenerateParams(prompt_ids=eos_prompt, max_tokens=5, temperature=0.0,
                                                          min_tokens=3)))
        assert held.last.completion_tokens >= 3 and tok.eos_token_id not in held.tokens[:3]


def test_asyncio_events_and_validation(make_engine):
    eng = make_engine(max_model_len=32)

    async def run():
        h = eng.submit_generate(greedy(prompts([5])[0], 6))
        return [e async for e in h.events()]

    events = asyncio.run(run())
    assert [e.finish_reason for e in events] == [None] * 5 + ["length"]
    with pytest.raises(ContextLengthExceeded, match="32"):
        eng.submit_generate(greedy(prompts([30])[0], 8))
    with pytest.raises(InvalidParameter, match="top_p"):
        eng.submit_generate(GenerateParams(prompt_ids=[5], top_p=0.0))
    with pytest.raises(InvalidParameter, match="empty"):
        eng.submit_generate(GenerateParams(prompt_ids=[]))
    with pytest.raises(UnknownAdapter):
        eng.submit_generate(greedy([5, 6], 2, adapter_id="nope"))


class Gate:
    """Blocks the runner's forward until opened: requests pile up in the queue deterministically."""

    def __init__(self, runner):
        self.open = threading.Event()
        self.entered = threading.Event()
        inner = runner.forward

        def forward(chunks, **kw):
            self.entered.set()
            self.open.wait(30)
            return inner(chunks, **kw)

        runner.forward = forward


def test_queue_full_then_recovers(make_engine):
    m = Metrics()
    eng = make_engine(metrics=m, max_running=1, max_queue=2)
    gate = Gate(eng.runner)
    first = eng.submit_generate(greedy([5, 6, 7], 2))
    assert gate.entered.wait(10)
    queued = [eng.submit_generate(greedy([5, 6], 2)) for _ in range(2)]
    with pytest.raises(QueueFull) as e:
        eng.submit_generate(greedy([5], 2))
    assert e.value.retry_after >= 1 and eng.num_waiting == 2
    gate.open.set()
    for h in [first, *queued]:
        assert collect(h).last.finish_reason == "length"
    wait_for(lambda: eng.num_running == 0)
    assert m.running._value.get() == 0 and m.waiting._value.get() == 0


def wait_for(cond, timeout=10):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.005)
    raise AssertionError("condition not reached")


def test_cancel_running_and_waiting_frees_everything(make_engine):
    m = Metrics()
    eng = make_engine(metrics=m, max_running=1)
    free_blocks = eng.cache.num_free_blocks
    running = eng.submit_generate(greedy(prompts([6])[0], 200))
    waiting = eng.submit_generate(greedy([5, 6], 4))
    it = running.events_sync(timeout=10)
    next(it)  # it is running and streaming
    waiting.cancel()
    running.cancel()
    rest = list(it)
    assert rest[-1].finish_reason == "abort"
    assert collect(waiting).last.finish_reason == "abort"
    wait_for(lambda: eng.num_running == 0 and eng.num_waiting == 0)
    assert eng.cache.num_free_blocks == free_blocks
    assert m.running._value.get() == 0 and m.cancelled._value.get() == 2
    assert collect(eng.submit_generate(greedy([5], 2))).last.finish_reason == "length"  # still serving


def test_closing_the_async_stream_cancels(make_engine):
    eng = make_engine()

    async def run():
        h = eng.submit_generate(greedy(prompts([4])[0], 200))
        agen = h.events()
        await agen.__anext__()
        await agen.aclose()  # the client went away mid-stream

    asyncio.run(run())
    wait_for(lambda: eng.num_running == 0)


def test_deadline_exceeded_frees_resources(make_engine):
    eng = make_engine()
    inner = eng.runner.forward
    eng.runner.forward = lambda chunks, **kw: (time.sleep(0.01), inner(chunks, **kw))[1]  # >= 2 s for 200 steps
    free_blocks = eng.cache.num_free_blocks
    h = eng.submit_generate(greedy(prompts([4])[0], 200, deadline=time.monotonic() + 0.2))
    out = collect(h)
    assert out.last.finish_reason == "error" and isinstance(out.last.error, DeadlineExceeded)
    wait_for(lambda: eng.num_running == 0)
    assert eng.cache.num_free_blocks == free_blocks


def test_drain_finishes_in_flight_and_refuses_new(make_engine):
    eng = make_engine(max_running=2)
    handles = [eng.submit_generate(greedy(p, 6)) for p in prompts([3, 5, 7])]
    assert eng.drain(timeout=30)
    assert not eng.ready and eng.healthy
    assert all(collect(h).last.finish_reason == "length" for h in handles)
    with pytest.raises(Unavailable, match="draining"):
        eng.submit_generate(greedy([5], 2))


def test_engine_death_is_reported_and_callers_get_errors(make_engine):
    eng = make_engine()

    def boom(chunks, **kw):
        raise RuntimeError("CUDA error: device lost")  # device-fatal, not one request's fault

    eng.runner.forward = boom
    out = collect(eng.submit_generate(greedy([5, 6], 4)))
    assert out.last.finish_reason == "error" and "device lost" in out.last.error.message
    wait_for(lambda: not eng.healthy)
    assert not eng.ready
    with pytest.raises(Unavailable):
        eng.submit_generate(greedy([5], 2))


def test_adapter_ownership_and_task(make_engine, tiny_llama):
    from adapters_store.synth import random_adapter

    store = MemStore()
    store.put("mine", random_adapter(tiny_llama, "lora", 4, seed=1), owner="alice")
    store.put("cls", random_adapter(tiny_llama, "lora", 4, seed=2, task="classify"))
    eng = make_engine(store=store)
    with pytest.raises(UnknownAdapter) as e:
        eng.submit_generate(greedy([5], 2, adapter_id="mine", owner="bob"))
    assert "mine" in e.value.message and e.value.http_status == 404
    with pytest.raises(TaskMismatch):
        eng.submit_generate(greedy([5], 2, adapter_id="cls"))


def test_metrics_count_every_token_and_request(make_engine):
    m = Metrics()
    eng = make_engine(metrics=m)
    ps = prompts([4, 9, 6], seed=7)
    outs = [collect(h) for h in [eng.submit_generate(greedy(p, 5)) for p in ps]]
    wait_for(lambda: eng.num_running == 0)
    assert m.generation_tokens._value.get() == sum(len(o.tokens) for o in outs) == 15
    assert m.prompt_tokens._value.get() == sum(map(len, ps))
    assert m.ttft._sum.get() > 0 and sum(b.get() for b in m.ttft._buckets) == 3
    assert sum(b.get() for b in m.itl._buckets) == 3 * 4
    assert sum(b.get() for b in m.queue_time._buckets) == 3
    assert sum(b.get() for b in m.request_generation_tokens._buckets) == 3
    assert sum(b.get() for b in m.batch_size._buckets) >= 5
    assert m.running._value.get() == 0 and m.waiting._value.get() == 0 and m.cancelled._value.get() == 0


def test_abort_storm_leaks_nothing(make_engine):
    """Random cancels, deadlines and normal finishes from several threads: every count returns to 0."""
    m = Metrics()
    eng = make_engine(metrics=m, max_running=4, max_queue=64)
    free_blocks = eng.cache.num_free_blocks
    g = torch.Generator().manual_seed(0)
    plan = [(p, int(torch.randint(0, 3, (1,), generator=g))) for p in prompts([3 + i % 9 for i in range(40)], 8)]

    def client(part):
        for p, kind in part:
            deadline = time.monotonic() + 0.01 if kind == 2 else None
            h = eng.submit_generate(greedy(p, 30, deadline=deadline))
            if kind == 1:
                time.sleep(0.002)
                h.cancel()
            list(h.events_sync(timeout=60))

    threads = [threading.Thread(target=client, args=(plan[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    wait_for(lambda: eng.num_running == 0 and eng.num_waiting == 0)
    assert eng.cache.num_free_blocks == free_blocks
    assert m.running._value.get() == 0 and m.waiting._value.get() == 0
    assert eng.healthy and collect(eng.submit_generate(greedy([5], 2))).last.finish_reason == "length"


def test_unset_sizes_come_from_the_machine(make_engine, monkeypatch):
    from server.common.machine import available_host_bytes
    from server.engine import core

    eng = make_engine(max_model_len=64, max_running=4)  # kv_cache_bytes=0, cpu_cache_bytes=0: sized at start
    assert eng.cache.num_blocks * eng.cache.block_size == 4 * 64  # plenty free: capped at max_running sequences
    share = available_host_bytes() / 8
    assert 0.5 * share < eng.pool.cpu_bytes < 1.5 * share  # 1/8 of available memory (it moves a little)
    per_token = 2 * 2 * 2 * 16 * 4  # tiny-llama: layers x (k, v) x kv heads x head dim x fp32
    seen = []
    monkeypatch.setattr(core, "kv_budget_bytes", lambda device, util: seen.append((device.type, util)) or 80 * per_token)
    eng = make_engine(max_model_len=64, gpu_memory_utilization=0.7)
    assert seen == [("cpu", 0.7)] and eng.cache.num_blocks * eng.cache.block_size == 80


def test_kv_budget_on_cpu_is_a_share_of_available_memory():
    from server.common.machine import available_host_bytes
    from server.model.kvcache import kv_budget_bytes

    got, share = kv_budget_bytes(torch.device("cpu"), 0.9), available_host_bytes() / 8
    assert 0.5 * share < got < 1.5 * share


def test_preemption_under_a_small_cache_is_invisible_to_clients(make_engine):
    per_token = 2 * 2 * 2 * 16 * 4  # tiny-llama: layers x (k, v) x kv heads x head dim x fp32
    eng = make_engine(max_model_len=64, kv_cache_bytes=80 * per_token, kv_block_size=8)
    total_blocks = eng.cache.num_free_blocks
    assert total_blocks == 10
    ps = prompts([10, 12, 9, 11, 10, 13], seed=9)
    alone = [collect(eng.submit_generate(greedy(p, 30))).tokens for p in ps]
    preempted = record_preemptions(eng)
    handles = [eng.submit_generate(greedy(p, 30)) for p in ps]  # 6 x ~40 tokens in an 80-token cache
    assert [collect(h).tokens for h in handles] == alone
    assert preempted  # the cache really ran out and requests were recomputed
    wait_for(lambda: eng.num_running == 0)
    assert eng.cache.num_free_blocks == total_blocks
