"""Hostile values at the HTTP edge (RELIABILITY rows 34, 35, 37): every numeric field at extreme JSON values,
invalid Unicode and NUL in every text field, and unimplemented fields. Each is a 400 naming the field, or
a correct answer; never a 500, never a dead engine, never a silently ignored field."""

from __future__ import annotations

import json

import pytest

from tests.util_server import app_client, compiled_bytes, multipart


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_llama):
    with app_client("tiny-llama", tmp_path_factory.mktemp("store")) as (client, state):
        for name, task in (("gen", "generate"), ("cls", "classify")):
            data = compiled_bytes(tiny_llama, "lora", 4, seed=7, task=task,
                                  labels=["a", "b"] if task == "classify" else None)
            assert client.post("/v1/adapters", **multipart(name, {f"{name}.safetensors": data})).status_code == 201
        yield client, state


def post_raw(client, route: str, raw: str):
    """Send the JSON text as written: JSON escapes like \\ud800 and literals like 1e400 or NaN reach the
    server unchanged (a Python json.dumps of the parsed value would not)."""
    return client.post(route, content=raw.encode(), headers={"content-type": "application/json"})


def refused(r, param: str | None = None) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param and param in err["message"], err
    return err


def still_serving(client, state):
    assert state.runtime.engine.healthy and client.get("/health").status_code == 200
    r = client.post("/v1/completions", json={"model": "gen", "prompt": "ok", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_the_reported_top_k_overflow_is_400_and_the_server_lives(srv):
    client, state = srv
    body = '{"model": "gen", "prompt": "hello", "max_tokens": 3, "temperature": 0.8, "top_k": 100000000000000000000}'
    refused(post_raw(client, "/v1/completions", body), "top_k")
    still_serving(client, state)


@pytest.mark.parametrize("field, raw", [
    ("top_k", "100000000000000000000"), ("top_k", "-2"), ("seed", str(2**70)), ("seed", str(-2**70)),
    ("max_tokens", str(10**20)), ("max_tokens", "-1"), ("n", "1000000000"), ("n", "0"),
    ("temperature", "1e400"), ("temperature", "-1e400"), ("temperature", "NaN"), ("temperature", "Infinity"),
    ("temperature", "1e9"), ("top_p", "NaN"), ("top_p", "1e-400"), ("top_p", "2"),
    ("frequency_penalty", "1e400"), ("presence_penalty", "-3"), ("min_tokens", str(10**20)),
    ("top_logprobs", "1000000000"), ("best_of", "-1"),
])
def test_numeric_extremes_are_400_naming_the_field(srv, field, raw):
    client, state = srv
    refused(post_raw(client, "/v1/completions", f'{{"model": "gen", "prompt": "x", "{field}": {raw}}}'), field)
    chat = f'{{"model": "gen", "messages": [{{"role": "user", "content": "x"}}], "{field}": {raw}}}'
    refused(post_raw(client, "/v1/chat/completions", chat), field)
    assert state.runtime.engine.healthy


@pytest.mark.parametrize("extra", [
    {"temperature": 1e-310},  # denormal: greedy, no overflow in the division
    {"temperature": 1e-310, "top_p": 1e-310},
    {"temperature": 0.7, "top_k": 2**31 - 1, "seed": -(2**63)},  # top_k beyond the vocabulary is off
    {"temperature": 0.7, "seed": 2**63 - 1},
    {"temperature": -0.0},
])
def test_extreme_but_valid_values_are_served(srv, extra):
    client, state = srv
    r = client.post("/v1/completions", json={"model": "gen", "prompt": "x", "max_tokens": 3, "ignore_eos": True,
                                             **extra})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
    if extra.get("temperature", 1) < 1e-5:
        greedy = client.post("/v1/completions", json={"model": "gen", "prompt": "x", "max_tokens": 3,
                                                      "ignore_eos": True, "temperature": 0}).json()
        assert r.json()["choices"][0]["text"] == greedy["choices"][0]["text"]


def test_min_tokens_above_max_tokens_is_400(srv):
    client, _ = srv
    refused(client.post("/v1/completions", json={"model": "gen", "prompt": "x", "max_tokens": 2, "min_tokens": 5}),
            "min_tokens")


@pytest.mark.parametrize("stop", [[f"s{i}" for i in range(17)], [""], ["x" * 257], ["ok", ""]])
def test_stop_lists_are_bounded(srv, stop):
    client, _ = srv
    refused(client.post("/v1/completions", json={"model": "gen", "prompt": "x", "stop": stop}), "stop")


BAD_TEXT = [r"\ud800", r"a\udfffb", r"nul\u0000here"]


@pytest.mark.parametrize("text", BAD_TEXT)
def test_invalid_unicode_and_nul_are_400_in_every_text_field(srv, text):
    client, state = srv
    cases = [
        ("/v1/completions", f'{{"model": "gen", "prompt": "{text}"}}', "prompt"),
        ("/v1/completions", f'{{"model": "gen", "prompt": ["{text}"]}}', "prompt"),
        ("/v1/completions", f'{{"model": "gen", "prompt": "x", "stop": ["{text}"]}}', "stop"),
        ("/v1/completions", f'{{"model": "{text}", "prompt": "x"}}', "model"),
        ("/v1/chat/completions", f'{{"model": "gen", "messages": [{{"role": "user", "content": "{text}"}}]}}',
         "messages.0.content"),
        ("/v1/chat/completions",
         f'{{"model": "gen", "messages": [{{"role": "user", "content": [{{"type": "text", "text": "{text}"}}]}}]}}',
         "messages.0.content"),
        ("/v1/classify", f'{{"model": "cls", "input": ["fine", "{text}"]}}', "input"),
        ("/v1/classify", f'{{"model": "cls", "input": "{text}"}}', "input"),
    ]
    for route, raw, param in cases:
        err = refused(post_raw(client, route, raw))
        assert err["param"].startswith(param), (route, raw, err)
        assert "unicode" in err["message"].lower() or "NUL" in err["message"], err
    still_serving(client, state)


@pytest.mark.parametrize("route, body, field", [
    ("/v1/completions", {"model": "gen", "prompt": "x", "guided_grammar": "start: \"a\""}, "guided_grammar"),
    ("/v1/completions", {"model": "gen", "prompt": "x", "response_format": {"type": "json_object", "x": 1}},
     "response_format.x"),
    ("/v1/completions", {"model": "gen", "prompt": "x", "suffix": "end"}, "suffix"),
    ("/v1/chat/completions", {"model": "gen", "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"model": "gen", "messages": [{"role": "user", "content": "x", "tool_calls": []}]},
     "messages.0.tool_calls"),
    ("/v1/chat/completions", {"model": "gen", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "messages.0.content"),
    ("/v1/completions", {"model": "gen", "prompt": "x", "stream": True, "stream_options": {"include_usage": True,
                                                                                          "continuous": True}},
     "stream_options.continuous"),
    ("/v1/classify", {"model": "cls", "input": ["x"], "truncate": True}, "truncate"),
])
def test_unimplemented_fields_are_refused_naming_them(srv, route, body, field):
    client, _ = srv
    err = refused(client.post(route, json=body))
    assert err["param"].startswith(field) and field.split(".")[0] in err["message"], err


def test_classify_inputs_over_the_context_are_400_not_truncated(srv):
    client, state = srv
    limit = state.runtime.engine.max_model_len
    err = refused(client.post("/v1/classify", json={"model": "cls", "input": ["short", "x " * (2 * limit)]}), "input")
    assert "input[1]" in err["message"] and str(limit) in err["message"]
    ok = client.post("/v1/classify", json={"model": "cls", "input": ["short"]})
    assert ok.status_code == 200 and ok.json()["data"][0]["label"] in ("a", "b")


def test_well_formed_requests_still_pass_every_check(srv):
    """The same checks must not refuse what clients really send (openai SDK defaults, vLLM extensions)."""
    client, _ = srv
    body = {"model": "gen", "prompt": "x", "max_tokens": 3, "temperature": 0.5, "top_p": 0.9, "top_k": 5,
            "seed": 3, "stop": ["\n"], "n": 1, "user": "u1", "frequency_penalty": 0, "presence_penalty": 0.0,
            "logprobs": None, "echo": False, "best_of": 1, "min_tokens": 1, "ignore_eos": False,
            "stream": False}
    assert client.post("/v1/completions", json=body).status_code == 200
    chat = {"model": "gen", "messages": [{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "u"}],
            "max_completion_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    r = client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    assert json.loads(r.text.split("data: ")[-2])["usage"]["completion_tokens"] <= 3
