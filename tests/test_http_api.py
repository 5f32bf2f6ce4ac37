"""The OpenAI-compatible surface in-process (TestClient over the real engine and store on tiny-llama):
outputs against the plain reference forward, SSE shape, models, classify, and the error envelope for every
bad input (RELIABILITY rows 12, 14, 15, 16, 17, 18)."""

from __future__ import annotations

import pytest

from adapters_store.format import loads
from tests.util_apply import apply_adapter, hf_greedy
from tests.util_server import app_client, compiled_bytes, metric, multipart, sse_events


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_llama):
    with app_client("tiny-llama", tmp_path_factory.mktemp("store"), max_body_bytes=16 << 10) as (client, state):
        gen = compiled_bytes(tiny_llama, "dora", 4, seed=3)
        cls = compiled_bytes(tiny_llama, "lora", 4, seed=4, task="classify", labels=["neg", "pos"])
        assert client.post("/v1/adapters", **multipart("gen", {"gen.safetensors": gen})).status_code == 201
        assert client.post("/v1/adapters", **multipart("cls", {"cls.safetensors": cls})).status_code == 201
        client.adapters = {"gen": loads(gen), "cls": loads(cls)}
        yield client, state


def complete(client, **body):
    body = {"max_tokens": 6, "temperature": 0, "ignore_eos": True, **body}
    return client.post("/v1/completions", json=body)


def envelope(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_completion_runs_the_named_adapter(srv, tiny_llama):
    client, _ = srv
    prompt = [5, 17, 42, 99, 7]
    r = complete(client, model="gen", prompt=prompt)
    assert r.status_code == 200
    out = r.json()
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-") and out["model"] == "gen"
    assert r.headers["x-request-id"] in out["id"]
    choice = out["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
    want = hf_greedy(apply_adapter(tiny_llama.model, client.adapters["gen"]), prompt, 6)
    assert choice["text"] == tiny_llama.tokenizer.decode(want, skip_special_tokens=True)
    base = complete(client, model="tiny-llama", prompt=prompt).json()["choices"][0]["text"]
    assert base == tiny_llama.tokenizer.decode(hf_greedy(tiny_llama.model, prompt, 6), skip_special_tokens=True)
    assert base != choice["text"]


def test_prompt_forms_agree(srv):
    client, _ = srv
    a = complete(client, model="gen", prompt="The cat").json()
    b = complete(client, model="gen", prompt=["The cat"]).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"] and a["usage"] == b["usage"]


def test_chat_applies_the_chat_template(srv, tiny_llama):
    client, _ = srv
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    r = client.post("/v1/chat/completions", json={"model": "gen", "messages": messages, "max_completion_tokens": 4,
                                                  "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    text = tiny_llama.tokenizer.apply_chat_template([{"role": "system", "content": "be brief"},
                                                     {"role": "user", "content": "hi"}],
                                                    add_generation_prompt=True, tokenize=False)
    assert out["usage"]["prompt_tokens"] == len(tiny_llama.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert out["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_stream_matches_the_non_streamed_text(srv, route):
    client, _ = srv
    body = {"model": "gen", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    body |= {"prompt": "Once upon"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    full = client.post(route, json=body).json()
    with client.stream("POST", route, json=body | {"stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.read().decode())
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert usage["choices"] == [] and usage["usage"] == full["usage"]
    if route == "/v1/completions":
        text = "".join(c["choices"][0]["text"] for c in chunks)
        want = full["choices"][0]["text"]
    else:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        want = full["choices"][0]["message"]["content"]
    assert text == want
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("length") == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_models_lists_the_base_first_then_adapters(srv):
    client, _ = srv
    data = client.get("/v1/models").json()["data"]
    assert data[0]["id"] == "tiny-llama" and data[0]["object"] == "model"
    assert {"gen", "cls"} <= {m["id"] for m in data[1:]}
    assert all(m["parent"] == "tiny-llama" for m in data[1:])


def test_classify_scores_every_label(srv):
    client, _ = srv
    r = client.post("/v1/classify", json={"model": "cls", "input": ["good film", "bad film", "meh"]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2]
    for d in data:
        assert set(d["scores"]) == {"neg", "pos"} and abs(sum(d["scores"].values()) - 1) < 1e-5
        assert d["label"] == max(d["scores"], key=d["scores"].get)
    single = client.post("/v1/classify", json={"model": "cls", "input": "good film"}).json()["data"][0]
    assert single["scores"] == pytest.approx(data[0]["scores"], abs=1e-5)


def test_classify_with_a_generate_adapter_or_the_base_is_400(srv):  # row 18
    client, _ = srv
    assert envelope(client.post("/v1/classify", json={"model": "gen", "input": ["x"]}), 400)["param"] == "model"
    assert envelope(client.post("/v1/classify", json={"model": "tiny-llama", "input": ["x"]}), 400)["param"] == "model"
    envelope(client.post("/v1/classify", json={"model": "cls", "input": []}), 400)


def test_unknown_adapter_is_404_never_the_base(srv):  # row 12
    client, state = srv
    before = metric(state.metrics.render().decode(), "rankserve_requests_rejected_total", reason="unknown_adapter")
    err = envelope(complete(client, model="no-such-adapter", prompt="hi"), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    envelope(client.post("/v1/classify", json={"model": "no-such", "input": ["x"]}), 404)
    after = metric(state.metrics.render().decode(), "rankserve_requests_rejected_total", reason="unknown_adapter")
    assert after == before + 2


@pytest.mark.parametrize("body, param", [
    ({"model": "gen", "prompt": ""}, "prompt"),
    ({"model": "gen", "prompt": []}, "prompt"),
    ({"model": "gen", "prompt": 5}, "prompt"),
    ({"model": "gen"}, "prompt"),
    ({"prompt": "x"}, "model"),
    ({"model": "gen", "prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"model": "gen", "prompt": [1, 100000]}, "prompt"),
    ({"model": "gen", "prompt": "x", "logprobs": 21}, "logprobs"),
    ({"model": "gen", "prompt": ["x", ""]}, "prompt"),
])
def test_malformed_requests_are_400_in_the_envelope(srv, body, param):  # row 14
    client, _ = srv
    err = envelope(client.post("/v1/completions", json=body), 400)
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param


def test_malformed_json_is_400(srv):
    client, state = srv
    before = metric(state.metrics.render().decode(), "rankserve_requests_rejected_total", reason="validation")
    r = client.post("/v1/completions", content=b'{"model": "gen", "prompt": ', headers={"content-type": "application/json"})
    assert "JSON" in envelope(r, 400)["message"]
    assert metric(state.metrics.render().decode(), "rankserve_requests_rejected_total", reason="validation") == before + 1


@pytest.mark.parametrize("field, value", [("max_tokens", 0), ("max_tokens", -3), ("temperature", -0.1),
                                          ("top_p", 0), ("top_p", 1.5), ("n", 17), ("top_k", -2), ("min_tokens", -1)])
def test_out_of_range_sampling_is_400_naming_the_field(srv, field, value):  # row 16
    client, _ = srv
    assert envelope(complete(client, model="gen", prompt="x", **{field: value}), 400)["param"] == field


def test_context_overflow_is_400_with_the_limit(srv):  # row 15
    client, state = srv
    limit = state.runtime.engine.max_model_len
    err = envelope(complete(client, model="gen", prompt=[5] * 200, max_tokens=100), 400)
    assert err["code"] == "context_length_exceeded" and str(limit) in err["message"]
    chat = client.post("/v1/chat/completions", json={"model": "gen", "messages": [{"role": "user", "content": "x " * 400}]})
    assert str(limit) in envelope(chat, 400)["message"]


def test_body_over_the_limit_is_413_even_without_content_length(srv):  # row 17
    client, _ = srv
    big = {"model": "gen", "prompt": "x" * (20 << 10)}
    envelope(client.post("/v1/completions", json=big), 413)

    def chunks():
        for _ in range(40):
            yield b" " * 1024

    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert envelope(r, 413)["code"] == "payload_too_large"
    assert complete(client, model="gen", prompt="still fine").status_code == 200


def test_framework_errors_use_the_envelope(srv):
    client, _ = srv
    assert envelope(client.get("/v1/nowhere"), 404)["code"] == "not_found"
    assert envelope(client.delete("/v1/models"), 405)["code"] == "method_not_allowed"
    assert envelope(client.post("/v1/classify", json={"model": "cls", "input": [1]}), 400)["param"].startswith("input")


def test_metrics_label_by_route_template_never_by_adapter_id(srv):
    client, state = srv
    client.get("/v1/adapters/gen")
    client.get("/v1/adapters/some-secret-id")
    text = client.get("/metrics").text
    assert "rankserve_requests_total" in text and "rankserve_build_info" in text
    assert metric(text, "rankserve_requests_total", endpoint="/v1/adapters/{adapter_id}", status="200") >= 1
    assert metric(text, "rankserve_requests_total", endpoint="/v1/adapters/{adapter_id}", status="404") >= 1
    assert "some-secret-id" not in text and 'endpoint="/v1/adapters/gen"' not in text


def test_probes(srv):
    client, _ = srv
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    assert client.get("/openapi.json").json()["paths"]["/v1/completions"]
    assert client.get("/docs").status_code == 200


def test_stop_strings_and_seeds_reach_the_sampler(srv):
    client, _ = srv
    full = complete(client, model="gen", prompt="Once", max_tokens=12).json()["choices"][0]["text"]
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = complete(client, model="gen", prompt="Once", max_tokens=12, stop=[stop], ignore_eos=False).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and stop not in cut["text"] and full.startswith(cut["text"])
    sampled = [complete(client, model="gen", prompt="Once", max_tokens=12, temperature=1.0, seed=s).json()
               ["choices"][0]["text"] for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]
