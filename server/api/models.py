"""GET /v1/models: the OpenAI model list, the base first, then every adapter the caller may use."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from server.api.deps import ERROR_RESPONSES, get_state, inference_principal
from server.api.schemas import ModelCard, ModelList
from server.common.auth import Principal

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def models(request: Request, principal: Principal = Depends(inference_principal)):
    """The base model first, then every adapter this key may use."""
    state = get_state(request)
    rt = state.require()
    s = state.settings
    cards = [ModelCard(id=s.base_name, created=state.created, owned_by="rankserve", root=s.model,
                       max_model_len=rt.engine.max_model_len, task=",".join(rt.base.tasks))]
    named = {}  # id -> record: exactly what inference resolves, the tenant's own shadowing a public one
    for r in await run_in_threadpool(rt.store.list):
        if r.owner in (None, principal.tenant) and (r.owner is not None or r.id not in named):
            named[r.id] = r
    for r in sorted(named.values(), key=lambda r: r.id):
        if r.base_fingerprint != rt.base.fingerprint:  # another base's adapter: it would not load here
            continue
        cards.append(ModelCard(id=r.id, created=int(getattr(r, "created_at", 0) or 0),
                               owned_by=r.owner or "rankserve", root=r.id, parent=s.base_name,
                               task=getattr(r, "task", None), method=getattr(r, "method", None)))
    return ModelList(data=cards)
