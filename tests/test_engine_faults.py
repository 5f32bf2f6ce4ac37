"""A fault in one request's own work fails that request alone (RELIABILITY row 36), and classification is
budgeted in tokens like generate (row 38): faults injected at each stage of a step, on tiny-llama."""

import asyncio

import pytest
import torch
from test_engine import MemStore, collect, greedy, prompts, wait_for

from adapters_store.basemodels import load_base
from adapters_store.synth import random_adapter
from server.common.errors import AdapterLoadFailed, ContextLengthExceeded, InvalidParameter, RequestFailed
from server.engine import Engine, EngineConfig, GenerateParams, isolation
from server.engine import output as engine_output
from server.engine.classify import ClassifyStep, encode
from tests.util_apply import apply_adapter, hf_greedy

VICTIM = 13  # prompts starting with this token id are the ones the injected faults hit


@pytest.fixture
def engine():
    made = []

    def make(store=None, **cfg):
        opts = dict(max_batch_tokens=64, max_running=8, max_queue=64, max_model_len=128, kv_block_size=8)
        opts.update(cfg)
        e = Engine(load_base("tiny-llama"), store or MemStore(), EngineConfig(**opts))
        e.start()
        made.append(e)
        return e

    yield make
    for e in made:
        e.shutdown()


def run_batch(eng, victim_prompt):
    """Three innocent requests and one victim, submitted together; (innocent results, victim result)."""
    innocent = prompts([6, 9, 4], seed=21)
    handles = [eng.submit_generate(greedy(p, 8)) for p in innocent[:2]]
    victim = eng.submit_generate(greedy(victim_prompt, 8))
    handles.append(eng.submit_generate(greedy(innocent[2], 8)))
    return innocent, [collect(h) for h in handles], collect(victim)


def check_only_the_victim_failed(eng, tiny_llama, innocent, results, victim, stage):
    for p, out in zip(innocent, results, strict=True):
        assert out.last.finish_reason == "length" and out.tokens == hf_greedy(tiny_llama.model, p, 8)
    assert victim.last.finish_reason == "error" and isinstance(victim.last.error, RequestFailed)
    assert stage in victim.last.error.message and victim.last.error.http_status == 500
    assert eng.healthy
    again = prompts([5], seed=99)[0]
    assert collect(eng.submit_generate(greedy(again, 4))).tokens == hf_greedy(tiny_llama.model, again, 4)


def test_a_forward_fault_fails_only_its_request(engine, tiny_llama):
    eng = engine()
    inner = eng.runner.forward

    def forward(chunks, **kw):
        if any(c.tokens and eng.cache is not None and c.start == 0 and c.tokens[0] == VICTIM for c in chunks):
            raise RuntimeError("kernel fault on this sequence")
        return inner(chunks, **kw)

    eng.runner.forward = forward
    innocent, results, victim = run_batch(eng, [VICTIM, 7, 8])
    check_only_the_victim_failed(eng, tiny_llama, innocent, results, victim, "forward")


def test_a_sampling_fault_fails_only_its_request(engine, tiny_llama, monkeypatch):
    eng = engine()
    real = isolation.sample_step

    def sample_step(logits, rows, eos_ids):
        if any(r.tokens.ids[0] == VICTIM for r in rows):
            raise OverflowError("top_k out of range for this row")
        return real(logits, rows, eos_ids)

    monkeypatch.setattr(isolation, "sample_step", sample_step)
    innocent, results, victim = run_batch(eng, [VICTIM, 7, 8])
    check_only_the_victim_failed(eng, tiny_llama, innocent, results, victim, "sampling")


def test_a_detokenisation_fault_fails_only_its_request(engine, tiny_llama, monkeypatch):
    eng = engine()
    real = engine_output.Detokenizer.step

    def step(self):
        if self.tokens.ids[0] == VICTIM and self.tokens.num_generated == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return real(self)

    monkeypatch.setattr(engine_output.Detokenizer, "step", step)
    innocent, results, victim = run_batch(eng, [VICTIM, 7, 8])
    check_only_the_victim_failed(eng, tiny_llama, innocent, results, victim, "detokenisation")
    assert len(victim.tokens) == 2  # two tokens streamed before the fault


def classify_store(base):
    store = MemStore()
    for i, name in enumerate(("good", "bad", "other")):
        store.put(name, random_adapter(base, "lora", 4, seed=40 + i, task="classify", labels=["n", "p"], std=0.1))
    return store


def classify_all(eng, calls):
    async def run():
        return await asyncio.gather(*(eng.classify(a, rows) for a, rows in calls), return_exceptions=True)

    return asyncio.run(run())


def test_a_classify_head_fault_fails_only_its_call(engine, tiny_llama, monkeypatch):
    eng = engine(store=classify_store(tiny_llama))
    real = ClassifyStep._head

    def head(self, job, hidden):
        if job.adapter_id == "bad":
            raise RuntimeError("head shape mismatch")
        return real(self, job, hidden)

    monkeypatch.setattr(ClassifyStep, "_head", head)
    rows = encode(tiny_llama.tokenizer, ["one text", "another longer text here"])
    good, bad, other = classify_all(eng, [("good", rows), ("bad", rows), ("other", rows)])
    assert isinstance(bad, RequestFailed) and "head shape mismatch" in bad.message
    assert len(good) == len(other) == 2 and all(label in ("n", "p") for label, _ in good + other)
    assert eng.healthy


def test_a_classify_forward_fault_fails_only_its_call(engine, tiny_llama):
    eng = engine(store=classify_store(tiny_llama))
    inner = eng.classifier._forward

    def forward(pieces):
        if any(job.adapter_id == "bad" for job, _, _ in pieces):
            raise RuntimeError("forward fault")
        return inner(pieces)

    eng.classifier._forward = forward
    rows = encode(tiny_llama.tokenizer, ["one text"])
    good, bad, other = classify_all(eng, [("good", rows), ("bad", rows), ("other", rows)])
    assert isinstance(bad, RequestFailed) and not isinstance(good, Exception) and not isinstance(other, Exception)
    assert eng.healthy and eng.classifier.jobs == type(eng.classifier.jobs)()
    wait_for(lambda: all(r.refs == 0 for r in eng.pool._resident.values()))  # every pin released
    assert eng.pool.stats.resident["gpu"] >= 1


def test_classify_is_budgeted_in_tokens_and_splits_a_large_call(engine, tiny_llama):
    eng = engine(store=classify_store(tiny_llama), max_batch_tokens=48, max_model_len=32)
    texts = [f"text number {i} " * (1 + i % 3) for i in range(13)]
    rows = encode(tiny_llama.tokenizer, texts)
    assert max(len(r) for r in rows) <= 32 and sum(len(r) for r in rows) > 48
    shapes = []
    inner = eng.classifier._forward

    def forward(pieces):
        n = sum(stop - start for _, start, stop in pieces)
        shapes.append(n * max(len(job.rows[i]) for job, start, stop in pieces for i in range(start, stop)))
        return inner(pieces)

    eng.classifier._forward = forward
    (split,) = classify_all(eng, [("good", rows)])
    budget = max(48, 32)
    assert len(shapes) > 1 and all(s <= budget for s in shapes)  # padded tokens per batch within budget
    (alone,) = [classify_all(eng, [("good", [r])])[0][0] for r in rows[:1]]
    assert split[0][0] == alone[0] and split[0][1] == pytest.approx(alone[1], abs=1e-5)
    assert len(split) == 13


def test_classify_refuses_inputs_over_the_context(engine, tiny_llama):
    eng = engine(store=classify_store(tiny_llama), max_model_len=16)
    rows = [[5] * 10, [6] * 17]
    (err,) = classify_all(eng, [("good", rows)])
    assert isinstance(err, ContextLengthExceeded) and "input[1]" in err.message and "16" in err.message
    assert err.http_status == 400


def test_numeric_extremes_cannot_overflow_on_the_engine_thread(engine, tiny_llama):
    """The engine's own checks (behind the HTTP schema's): a top_k beyond the vocabulary is off, a denormal
    temperature is greedy, and an out-of-range seed is refused at submit."""
    eng = engine()
    p = prompts([5], seed=3)[0]
    want = hf_greedy(tiny_llama.model, p, 6)
    def params(**kw):
        return GenerateParams(prompt_ids=p, max_tokens=6, ignore_eos=True, **kw)

    huge_k = collect(eng.submit_generate(params(temperature=1.0, top_k=10**20, seed=1)))
    assert huge_k.last.finish_reason == "length" and len(huge_k.tokens) == 6
    assert collect(eng.submit_generate(params(temperature=1e-310))).tokens == want
    with pytest.raises(InvalidParameter, match="seed"):
        eng.submit_generate(params(temperature=1.0, seed=2**70))
    assert eng.healthy and torch.is_tensor(eng._eos_tensor)


class FlakyStore(MemStore):
    """A store whose loads raise the queued exceptions first (one per load), then work."""

    def __init__(self):
        super().__init__()
        self.faults: list[BaseException] = []
        self.loads = 0

    def load(self, adapter_id, base=None, digest=None):
        self.loads += 1
        if self.faults:
            raise self.faults.pop(0)
        return super().load(adapter_id, base, digest)


@pytest.mark.parametrize("async_loads", [True, False])
def test_a_transient_load_error_is_retried_with_back_off(engine, tiny_llama, async_loads):
    store = FlakyStore()
    adapter = random_adapter(tiny_llama, "lora", 4, seed=61, std=0.1)
    store.put("flaky", adapter)
    store.faults = [OSError(5, "Input/output error"), OSError(5, "Input/output error")]
    eng = engine(store=store, async_adapter_loads=async_loads)
    p = prompts([6], seed=5)[0]
    out = collect(eng.submit_generate(greedy(p, 5, adapter_id="flaky")))
    assert out.last.finish_reason == "length", out.last.error
    assert out.tokens == hf_greedy(apply_adapter(tiny_llama.model, adapter), p, 5)
    assert store.loads == 3 and "flaky" not in str(eng.residency.failed)


def test_out_of_memory_on_load_frees_the_cpu_tier_and_retries(engine, tiny_llama):
    store = FlakyStore()
    for i in range(3):
        store.put(f"a{i}", random_adapter(tiny_llama, "lora", 4, seed=70 + i, std=0.1))
    eng = engine(store=store, max_slots=1, max_rank=8)
    p = prompts([4], seed=6)[0]
    for name in ("a0", "a1"):  # a0 is evicted from its slot into the CPU tier by a1
        assert collect(eng.submit_generate(greedy(p, 2, adapter_id=name))).last.finish_reason == "length"
    assert eng.pool.stats.resident["cpu"] == 2
    store.faults = [MemoryError("out of memory reading the file")]
    out = collect(eng.submit_generate(greedy(p, 2, adapter_id="a2")))
    assert out.last.finish_reason == "length" and store.loads == 4  # a2 read twice: the failure, the retry
    assert not any(eng.pool.cached(store.get(n).digest) for n in ("a0", "a1"))  # the CPU tier was dropped


def test_a_load_that_keeps_failing_transiently_is_503_and_not_remembered(engine, tiny_llama, monkeypatch):
    from server.lora import residency

    monkeypatch.setattr(residency, "RETRY_BACKOFF_S", (0.01, 0.01))
    store = FlakyStore()
    store.put("down", random_adapter(tiny_llama, "lora", 4, seed=80, std=0.1))
    store.faults = [OSError(5, "EIO")] * 20
    eng = engine(store=store, async_adapter_loads=False)
    out = collect(eng.submit_generate(greedy([5, 6], 2, adapter_id="down")))
    assert out.last.error.http_status == 503 and "3 attempts" in out.last.error.message
    assert out.last.error.retry_after is not None and not eng.residency.failed
    store.faults = []
    assert collect(eng.submit_generate(greedy([5, 6], 2, adapter_id="down"))).last.finish_reason == "length"


def test_a_permanent_failure_is_remembered_until_delete_or_reupload(engine, tiny_llama):
    from adapters_store.format import AdapterFormatError

    store = FlakyStore()
    store.put("bad", random_adapter(tiny_llama, "lora", 4, seed=90, std=0.1))
    eng = engine(store=store, async_adapter_loads=False)
    store.faults = [AdapterFormatError("the stored file no longer matches its digest")]
    first = collect(eng.submit_generate(greedy([5], 2, adapter_id="bad")))
    assert first.last.error.http_status == 424
    with pytest.raises(AdapterLoadFailed):  # remembered: refused at submit, no load
        eng.submit_generate(greedy([5], 2, adapter_id="bad"))
    assert store.loads == 1
    eng.adapter_published(store.get("bad").digest)  # the same bytes uploaded again over the damaged file
    assert collect(eng.submit_generate(greedy([5], 2, adapter_id="bad"))).last.finish_reason == "length"
    store.faults = [AdapterFormatError("damaged again")]
    eng.pool.forget(store.get("bad").digest)
    wait_for(lambda: eng.pool.slot_of(store.get("bad").digest) is None)
    assert collect(eng.submit_generate(greedy([5], 2, adapter_id="bad"))).last.error.http_status == 424
    eng.forget_adapter(store.get("bad").digest)  # a delete clears the memo too
    assert not eng.residency.failed
