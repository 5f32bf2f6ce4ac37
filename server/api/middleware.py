"""The HTTP edge every request crosses: request id, draining, the JSON body cap, metrics, access log, and
the OpenAI error envelope for every error (ours, the store's, FastAPI's 422/404/405, and crashes).

A pure ASGI middleware rather than BaseHTTPMiddleware, so streaming responses and client disconnects pass
through untouched. The metrics' ``endpoint`` label is the matched route template (FastAPI writes it into
the scope), never the raw path, which would carry adapter ids (unbounded cardinality).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.common.auth import AuthenticationFailed, PermissionDenied, RateLimited
from server.common.errors import QueueFull, RequestTimeout, ServingError, Unavailable, UnknownAdapter
from server.common.logs import event, request_id_var
from server.common.metrics import Metrics

PROBES = frozenset({"/health", "/ready", "/metrics"})
OPEN_PATHS = PROBES | {"/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc", "/version"}
UPLOAD_ROUTE = ("POST", "/v1/adapters")  # streams its own body under --max-upload-bytes
_STORE_PARAMS = {"InvalidAdapterId": "adapter_id", "AdapterExists": "adapter_id", "AdapterNotFound": "adapter_id",
                 "InvalidAdapter": "files", "AdapterTooLarge": "files", "PickleRefused": "files"}
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|[a-z]+\[.*\]|function-.*|[A-Z]\w*)$")  # pydantic's union branch names
_RID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_STATUS_CODES = {400: "bad_request", 401: "invalid_api_key", 403: "insufficient_permissions", 404: "not_found",
                 405: "method_not_allowed", 408: "request_timeout", 409: "conflict", 413: "payload_too_large",
                 415: "unsupported_media_type", 422: "invalid_parameter", 429: "rate_limit_exceeded",
                 500: "internal_error", 503: "unavailable", 504: "deadline_exceeded", 507: "insufficient_storage"}


class BodyTooLarge(ServingError):
    http_status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


def error_payload(status: int, message: str, param: str | None = None, code: str | None = None,
                  type_: str | None = None) -> dict:
    if type_ is None:
        type_ = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": type_, "param": param, "code": code or _STATUS_CODES.get(status)}}


def describe_error(exc: BaseException) -> tuple[int, dict, float | None]:
    """(status, envelope, retry_after) for a ServingError or any error carrying ``http_status`` (the store's)."""
    if isinstance(exc, ServingError):
        return exc.http_status, error_payload(exc.http_status, exc.message, exc.param, exc.code, exc.type), exc.retry_after
    status = int(getattr(exc, "http_status", 500))
    problems = getattr(exc, "problems", None)
    message = "; ".join(problems) if problems else (str(exc) or type(exc).__name__)
    if isinstance(exc, KeyError) and exc.args:  # str(KeyError) quotes its argument
        message = str(exc.args[0])
    code = getattr(exc, "code", None)
    if not isinstance(code, str):
        code = re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()
    param = getattr(exc, "param", None) or _STORE_PARAMS.get(type(exc).__name__)
    return status, error_payload(status, message, param, code), getattr(exc, "retry_after", None)


def reject_reason(exc: BaseException, status: int) -> str | None:
    """The ``requests_rejected_total`` reason for an error answered before any work ran (bounded set)."""
    if isinstance(exc, QueueFull):
        return "queue_full"
    if isinstance(exc, RateLimited):
        return "rate_limited"
    if isinstance(exc, AuthenticationFailed | PermissionDenied):
        return "auth"
    if isinstance(exc, UnknownAdapter):
        return "unknown_adapter"
    if isinstance(exc, Unavailable):
        return "unavailable"
    if status in (400, 413, 415, 422):
        return "validation"
    return None


def json_error(status: int, payload: dict, retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
    return JSONResponse(payload, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    def respond(exc: BaseException) -> JSONResponse:
        status, payload, retry_after = describe_error(exc)
        reason = reject_reason(exc, status)
        if reason is not None:
            metrics.rejected.labels(reason=reason).inc()
        if status >= 500:
            event("request failed", logging.WARNING, status=status, error=payload["error"]["message"])
        return json_error(status, payload, retry_after)

    async def serving_error(request: Request, exc: Exception) -> JSONResponse:
        return respond(exc)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        """Pydantic's errors as one 400 (as OpenAI and vLLM answer), naming every offending field."""
        assert isinstance(exc, RequestValidationError)
        parts, param = [], None
        for e in exc.errors():
            loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path") and not _UNION_TAG.match(str(x))]
            if e.get("type") == "json_invalid":
                parts.append(f"malformed JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
                continue
            name = ".".join(loc)
            if e.get("type") == "extra_forbidden":
                msg = "not supported by this server (unknown field)"
            else:
                msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
            if not name and re.match(r"^[a-z_]+: ", msg):  # model validators name their field first
                name = msg.split(":", 1)[0]
            param = param or name or None
            part = f"{name}: {msg}" if name and not msg.startswith(name + ":") else msg
            if part not in parts:
                parts.append(part)
        metrics.rejected.labels(reason="validation").inc()
        return json_error(400, error_payload(400, "; ".join(parts) or "invalid request", param, "invalid_parameter"))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.url.path}"
        elif exc.status_code == 405:
            detail = f"method {request.method} is not allowed on {request.url.path}"
        return JSONResponse(error_payload(exc.status_code, detail), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    app.add_exception_handler(ServingError, serving_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    for cls in _store_error_classes():
        app.add_exception_handler(cls, serving_error)


def _store_error_classes() -> list[type[Exception]]:
    """The store's and the format's errors carry http_status; map them without importing what is absent."""
    classes: list[type[Exception]] = []
    try:
        from adapters_store.format import AdapterFormatError

        classes.append(AdapterFormatError)
    except ImportError:
        pass
    try:
        from adapters_store import store as store_mod

        for obj in vars(store_mod).values():
            if isinstance(obj, type) and issubclass(obj, Exception) and hasattr(obj, "http_status"):
                classes.append(obj)
    except ImportError:
        pass
    return classes


class EdgeMiddleware:
    """Request id, draining 503, JSON body cap (413 while reading), in-flight count, metrics, access log."""

    def __init__(self, app: ASGIApp, state) -> None:
        self.app = app
        self.state = state  # server.state.ServerState

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state, metrics = self.state, self.state.metrics
        path, method = scope["path"], scope["method"]
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _RID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)
        probe = path in OPEN_PATHS
        status = [499]  # stays 499 (client closed) if no response starts
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        if not probe:
            state.inflight += 1
        try:
            if state.draining and not probe:
                metrics.rejected.labels(reason="unavailable").inc()
                await json_error(503, error_payload(503, "the server is draining (shutting down)", code="unavailable"),
                                 retry_after=5)(scope, receive, send_with_id)
                return
            if not probe and state.keys.enabled and not await self._authenticate(scope, headers, receive,
                                                                                  send_with_id):
                return  # 401 or 429 before a byte of the body is read (RELIABILITY row 42)
            if method in ("POST", "PUT", "PATCH") and (method, path) != UPLOAD_ROUTE:
                try:
                    receive = await self._read_body(headers, receive)
                except (BodyTooLarge, RequestTimeout) as e:
                    metrics.rejected.labels(reason="validation").inc()
                    await json_error(e.http_status, describe_error(e)[1])(scope, receive, send_with_id)
                    return
                if receive is None:  # the client left while sending its body
                    return
            await self.app(scope, receive, send_with_id)
        except Exception:
            logging.getLogger("rankserve").exception("unhandled error serving %s %s", method, path)
            if status[0] == 499:
                await json_error(500, error_payload(500, "internal server error"))(scope, receive, send_with_id)
        finally:
            if not probe:
                state.inflight -= 1
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - started
            metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()
            metrics.request_duration.labels(endpoint=endpoint).observe(elapsed)
            if not (probe and status[0] < 400):  # probes would drown the log
                principal = scope.get("state", {}).get("principal")
                event("request", method=method, endpoint=endpoint, status=status[0],
                      duration_ms=round(elapsed * 1000, 2), key_id=getattr(principal, "key_id", None),
                      user=scope.get("state", {}).get("user"))
            request_id_var.reset(token)

    async def _authenticate(self, scope: Scope, headers: dict[bytes, bytes], receive: Receive, send: Send) -> bool:
        """The key, checked before the body is read; the principal is kept for the route's dependency. An
        address that sent too many bad keys gets 429 before any key is compared."""
        state = self.state
        address = (scope.get("client") or ("-",))[0]
        try:
            state.bad_keys.check(address)
            scope["state"]["principal"] = state.keys.authenticate(
                headers.get(b"authorization", b"").decode("latin-1") or None,
                headers.get(b"x-api-key", b"").decode("latin-1") or None)
            return True
        except (AuthenticationFailed, RateLimited) as e:
            if isinstance(e, AuthenticationFailed):
                state.bad_keys.failed(address)
            status, payload, retry_after = describe_error(e)
            state.metrics.rejected.labels(reason=reject_reason(e, status)).inc()
            await json_error(status, payload, retry_after)(scope, receive, send)
            return False

    async def _read_body(self, headers: dict[bytes, bytes], receive: Receive) -> Receive | None:
        """Read the whole (small, JSON) body under the cap, stopping at the first byte over it; replay it."""
        limit = self.state.settings.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes "
                               "(--max-body-bytes)")
        chunks, size = [], 0
        timeout = self.state.settings.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except asyncio.TimeoutError:
                raise RequestTimeout(f"the request body did not arrive within {timeout:g} s (--body-timeout)") from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes (--max-body-bytes)")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the real channel, so disconnects are still seen

        return replay
