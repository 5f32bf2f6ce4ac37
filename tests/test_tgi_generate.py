"""LoRAX/TGI-compatible generation through the real `lorax` and `text_generation` clients against a real
`rankserve serve` (tiny-llama): tokens and their logprobs against the plain reference forward, streams
that add up to the answer, finish reasons, and parameters refused by name."""

from __future__ import annotations

import json

import httpx
import lorax
import pytest
import text_generation
import torch

from adapters_store.format import loads
from tests.util_apply import apply_adapter
from tests.util_server import LiveServer, compiled_bytes, multipart

PROMPT = "The adapter says"


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("tgi")
    with LiveServer(tmp, "tiny-llama") as srv:
        blob = compiled_bytes(tiny_llama, "lora", 4, seed=11)
        r = httpx.post(srv.url + "/v1/adapters", **multipart("ad", {"ad.safetensors": blob}), timeout=60)
        assert r.status_code == 201, r.text
        srv.adapter = loads(blob)
        yield srv


def reference_logprobs(tiny_llama, adapter, prompt_ids: list[int], generated: list[int]) -> torch.Tensor:
    """Per generated token, log softmax of the plain forward's logits at it (one pass over the whole text)."""
    model = apply_adapter(tiny_llama.model, adapter) if adapter is not None else tiny_llama.model
    ids = torch.tensor([prompt_ids + generated])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1].float()  # [G, V]
    return torch.log_softmax(logits, -1)


def test_lorax_details_carry_the_reference_logprobs_and_greedy_is_their_argmax(live, tiny_llama):
    client = lorax.Client(live.url, timeout=60)
    r = client.generate(PROMPT, adapter_id="ad", max_new_tokens=8, details=True, ignore_eos_token=True)
    d = r.details
    assert d.finish_reason == "length" and d.generated_tokens == 8 == len(d.tokens)
    assert d.prompt_tokens == len(tiny_llama.tokenizer(PROMPT)["input_ids"]) and d.prefill == []
    assert "".join(t.text for t in d.tokens) == r.generated_text
    ids = [t.id for t in d.tokens]
    ref = reference_logprobs(tiny_llama, live.adapter, tiny_llama.tokenizer(PROMPT)["input_ids"], ids)
    for k, t in enumerate(d.tokens):
        assert t.id == int(ref[k].argmax())  # greedy: the argmax of the distribution reported
        assert abs(t.logprob - float(ref[k, t.id])) < 1e-4
    oc = httpx.post(live.url + "/v1/completions", json={"model": "ad", "prompt": PROMPT, "max_tokens": 8,
                                                         "temperature": 0, "ignore_eos": True}, timeout=60)
    assert oc.json()["choices"][0]["text"] == r.generated_text  # the same adapter as the OpenAI route


def test_lorax_stream_adds_up_to_the_answer(live):
    client = lorax.Client(live.url, timeout=60)
    full = client.generate(PROMPT, adapter_id="ad", max_new_tokens=10, ignore_eos_token=True, details=True)
    events = list(client.generate_stream(PROMPT, adapter_id="ad", max_new_tokens=10, ignore_eos_token=True,
                                         details=True))
    assert [e.token.id for e in events] == [t.id for t in full.details.tokens]
    assert [e.token.logprob for e in events] == pytest.approx([t.logprob for t in full.details.tokens], abs=1e-6)
    assert all(e.generated_text is None for e in events[:-1]) and events[-1].generated_text == full.generated_text
    assert events[-1].details.finish_reason == "length" and events[-1].details.generated_tokens == 10


def test_text_generation_client_on_the_base_model(live):
    client = text_generation.Client(live.url, timeout=60)
    r = client.generate(PROMPT, max_new_tokens=6, return_full_text=True, stop_sequences=[])  # details: always
    assert r.generated_text.startswith(PROMPT) and len(r.details.tokens) == r.details.generated_tokens
    streamed = "".join(e.token.text for e in client.generate_stream(PROMPT, max_new_tokens=6))
    assert PROMPT + streamed == r.generated_text or r.details.finish_reason != "length"
    raw = httpx.post(live.url + "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}, timeout=60)
    assert raw.status_code == 200 and set(raw.json()) == {"generated_text"}


def test_sampling_is_reproducible_by_seed_and_reports_it(live):
    client = lorax.Client(live.url, timeout=60)
    kw = dict(adapter_id="ad", max_new_tokens=8, do_sample=True, temperature=0.9, top_k=50, top_p=0.95,
              details=True, ignore_eos_token=True)
    a, b = client.generate(PROMPT, seed=5, **kw), client.generate(PROMPT, seed=5, **kw)
    assert a.generated_text == b.generated_text and a.details.seed == 5
    assert client.generate(PROMPT, max_new_tokens=3, details=True).details.seed is None  # greedy


def test_stop_sequences_and_eos(live, tiny_llama):
    client = lorax.Client(live.url, timeout=60)
    base = client.generate(PROMPT, max_new_tokens=12, ignore_eos_token=True).generated_text
    stop = base[3:6]
    r = client.generate(PROMPT, max_new_tokens=12, ignore_eos_token=True, stop_sequences=[stop], details=True)
    assert r.details.finish_reason == "stop_sequence" and r.generated_text == base[:base.index(stop)]


def test_response_format_constrains_the_output(live):
    client = lorax.Client(live.url, timeout=60)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = client.generate(PROMPT, adapter_id="ad", max_new_tokens=20, details=True,
                        response_format={"type": "json_object", "schema": schema})
    assert json.loads(r.generated_text) in ({"ok": True}, {"ok": False})
    assert r.details.finish_reason == "eos_token"


def test_decoder_input_details_carry_the_reference_prompt_logprobs(live, tiny_llama):
    client = lorax.Client(live.url, timeout=60)
    r = client.generate(PROMPT, adapter_id="ad", max_new_tokens=2, details=True, decoder_input_details=True)
    ids = tiny_llama.tokenizer(PROMPT)["input_ids"]
    pre = r.details.prefill
    assert [t.id for t in pre] == ids and pre[0].logprob is None  # the first token has nothing before it
    assert [t.text for t in pre] == [tiny_llama.tokenizer.decode([i]) for i in ids]
    with torch.no_grad():
        ref = torch.log_softmax(apply_adapter(tiny_llama.model, live.adapter)(torch.tensor([ids])).logits[0].float(), -1)
    for i in range(1, len(ids)):
        assert abs(pre[i].logprob - float(ref[i - 1, ids[i]])) < 1e-4
    assert client.generate(PROMPT, max_new_tokens=2, details=True).details.prefill == []  # only when asked
    s = httpx.post(live.url + "/generate_stream", json={"inputs": PROMPT, "parameters": {"decoder_input_details": True}},
                   timeout=60)
    assert s.status_code == 400 and "decoder_input_details" in s.json()["error"]


@pytest.mark.parametrize("kw, words", [
    (dict(repetition_penalty=1.3), "repetition_penalty"),
    (dict(adapter_source="hub"), "adapter_source"),
    (dict(typical_p=0.5), "typical_p"),
])
def test_unserved_parameters_are_400_naming_them(live, kw, words):
    client = lorax.Client(live.url, timeout=60)
    with pytest.raises(lorax.errors.ValidationError, match=words):
        client.generate(PROMPT, max_new_tokens=2, **kw)


def test_errors_in_lorax_shape(live):
    client = lorax.Client(live.url, timeout=60)
    with pytest.raises(lorax.errors.ValidationError, match="does not exist"):
        client.generate(PROMPT, adapter_id="no-such-adapter", max_new_tokens=2)
    r = httpx.post(live.url + "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 10**6}}, timeout=60)
    assert r.status_code == 400 and r.json()["error_type"] == "validation" and "max_tokens" in r.json()["error"]
    r = httpx.post(live.url + "/generate", json={"inputs": "", "parameters": {}}, timeout=60)
    assert r.status_code == 400 and "inputs" in r.json()["error"]
    r = httpx.post(live.url + "/generate", json={"inputs": PROMPT, "stream": True}, timeout=60)
    assert r.status_code == 400 and "generate_stream" in r.json()["error"]
    for raw in (b"\x80", b'{"inputs": "\xff"}', b"{not json"):  # fuzzing found a 500 for the first
        r = httpx.post(live.url + "/generate", content=raw, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 400 and r.json()["error_type"] == "validation", (raw, r.text)
        assert "malformed JSON" in r.json()["error"]
