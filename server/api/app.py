"""The FastAPI application: routes only, no tensor math. The engine runs in its own thread; nothing here
waits on the model except through the engine's queue and events.

`create_app(settings)` loads the base model, store and engine in a background thread after start-up (so
/health and /ready answer at once: /ready is 503 until loaded); tests pass a prebuilt `Runtime`.
Probes and /metrics never touch the engine's queue, so they stay fast under saturation.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.api import adapters, classify, completions, models, probes, tgi, tokenize, vllm_adapters
from server.api.middleware import EdgeMiddleware, install_error_handlers
from server.common.config import Settings
from server.common.metrics import Metrics
from server.state import Runtime, ServerState, start_loading


def create_app(settings: Settings, runtime: Runtime | None = None, metrics: Metrics | None = None,
               on_load_failure=None) -> FastAPI:
    state = ServerState.create(settings, metrics, runtime)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.runtime is None:
            start_loading(state, on_load_failure)
        try:
            yield
        finally:
            state.close(stop_engine=runtime is None)  # an engine the app loaded is the app's to stop

    app = FastAPI(title="rankserve", version=tokenize.VERSION, lifespan=lifespan,
                  description="OpenAI-compatible serving of many low-rank adapters on one base model")
    app.state.rankserve = state
    install_error_handlers(app, state.metrics)
    app.add_middleware(EdgeMiddleware, state=state)
    for module in (completions, classify, tgi, adapters, vllm_adapters, models, probes, tokenize):
        app.include_router(module.router)
    return app
