"""Structured output (response_format, guided_json/regex/choice) through the real `openai` client and the
real engine on tiny-llama: every output satisfies its constraint, greedy and sampled, streamed or not, in
batches that mix constrained and unconstrained requests on different adapters; the grammar's masks against
a plain reference; bad constraints are 400 naming the field."""

from __future__ import annotations

import json
import re
import threading

import openai
import pytest
import torch

from server.engine import GenerateParams
from server.engine.guided import GuideSpec, bitmask_bias
from server.engine.sampler import RowSampling, SamplingParams, sample
from tests.util_server import app_client, compiled_bytes, multipart

SCHEMA = {"type": "object", "properties": {
    "ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}, "tag": {"enum": ["a", "b"]}},
    "required": ["ok", "n", "tag"], "additionalProperties": False}
CHOICES = ["yes", "no", 'say "maybe"']
REGEX = r"[0-9]{3}-[a-z]{2,4}"


def holds(kind: str, text: str) -> bool:
    """The constraint, checked without the grammar engine."""
    if kind == "choice":
        return text in CHOICES
    if kind == "regex":
        return re.fullmatch(REGEX, text) is not None
    obj = json.loads(text)
    if kind == "json_object":
        return isinstance(obj, dict)
    return (set(obj) == {"ok", "n", "tag"} and isinstance(obj["ok"], bool) and type(obj["n"]) is int
            and 0 <= obj["n"] <= 99 and obj["tag"] in ("a", "b"))


EXTRA = {"choice": {"guided_choice": CHOICES}, "regex": {"guided_regex": REGEX},
         "schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "rec", "schema": SCHEMA}}},
         "guided_json": {"guided_json": SCHEMA}}
KIND = {"choice": "choice", "regex": "regex", "schema": "schema", "guided_json": "schema"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_llama):
    with app_client("tiny-llama", tmp_path_factory.mktemp("store")) as (client, state):
        for name, method, seed in (("lora-a", "lora", 1), ("dora-b", "dora", 2)):
            blob = compiled_bytes(tiny_llama, method, 4, seed=seed)
            assert client.post("/v1/adapters", **multipart(name, {"a.safetensors": blob})).status_code == 201
        yield client, state, openai.OpenAI(base_url="http://testserver/v1", api_key="k", http_client=client,
                                           max_retries=0)


@pytest.mark.parametrize("constraint", list(EXTRA))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("stream", [False, True])
def test_completions_follow_the_constraint(srv, constraint, temperature, stream):
    _, _, oc = srv
    kw = dict(model="lora-a", prompt="Answer:", max_tokens=48, temperature=temperature, seed=7,
              extra_body=EXTRA[constraint])
    if stream:
        chunks = list(oc.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].text for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        r = oc.completions.create(**kw)
        text, reason = r.choices[0].text, r.choices[0].finish_reason
    assert reason == "stop", (text, reason)  # the grammar completed and ended the request
    assert holds(KIND[constraint], text), text


@pytest.mark.parametrize("stream", [False, True])
def test_chat_response_format_json_schema(srv, stream):
    _, _, oc = srv
    kw = dict(model="dora-b", messages=[{"role": "user", "content": "a record please"}], max_tokens=48,
              temperature=0.8, seed=3, response_format={"type": "json_schema",
                                                        "json_schema": {"name": "rec", "schema": SCHEMA}})
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in oc.chat.completions.create(stream=True, **kw)
                       if c.choices)
    else:
        text = oc.chat.completions.create(**kw).choices[0].message.content
    assert holds("schema", text), text


def test_json_object_is_a_json_object_or_a_truncated_one(srv):
    """json_object allows any object, so a random model may run to max_tokens: a finished answer parses as a
    JSON object; a cut one is still a prefix the grammar allowed (it starts an object)."""
    _, _, oc = srv
    finished = 0
    for seed in range(6):
        r = oc.chat.completions.create(model="lora-a", messages=[{"role": "user", "content": "json"}], max_tokens=40,
                                       temperature=0.7, seed=seed, response_format={"type": "json_object"})
        text, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert text.startswith("{"), text
        if reason == "stop":
            finished += 1
            assert holds("json_object", text), text
    assert finished >= 1


def test_mixed_batch_of_constrained_and_free_requests_on_different_adapters(srv):
    """Run together, every request answers as it does alone: the masks touch only their own rows."""
    _, state, oc = srv
    jobs = [("lora-a", "choice"), ("dora-b", "regex"), ("lora-a", None), ("dora-b", "schema"), ("tiny-llama", None),
            ("lora-a", "guided_json"), ("dora-b", None), ("tiny-llama", "regex")]

    def ask(model, constraint):
        r = oc.completions.create(model=model, prompt="Q:", max_tokens=32, temperature=0, seed=1,
                                  extra_body={**EXTRA.get(constraint, {}), "ignore_eos": constraint is None})
        return r.choices[0].text

    alone = [ask(*j) for j in jobs]
    together: list = [None] * len(jobs)
    batches_before = state.metrics.registry.get_sample_value("rankserve_batch_size_count") or 0
    threads = [threading.Thread(target=lambda i=i, j=j: together.__setitem__(i, ask(*j))) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone
    for (_, constraint), text in zip(jobs, together, strict=True):
        if constraint is not None:
            assert holds(KIND[constraint], text), text
    steps = (state.metrics.registry.get_sample_value("rankserve_batch_size_count") or 0) - batches_before
    assert steps < sum(32 for _ in jobs) / 2  # they did share steps


@pytest.mark.parametrize("body, param", [
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}, "guided_json"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
    ({"guided_choice": ["a"], "min_tokens": 2}, None),
    ({"guided_regex": "a+", "ignore_eos": True}, None),
])
def test_invalid_constraints_are_400_naming_the_field(srv, body, param):
    client, _, _ = srv
    r = client.post("/v1/completions", json={"model": "lora-a", "prompt": "x", "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    if param is not None:
        assert err["param"] == param, err
    named = param or ("min_tokens" if "min_tokens" in body else "ignore_eos")
    assert named.split(".")[0] in err["message"], err


def test_hostile_constraints_are_bounded_and_the_engine_serves_on(srv):
    """Too deep or too large: 400 naming the field. A regex whose DFA is exponential (2^40 states) costs
    llguidance nothing up front (it builds its lexer lazily, within fuel limits per token): it is served."""
    client, _, _ = srv
    deep: dict = {"type": "string"}
    for _ in range(300):
        deep = {"type": "array", "items": deep}
    huge = {"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": "(a|b|c)*d{1,40}"}
                                             for i in range(1500)}}
    for schema, words in ((deep, "deeper"), (huge, "characters")):
        r = client.post("/v1/completions", json={"model": "lora-a", "prompt": "x", "guided_json": schema})
        assert r.status_code == 400 and r.json()["error"]["param"] == "guided_json", r.text[:300]
        assert words in r.json()["error"]["message"]
    rx = "(a|b)*a(a|b){40}"
    r = client.post("/v1/completions", json={"model": "lora-a", "prompt": "x", "max_tokens": 100, "guided_regex": rx,
                                             "temperature": 1.0, "seed": 0})
    assert r.status_code == 200
    body = r.json()["choices"][0]
    assert body["finish_reason"] == "length" or re.fullmatch(rx, body["text"]), body
    ok = client.post("/v1/completions", json={"model": "lora-a", "prompt": "x", "max_tokens": 3, "guided_choice": ["ok"]})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "ok"


def test_compiled_grammars_are_cached_per_spec(srv):
    _, state, _ = srv
    guides = state.runtime.engine.guides
    a, b = GuideSpec.json_schema(SCHEMA, "guided_json"), GuideSpec.json_schema(json.dumps(SCHEMA), "response_format")
    assert a == b  # the same schema, whichever field carried it
    assert guides._template(a) is guides._template(b)
    assert guides.start(a).matcher is not guides.start(a).matcher  # each request its own matcher


def test_choice_masks_match_a_plain_reference(tiny_llama, srv):
    """The first-token mask of a choice grammar is exactly the tokens whose text begins some choice."""
    _, state, _ = srv
    tok = tiny_llama.tokenizer
    V = int(tiny_llama.model.config.vocab_size)
    choices = ["yes", "no", "nothing"]
    guide = state.runtime.engine.guides.start(GuideSpec.choice(choices, "guided_choice"))
    logits = torch.zeros(2, V)
    row = RowSampling(SamplingParams(temperature=0), torch.Generator(), guide=guide)
    free = RowSampling(SamplingParams(temperature=0), torch.Generator())
    from server.engine.guided import mask_rows
    masked = logits.clone()
    mask_rows(masked, [None, guide])  # in place; the guide keeps its row's mask
    bias = guide.mask
    expect = [t for t in range(V) if (s := tok.decode([t])) and any(c.startswith(s) for c in choices)
              and t not in tok.all_special_ids]
    assert (bias == 0).nonzero().flatten().tolist() == expect
    assert torch.equal(masked[1], bias)
    assert torch.equal(masked[0], logits[0])  # the free row is untouched
    picked = sample(torch.randn(2, V), [free, row], torch.tensor([0]))
    assert picked[1] in expect


def test_bitmask_bias_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (3, 5), dtype=torch.int32, generator=g)
    want = torch.tensor([[0.0 if (int(bits[r, t // 32]) >> (t % 32)) & 1 else float("-inf") for t in range(150)]
                         for r in range(3)])
    assert torch.equal(bitmask_bias(bits, 150), want)


def test_free_rows_never_reach_the_grammar_code(monkeypatch):
    import server.engine.logits as logits
    import server.engine.sampler as sampler

    monkeypatch.setattr(logits, "mask_rows", lambda *a: (_ for _ in ()).throw(AssertionError("called")))
    monkeypatch.setattr(sampler, "advance_rows", lambda *a: (_ for _ in ()).throw(AssertionError("called")))
    rows = [RowSampling(SamplingParams(temperature=t), torch.Generator().manual_seed(0)) for t in (0, 1.0)]
    assert len(sample(torch.randn(2, 64), rows, torch.tensor([0]))) == 2


def test_the_engine_refuses_min_tokens_with_a_grammar_in_process(srv):
    _, state, _ = srv
    from server.common.errors import InvalidParameter

    with pytest.raises(InvalidParameter, match="min_tokens"):
        state.runtime.engine.submit_generate(GenerateParams(prompt_ids=[5, 6], max_tokens=4, min_tokens=1,
                                                            guide=GuideSpec.regex("a+", "guided_regex")))


def forbidden_first(state, V: int, choices: list[str], k: int) -> tuple[set[int], list[int]]:
    """A choice grammar's first-step allowed ids, and k ids outside them."""
    from server.engine.guided import mask_rows

    probe = state.runtime.engine.guides.start(GuideSpec.choice(choices, "guided_choice"))
    mask_rows(torch.zeros(1, V), [probe])
    allowed = set((probe.mask == 0).nonzero().flatten().tolist())
    return allowed, [t for t in range(V) if t not in allowed][:k]


def test_the_mask_comes_after_every_processor_and_is_never_bypassed(tiny_llama, srv):
    """logit_bias +100 and penalties that favour forbidden tokens cannot lift them past the grammar, greedy or
    sampled; a guided row whose token was drawn without this step's mask is refused, its matcher unchanged."""
    from server.engine.guided import advance_rows
    from server.engine.tokens import TokenState

    _, state, _ = srv
    V = int(tiny_llama.model.config.vocab_size)
    allowed, forbidden = forbidden_first(state, V, CHOICES, 200)
    spec = GuideSpec.choice(CHOICES, "guided_choice")
    for seed, temperature in enumerate((0.0, 0.7, 1.0, 5.0)):
        sp = SamplingParams(temperature=temperature, logit_bias=tuple((t, 100.0) for t in forbidden),
                            repetition_penalty=0.2, presence_penalty=-2.0, frequency_penalty=-2.0, min_p=0.01)
        tokens = TokenState([1, 2] + forbidden[:8], num_prompt=2)  # "generated" forbidden ids: penalties favour them
        guide = state.runtime.engine.guides.start(spec)
        rows = [RowSampling(sp, torch.Generator().manual_seed(seed), tokens, guide=guide),
                RowSampling(sp, torch.Generator().manual_seed(seed), tokens)]  # the same, unconstrained
        picked = sample(torch.randn(2, V, generator=torch.Generator().manual_seed(seed)), rows, torch.tensor([0]))
        assert picked[0] in allowed, (temperature, picked)
        assert picked[1] in forbidden  # the bias does work where no grammar holds it back
    guide = state.runtime.engine.guides.start(spec)
    with pytest.raises(ValueError, match="without its grammar mask"):
        advance_rows([guide], [min(allowed)])
    from server.engine.guided import mask_rows

    mask_rows(torch.zeros(1, int(tiny_llama.model.config.vocab_size)), [guide])  # the matcher is still at the start
    assert set((guide.mask == 0).nonzero().flatten().tolist()) == allowed


@pytest.mark.parametrize("stream", [False, True])
def test_constraint_with_n_logprobs_penalties_and_logit_bias(tiny_llama, srv, stream):
    """Two prompts x n=3, sampled, with logprobs, penalties and logit_bias pushing forbidden tokens: every one
    of the six choices follows the grammar, ends with "stop", and carries its tokens' logprobs."""
    _, state, oc = srv
    _, forbidden = forbidden_first(state, int(tiny_llama.model.config.vocab_size), CHOICES, 300)
    kw = dict(model="lora-a", prompt=["Answer:", "Q:"], max_tokens=24, n=3, temperature=1.0, seed=11, logprobs=2,
              presence_penalty=1.5, frequency_penalty=-1.0, logit_bias={str(t): 100 for t in forbidden},
              extra_body={"guided_choice": CHOICES, "repetition_penalty": 1.3})
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    lps: dict[int, list] = {}
    if stream:
        for c in oc.completions.create(stream=True, **kw):
            for ch in c.choices:
                texts[ch.index] = texts.get(ch.index, "") + ch.text
                reasons[ch.index] = ch.finish_reason or reasons.get(ch.index)
                lps.setdefault(ch.index, []).extend(ch.logprobs.token_logprobs if ch.logprobs else [])
    else:
        for ch in oc.completions.create(**kw).choices:
            texts[ch.index], reasons[ch.index], lps[ch.index] = ch.text, ch.finish_reason, ch.logprobs.token_logprobs
    assert sorted(texts) == list(range(6))
    for i in range(6):
        assert holds("choice", texts[i]) and reasons[i] == "stop", (i, texts[i], reasons[i])
        assert lps[i] and all(v <= 0 for v in lps[i]), lps[i]


@pytest.mark.slow
def test_smollm2_answers_a_json_schema_with_its_49k_vocabulary(tmp_path):
    """The real model and tokenizer: a chat answer that parses and follows the schema, and a choice."""
    with app_client("smollm2", tmp_path / "store", engine_opts={"max_model_len": 512}) as (client, _):
        oc = openai.OpenAI(base_url="http://testserver/v1", api_key="k", http_client=client, max_retries=0)
        schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                   "country": {"type": "string", "maxLength": 40}},
                  "required": ["city", "country"], "additionalProperties": False}
        r = oc.chat.completions.create(model="smollm2", max_tokens=40, temperature=0, messages=[
            {"role": "user", "content": "Name the capital of France as JSON with city and country."}],
            response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}})
        obj = json.loads(r.choices[0].message.content)
        assert set(obj) == {"city", "country"} and r.choices[0].finish_reason == "stop"
        c = oc.completions.create(model="smollm2", prompt="Is Paris in France? Answer:", max_tokens=5,
                                  temperature=0, extra_body={"guided_choice": [" yes", " no"]})
        assert c.choices[0].text in (" yes", " no")
