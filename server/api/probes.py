"""Probes and metrics: never touch the engine's queue, so they stay fast under saturation."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.api.deps import get_state

router = APIRouter(tags=["probes"])


@router.get("/health")
async def health(request: Request):
    """Liveness: 503 when the engine thread is dead or hung, or loading failed."""
    state = get_state(request)
    failure = state.failure
    if failure is not None:
        return JSONResponse({"status": "unhealthy", "detail": failure}, status_code=503)
    return {"status": "ok"}

@router.get("/ready")
async def ready(request: Request):
    """Readiness: 503 while loading, draining, or when the engine is unhealthy."""
    state = get_state(request)
    if state.ready:
        return {"status": "ready"}
    why = "draining" if state.draining else ("loading" if state.runtime is None and not state.load_error
                                              else "unhealthy")
    return JSONResponse({"status": why}, status_code=503, headers={"Retry-After": "5"})

@router.get("/metrics")
async def metrics(request: Request):
    """Prometheus text format."""
    state = get_state(request)
    if state.runtime is not None:
        engine = state.runtime.engine
        state.metrics.running.set(engine.num_running)
        state.metrics.waiting.set(engine.num_waiting)
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
