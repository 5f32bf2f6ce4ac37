"""API keys, tenants and rate limits over HTTP (RELIABILITY rows 13, 20, 32), plus the key ring and the
token bucket on their own."""

from __future__ import annotations

import json
import logging

import pytest

from server.common.auth import AuthenticationFailed, FailedKeyLimiter, KeyRing, RateLimited, RateLimiter
from tests.util_server import app_client, compiled_bytes, metric, multipart

INFER_A, INFER_B, INFER_PLAIN = "sk-infer-a", "sk-infer-b", "sk-infer-plain"
ADMIN, ADMIN_A = "sk-admin-global", "sk-admin-a"
KEYS = (INFER_A, INFER_B, INFER_PLAIN, ADMIN, ADMIN_A)


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


class Captured(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        from server.common.logs import JsonFormatter

        self.lines.append(JsonFormatter().format(record))


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    captured = Captured()
    logger = logging.getLogger("rankserve")
    logger.addHandler(captured)
    old = logger.level
    logger.setLevel(logging.INFO)
    with app_client("tiny-llama", tmp_path_factory.mktemp("store"),
                    api_keys=(f"{INFER_A}:tenantA", f"{INFER_B}:tenantB", INFER_PLAIN),
                    admin_keys=(ADMIN, f"{ADMIN_A}:tenantA"), bad_key_burst=100_000) as (client, state):
        client.captured = captured
        yield client, state
    logger.removeHandler(captured)
    logger.setLevel(old)


def complete(client, key, model, **kw):
    body = {"model": model, "prompt": "hello", "max_tokens": 2, **kw}
    return client.post("/v1/completions", json=body, headers=auth(key) if key else {})


ROUTES = [("GET", "/v1/models", None), ("POST", "/v1/completions", {"model": "tiny-llama", "prompt": "x"}),
          ("POST", "/v1/chat/completions", {"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}]}),
          ("POST", "/v1/classify", {"model": "x", "input": ["x"]}), ("GET", "/v1/adapters", None),
          ("GET", "/v1/adapters/x", None), ("DELETE", "/v1/adapters/x", None)]


@pytest.mark.parametrize("method, path, body", ROUTES)
@pytest.mark.parametrize("key", [None, "sk-wrong", INFER_A.upper(), INFER_A[:-1], INFER_A + "x"])
def test_missing_or_bad_key_is_401_on_every_non_probe_route(srv, method, path, body, key):  # row 32
    client, _ = srv
    r = client.request(method, path, json=body, headers=auth(key) if key else {})
    assert r.status_code == 401, r.text
    assert r.json()["error"]["type"] == "authentication_error"


def test_probes_and_metrics_need_no_key(srv):
    client, state = srv
    assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200
    text = client.get("/metrics").text
    assert metric(text, "rankserve_requests_rejected_total", reason="auth") > 0


def test_inference_keys_cannot_upload_or_delete(srv, tiny_llama):  # row 32
    client, state = srv
    blob = compiled_bytes(tiny_llama, seed=1)
    for key in (INFER_A, INFER_PLAIN):
        r = client.post("/v1/adapters", headers=auth(key), **multipart("pub", {"p.safetensors": blob}))
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert "pub" not in state.runtime.store
    assert client.post("/v1/adapters", headers=auth(ADMIN), **multipart("pub", {"p.safetensors": blob})).status_code == 201
    assert client.delete("/v1/adapters/pub", headers=auth(INFER_PLAIN)).status_code == 403
    assert complete(client, INFER_B, "pub").status_code == 200  # public adapters serve every tenant


def test_another_tenants_adapter_is_404(srv, tiny_llama):  # row 13
    client, state = srv
    r = client.post("/v1/adapters", headers=auth(ADMIN_A), **multipart("secret-a", {"s.safetensors": compiled_bytes(tiny_llama, seed=2)}))
    assert r.status_code == 201 and r.json()["owner"] == "tenantA"
    assert complete(client, INFER_A, "secret-a").status_code == 200
    for key in (INFER_B, INFER_PLAIN):
        r = complete(client, key, "secret-a")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert client.get("/v1/adapters/secret-a", headers=auth(key)).status_code == 404
        assert "secret-a" not in {m["id"] for m in client.get("/v1/models", headers=auth(key)).json()["data"]}
        assert "secret-a" not in {a["id"] for a in client.get("/v1/adapters", headers=auth(key)).json()["data"]}
    assert "secret-a" in {m["id"] for m in client.get("/v1/models", headers=auth(INFER_A)).json()["data"]}
    assert client.get("/v1/adapters/secret-a", headers=auth(ADMIN)).status_code == 404  # not a public adapter
    assert client.get("/v1/adapters/secret-a?owner=tenantA", headers=auth(ADMIN)).status_code == 200  # row 40
    assert client.delete("/v1/adapters/secret-a", headers=auth(ADMIN_A)).status_code == 200
    assert complete(client, INFER_A, "secret-a").status_code == 404


def test_a_tenant_admin_cannot_delete_public_adapters(srv, tiny_llama):
    client, state = srv
    blob = compiled_bytes(tiny_llama, seed=3)
    assert client.post("/v1/adapters", headers=auth(ADMIN), **multipart("shared", {"s.safetensors": blob})).status_code == 201
    assert client.delete("/v1/adapters/shared", headers=auth(ADMIN_A)).status_code == 403
    assert "shared" in state.runtime.store


def test_keys_never_reach_the_logs(srv):  # row 32
    client, _ = srv
    for key in KEYS:
        complete(client, key, "tiny-llama")
    complete(client, "sk-not-a-key", "tiny-llama")
    text = "\n".join(client.captured.lines)
    assert '"msg": "request"' in text and "key-" in text  # the access log names keys by digest
    for key in (*KEYS, "sk-not-a-key"):
        assert key not in text


def test_the_end_user_id_is_recorded_in_the_access_log(srv):
    client, _ = srv
    assert complete(client, INFER_A, "tiny-llama", user="end-user-42").status_code == 200
    lines = [json.loads(line) for line in client.captured.lines if '"end-user-42"' in line]
    assert [(r["msg"], r["endpoint"], r["user"]) for r in lines] == [("request", "/v1/completions", "end-user-42")]


def test_rate_limit_is_per_key(tmp_path):  # row 20
    with app_client("tiny-llama", tmp_path, api_keys=("k1", "k2"), rate_limit=0.5, rate_burst=2) as (client, state):
        assert [client.get("/v1/models", headers=auth("k1")).status_code for _ in range(2)] == [200, 200]
        r = client.get("/v1/models", headers=auth("k1"))
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(r.headers["Retry-After"]) <= 2
        assert client.get("/v1/models", headers=auth("k2")).status_code == 200  # other keys unaffected
        assert complete(client, "k1", "tiny-llama").status_code == 429
        assert metric(state.metrics.render().decode(), "rankserve_requests_rejected_total", reason="rate_limited") == 2
        assert client.get("/health").status_code == 200  # probes are never limited


def test_open_server_without_keys_allows_uploads(tmp_path, tiny_llama):
    with app_client("tiny-llama", tmp_path) as (client, _):
        r = client.post("/v1/adapters", **multipart("open", {"o.safetensors": compiled_bytes(tiny_llama, seed=4)}))
        assert r.status_code == 201


def test_key_ring_parses_tenants_and_compares_exactly():
    ring = KeyRing(api_keys=("abc:t1", "plain"), admin_keys=("root",))
    p = ring.authenticate("Bearer abc")
    assert (p.tenant, p.admin) == ("t1", False) and "abc" not in p.key_id
    assert ring.authenticate("bearer plain").tenant is None
    assert ring.authenticate(None, x_api_key="root").admin
    for bad in ("Bearer ABC", "Bearer ab", "Bearer abc:t1", "Basic abc", "Bearer "):
        with pytest.raises(AuthenticationFailed):
            ring.authenticate(bad)
    assert not KeyRing().enabled and KeyRing().authenticate(None).admin


def test_token_bucket_refills_at_the_rate():
    now = [0.0]
    rl = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [rl.take("a") for _ in range(3)] == [None, None, None]
    wait = rl.take("a")
    assert wait == pytest.approx(0.5)
    now[0] += 0.5
    assert rl.take("a") is None and rl.take("b") is None
    assert RateLimiter(0).take("a") is None


def test_a_key_with_an_empty_tenant_is_refused_at_start():  # row 42
    from server.common.config import Settings, check

    with pytest.raises(ValueError, match="empty tenant"):
        KeyRing(admin_keys=("root:",))
    with pytest.raises(ValueError, match="empty tenant"):
        check(Settings(admin_keys=("root: ",)))
    check(Settings(admin_keys=("root", "k:t")))


def test_bad_keys_are_rate_limited_per_address_before_any_compare(tmp_path):  # row 42
    with app_client("tiny-llama", tmp_path, api_keys=("good",), bad_key_rate=0.5, bad_key_burst=3) as (client, state):
        assert [client.get("/v1/models", headers=auth("guess")).status_code for _ in range(3)] == [401] * 3
        r = client.get("/v1/models", headers=auth("good"))  # the address is locked out, good key or not
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert client.get("/health").status_code == 200
        assert metric(state.metrics.render().decode(), "rankserve_requests_rejected_total", reason="auth") == 3


def test_failed_key_limiter_refills():
    now = [0.0]
    lim = FailedKeyLimiter(rate=1.0, burst=2, clock=lambda: now[0])
    lim.check("a")
    lim.failed("a")
    lim.failed("a")
    with pytest.raises(RateLimited):
        lim.check("a")
    lim.check("b")
    now[0] += 1.0
    lim.check("a")
    FailedKeyLimiter(rate=0).check("a")


def test_a_bad_key_is_answered_before_the_body_is_read(tmp_path):  # row 42
    import asyncio

    from server.api.app import create_app
    from server.common.config import Settings

    app = create_app(Settings(model="tiny-llama", store=str(tmp_path), api_keys=("good",)))
    reads, sent = [], []

    async def receive():
        reads.append(1)
        await asyncio.sleep(3600)  # a client that never sends its (large) body

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "headers": [(b"authorization", b"Bearer nope"), (b"content-length", b"1000000")],
             "client": ("10.0.0.9", 5555), "server": ("127.0.0.1", 8000), "scheme": "http", "root_path": "",
             "http_version": "1.1", "app": app}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 5))
    assert not reads and sent[0]["status"] == 401
