"""The sampler's logits processors, min-p and logprobs against plain references written token by token."""

from __future__ import annotations

import math

import torch

from server.engine.logits import process
from server.engine.logprobs import record_prompt_logprobs, token_logprobs
from server.engine.sampler import RowSampling, SamplingParams, sample, sample_step
from server.engine.tokens import TokenState

V = 40
NO_EOS = torch.tensor([], dtype=torch.long)


def row(prompt=(1, 2, 3), generated=(), seed=0, **kw) -> RowSampling:
    tokens = TokenState(list(prompt) + list(generated), num_prompt=len(prompt))
    return RowSampling(SamplingParams(max_tokens=50, **kw), torch.Generator().manual_seed(seed), tokens)


def reference(logits: list[float], r: RowSampling, eos: list[int]) -> list[float]:
    """The pipeline written out: hold, bias, repetition, frequency and presence."""
    p, out = r.params, list(logits)
    ids, gen = r.tokens.ids, r.tokens.generated
    if len(gen) < p.min_tokens:
        for t in list(p.stop_token_ids) + eos:
            out[t] = -math.inf
    for t, b in p.logit_bias:
        out[t] += b
    for t in set(ids):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(gen):
        out[t] -= p.frequency_penalty * gen.count(t) + p.presence_penalty
    return out


def test_the_pipeline_matches_the_reference_row_by_row():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, V, generator=g) * 3
    rows = [row(presence_penalty=0.7, generated=(4, 4, 9)),
            row(frequency_penalty=-1.2, generated=(5, 6, 5, 5)),
            row(repetition_penalty=2.5, prompt=(0, 1, 2, 30), generated=(7,)),
            row(logit_bias=((3, 5.0), (8, -100.0)), min_tokens=3, stop_token_ids=(11, 12), generated=(1,)),
            row()]  # asks for nothing: untouched
    eos = [2]
    got = process(logits, rows, torch.tensor(eos))
    for i, r in enumerate(rows):
        assert torch.allclose(got[i], torch.tensor(reference(logits[i].tolist(), r, eos)), atol=1e-5), i
    assert torch.equal(got[4], logits[4])


def test_penalty_state_follows_new_tokens_incrementally():
    r = row(frequency_penalty=1.0, presence_penalty=0.5, repetition_penalty=1.5)
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(1))
    for tok in (4, 4, 7, 4, 30):
        got = process(logits, [r], NO_EOS)[0]
        assert torch.allclose(got, torch.tensor(reference(logits[0].tolist(), r, [])), atol=1e-5)
        r.tokens.append(tok)


def test_the_input_logits_are_never_changed_and_nothing_is_copied_when_nobody_asks():
    logits = torch.randn(2, V)
    before = logits.clone()
    process(logits, [row(presence_penalty=1.0, generated=(3,)), row()], NO_EOS)
    assert torch.equal(logits, before)
    assert process(logits, [row(), row(temperature=0.5)], NO_EOS) is logits


def test_min_p_keeps_exactly_the_tokens_above_the_threshold():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.12, 0.08]]))
    r = row(min_p=0.25, seed=3)  # keeps p >= 0.125: tokens 0 and 1
    assert {sample(logits, [r], NO_EOS)[0] for _ in range(400)} == {0, 1}
    r = row(min_p=1.0)
    assert {sample(logits, [r], NO_EOS)[0] for _ in range(50)} == {0}


def test_logprobs_are_the_raw_log_softmax_whatever_the_sampling():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, V, generator=g)
    rows = [row(temperature=0.0, logprobs=3), row(temperature=2.0, logit_bias=((5, 50.0),), logprobs=0), row()]
    toks, lps = sample_step(logits, rows, NO_EOS)
    ref = torch.log_softmax(logits, dim=-1)
    assert lps is not None and lps[2] is None
    assert toks[0] == int(logits[0].argmax()) and lps[0].logprob == lps[0].top[0][1]  # greedy = top-1
    assert [t for t, _ in lps[0].top] == ref[0].topk(3).indices.tolist()
    assert toks[1] == 5 and math.isclose(lps[1].logprob, float(ref[1, 5]), abs_tol=1e-6)  # raw, not biased
    assert lps[1].top == ()
    assert sample_step(logits, [row(), row()], NO_EOS)[1] is None


def test_prompt_logprobs_over_chunks_and_recompute_equal_one_pass():
    g = torch.Generator().manual_seed(5)
    ids = [3, 9, 1, 7, 7, 2, 30]
    logits = torch.randn(len(ids), V, generator=g)  # position p predicts ids[p + 1]
    whole: list = [None]
    record_prompt_logprobs(whole, ids, len(ids), 0, logits, 2)
    want = token_logprobs(logits[:-1], torch.tensor(ids[1:]), [2] * (len(ids) - 1))
    assert whole == [None, *want]
    chunked: list = [None]
    record_prompt_logprobs(chunked, ids, len(ids), 0, logits[:3], 2)
    record_prompt_logprobs(chunked, ids, len(ids), 0, logits[:5], 2)  # recomputed after a preemption
    record_prompt_logprobs(chunked, ids, len(ids), 5, logits[5:], 2)
    assert chunked == whole
