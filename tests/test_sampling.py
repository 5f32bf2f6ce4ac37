"""Sampling rules and the per-request output state, against plain references."""

import pytest
import torch

from adapters_store.basemodels import tiny_tokenizer
from server.engine.output import OutputState
from server.engine.sampler import RowSampling, SamplingParams, make_generator, sample
from server.engine.tokens import TokenState

NO_EOS = torch.tensor([], dtype=torch.long)


def row(seed=0, **kw):
    return RowSampling(SamplingParams(**kw), torch.Generator().manual_seed(seed))


def test_greedy_is_argmax_and_independent_of_other_rows():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    rows = [row(temperature=0.0) if i % 2 == 0 else row(seed=i, temperature=1.0) for i in range(6)]
    got = sample(logits, rows, NO_EOS)
    for i in (0, 2, 4):
        assert got[i] == int(logits[i].argmax())
        assert sample(logits[i:i + 1], [row(temperature=0.0)], NO_EOS) == [got[i]]


def test_seeded_sampling_is_reproducible_and_batch_independent():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    r = row(seed=42)
    alone = [sample(logits[1:2], [r], NO_EOS)[0] for _ in range(20)]
    rows = [row(seed=7), row(seed=42), row(temperature=0.0), row(seed=9)]
    mixed = [sample(logits, rows, NO_EOS)[1] for _ in range(20)]
    assert alone == mixed
    r2 = row(seed=43)
    other = [sample(logits[1:2], [r2], NO_EOS)[0] for _ in range(20)]
    assert other != alone


def test_sampling_follows_the_softmax_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    r = row(seed=3, temperature=1.0)
    counts = torch.bincount(torch.tensor([sample(logits, [r], NO_EOS)[0] for _ in range(4000)]), minlength=4)
    torch.testing.assert_close(counts / 4000, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)


def test_temperature_sharpens():
    logits = torch.log(torch.tensor([[0.6, 0.4]]))
    r = row(seed=5, temperature=0.25)  # p ~ 0.6^4 / (0.6^4 + 0.4^4) = 0.835
    freq = sum(sample(logits, [r], NO_EOS)[0] == 0 for _ in range(2000)) / 2000
    assert abs(freq - 0.835) < 0.04


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    rk = row(seed=1, top_k=2)
    assert set(sample(logits, [rk], NO_EOS)[0] for _ in range(500)) == {0, 1}
    rp = row(seed=2, top_p=0.65)  # 0.4 + 0.3 reaches 0.65: two tokens kept
    assert set(sample(logits, [rp], NO_EOS)[0] for _ in range(500)) == {0, 1}
    rp1 = row(seed=2, top_p=0.3)  # the first token alone reaches it
    assert set(sample(logits, [rp1], NO_EOS)[0] for _ in range(100)) == {0}


def test_min_tokens_masks_eos_until_reached():
    logits = torch.tensor([[10.0, 0.0, 0.0]])  # EOS (id 0) dominates
    eos = torch.tensor([0])
    held = RowSampling(SamplingParams(temperature=0.0, min_tokens=2), torch.Generator(), TokenState([5], num_prompt=0))
    free = RowSampling(SamplingParams(temperature=0.0, min_tokens=2), torch.Generator(), TokenState([5, 6], num_prompt=0))
    assert sample(logits.repeat(2, 1), [held, free], eos) == [1, 0]


def test_make_generator_seeded_vs_fallback():
    fb = torch.Generator().manual_seed(0)
    a, b = make_generator(11, fb), make_generator(11, fb)
    assert torch.rand(3, generator=a).tolist() == torch.rand(3, generator=b).tolist()
    c, d = make_generator(None, fb), make_generator(None, fb)
    assert torch.rand(3, generator=c).tolist() != torch.rand(3, generator=d).tolist()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def run_output(tok, text_ids, prompt=(45, 74), eos=(0,), **params):
    state = OutputState(SamplingParams(**params), tok, TokenState(list(prompt)), frozenset(eos))
    deltas, reason = [], None
    for t in text_ids:
        d, reason = state.append(t)
        deltas.append(d)
        if reason:
            break
    return "".join(deltas), reason, state


def test_incremental_text_equals_full_decode(tok):
    ids = tok("the cat é 😀 sat on the mat, naïvely.").input_ids
    text, reason, _ = run_output(tok, ids, max_tokens=len(ids))
    assert reason == "length"
    assert text == tok.decode(ids, skip_special_tokens=True)


def test_stop_string_is_cut_and_not_returned(tok):
    ids = tok("hello world STOP more text").input_ids
    text, reason, st = run_output(tok, ids, max_tokens=100, stop=("STOP",))
    assert (text, reason) == ("hello world ", "stop")
    assert len(st.tokens.generated) < len(ids)


def test_partial_stop_prefix_is_held_back_then_released(tok):
    ids = tok("a STin the end").input_ids
    state = OutputState(SamplingParams(max_tokens=100, stop=("STOP",)), tok, TokenState(), frozenset({0}))
    out = ""
    for t in ids:
        d, reason = state.append(t)
        out += d
        assert "ST" not in out or "STi" in out  # never returned while it could still become "STOP"
        assert reason is None
    assert out + state.text[state.emitted:] == "a STin the end"


def test_eos_stops_unless_ignored_and_respects_min_tokens(tok):
    ids = tok("abc").input_ids
    text, reason, st = run_output(tok, ids + [0] + ids, max_tokens=50)
    assert reason == "stop" and text == "abc" and st.tokens.generated[-1] == 0
    _, reason, st = run_output(tok, ids + [0] + ids, max_tokens=50, ignore_eos=True)
    assert reason is None and len(st.tokens.generated) == 2 * len(ids) + 1
    _, reason, st = run_output(tok, [0, 0, 0] + ids, max_tokens=50, min_tokens=2)
    assert reason == "stop" and len(st.tokens.generated) == 3


def test_stop_strings_wait_for_min_tokens(tok):
    ids = tok("X Y X Y").input_ids
    second_x = [i for i, t in enumerate(ids) if tok.decode([t]) == "X"][1]
    text, reason, st = run_output(tok, ids, max_tokens=50, stop=("X",), min_tokens=2)
    assert reason == "stop" and len(st.tokens.generated) == second_x + 1  # the first X came before min_tokens
    assert text == "X Y "


def test_params_validate_names_fields():
    bad = SamplingParams(max_tokens=0, temperature=-1, top_p=0, min_tokens=5, stop=("",)).validate()
    joined = " ".join(bad)
    for name in ("max_tokens", "temperature", "top_p", "min_tokens", "stop"):
        assert name in joined
    assert SamplingParams().validate() == []


def test_incomplete_character_is_held_then_flushed_at_the_end(tok):
    ids = tok("ok 😀").input_ids
    text, reason, _ = run_output(tok, ids[:-1], max_tokens=len(ids) - 1)  # ends inside the emoji's bytes
    assert reason == "length" and text == tok.decode(ids[:-1]) and text.endswith("\ufffd")
    state = OutputState(SamplingParams(max_tokens=50), tok, TokenState(), frozenset({0}))
    assert "".join(state.append(t)[0] for t in ids[:-1]) == "ok "  # the partial character waits
