"""The OpenAI API in full through the official `openai` Python client against the real server (uvicorn in a
subprocess, tiny-llama): batched and token-id prompts, n and best_of, logprobs (completions and chat), echo
and scoring with max_tokens=0, penalties, logit_bias, stop_token_ids, min_p, include_stop_str_in_output,
/tokenize, /detokenize, /version, streaming of all of it, usage counts, and the 400s naming each field.

Numbers are checked against a plain reference: the same seeded base model run by Hugging Face's own forward
in this process, with the penalties written out token by token (tests/util_reference.py)."""

from __future__ import annotations

import math

import pytest

openai = pytest.importorskip("openai")

from tests.util_reference import greedy_reference, reference_logprobs  # noqa: E402
from tests.util_server import LiveServer, compiled_bytes, multipart  # noqa: E402

ADMIN, INFER = "sk-oai-admin", "sk-oai-infer"
BASE, ADAPTER = "tiny-llama", "oai-lora"


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("oai")
    env = {"RANKSERVE_API_KEYS": INFER, "RANKSERVE_ADMIN_KEY": ADMIN}
    with LiveServer(tmp, BASE, "--max-queue", "64", "--max-running", "16", "--max-model-len", "256",
                    env=env) as s:
        r = s.client(ADMIN).post("/v1/adapters", **multipart(ADAPTER, {"a.safetensors": compiled_bytes(tiny_llama)}))
        assert r.status_code == 201, r.text
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=INFER, max_retries=0)


def ids_of(tiny_llama, text: str) -> list[int]:
    return list(tiny_llama.tokenizer(text)["input_ids"])


def greedy(client, model=BASE, prompt="The cat", n_tokens=6, **kw):
    extra = {"ignore_eos": True, **kw.pop("extra_body", {})}
    if kw.get("logprobs") is not None:
        extra.setdefault("return_tokens_as_token_ids", True)
    return client.completions.create(model=model, prompt=prompt, max_tokens=n_tokens, temperature=0,
                                     extra_body=extra, **kw)


def stream_text(client, **kw) -> tuple[dict[int, str], dict[int, str | None], object]:
    """Each choice's text and finish reason gathered from a stream, and its usage chunk."""
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    usage = None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
    return texts, reasons, usage


# ---- prompts ------------------------------------------------------------------------------------------------
def test_every_prompt_form_gives_one_choice_per_prompt_in_order(client, tiny_llama):
    prompts = ["The cat", "Once upon a time", "x"]
    alone = [greedy(client, prompt=p).choices[0].text for p in prompts]
    assert len(set(alone)) > 1  # the prompts are told apart
    for form in (prompts, [ids_of(tiny_llama, p) for p in prompts]):
        r = greedy(client, prompt=form)
        assert [c.index for c in r.choices] == [0, 1, 2]
        assert [c.text for c in r.choices] == alone
        assert r.usage.prompt_tokens == sum(len(ids_of(tiny_llama, p)) for p in prompts)
        assert r.usage.completion_tokens == 3 * 6
    assert greedy(client, prompt=ids_of(tiny_llama, "The cat")).choices[0].text == alone[0]
    texts, reasons, usage = stream_text(client, model=BASE, prompt=prompts, max_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert [texts[i] for i in range(3)] == alone and set(reasons.values()) == {"length"}
    assert usage.completion_tokens == 18


# ---- n and best_of ------------------------------------------------------------------------------------------
def test_n_choices_are_seeded_per_choice_and_stream_alike(client):
    kw = dict(model=ADAPTER, prompt=["The cat", "x"], max_tokens=5, temperature=1.0, n=3, seed=11,
              extra_body={"ignore_eos": True})
    r = client.completions.create(**kw)
    assert [c.index for c in r.choices] == list(range(6))
    assert len({c.text for c in r.choices[:3]}) > 1  # seed + j: the choices differ
    assert [c.text for c in client.completions.create(**kw).choices] == [c.text for c in r.choices]  # reproducible
    # choice j of a seeded request is the single request seeded seed + j
    one = client.completions.create(**{**kw, "n": 1, "seed": 12, "prompt": "The cat"})
    assert one.choices[0].text == r.choices[1].text
    assert r.usage.prompt_tokens == client.completions.create(**{**kw, "n": 1}).usage.prompt_tokens
    assert r.usage.completion_tokens == 6 * 5
    texts, _, usage = stream_text(client, **kw)
    assert [texts[i] for i in range(6)] == [c.text for c in r.choices]
    assert (usage.prompt_tokens, usage.completion_tokens) == (r.usage.prompt_tokens, r.usage.completion_tokens)


def test_n_counts_the_prompt_once(client, tiny_llama):
    r = greedy(client, prompt="The cat", n=4)
    assert r.usage.prompt_tokens == len(ids_of(tiny_llama, "The cat")) and r.usage.completion_tokens == 24
    assert len({c.text for c in r.choices}) == 1  # greedy: the same choice four times


def test_best_of_returns_the_n_most_likely_sequences(client):
    kw = dict(model=BASE, prompt="The cat", max_tokens=4, temperature=1.0, seed=5, extra_body={"ignore_eos": True})
    all4 = client.completions.create(n=4, logprobs=0, **kw)
    scores = sorted(((sum(c.logprobs.token_logprobs), c.text) for c in all4.choices), reverse=True)
    best = client.completions.create(n=2, best_of=4, **kw)
    assert [c.text for c in best.choices] == [t for _, t in scores[:2]]
    assert [c.index for c in best.choices] == [0, 1] and best.choices[0].logprobs is None
    assert best.usage.completion_tokens == 16  # every generated sequence is counted


# ---- logprobs -----------------------------------------------------------------------------------------------
def test_completion_logprobs_match_the_reference_and_greedy_is_their_argmax(client, tiny_llama):
    r = greedy(client, prompt="Once upon a time", n_tokens=8, logprobs=5)
    named = greedy(client, prompt="Once upon a time", n_tokens=8, logprobs=5,
                   extra_body={"return_tokens_as_token_ids": False})
    lp = r.choices[0].logprobs
    prompt = ids_of(tiny_llama, "Once upon a time")
    gen = greedy_reference(tiny_llama.model, prompt, 8)
    assert ids_from_logprobs(r) == gen
    ref = reference_logprobs(tiny_llama.model, prompt + gen)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    for i, (logprob, top) in enumerate(zip(lp.token_logprobs, lp.top_logprobs, strict=True)):
        assert len(top) == 5  # the chosen token is the top one
        assert logprob == max(top.values())  # greedy: the token is the argmax of the returned logprobs
        row = ref[len(prompt) - 1 + i]
        assert math.isclose(logprob, float(row.max()), abs_tol=1e-4)
        assert sorted(top.values(), reverse=True) == pytest.approx(row.topk(5).values.tolist(), abs=1e-4)
    named_lp = named.choices[0].logprobs
    assert named_lp.tokens == tiny_llama.tokenizer.batch_decode([[i] for i in gen])
    assert named_lp.text_offset == [sum(len(t) for t in named_lp.tokens[:i]) for i in range(8)]
    assert named_lp.token_logprobs == lp.token_logprobs


def test_echo_scores_the_prompt_like_the_reference(client, tiny_llama):
    prompt = ids_of(tiny_llama, "The meaning of life is")
    ref = reference_logprobs(tiny_llama.model, prompt)
    for max_tokens in (0, 1):
        r = client.completions.create(model=BASE, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=1,
                                      echo=True)
        lp = r.choices[0].logprobs
        assert len(lp.token_logprobs) == len(prompt) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for i in range(1, len(prompt)):
            assert math.isclose(lp.token_logprobs[i], float(ref[i - 1, prompt[i]]), abs_tol=1e-4)
            top1 = max(lp.top_logprobs[i].values())
            assert math.isclose(top1, float(ref[i - 1].max()), abs_tol=1e-4)
        assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == max_tokens
        assert r.choices[0].text.startswith(tiny_llama.tokenizer.decode(prompt))
    texts, reasons, usage = stream_text(client, model=BASE, prompt=prompt, max_tokens=0, logprobs=1, echo=True)
    assert texts[0] == tiny_llama.tokenizer.decode(prompt) and reasons[0] == "length"
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), 0)


def test_streamed_logprobs_equal_the_whole_answer(client):
    kw = dict(model=ADAPTER, prompt="The cat", max_tokens=6, temperature=0.8, seed=3, logprobs=2, echo=True,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].logprobs
    tokens, lps, offsets = [], [], []
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                lps += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
    assert (tokens, offsets) == (whole.tokens, whole.text_offset)
    # equal up to fp32 rounding: a lone adapter may run merged into the base weights in one run and not the other
    assert lps[0] is None and lps[1:] == pytest.approx(whole.token_logprobs[1:], abs=1e-5)


def test_chat_logprobs_stream_and_greedy_argmax(client):
    msgs = [{"role": "user", "content": "Say something"}]
    kw = dict(model=ADAPTER, messages=msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob == entry.top_logprobs[0].logprob
        assert entry.bytes == list(entry.token.encode("utf-8"))
    streamed, text = [], ""
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.logprobs is not None:
                streamed += c.logprobs.content
    assert text == r.choices[0].message.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(model=ADAPTER, messages=msgs, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


# ---- sampling controls --------------------------------------------------------------------------------------
def test_penalties_and_logit_bias_match_a_plain_reference(client, tiny_llama):
    prompt = ids_of(tiny_llama, "The cat")
    cases = [dict(presence_penalty=1.5), dict(frequency_penalty=2.0), dict(repetition_penalty=3.0),
             dict(presence_penalty=-1.0, frequency_penalty=0.5, repetition_penalty=1.5, logit_bias={"7": 2.0})]
    base = greedy_reference(tiny_llama.model, prompt, 10)
    for case in cases:
        bias = {int(k): v for k, v in case.get("logit_bias", {}).items()}
        want = greedy_reference(tiny_llama.model, prompt, 10, presence=case.get("presence_penalty", 0.0),
                                frequency=case.get("frequency_penalty", 0.0),
                                repetition=case.get("repetition_penalty", 1.0), bias=bias)
        extra = {k: v for k, v in case.items() if k == "repetition_penalty"}
        r = greedy(client, prompt=prompt, n_tokens=10, logprobs=0, extra_body=extra,
                   **{k: v for k, v in case.items() if k != "repetition_penalty"})
        assert ids_from_logprobs(r) == want, case
    assert want != base  # the penalties changed the greedy choice


def ids_from_logprobs(r) -> list[int]:
    """The generated ids, from logprob tokens returned as "token_id:<id>"."""
    return [int(t.removeprefix("token_id:")) for t in r.choices[0].logprobs.tokens]


def test_logit_bias_forces_and_forbids(client, tiny_llama):
    forced = greedy(client, prompt="The cat", logit_bias={"300": 100}, logprobs=0)
    assert ids_from_logprobs(forced) == [300] * 6
    first = ids_from_logprobs(greedy(client, prompt="The cat", logprobs=0))[0]
    banned = greedy(client, prompt="The cat", logit_bias={str(first): -100}, logprobs=0)
    assert ids_from_logprobs(banned)[0] != first


def test_stop_token_ids_and_include_stop_str(client, tiny_llama):
    plain = greedy(client, prompt="The cat", n_tokens=8, logprobs=0)
    ids = ids_from_logprobs(plain)
    stop_at = next(i for i in range(1, 8) if ids[i] not in ids[:i])
    r = greedy(client, prompt="The cat", n_tokens=8, extra_body={"stop_token_ids": [ids[stop_at]]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == stop_at + 1
    assert r.choices[0].text == tiny_llama.tokenizer.decode(ids[:stop_at])
    r = greedy(client, prompt="The cat", n_tokens=8,
               extra_body={"stop_token_ids": [ids[stop_at]], "include_stop_str_in_output": True})
    assert r.choices[0].text == tiny_llama.tokenizer.decode(ids[:stop_at + 1])
    text = plain.choices[0].text
    stop = text[3:5]
    cut = greedy(client, prompt="The cat", n_tokens=8, stop=[stop], extra_body={"include_stop_str_in_output": True})
    assert cut.choices[0].text == text[:text.index(stop) + len(stop)] and cut.choices[0].finish_reason == "stop"
    held = greedy(client, prompt="The cat", n_tokens=8, extra_body={"stop_token_ids": [ids[0]], "min_tokens": 2})
    assert held.usage.completion_tokens >= 2


def test_min_p_one_keeps_only_the_most_likely_token(client):
    want = greedy(client, prompt="The cat").choices[0].text
    r = client.completions.create(model=BASE, prompt="The cat", max_tokens=6, temperature=1.5, seed=1,
                                  extra_body={"min_p": 1.0, "ignore_eos": True})
    assert r.choices[0].text == want


# ---- tokenize, detokenize, version --------------------------------------------------------------------------
def test_tokenize_detokenize_version(srv, tiny_llama):
    c = srv.client(INFER)
    r = c.post("/tokenize", json={"model": BASE, "prompt": "Hello world", "return_token_strs": True}).json()
    assert r["tokens"] == ids_of(tiny_llama, "Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 256 and r["token_strs"] == tiny_llama.tokenizer.convert_ids_to_tokens(r["tokens"])
    chat = c.post("/tokenize", json={"model": ADAPTER, "messages": [{"role": "user", "content": "hi"}]}).json()
    want = tiny_llama.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                    tokenize=False)
    assert chat["tokens"] == list(tiny_llama.tokenizer(want, add_special_tokens=False)["input_ids"])
    assert c.post("/detokenize", json={"tokens": r["tokens"]}).json() == {
        "prompt": tiny_llama.tokenizer.decode(r["tokens"])}
    assert c.post("/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404
    bad = c.post("/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert srv.client().get("/version").json()["version"]  # no key needed, as vLLM's


# ---- limits -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, param", [
    (dict(logprobs=21), "logprobs"), (dict(n=17), "n"), (dict(best_of=2, n=3), "best_of"),
    (dict(best_of=3, stream=True), "best_of"), (dict(max_tokens=0), "max_tokens"),
    (dict(logit_bias={"abc": 1}), "logit_bias"), (dict(logit_bias={"5": 101}), "logit_bias"),
    (dict(logit_bias={"512": 1}), "logit_bias"), (dict(logit_bias={str(i): 1 for i in range(1025)}), "logit_bias"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(extra_body={"stop_token_ids": [512]}), "stop_token_ids"),
    (dict(extra_body={"min_p": 1.5}), "min_p"), (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
    (dict(prompt=["x"] * 257), "prompt"), (dict(prompt=[[1, 2], []]), "prompt"), (dict(prompt=[[1, 600]]), "prompt"),
    (dict(prompt=["x"] * 20, n=16), "n"),
])
def test_bad_fields_are_400s_naming_them(client, kw, param):
    kw = {"model": BASE, "prompt": "x", "max_tokens": 2, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**kw)
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body


@pytest.mark.parametrize("kw, param", [(dict(top_logprobs=21, logprobs=True), "top_logprobs"),
                                        (dict(top_logprobs=2), "top_logprobs"), (dict(n=0), "n")])
def test_bad_chat_fields_are_400s_naming_them(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}], max_tokens=2, **kw)
    assert e.value.body["param"] == param, e.value.body
