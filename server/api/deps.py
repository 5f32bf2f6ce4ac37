"""Request-scoped helpers shared by the routes: the server state, authentication and rate limiting as
FastAPI dependencies, the `model` field's meaning, and client-disconnect watching."""

from __future__ import annotations

import asyncio

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.api.schemas import ErrorResponse
from server.common.auth import Principal
from server.state import ServerState

bearer = HTTPBearer(auto_error=False, description="an API key: Authorization: Bearer <key>")
HUNG_GRACE_S = 5.0  # past the deadline, the engine itself should have answered 504; this guards a hung one
ERROR_RESPONSES: dict = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 413, 422, 429, 503, 504)}


def get_state(request: Request) -> ServerState:
    return request.app.state.rankserve


async def inference_principal(request: Request,
                              credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
    """401 for a missing or bad key, then 429 when this key's bucket is empty (other keys unaffected)."""
    state = get_state(request)
    principal = getattr(request.state, "principal", None)  # checked by the edge middleware before the body
    if principal is None:
        principal = state.keys.authenticate(request.headers.get("authorization"), request.headers.get("x-api-key"))
        request.state.principal = principal  # the access log records principal.key_id, never the key
    bucket = principal.key_id if state.keys.enabled else f"addr-{request.client.host if request.client else '-'}"
    state.limiter.check(bucket)
    return principal


async def admin_principal(request: Request, principal: Principal = Depends(inference_principal)) -> Principal:
    get_state(request).keys.require_admin(principal)
    return principal


def adapter_of(state: ServerState, model: str) -> str | None:
    """The adapter id a request's `model` names; None for the base model (its served name or --model)."""
    if model in (state.settings.base_name, state.settings.model):
        return None
    return model


async def wait_disconnect(request: Request) -> None:
    """Returns once the client has gone (after the body was read, the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def watch_disconnect(request: Request, on_disconnect) -> asyncio.Task:
    """A task calling ``on_disconnect()`` when the client goes; cancel it once the answer is sent."""

    async def watch() -> None:
        await wait_disconnect(request)
        on_disconnect()

    return asyncio.ensure_future(watch())
