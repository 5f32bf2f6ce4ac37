"""Faults injected into the real server (`python -m server.cli serve`, uvicorn) on tiny-llama, on a loopback
port, while it is under load: SIGTERM (RELIABILITY row 29), many clients leaving at once while queued or
streaming (row 24), adapter files damaged on disk behind the server's back (row 22), uploads and deletes
of one id racing (rows 9, 25, 26), a burst over more cold adapters than device slots (row 21), and a model
step that raises or never returns (row 30; injected by tests/fault_server.py).

Single-request versions of rows 24 and 25 live in test_e2e_server.py and test_http_limits.py, and SIGTERM
with every request running in test_e2e_lifecycle.py; these add concurrency, queued requests and the real
process. Every thread pool and loop here is bounded in count and time.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.util_server import LiveServer, compiled_bytes, metric, multipart, wait_for

DRAIN_S = 30.0
FIVE_XX_DOCUMENTED = {503}  # draining / no slot in time (with Retry-After); 424 is a 4xx


def body(model: str, n: int = 8, **kw) -> dict:
    return {"model": model, "prompt": "The meaning of", "max_tokens": n, "temperature": 0, "ignore_eos": True, **kw}


def text_of(r) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def gauges(client) -> tuple[float, float]:
    text = client.get("/metrics").text
    return metric(text, "rankserve_num_requests_running"), metric(text, "rankserve_num_requests_waiting")


def raw_post(port: int, path: str, payload: dict) -> socket.socket:
    """Send a request on a bare socket and return it unread: closing it is a client that went away."""
    data = json.dumps(payload).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(head + data)
    return s


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    with LiveServer(tmp, "tiny-llama", "--demo-adapters", "--max-running", "4", "--max-queue", "32",
                    "--max-model-len", "512") as server:
        yield server


def test_sigterm_with_requests_still_queued_serves_them_too_then_exits_0(tmp_path):  # row 29
    """test_e2e_lifecycle covers streams that are all running at SIGTERM; here some requests are still
    waiting in the queue (max-running 2): they are in flight too, so they run and finish during the drain,
    while liveness stays 200 and a new request gets 503 with Retry-After."""
    srv = LiveServer(tmp_path, "tiny-llama", "--demo-adapters", "--max-running", "2", "--max-queue", "16",
                     "--max-model-len", "512", "--drain-timeout", str(DRAIN_S)).start()
    try:
        user = srv.client(timeout=90)
        started = [threading.Event(), threading.Event()]
        streams: list[dict] = [{}, {}]

        def stream(i: int) -> None:
            req = body("demo-lora", 480, stream=True, stream_options={"include_usage": True})
            with user.stream("POST", "/v1/completions", json=req) as r:
                streams[i]["status"] = r.status_code
                chunks = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        chunks.append(line[6:])
                        started[i].set()
                streams[i]["chunks"] = chunks

        with ThreadPoolExecutor(6) as pool:
            running = [pool.submit(stream, i) for i in range(2)]
            assert all(e.wait(30) for e in started), "both streams should be generating"
            queued = [pool.submit(user.post, "/v1/completions", json=body("demo-lora", 60)) for _ in range(3)]
            wait_for(lambda: gauges(user)[1] >= 3, 10, "all three requests waiting behind the two running")
            sigterm_at = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: srv.client().get("/ready").status_code == 503, 2, "readiness 503 at once")
            assert srv.client().get("/ready").json()["status"] == "draining"
            assert srv.client().get("/health").status_code == 200  # alive, just not taking work
            late = srv.client(timeout=10).post("/v1/completions", json=body("tiny-llama", 4))
            assert late.status_code == 503 and late.headers.get("retry-after")
            assert late.json()["error"]["code"] == "unavailable"
            for f in running:
                f.result(90)
            results = [f.result(90) for f in queued]
        for s in streams:  # every token of what was in flight arrived, then the usage and [DONE]
            assert s["status"] == 200 and s["chunks"][-1] == "[DONE]"
            usage = json.loads(s["chunks"][-2])["usage"]
            assert usage["completion_tokens"] == 480
        for r in results:
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 60
        code = srv.proc.wait(DRAIN_S + 15)
        assert code == 0 and time.monotonic() - sigterm_at < DRAIN_S + 15
        msgs = [e.get("msg") for e in srv.log_events()]
        assert "drain started" in msgs and "drain finished" in msgs
    finally:
        srv.stop(signal.SIGKILL)


def test_many_clients_leaving_while_queued_or_streaming_free_everything(srv):  # row 24
    user = srv.client(timeout=90)
    expected = text_of(user.post("/v1/completions", json=body("demo-lora", 12)))
    before = user.get("/metrics").text
    n = 480  # tiny-llama's context is 512

    def stream_then_leave(k: int) -> int:
        with user.stream("POST", "/v1/completions", json=body("demo-lora", n, stream=True)) as r:
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen >= k:
                        return seen  # leaving the block closes the connection mid-stream
        return seen

    def complete(_: int) -> str:
        return text_of(user.post("/v1/completions", json=body("demo-lora", 12)))

    with ThreadPoolExecutor(8) as pool:
        leavers = [pool.submit(stream_then_leave, k) for k in (1, 3, 5, 8)]
        # non-streamed requests on bare sockets, closed as soon as the server holds them (max-running 4:
        # most of them are still queued), then 4 clients that stay
        socks = [raw_post(srv.port, "/v1/completions", body("demo-lora", n)) for _ in range(4)]
        wait_for(lambda: sum(gauges(user)) >= 5, 10, "the sockets' requests admitted or queued")
        for s in socks:
            s.close()
        keepers = [pool.submit(complete, i) for i in range(4)]
        assert all(1 <= f.result(60) < n for f in leavers)
        assert [f.result(90) for f in keepers] == [expected] * 4  # others unaffected, same greedy text
    wait_for(lambda: gauges(user) == (0.0, 0.0), 15, "running and waiting gauges back to 0")
    after = user.get("/metrics").text

    def grew(name: str) -> float:
        return metric(after, name) - metric(before, name)

    assert grew("rankserve_requests_cancelled_total") >= 5  # the 4 streams, and sockets cut before the end
    assert grew("rankserve_generation_tokens_total") < 8 * n  # the gone clients' work was not all done
    assert text_of(user.post("/v1/completions", json=body("demo-lora", 12))) == expected


def corrupt(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "flipped":  # one byte of tensor data: the header still parses, the digest does not match
        data[-100] ^= 0xFF
    else:  # replaced by something that is not a safetensors file at all
        data = bytearray(b"\x00garbage" * 64)
    path.write_bytes(bytes(data))


def test_adapter_files_damaged_on_disk_fail_only_their_requests(srv, tiny_llama):  # row 22
    admin, user = srv.client(), srv.client(timeout=90)
    good = {"c-good-1": compiled_bytes(tiny_llama, "lora", 4, seed=31), "c-good-2": compiled_bytes(tiny_llama, "dora", 4, seed=32)}
    victims = {f"c-{how}": how for how in ("truncated", "flipped", "garbage")}
    for adapter_id, blob in {**good, **{v: compiled_bytes(tiny_llama, "lora", 4, seed=40 + i)
                                        for i, v in enumerate(victims)}}.items():
        assert admin.post("/v1/adapters", **multipart(adapter_id, {"a.safetensors": blob})).status_code == 201
    expected = {m: text_of(user.post("/v1/completions", json=body(m))) for m in (*good, "tiny-llama")}
    seen: list[tuple[str, int, str]] = []
    spans: list[tuple[float, float]] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        for i in range(300):  # bounded; runs until the damaged adapters have been tried
            if stop.is_set():
                return
            m = random.Random(worker * 1000 + i).choice(list(expected))
            start = time.monotonic()
            r = user.post("/v1/completions", json=body(m))
            spans.append((start, time.monotonic()))
            seen.append((m, r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text))

    with ThreadPoolExecutor(3) as pool:
        workers = [pool.submit(load, w) for w in range(3)]
        wait_for(lambda: len(seen) >= 3, 30, "load running")
        for adapter_id, how in victims.items():  # never used before, so nothing of them is resident
            corrupt(srv.store / "adapters" / adapter_id / "adapter.safetensors", how)
        failures = {}
        window = [time.monotonic()]
        for adapter_id in victims:
            for _ in range(2):  # the second attempt fails fast from the remembered failure
                start = time.monotonic()
                r = user.post("/v1/completions", json=body(adapter_id))
                failures.setdefault(adapter_id, []).append((r.status_code, r.json()["error"], time.monotonic() - start))
        window.append(time.monotonic())
        stop.set()
        for w in workers:
            w.result(120)
    for adapter_id, answers in failures.items():
        for status, error, _ in answers:  # 424 (failed dependency), naming the adapter: not 404, not 5xx
            assert status == 424 and error["code"] == "adapter_load_failed", (adapter_id, status, error)
            assert adapter_id in error["message"] and error["param"] == "model"
        assert answers[1][2] < 5.0  # the second attempt fails at once
    assert any(a < window[1] and b > window[0] for a, b in spans)  # the load ran while they failed
    assert all(status == 200 and text == expected[m] for m, status, text in seen), \
        [s for s in seen if s[1] != 200][:3]
    assert srv.client().get("/health").status_code == 200 and srv.client().get("/ready").status_code == 200
    listed = {a["id"] for a in admin.get("/v1/adapters").json()["data"]}
    assert set(good) <= listed
    for m in good:  # still serving, unaffected
        assert text_of(user.post("/v1/completions", json=body(m))) == expected[m]


def test_concurrent_upload_and_delete_of_one_id_stay_consistent(srv, tiny_llama):  # rows 9, 25, 26
    admin, user = srv.client(timeout=90), srv.client(timeout=90)
    versions = {"A": compiled_bytes(tiny_llama, "lora", 4, seed=51), "B": compiled_bytes(tiny_llama, "mor", 4, seed=52)}
    digest = {v: hashlib.sha256(b).hexdigest() for v, b in versions.items()}
    outputs = {}
    for v, blob in versions.items():
        assert admin.post("/v1/adapters", **multipart(f"race-ref-{v}", {"a.safetensors": blob})).status_code == 201
        outputs[v] = text_of(user.post("/v1/completions", json=body(f"race-ref-{v}")))
    assert outputs["A"] != outputs["B"]
    log: list[tuple[str, str, int, str]] = []

    def worker(w: int) -> None:
        rng = random.Random(w)
        for _ in range(10):
            op = rng.choice(("upload", "upload", "delete", "generate"))
            if op == "upload":
                v = rng.choice("AB")
                r = admin.post("/v1/adapters", **multipart("race", {"a.safetensors": versions[v]}))
                log.append((op, v, r.status_code, ""))
            elif op == "delete":
                r = admin.delete("/v1/adapters/race")
                log.append((op, "", r.status_code, ""))
            else:
                r = user.post("/v1/completions", json=body("race"))
                log.append((op, "", r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else ""))

    with ThreadPoolExecutor(4) as pool:
        for f in [pool.submit(worker, w) for w in range(4)]:
            f.result(180)
    allowed = {"upload": {201, 409}, "delete": {200, 404}, "generate": {200, 404}}
    assert all(status in allowed[op] for op, _, status, _ in log), [x for x in log if x[2] not in allowed[x[0]]]
    # a generation saw exactly one whole version, never the base and never a mix
    assert all(text in outputs.values() for op, _, status, text in log if op == "generate" and status == 200)
    uploads = sum(1 for op, _, s, _ in log if op == "upload" and s == 201)
    deletes = sum(1 for op, _, s, _ in log if op == "delete" and s == 200)
    assert uploads - deletes in (0, 1), (uploads, deletes)  # successful uploads and deletes alternate
    got = admin.get("/v1/adapters/race")
    listed = [a["id"] for a in admin.get("/v1/adapters").json()["data"]].count("race")
    if uploads - deletes == 1:
        assert got.status_code == 200 and listed == 1
        version = next(v for v, d in digest.items() if d == got.json()["digest"])
        assert text_of(user.post("/v1/completions", json=body("race"))) == outputs[version]
    else:
        assert got.status_code == 404 and listed == 0
        assert user.post("/v1/completions", json=body("race")).status_code == 404
    wait_for(lambda: not any((srv.store / "tmp").iterdir()), 5, "no staged or deleted leftovers in the store")


def test_burst_over_more_cold_adapters_than_slots_is_bounded(tmp_path, tiny_llama):  # row 21
    with LiveServer(tmp_path, "tiny-llama", "--max-slots", "2", "--max-running", "8", "--max-queue", "64",
                    "--max-model-len", "256") as srv:
        admin, user = srv.client(), srv.client(timeout=90)
        methods = ("lora", "dora", "mor", "edora", "aroma", "adalora", "lora", "dora")
        for i, method in enumerate(methods):
            blob = compiled_bytes(tiny_llama, method, 4, seed=60 + i, variable_rank=method in ("aroma", "adalora"))
            assert admin.post("/v1/adapters", **multipart(f"cold-{i}", {"a.safetensors": blob})).status_code == 201
        order = [f"cold-{i}" for i in range(8)] * 4
        random.Random(0).shuffle(order)
        start = time.monotonic()
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda m: (m, user.post("/v1/completions", json=body(m, 20))), order))
        elapsed = time.monotonic() - start
        assert elapsed < 75  # bounded: the slot wait is 30 s, and nothing hangs
        for m, r in answers:
            assert r.status_code in (200, 429) or r.status_code in FIVE_XX_DOCUMENTED, (m, r.status_code, r.text)
            if r.status_code != 200:
                assert r.headers.get("retry-after") and r.json()["error"]["code"] in ("queue_full", "unavailable")
        ok = [(m, r) for m, r in answers if r.status_code == 200]
        assert len(ok) >= len(order) // 2, [r.status_code for _, r in answers]
        alone = {m: text_of(user.post("/v1/completions", json=body(m, 20))) for m in sorted(set(order))}
        assert all(text_of(r) == alone[m] for m, r in ok)  # each answer is its own adapter's, whatever the slot
        text = user.get("/metrics").text
        assert metric(text, "rankserve_adapters_resident", tier="gpu") <= 2
        assert metric(text, "rankserve_adapter_evictions_total", tier="gpu") >= 6
        assert metric(text, "rankserve_adapter_loads_total", result="error") == 0
        assert gauges(user) == (0.0, 0.0)
        assert user.get("/health").status_code == 200


def sse_events(stream) -> list[dict]:
    """Every `data:` event of an SSE response up to [DONE] (the stream must end: the test's timeout guards)."""
    out = []
    for line in stream.iter_lines():
        if line.startswith("data: "):
            if line == "data: [DONE]":
                break
            out.append(json.loads(line[6:]))
    return out


@pytest.mark.parametrize("fault", ["crash", "hang"])
def test_dead_or_hung_engine_tells_streams_then_the_process_exits_1(tmp_path, fault):  # row 30
    """A model step that raises (a CUDA error) or never returns (a wedged device): the stream in flight
    gets an error event and [DONE] instead of hanging, /health says why with 503, and the process exits 1
    on its own so its supervisor restarts it."""
    args = ["--max-model-len", "512", "--unhealthy-exit-after", "3"]
    if fault == "hang":
        args += ["--hang-timeout", "2"]
    server = LiveServer(tmp_path, "tiny-llama", *args, module="tests.fault_server",
                        env={"RANKSERVE_TEST_FAULT": f"{fault}:10"})
    with server:
        user = server.client(timeout=60)
        started = time.monotonic()
        with user.stream("POST", "/v1/completions", json=body("tiny-llama", 300, stream=True)) as s:
            events = sse_events(s)
        told_after = time.monotonic() - started
        health = user.get("/health")  # within the 3 s before the exit
        assert health.status_code == 503, health.text
        assert ("injected device fault" if fault == "crash" else "hang timeout 2 s") in health.json()["detail"]
        assert user.get("/ready").status_code == 503
        tokens = [e for e in events if "choices" in e and e["choices"] and e["choices"][0]["text"]]
        assert 1 <= len(tokens) < 300  # it streamed, then stopped at the fault
        assert "error" in events[-1] and events[-1]["error"]["code"] == "unavailable", events[-1]
        if fault == "hang":  # told by the watchdog after the hang timeout, not at the 600 s request deadline
            assert 2 <= told_after < 30
            assert "hang timeout" in events[-1]["error"]["message"]
        assert server.proc.wait(timeout=60) == 1
        logged = [e for e in server.log_events() if e.get("msg", "").startswith("engine unhealthy")]
        assert logged, server.common.logs()[-2000:]
