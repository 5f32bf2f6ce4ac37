"""Overload, deadlines, disconnects and deletes under load, in-process over the real engine (RELIABILITY
rows 19, 24, 25, 27, 28, 31): the status code, and that every count (running, waiting, adapter pins) returns
to zero."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from tests.util_server import Gate, app_client, compiled_bytes, metric, multipart, sse_events, wait_for


def body(model="tiny-llama", n=4, **kw):
    return {"model": model, "prompt": [5, 6, 7, 8], "max_tokens": n, "temperature": 0, "ignore_eos": True, **kw}


def rejected(state, reason):
    return metric(state.metrics.render().decode(), "rankserve_requests_rejected_total", reason=reason)


def pins(engine) -> int:
    """Adapter pins held in the pool (private: the pool has no public pin count)."""
    return sum(r.refs for r in engine.pool._resident.values())


def idle(engine) -> bool:
    return engine.num_running == 0 and engine.num_waiting == 0 and pins(engine) == 0


class CountingTokenizer:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.inner(*a, **k)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def slow_steps(engine, seconds: float) -> None:
    inner = engine.runner.forward

    def forward(chunks, **kw):
        time.sleep(seconds)
        return inner(chunks, **kw)

    engine.runner.forward = forward


def in_thread(fn, *args, **kwargs):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn(*args, **kwargs)))
    t.start()
    return t, out


def test_queue_full_is_429_before_tokenising_then_recovers(tmp_path):  # row 19
    with app_client("tiny-llama", tmp_path, engine_opts=dict(max_running=1, max_queue=1)) as (client, state):
        engine = state.runtime.engine
        tok = state.runtime.tokenizer = CountingTokenizer(state.runtime.tokenizer)
        gate = Gate(engine)
        running = in_thread(client.post, "/v1/completions", json=body(prompt="first request"))
        assert gate.entered.wait(10)
        queued = in_thread(client.post, "/v1/completions", json=body(prompt="second request"))
        wait_for(lambda: engine.num_waiting == 1)
        calls = tok.calls
        r = client.post("/v1/completions", json=body(prompt="third request"))
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert int(r.headers["Retry-After"]) >= 1
        assert tok.calls == calls  # refused before tokenising
        assert rejected(state, "queue_full") == 1
        gate.release()
        for t, out in (running, queued):
            t.join(30)
            assert out["r"].status_code == 200
        assert client.post("/v1/completions", json=body()).status_code == 200
        wait_for(lambda: idle(engine))


def test_probes_answer_fast_while_the_engine_is_saturated(tmp_path):  # row 31
    with app_client("tiny-llama", tmp_path, engine_opts=dict(max_running=1, max_queue=2)) as (client, state):
        engine = state.runtime.engine
        gate = Gate(engine)
        threads = [in_thread(client.post, "/v1/completions", json=body()) for _ in range(3)]
        assert gate.entered.wait(10)
        wait_for(lambda: engine.num_waiting == 2)
        for path in ("/health", "/ready", "/metrics"):
            start = time.perf_counter()
            r = client.get(path)
            assert r.status_code == 200 and time.perf_counter() - start < 0.5, path
        assert metric(client.get("/metrics").text, "rankserve_num_requests_waiting") == 2
        gate.release()
        for t, _ in threads:
            t.join(30)


def test_deadline_is_504_or_an_sse_error_event_and_frees_everything(tmp_path, tiny_llama):  # row 28
    with app_client("tiny-llama", tmp_path, request_timeout=0.6) as (client, state):
        engine = state.runtime.engine
        blob = compiled_bytes(tiny_llama, seed=1)
        assert client.post("/v1/adapters", **multipart("slow", {"s.safetensors": blob})).status_code == 201
        slow_steps(engine, 0.05)
        r = client.post("/v1/completions", json=body("slow", n=200))
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        with client.stream("POST", "/v1/completions", json=body("slow", n=200, stream=True)) as s:
            assert s.status_code == 200
            events = sse_events(s.read().decode())
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "deadline_exceeded"
        assert any("choices" in e for e in events[:-2])  # some tokens came before the deadline
        wait_for(lambda: idle(engine))
        assert metric(state.metrics.render().decode(), "rankserve_requests_cancelled_total") >= 2


def test_delete_while_streaming_lets_it_finish_and_refuses_new_ones(tmp_path, tiny_llama):  # row 25
    with app_client("tiny-llama", tmp_path) as (client, state):
        engine = state.runtime.engine
        blob = compiled_bytes(tiny_llama, seed=2)
        digest = client.post("/v1/adapters", **multipart("going", {"g.safetensors": blob})).json()["digest"]
        slow_steps(engine, 0.02)

        def stream():
            with client.stream("POST", "/v1/completions", json=body("going", n=30, stream=True)) as s:
                return sse_events(s.read().decode())

        t, out = in_thread(stream)
        wait_for(lambda: engine.num_running == 1)
        assert client.delete("/v1/adapters/going").status_code == 200
        assert client.post("/v1/completions", json=body("going")).status_code == 404
        t.join(30)
        events = out["r"]
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        wait_for(lambda: idle(engine) and engine.pool.slot_of(digest) is None)  # forgotten at its last release


def _asgi_scope(path: str, payload: bytes) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]}


async def _call_then_leave(app, payload: bytes, leave_after_chunks: int, leave_after_s: float | None = None,
                           path: str = "/v1/completions"):
    """Drive the ASGI app like a client that disconnects after some body chunks (or some seconds)."""
    gone = asyncio.Event()
    chunks: list[bytes] = []
    sent_body = False

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            if len(chunks) >= leave_after_chunks:
                gone.set()

    if leave_after_s is not None:
        asyncio.get_running_loop().call_later(leave_after_s, gone.set)
    statuses: list[int] = []

    async def send_status(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])
        await send(message)

    await asyncio.wait_for(app(_asgi_scope(path, payload), receive, send_status), 30)
    return chunks, statuses


@pytest.mark.parametrize("stream", [True, False])
def test_client_gone_while_generating_aborts_within_a_step(tmp_path, stream):  # row 24
    with app_client("tiny-llama", tmp_path) as (client, state):
        engine = state.runtime.engine
        slow_steps(engine, 0.02)
        payload = json.dumps(body(n=200, stream=stream)).encode()
        start = time.monotonic()
        if stream:
            chunks, _ = asyncio.run(_call_then_leave(client.app, payload, leave_after_chunks=2))
            assert 2 <= len(chunks) < 50
        else:
            asyncio.run(_call_then_leave(client.app, payload, leave_after_chunks=1, leave_after_s=0.3))
        # the engine frees the request before it books the metrics: wait for both
        wait_for(lambda: idle(engine) and metric(client.get("/metrics").text,
                                                 "rankserve_requests_cancelled_total") == 1, timeout=5)
        assert time.monotonic() - start < 3  # 200 tokens at >= 20 ms per step would take over 4 s
        text = client.get("/metrics").text  # the route refreshes the gauges from the engine
        assert metric(text, "rankserve_requests_cancelled_total") == 1
        assert metric(text, "rankserve_num_requests_running") == 0
        if not stream:  # the abandoned request is booked as "client gone", not as a success
            assert metric(text, "rankserve_requests_total", endpoint="/v1/completions", status="499") == 1
            assert metric(text, "rankserve_requests_total", endpoint="/v1/completions", status="200") == 0


async def _call_then_stop_reading(app, payload: bytes, read_chunks: int):
    """A client that stays connected but stops reading after some body chunks: every later write waits
    forever, as uvicorn's send does once the socket's buffers are full."""
    chunks: list[bytes] = []
    sent_body = False
    never = asyncio.Event()

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await never.wait()  # no disconnect: the client is still there

    async def send(message):
        if message["type"] == "http.response.body":
            if len(chunks) >= read_chunks:
                await never.wait()
            chunks.append(message["body"])

    await asyncio.wait_for(app(_asgi_scope("/v1/completions", payload), receive, send), 30)
    return chunks


def test_stream_to_a_client_that_stops_reading_is_aborted(tmp_path):  # row 27
    with app_client("tiny-llama", tmp_path, stream_write_timeout=0.5) as (client, state):
        engine = state.runtime.engine
        slow_steps(engine, 0.02)  # 200 tokens take over 4 s
        payload = json.dumps(body(n=200, stream=True)).encode()
        start = time.monotonic()
        chunks = asyncio.run(_call_then_stop_reading(client.app, payload, read_chunks=3))
        returned = time.monotonic() - start
        assert len(chunks) == 3 and 0.5 <= returned < 30  # it gave up on the write (the tokens check below: early)
        wait_for(lambda: idle(engine) and metric(client.get("/metrics").text,
                                                 "rankserve_requests_cancelled_total") == 1, timeout=5)
        text = client.get("/metrics").text
        assert 3 <= metric(text, "rankserve_generation_tokens_total") < 200  # the engine stopped generating for it
        r = client.post("/v1/completions", json=body(n=3))  # the server serves the next client
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_client_gone_while_queued_never_runs(tmp_path):  # row 24
    with app_client("tiny-llama", tmp_path, engine_opts=dict(max_running=1)) as (client, state):
        engine = state.runtime.engine
        gate = Gate(engine)
        first = in_thread(client.post, "/v1/completions", json=body(n=2))
        assert gate.entered.wait(10)
        payload = json.dumps(body(n=50)).encode()

        async def queued_then_leave():
            task = asyncio.ensure_future(_call_then_leave(client.app, payload, 1, leave_after_s=0.3))
            await asyncio.sleep(0.1)
            assert engine.num_waiting == 1
            await asyncio.sleep(0.4)  # the client has left; release the engine
            gate.release()
            await task

        asyncio.run(queued_then_leave())
        first[0].join(30)
        wait_for(lambda: idle(engine), timeout=5)
        assert metric(state.metrics.render().decode(), "rankserve_generation_tokens_total") == 2  # only the first ran


def test_client_gone_while_classify_is_queued_skips_it(tmp_path, tiny_llama):  # row 24, classify
    with app_client("tiny-llama", tmp_path) as (client, state):
        engine = state.runtime.engine
        blob = compiled_bytes(tiny_llama, "lora", 4, seed=3, task="classify")
        assert client.post("/v1/adapters", **multipart("cls", {"c.safetensors": blob})).status_code == 201
        runs = []
        inner = engine.classifier._forward
        engine.classifier._forward = lambda batch: runs.append(len(batch)) or inner(batch)
        gate = Gate(engine)
        first = in_thread(client.post, "/v1/completions", json=body(n=2))
        assert gate.entered.wait(10)  # the engine thread is held inside a generate step
        payload = json.dumps({"model": "cls", "input": ["a", "b"]}).encode()

        async def leave_then_release():
            task = asyncio.ensure_future(_call_then_leave(client.app, payload, 1, leave_after_s=0.2, path="/v1/classify"))
            await asyncio.sleep(0.5)
            gate.release()
            return await task

        _, statuses = asyncio.run(leave_then_release())
        assert statuses == [499]
        first[0].join(30)
        wait_for(lambda: idle(engine) and not engine.classifier.jobs)
        assert runs == []  # the abandoned job never reached the model
        r = client.post("/v1/classify", json={"model": "cls", "input": ["a"]})
        assert r.status_code == 200 and runs == [1]
