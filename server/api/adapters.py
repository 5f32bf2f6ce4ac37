"""/v1/adapters: upload (streamed multipart, admin keys only), list, inspect, delete.

An upload is one compiled ``*.safetensors`` file or a PEFT pair (``adapter_config.json`` +
``adapter_model.safetensors``), told apart by file name. Parsing, PEFT conversion, validation against
the resident base and the store's atomic write all run in a threadpool; the adapter becomes visible
only once the store has renamed it into place. Adapters of one tenant are 404 to every other tenant.
"""

from __future__ import annotations

import dataclasses
import json
import logging

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from adapters_store.store import AdapterExists, check_id
from server.api.deps import ERROR_RESPONSES, admin_principal, get_state, inference_principal
from server.api.middleware import describe_error
from server.api.uploads import CONFIG, WEIGHTS, ClientGone, Upload, receive_upload
from server.common.auth import PermissionDenied, Principal
from server.common.errors import BadRequest, InvalidParameter, UnknownAdapter
from server.common.logs import event
from server.state import ServerState

router = APIRouter(tags=["adapters"])
HIDDEN_FIELDS = {"path"}  # server paths stay private
_UPLOAD_RESULTS = {408: "timeout", 409: "conflict", 413: "too_large", 415: "unsupported", 507: "disk_full"}


def record_json(record) -> dict:
    d = dataclasses.asdict(record) if dataclasses.is_dataclass(record) else dict(vars(record))
    out = {"object": "adapter"}
    out.update({k: (str(v) if hasattr(v, "__fspath__") else v) for k, v in d.items()
                if k not in HIDDEN_FIELDS and not k.startswith("_")})
    return out


def _owner_of(principal: Principal) -> str | None:
    return principal.tenant  # a global admin uploads public adapters


def _visible(state: ServerState, adapter_id: str, principal: Principal):
    """The record, or 404 when absent or another tenant's (the same answer, so ids do not leak)."""
    record = state.require().store.get(adapter_id)
    if not principal.can_see(record.owner):
        raise UnknownAdapter(f"adapter {adapter_id!r} does not exist", param="adapter_id")
    return record


def _labels(upload: Upload) -> list[str] | None:
    raw = upload.fields.get("labels")
    if not raw:
        return None
    try:
        labels = json.loads(raw) if raw.lstrip().startswith("[") else [s.strip() for s in raw.split(",")]
    except json.JSONDecodeError as e:
        raise InvalidParameter(f"labels: not a JSON list: {e}", param="labels") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(s, str) and s for s in labels):
        raise InvalidParameter("labels: a JSON list of non-empty strings", param="labels")
    return labels


def _register(state: ServerState, adapter_id: str, upload: Upload, owner: str | None):
    """Threadpool: a PEFT pair converted, or the spooled compiled file itself, validated against the base in
    place and published by the store (the compiled file by rename: its bytes are never read into memory)."""
    rt = state.require()
    files = {f.filename: f for f in upload.files}
    if set(files) == {CONFIG, WEIGHTS}:
        return rt.store.put_peft(adapter_id, {n: f.path for n, f in files.items()}, rt.base, owner=owner,
                                 labels=_labels(upload))
    if len(upload.files) == 1 and upload.files[0].filename.endswith(".safetensors"):
        return rt.store.put_staged(adapter_id, upload.files[0].staged, owner=owner, base=rt.base)
    names = sorted(f.filename for f in upload.files) or "none"
    raise InvalidParameter(f"files: got {names}; expected one compiled *.safetensors, or the PEFT pair "
                           f"{CONFIG} + {WEIGHTS}", param="files")


def _early_checks(state: ServerState):
    """Run on each form field as soon as it is complete, before the files that follow it are streamed."""

    def check(name: str, value: str) -> None:
        if name != "adapter_id":
            return
        adapter_id = value.strip()
        if adapter_id in (state.settings.base_name, state.settings.model):
            raise BadRequest(f"adapter_id {adapter_id!r} is the base model's name", param="adapter_id")
        store = state.require().store
        check_id(adapter_id)
        if adapter_id in store:
            raise AdapterExists(f"adapter {adapter_id!r} already exists; delete it first")

    return check


@router.post("/v1/adapters", status_code=201, responses=ERROR_RESPONSES | {415: {}, 409: {}},
             openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": {
                 "type": "object", "required": ["adapter_id", "files"],
                 "properties": {"adapter_id": {"type": "string"},
                                "labels": {"type": "string", "description": "PEFT classify heads: JSON list"},
                                "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}})
async def upload_adapter(request: Request, principal: Principal = Depends(admin_principal)):
    """Upload an adapter (admin key): `adapter_id` + `files` (compiled *.safetensors or a PEFT pair)."""
    state = get_state(request)
    metrics = state.metrics
    store = state.require().store  # file parts are spooled into its staging area
    try:
        try:
            upload = await receive_upload(request, state.settings.max_upload_bytes, store, _early_checks(state),
                                          idle_timeout=state.settings.body_timeout)
        except ClientGone:
            metrics.adapter_uploads.labels(result="aborted").inc()
            event("upload aborted: client disconnected", logging.WARNING)
            return Response(status_code=499)
        try:
            adapter_id = upload.fields.get("adapter_id", "").strip()
            if not adapter_id:
                raise InvalidParameter("adapter_id: a form field naming the adapter is required", param="adapter_id")
            record = await run_in_threadpool(_register, state, adapter_id, upload, _owner_of(principal))
        finally:
            upload.cleanup()
    except Exception as e:
        status = describe_error(e)[0]
        metrics.adapter_uploads.labels(result=_UPLOAD_RESULTS.get(status, "invalid" if status < 500 else "error")).inc()
        raise
    metrics.adapter_uploads.labels(result="ok").inc()
    state.require().engine.adapter_published(record.digest)  # a failure remembered for these bytes is void
    event("adapter uploaded", adapter_id=record.id, owner=record.owner, size=getattr(record, "size", None))
    return JSONResponse(record_json(record), status_code=201)


@router.get("/v1/adapters", responses=ERROR_RESPONSES)
async def list_adapters(request: Request, principal: Principal = Depends(inference_principal)):
    """Adapters this key can see: public ones and its tenant's own (a global admin sees all)."""
    state = get_state(request)
    records = await run_in_threadpool(state.require().store.list)
    return {"object": "list", "data": [record_json(r) for r in records if principal.can_see(r.owner)]}


@router.get("/v1/adapters/{adapter_id}", responses=ERROR_RESPONSES)
async def get_adapter(adapter_id: str, request: Request, principal: Principal = Depends(inference_principal)):
    return record_json(await run_in_threadpool(_visible, get_state(request), adapter_id, principal))


@router.delete("/v1/adapters/{adapter_id}", responses=ERROR_RESPONSES)
async def delete_adapter(adapter_id: str, request: Request, principal: Principal = Depends(admin_principal)):
    """Delete (admin key): requests already running finish; new ones get 404."""
    state = get_state(request)

    def delete() -> None:
        record = _visible(state, adapter_id, principal)
        if principal.tenant is not None and record.owner != principal.tenant:
            raise PermissionDenied(f"adapter {adapter_id!r} is public; only a global admin key deletes it")
        rt = state.require()
        rt.store.delete(adapter_id, expect=record)  # only the version checked above (else 404)
        rt.engine.forget_adapter(record.digest)  # running requests keep their pinned version

    await run_in_threadpool(delete)
    event("adapter deleted", adapter_id=adapter_id)
    return {"id": adapter_id, "object": "adapter", "deleted": True}
