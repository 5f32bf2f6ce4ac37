"""POST /v1/classify: label texts with a classify adapter (the engine batches calls of any adapters)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from server.api.deps import (
    ERROR_RESPONSES,
    HUNG_GRACE_S,
    adapter_of,
    get_state,
    inference_principal,
    watch_disconnect,
)
from server.api.schemas import Classification, ClassifyRequest, ClassifyResponse
from server.common.auth import Principal
from server.common.errors import DeadlineExceeded, InvalidParameter
from server.engine.classify import encode

router = APIRouter(tags=["classify"])


@router.post("/v1/classify", response_model=ClassifyResponse, responses=ERROR_RESPONSES)
async def classify(body: ClassifyRequest, request: Request, principal: Principal = Depends(inference_principal)):
    """Label each input with a classify adapter: the top label and the score of every label."""
    state = get_state(request)
    rt = state.require()
    engine = rt.engine
    request.state.user = body.user  # the end-user id goes into the access log line
    adapter_id = adapter_of(state, body.model)
    if adapter_id is None:
        raise InvalidParameter("classification needs a classify adapter id as `model` (it carries the head)",
                               param="model")
    engine.check_capacity()  # 429 / 503 before any tokenising
    rows = await run_in_threadpool(encode, rt.tokenizer, body.texts)  # off the loop and the engine thread
    work = asyncio.ensure_future(engine.classify(adapter_id, rows, principal.tenant))
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
