# ruff: noqa: F811  (test functions take the imported make_engine fixture as a parameter)
"""The engine's logprob data path (what any route formats: OpenAI's, LoRAX's): per-token logprobs aligned with
the events' token ids, prompt logprobs over a chunked prefill and across a preemption, scoring with
max_tokens=0, all against Hugging Face's own forward; and submit_many queues all or none."""

from __future__ import annotations

import pytest

from server.common.errors import InvalidParameter, QueueFull
from server.engine import GenerateParams
from tests.test_engine import collect, make_engine, prompts, record_preemptions  # noqa: F401  (make_engine: test_engine's fixture)
from tests.util_reference import reference_logprobs


def test_token_and_prompt_logprobs_match_the_reference_over_a_chunked_prefill(make_engine, tiny_llama):
    eng = make_engine(max_batch_tokens=8)  # a 21-token prompt prefills over three steps
    prompt = prompts([21], seed=3)[0]
    out = collect(eng.submit_generate(GenerateParams(prompt, max_tokens=5, temperature=0.0, ignore_eos=True,
                                                     logprobs=3, prompt_logprobs=2)))
    ref = reference_logprobs(tiny_llama.model, prompt + out.tokens)
    first = out.events[0]
    assert first.prompt_logprobs is not None and all(e.prompt_logprobs is None for e in out.events[1:])
    plp = first.prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None
    for i in range(1, len(prompt)):
        assert plp[i].token == prompt[i] and abs(plp[i].logprob - float(ref[i - 1, prompt[i]])) < 1e-4
        assert [t for t, _ in plp[i].top] == ref[i - 1].topk(2).indices.tolist()
    lps = [lp for e in out.events for lp in (e.logprobs or [])]
    assert [lp.token for lp in lps] == out.tokens
    for j, lp in enumerate(lps):
        row = ref[len(prompt) - 1 + j]
        assert lp.token == int(row.argmax()) and lp.logprob == lp.top[0][1]  # greedy = the argmax
        assert abs(lp.logprob - float(row.max())) < 1e-4 and len(lp.top) == 3


def test_scoring_only_returns_the_prompt_logprobs_and_no_token(make_engine, tiny_llama):
    eng = make_engine()
    prompt = prompts([9], seed=4)[0]
    out = collect(eng.submit_generate(GenerateParams(prompt, max_tokens=0, prompt_logprobs=0)))
    assert len(out.events) == 1 and out.tokens == [] and out.last.finish_reason == "length"
    assert (out.last.prompt_tokens, out.last.completion_tokens) == (9, 0)
    ref = reference_logprobs(tiny_llama.model, prompt)
    assert [round(lp.logprob, 4) for lp in out.last.prompt_logprobs[1:]] == [
        round(float(ref[i - 1, prompt[i]]), 4) for i in range(1, 9)]


def test_prompt_logprobs_survive_a_preemption(make_engine, tiny_llama):
    per_token = 2 * 2 * 2 * 16 * 4  # tiny-llama: layers x (k, v) x kv heads x head dim x fp32
    eng = make_engine(max_model_len=64, kv_cache_bytes=80 * per_token, kv_block_size=8)
    preempted = record_preemptions(eng)
    ps = prompts([10, 12, 9, 11, 10, 13], seed=9)
    handles = [eng.submit_generate(GenerateParams(p, max_tokens=30, temperature=0.0, ignore_eos=True,
                                                  prompt_logprobs=1)) for p in ps]  # 6 x ~40 tokens, 80 in cache
    for p, h in zip(ps, handles, strict=True):
        plp = collect(h).events[0].prompt_logprobs
        ref = reference_logprobs(tiny_llama.model, p)
        assert len(plp) == len(p) and all(abs(plp[i].logprob - float(ref[i - 1, p[i]])) < 1e-4
                                          for i in range(1, len(p)))
    assert preempted  # the cache really ran out and requests were recomputed


def test_submit_many_queues_all_or_none(make_engine):
    eng = make_engine(max_queue=4)
    with pytest.raises(InvalidParameter):  # more sequences than the queue can ever hold
        eng.submit_many([GenerateParams([5, 6], max_tokens=2)] * 5)
    with pytest.raises(InvalidParameter):  # one bad request refuses the whole batch
        eng.submit_many([GenerateParams([5, 6], max_tokens=2), GenerateParams([5, 6], max_tokens=2, logprobs=21)])
    assert eng.num_waiting + eng.num_running == 0
    handles = eng.submit_many([GenerateParams([5, 6], max_tokens=2, ignore_eos=True)] * 3)
    assert all(collect(h).last.completion_tokens == 2 for h in handles)
    eng.scheduler.max_queue = 0  # full: nothing of the batch is queued
    with pytest.raises(QueueFull):
        eng.submit_many([GenerateParams([5, 6], max_tokens=2)] * 2)
    assert eng.num_waiting == 0
