"""The FastAPI application: routes only, no tensor math. The engine runs in its own thread; nothing here
waits on the model except through the engine's queue and events.

`create_app(settings)` loads the base model, store and engine in a background thread after start-up (so
/health and /ready answer at once: /ready is 503 until loaded); tests pass a prebuilt `Runtime`.
Probes and /metrics never touch the engine's queue, so they stay fast under saturation.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from server.adapters_api import router as adapters_router
from server.auth import Principal
from server.completions import HUNG_GRACE_S
from server.completions import router as completions_router
from server.config import Settings
from server.deps import ERROR_RESPONSES, adapter_of, get_state, inference_principal, watch_disconnect
from server.errors import DeadlineExceeded, InvalidParameter
from server.metrics import Metrics
from server.middleware import EdgeMiddleware, install_error_handlers
from server.schemas import Classification, ClassifyRequest, ClassifyResponse, ModelCard, ModelList
from server.state import Runtime, ServerState, start_loading

VERSION = "0.1.0"


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

    app = FastAPI(title="rankserve", version=VERSION, lifespan=lifespan,
                  description="OpenAI-compatible serving of many low-rank adapters on one base model")
    app.state.rankserve = state
    install_error_handlers(app, state.metrics)
    app.add_middleware(EdgeMiddleware, state=state)
    app.include_router(completions_router)
    app.include_router(adapters_router)
    _probes(app)
    _models_and_classify(app)
    return app


def _probes(app: FastAPI) -> None:
    @app.get("/health", tags=["probes"])
    async def health(request: Request):
        """Liveness: 503 when the engine thread is dead or hung, or loading failed."""
        state = get_state(request)
        failure = state.failure
        if failure is not None:
            return JSONResponse({"status": "unhealthy", "detail": failure}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready", tags=["probes"])
    async def ready(request: Request):
        """Readiness: 503 while loading, draining, or when the engine is unhealthy."""
        state = get_state(request)
        if state.ready:
            return {"status": "ready"}
        why = "draining" if state.draining else ("loading" if state.runtime is None and not state.load_error
                                                  else "unhealthy")
        return JSONResponse({"status": why}, status_code=503, headers={"Retry-After": "5"})

    @app.get("/metrics", tags=["probes"])
    async def metrics(request: Request):
        """Prometheus text format."""
        state = get_state(request)
        if state.runtime is not None:
            engine = state.runtime.engine
            state.metrics.running.set(engine.num_running)
            state.metrics.waiting.set(engine.num_waiting)
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _models_and_classify(app: FastAPI) -> None:
    @app.get("/v1/models", response_model=ModelList, tags=["models"], responses=ERROR_RESPONSES)
    async def models(request: Request, principal: Principal = Depends(inference_principal)):
        """The base model first, then every adapter this key may use."""
        state = get_state(request)
        rt = state.require()
        s = state.settings
        cards = [ModelCard(id=s.base_name, created=state.created, owned_by="rankserve", root=s.model,
                           max_model_len=rt.engine.max_model_len, task=",".join(rt.base.tasks))]
        for r in await run_in_threadpool(rt.store.list):
            if r.base_fingerprint != rt.base.fingerprint:  # another base's adapter: it would not load here
                continue
            if r.owner is None or r.owner == principal.tenant:  # exactly what inference will accept
                cards.append(ModelCard(id=r.id, created=int(getattr(r, "created_at", 0) or 0),
                                       owned_by=r.owner or "rankserve", root=r.id, parent=s.base_name,
                                       task=getattr(r, "task", None), method=getattr(r, "method", None)))
        return ModelList(data=cards)

    @app.post("/v1/classify", response_model=ClassifyResponse, tags=["classify"], responses=ERROR_RESPONSES)
    async def classify(body: ClassifyRequest, request: Request, principal: Principal = Depends(inference_principal)):
        """Label each input with a classify adapter: the top label and the score of every label."""
        state = get_state(request)
        engine = state.require().engine
        adapter_id = adapter_of(state, body.model)
        if adapter_id is None:
            raise InvalidParameter("classification needs a classify adapter id as `model` (it carries the head)",
                                   param="model")
        work = asyncio.ensure_future(engine.classify(adapter_id, body.texts, principal.tenant))
        watch = watch_disconnect(request, work.cancel)  # a gone client's job is skipped by the engine
        try:
            results = await asyncio.wait_for(work, state.settings.request_timeout + HUNG_GRACE_S)
        except asyncio.TimeoutError:  # the engine answers 504 itself at the deadline; this guards a hung one
            raise DeadlineExceeded("classification got no answer from the engine by its deadline") from None
        except asyncio.CancelledError:
            if watch.done() and not watch.cancelled():  # the client left: nobody reads an answer
                return Response(status_code=499)
            raise
        finally:
            watch.cancel()
        data = [Classification(index=i, label=label, scores=scores) for i, (label, scores) in enumerate(results)]
        return ClassifyResponse(id="clf-" + request.state.request_id, model=body.model, data=data)
