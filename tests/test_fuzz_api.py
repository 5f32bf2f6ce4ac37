"""Property-based fuzzing of the whole HTTP API against a real server (RELIABILITY rows 34, 35, 37, 45).

The server is the app in-process (TestClient) over the real engine thread and a real store holding generate
and classify adapters of two tenants and public ones, with inference and admin keys configured. Each
hypothesis example is a sequence of 1-3 requests drawn from every route's strategies (tests/fuzz_http.py,
tests/fuzz_uploads.py). After each request: status < 500 and one the route documents, 4xx bodies in the
OpenAI error envelope, streams ending with one `data: [DONE]`, no unknown field or non-finite number
accepted, the engine idle again and alive, the real adapters untouched. After the run: /health and /ready
are 200, every real adapter still serves, and every stored file has its original sha256.

A request that kills the engine fails its example; the next example gets a fresh server over the same
store, so hypothesis can still shrink the killer to its smallest form.

Sizes, measured on the 2-core machine: ~100-110 requests/s (about half are refused at the edge in 2-4 ms,
the rest generate 1-4 tokens or classify in 5-15 ms; hypothesis itself takes a quarter of the time). The
short run (default suite) is ~1,500 requests, ~14 s plus ~6 s of set-up; the long run (-m slow) ~12,000
requests, ~2 minutes, from LONG_SEED, which it prints with the request count and rate when it ends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import traceback
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from tests import fuzz_http as fz
from tests.fuzz_uploads import uploads
from tests.util_server import app_client, compiled_bytes, multipart, peft_files, wait_for

SHORT_SEED, SHORT_EXAMPLES = 20261201, 880  # ~1,500 requests
LONG_SEED, LONG_EXAMPLES = 45_000_045, 7_000  # ~12,000 requests; the recorded seed: a finding replays from it
# ---- properties of every answer ---------------------------------------------------------------------------
class FuzzFailure(AssertionError):
    """A property the fuzzer found broken (one subclass per property)."""


class ServerError(FuzzFailure):
    """A 5xx, a request that killed the engine, a server error event in a stream, or the app raising."""


class UnexpectedStatus(FuzzFailure):
    """A status the route does not document (invalid parameters are 400, DESIGN section 4)."""


class BadEnvelope(FuzzFailure):
    """A 4xx or a stream's error event not in the OpenAI error envelope, or a 429 with no Retry-After."""


class BrokenStream(FuzzFailure):
    """An SSE answer that is not JSON events ending with exactly one `data: [DONE]`."""


class BadAnswer(FuzzFailure):
    """A 2xx body not of the route's shape, or an answer without a valid X-Request-Id."""


class NotRefused(FuzzFailure):
    """A 2xx to a body with an unknown field (RELIABILITY row 37) or a non-finite number (row 34)."""


class Leak(FuzzFailure):
    """A request still counted in the engine or in flight after its answer (RELIABILITY rows 24, 25)."""


class StoreChanged(FuzzFailure):
    """A real adapter appeared, vanished or changed digest (only the fuzzer's own ids may come and go)."""


@dataclass
class Reply:
    status: int
    headers: dict  # lower-case names
    body: bytes
    traceback: str = ""


ENVELOPE = {"message", "type", "param", "code"}


TGI_ROUTES = frozenset({"/generate", "/generate_stream", "/"})  # answer errors in LoRAX's shape (its clients parse it)


def lorax_envelope_problem(payload) -> str | None:
    if (isinstance(payload, dict) and set(payload) == {"error", "error_type"} and isinstance(payload["error"], str)
            and payload["error"] and isinstance(payload["error_type"], str)):
        return None
    return "not LoRAX's {'error': str, 'error_type': str}"


def envelope_problem(payload) -> str | None:
    if not isinstance(payload, dict) or set(payload) != {"error"} or not isinstance(payload["error"], dict):
        return "not {'error': {...}}"
    err = payload["error"]
    if set(err) != ENVELOPE:
        return f"error fields {sorted(err)} are not {sorted(ENVELOPE)}"
    if not (isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)):
        return "message and type must be non-empty strings"
    if not all(err[k] is None or isinstance(err[k], str) for k in ("param", "code")):
        return "param and code must be strings or null"
    return None


def check_stream(body: bytes, where: str) -> None:
    try:
        blocks = body.decode("utf-8").split("\n\n")
    except UnicodeDecodeError as e:
        raise BrokenStream(f"the SSE body is not UTF-8 ({e}): {where}") from None
    if blocks[-1] != "" or not all(b.startswith("data: ") for b in blocks[:-1]):
        raise BrokenStream(f"the SSE body is not `data: ...` events each ending in a blank line: {where}")
    payloads = [b[len("data: "):] for b in blocks[:-1]]
    if not payloads or payloads[-1] != "[DONE]" or payloads.count("[DONE]") != 1:
        raise BrokenStream(f"the SSE body does not end with exactly one `data: [DONE]`: {where}")
    finishes, errors = [], []
    for text in payloads[:-1]:
        try:
            event = json.loads(text)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            raise BrokenStream(f"SSE event {text[:200]!r} is not a JSON object: {where}")
        if "error" in event:
            errors.append(event)
        finishes += [(c.get("index"), c["finish_reason"]) for c in event.get("choices", []) if c.get("finish_reason")]
    for event in errors:
        if (problem := envelope_problem(event)) is not None:
            raise BadEnvelope(f"SSE error event: {problem}: {where}")
        if event["error"]["type"] == "server_error":
            raise ServerError(f"an SSE error event of the server's own: {where}")
    if not errors and (not finishes or any(f not in ("stop", "length") for _, f in finishes)):
        raise BrokenStream(f"finish_reasons {finishes}, not each one of stop or length: {where}")
    if not errors and sorted(i for i, _ in finishes) != list(range(len(finishes))):
        raise BrokenStream(f"choices {[i for i, _ in finishes]} do not each finish once, numbered 0, 1, ...: {where}")


def check(req: fz.Req, reply: Reply) -> None:
    """Every property an answer to ``req`` must have; raises the failure's class naming request and answer."""
    where = f"{req!r}\n  -> {reply.status} {reply.body[:800]!r}"
    if reply.traceback:
        where += "\n  server traceback:\n" + reply.traceback
    if reply.status >= 500:
        raise ServerError(where)
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", reply.headers.get("x-request-id", "")):
        raise BadAnswer(f"no valid X-Request-Id: {where}")
    if req.statuses is not None and reply.status not in req.statuses:
        raise UnexpectedStatus(f"{reply.status} is not one of {sorted(req.statuses)}: {where}")
    if req.method == "HEAD" or 300 <= reply.status < 400:
        return
    if reply.status >= 400:
        try:
            payload = json.loads(reply.body)
        except ValueError:
            payload = None
        problem = envelope_problem(payload)
        if problem is not None and req.method == "POST" and req.path in TGI_ROUTES:  # auth refusals: OpenAI's
            problem = lorax_envelope_problem(payload) and problem
        if problem is not None:
            raise BadEnvelope(f"{problem}: {where}")
        if reply.status == 429 and "retry-after" not in reply.headers:
            raise BadEnvelope(f"429 without Retry-After: {where}")
        return
    if reply.headers.get("content-type", "").startswith("text/event-stream"):
        check_stream(reply.body, where)
    elif req.expect is not None:
        try:
            payload = json.loads(reply.body)
        except ValueError:
            raise BadAnswer(f"the 2xx body is not JSON: {where}") from None
        if not isinstance(payload, dict) or payload.get("object") != req.expect:
            raise BadAnswer(f"the 2xx body is not an {req.expect!r} object: {where}")
        choices = payload.get("choices", [{"index": 0, "finish_reason": "stop"}])
        if not choices or any(c.get("finish_reason") not in ("stop", "length") for c in choices):
            raise BadAnswer(f"not every choice finished by stop or length: {where}")
        if [c.get("index") for c in choices] != list(range(len(choices))):
            raise BadAnswer(f"choice indices are not 0, 1, ... in order: {where}")
    if req.refuse:
        raise NotRefused(f"answered, not refused ({'; '.join(req.refuse)}): {where}")


# ---- the server under fuzz ---------------------------------------------------------------------------------
class Tracebacks(logging.Handler):
    """The server's logged exceptions since the last request, printed beside a failing one."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.texts.append("".join(traceback.format_exception(*record.exc_info))[-3000:])


class FuzzTarget:
    """The server under fuzz, started afresh over the same store when a request has killed its engine."""

    def __init__(self, store_dir, real: dict[str, bytes], blobs: dict[str, bytes]):
        self.store_dir, self.blobs = store_dir, blobs
        # (id, owning tenant or None) -> sha256: ids are namespaced per tenant
        self.digests = {(i, fz.ADAPTERS[i][1]): hashlib.sha256(b).hexdigest() for i, b in real.items()}
        self.sent, self.restarts, self.statuses = 0, 0, Counter()
        self.tracebacks = Tracebacks()
        self._stack: ExitStack | None = None

    def start(self) -> None:
        self._stack = ExitStack()
        # bad_key_rate off: every request comes from the one test client address, so after 20 bad keys the
        # brute-force guard would answer 429 to everything (it has its own tests in test_http_auth.py)
        self.client, self.state = self._stack.enter_context(app_client(
            fz.BASE, self.store_dir, engine_opts={"hang_timeout_s": 20.0}, api_keys=fz.API_KEYS,
            admin_keys=fz.ADMIN_KEYS, max_body_bytes=64 << 10, max_upload_bytes=256 << 10,
            request_timeout=20.0, bad_key_rate=0.0))
        logging.getLogger("rankserve").addHandler(self.tracebacks)

    def stop(self) -> None:
        logging.getLogger("rankserve").removeHandler(self.tracebacks)
        if self._stack is not None:
            self._stack.close()

    @property
    def engine(self):
        return self.state.runtime.engine

    def reset(self) -> None:
        """Before each example, so that it replays alike: a live engine, and none of the fuzzer's uploads."""
        if not self.engine.healthy:  # an earlier example killed it
            self.stop()
            self.start()
            self.restarts += 1
        admin = {"Authorization": f"Bearer {fz.ADMIN}"}
        for r in self.state.runtime.store.list():
            if r.id.startswith(fz.UPLOAD_PREFIX):
                deleted = self.client.delete(f"/v1/adapters/{r.id}{fz.owner_query(r.owner)}", headers=admin)
                assert deleted.status_code == 200, deleted.text

    def send(self, req: fz.Req) -> Reply:
        self.tracebacks.texts.clear()
        self.sent += 1
        request = self.client.build_request(req.method, req.path, headers=req.headers, content=req.body)
        try:
            r = self.client.send(request, stream=True, follow_redirects=False)
            try:
                body = r.read()
            finally:
                r.close()
            reply = Reply(r.status_code, {k.lower(): v for k, v in r.headers.items()}, body)
        except Exception:  # the app raised past every handler (the TestClient re-raises it here)
            reply = Reply(500, {}, b"", traceback.format_exc()[-3000:])
        reply.traceback = reply.traceback or "\n".join(self.tracebacks.texts)
        self.statuses[(req.route, reply.status)] += 1
        return reply

    def settle(self, failed: bool, timeout: float = 5.0) -> bool:
        """True once the engine holds no request and nothing is in flight, or once it died; False if neither
        within ``timeout``. After a failed request the engine thread gets 0.2 s to die: it may answer the
        request just before it raises."""
        start = time.monotonic()
        while (waited := time.monotonic() - start) < timeout:
            if not self.engine.healthy:
                return True
            idle = (self.engine.num_running, self.engine.num_waiting, self.state.inflight) == (0, 0, 0)
            if idle and (not failed or waited > 0.2):
                return True
            time.sleep(0.002)
        return False

    def run(self, req: fz.Req) -> None:
        """One request, then every property of its answer and of the server after it."""
        reply = self.send(req)
        settled = self.settle(failed=reply.status >= 500 or b'"server_error"' in reply.body)
        if not self.engine.healthy:
            raise ServerError(f"{req!r} killed the engine: {self.engine.failure}\n  -> {reply.status} "
                              f"{reply.body[:300]!r}\n{reply.traceback}")
        check(req, reply)
        if not settled:
            raise Leak(f"{req!r} is still in the engine or in flight 5 s after its answer")
        records = self.state.runtime.store.list()
        stored = {(r.id, r.owner): r.digest for r in records if not r.id.startswith(fz.UPLOAD_PREFIX)}
        if stored != self.digests:
            raise StoreChanged(f"{req!r} changed the store: {stored} != {self.digests}")

    def assert_intact(self) -> None:
        """After a run: healthy, nothing left in the engine, every adapter serves, every file as uploaded."""
        assert self.client.get("/health").json() == {"status": "ok"} and self.engine.healthy
        assert self.client.get("/ready").status_code == 200
        wait_for(lambda: (self.engine.num_running, self.engine.num_waiting, self.state.inflight) == (0, 0, 0),
                 what="no request running, waiting or in flight")
        key_of = {None: fz.INFER_PLAIN, "tenantA": fz.INFER_A, "tenantB": fz.INFER_B}
        for adapter_id in fz.GENERATE_IDS + fz.CLASSIFY_IDS:
            owner = fz.ADAPTERS[adapter_id][1] if adapter_id in fz.ADAPTERS else None
            headers = {"Authorization": f"Bearer {key_of[owner]}"}
            if adapter_id in fz.CLASSIFY_IDS:
                r = self.client.post("/v1/classify", headers=headers,
                                     json={"model": adapter_id, "input": ["a", "b"]})
                assert r.status_code == 200 and len(r.json()["data"]) == 2, r.text
                continue
            body = {"model": adapter_id, "prompt": "Hello", "max_tokens": 3, "temperature": 0,
                    "ignore_eos": True}
            r = self.client.post("/v1/completions", headers=headers, json=body)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
        self.reset()
        store = self.state.runtime.store
        assert {(r.id, r.owner) for r in store.list()} == set(self.digests)
        on_disk = {(i, o): hashlib.sha256(store.read_bytes(i, owner=o)).hexdigest() for i, o in self.digests}
        assert on_disk == self.digests, "a stored adapter's bytes changed"


def start_target(store_dir, tiny_llama) -> FuzzTarget:
    """A server over a store holding ``fz.ADAPTERS``, each uploaded by its owner's admin key."""
    from adapters_store.synth import random_adapter

    assert tiny_llama.model.config.vocab_size == fz.VOCAB
    nan = random_adapter(tiny_llama, "lora", 4, seed=9)
    next(iter(nan.modules.values())).lora_b[0, 0] = float("nan")
    real = {"gen-pub": compiled_bytes(tiny_llama, "lora", 4, seed=1),
            "cls-pub": compiled_bytes(tiny_llama, "lora", 4, seed=2, task="classify", labels=["neg", "pos"]),
            "gen-a": compiled_bytes(tiny_llama, "dora", 4, seed=3),
            "cls-b": compiled_bytes(tiny_llama, "lora", 2, seed=4, task="classify", labels=["a", "b", "c"])}
    peft = peft_files(tiny_llama.model, seed=5)
    blobs = {"gen": compiled_bytes(tiny_llama, "lora", 4, seed=6),
             "cls": compiled_bytes(tiny_llama, "lora", 4, seed=7, task="classify", labels=["x", "y"]),
             "rank": compiled_bytes(tiny_llama, "lora", 64, seed=8), "nan": nan.to_bytes(),
             "mor": compiled_bytes(tiny_llama, "mor", 4, seed=10, compact=True),  # MoR's compact form: expanded at load
             "peft_config": peft["adapter_config.json"], "peft_weights": peft["adapter_model.safetensors"]}
    target = FuzzTarget(store_dir, real, blobs)
    target.start()
    uploader = {None: fz.ADMIN, "tenantA": fz.ADMIN_A, "tenantB": fz.ADMIN_B}
    for adapter_id, (_, owner) in fz.ADAPTERS.items():
        r = target.client.post("/v1/adapters", headers={"Authorization": f"Bearer {uploader[owner]}"},
                               **multipart(adapter_id, {f"{adapter_id}.safetensors": real[adapter_id]}))
        assert r.status_code == 201 and r.json()["digest"] == target.digests[adapter_id, owner], r.text
        assert r.json()["owner"] == owner
    return target


@pytest.fixture(scope="module")
def target(tmp_path_factory, tiny_llama):
    t = start_target(tmp_path_factory.mktemp("fuzz-store"), tiny_llama)
    yield t
    t.stop()


def any_request(blobs: dict[str, bytes]):
    """One request to any route; completions, where the engine works hardest, twice as often."""
    return st.one_of(fz.completions(), fz.chat_completions(), fz.classify(), fz.completions(), uploads(blobs),
                     fz.get_adapter(), fz.delete_adapter(), fz.listings(), fz.probes(), fz.misc())


def fuzz(target: FuzzTarget, examples: int, at_seed: int) -> int:
    """``examples`` generated sequences of 1-3 requests (1.8 on average) from ``at_seed``, each request
    checked, then the whole server; returns the number of requests sent. A sequence lets an upload be used
    or deleted by what follows, and each starts from the same store, so a failing one replays and shrinks."""
    sent, restarts, started = target.sent, target.restarts, time.monotonic()

    @seed(at_seed)
    @settings(max_examples=examples, deadline=None, database=None, print_blob=True,
              report_multiple_bugs=False, phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much, HealthCheck.large_base_example])
    @given(requests=st.lists(any_request(target.blobs), min_size=1, max_size=3))
    def sequence(requests: list[fz.Req]) -> None:
        target.reset()
        for req in requests:
            target.run(req)

    try:
        sequence()
    finally:
        n, elapsed = target.sent - sent, time.monotonic() - started
        statuses = Counter()
        for (_, status), count in target.statuses.items():
            statuses[status] += count
        print(f"\nfuzz seed {at_seed}: {n} requests in {elapsed:.1f} s ({n / elapsed:.0f}/s), "
              f"{target.restarts - restarts} engine restarts; statuses so far: "
              f"{dict(sorted(statuses.items()))}")
    assert target.restarts == restarts, "the engine died between two requests"
    target.assert_intact()
    return target.sent - sent


def test_fuzz_every_route_short(target):
    fuzz(target, SHORT_EXAMPLES, SHORT_SEED)


@pytest.mark.slow
def test_fuzz_every_route_long(target):
    assert fuzz(target, LONG_EXAMPLES, LONG_SEED) >= 10_000
