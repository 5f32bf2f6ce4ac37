"""/v1/adapters: upload (streamed multipart, admin keys only), list, inspect, delete.

An upload is one compiled ``*.safetensors`` file or a PEFT pair (``adapter_config.json`` +
``adapter_model.safetensors``), told apart by file name. Parsing, PEFT conversion, validation against
the resident base and the store's atomic write all run in a threadpool; the adapter becomes visible
only once the store has renamed it into place.

Ids are namespaced per tenant (adapters_store/tenancy.py): what a tenant admin uploads lands in its own
namespace, so another tenant's id is neither taken nor revealed; a tenant's lookup finds its own adapter,
then a public one, and never another tenant's, so that answers exactly as a missing id does. A global
admin addresses a tenant's adapter with ``?owner=TENANT``. Tenant uploads are held to the quotas
(--tenant-max-adapters, --tenant-max-bytes), checked as soon as the id, then each file chunk, is known,
and again just before the store publishes.
"""

from __future__ import annotations

import dataclasses
import json
import logging

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from adapters_store.store import AdapterExists, AdapterRecord, Quota, QuotaExceeded, Usage, check_id
from server.api.deps import ERROR_RESPONSES, admin_principal, get_state, inference_principal
from server.api.middleware import describe_error
from server.api.uploads import CONFIG, WEIGHTS, ClientGone, SpooledFile, Upload, receive_upload
from server.common.auth import PermissionDenied, Principal
from server.common.errors import BadRequest, InvalidParameter
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


def _quota(state: ServerState, owner: str | None) -> Quota | None:
    s = state.settings
    if owner is None or not (s.tenant_max_adapters or s.tenant_max_bytes):
        return None  # public uploads (global admins) have no quota
    return Quota(s.tenant_max_adapters, s.tenant_max_bytes)


def _lookup(state: ServerState, adapter_id: str, principal: Principal, owner: str | None) -> AdapterRecord:
    """What ``adapter_id`` names for the caller: a tenant's own adapter, else the public one; a global admin's
    public one, or with ``owner`` that tenant's. Another tenant's adapter is never looked at, so it answers
    exactly as a missing one (AdapterNotFound: same status, code, message and param)."""
    store = state.require().store
    if owner is None:
        return store.resolve(adapter_id, principal.tenant)
    if not principal.admin or principal.tenant is not None:  # independent of the id: reveals nothing
        raise PermissionDenied("owner: only a global admin key (one without a tenant) may name an owner",
                               param="owner")
    if not owner:
        raise InvalidParameter("owner: a tenant name, or leave it out for public adapters", param="owner")
    return store.get(check_id(adapter_id), owner=owner)


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


def register(state: ServerState, adapter_id: str, upload: Upload, owner: str | None):
    """Threadpool: a PEFT pair converted, or the spooled compiled file itself, validated against the base in
    place and published by the store (the compiled file by rename: its bytes are never read into memory)."""
    rt = state.require()
    files = {f.filename: f for f in upload.files}
    quota = _quota(state, owner)
    if set(files) == {CONFIG, WEIGHTS}:
        return rt.store.put_peft(adapter_id, {n: f.path for n, f in files.items()}, rt.base, owner=owner,
                                 labels=_labels(upload), quota=quota)
    if len(upload.files) == 1 and upload.files[0].filename.endswith(".safetensors"):
        return rt.store.put_staged(adapter_id, upload.files[0].staged, owner=owner, base=rt.base, quota=quota)
    names = sorted(f.filename for f in upload.files) or "none"
    raise InvalidParameter(f"files: got {names}; expected one compiled *.safetensors, or the PEFT pair "
                           f"{CONFIG} + {WEIGHTS}", param="files")


class _EarlyChecks:
    """Run while the body streams in: on each form field as soon as it is complete (before the files that
    follow it), and before each chunk of a file is written. The quota checks here refuse early; the store
    checks again, exactly, just before publishing."""

    def __init__(self, state: ServerState, owner: str | None):
        self.state, self.owner, self.quota = state, owner, _quota(state, owner)
        self._used: Usage | None = None

    def used(self) -> Usage:
        if self._used is None:  # once per upload, not per chunk
            self._used = self.state.require().store.usage(self.owner)  # type: ignore[arg-type]
        return self._used

    def field(self, name: str, value: str) -> None:
        if name != "adapter_id":
            return
        adapter_id = value.strip()
        if adapter_id in (self.state.settings.base_name, self.state.settings.model):
            raise BadRequest(f"adapter_id {adapter_id!r} is the base model's name", param="adapter_id")
        check_id(adapter_id)
        if self.state.require().store.exists(adapter_id, owner=self.owner):  # the uploader's own namespace
            raise AdapterExists(f"adapter {adapter_id!r} already exists; delete it first")
        if self.quota is not None:
            self.quota.check_count(self.owner, self.used())  # type: ignore[arg-type]

    def file(self, f: SpooledFile, size: int) -> None:
        """A compiled file is stored as uploaded, so its size counts as it streams; a PEFT pair is converted
        first (its stored size is known only then)."""
        if self.quota is not None and f.filename not in (CONFIG, WEIGHTS):
            self.quota.check_bytes(self.owner, self.used(), size, so_far=True)  # type: ignore[arg-type]


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
    checks = _EarlyChecks(state, _owner_of(principal))
    try:
        try:
            upload = await receive_upload(request, state.settings.max_upload_bytes, store, checks.field,
                                          idle_timeout=state.settings.body_timeout, check_file=checks.file)
        except ClientGone:
            metrics.adapter_uploads.labels(result="aborted").inc()
            event("upload aborted: client disconnected", logging.WARNING)
            return Response(status_code=499)
        try:
            adapter_id = upload.fields.get("adapter_id", "").strip()
            if not adapter_id:
                raise InvalidParameter("adapter_id: a form field naming the adapter is required", param="adapter_id")
            record = await run_in_threadpool(register, state, adapter_id, upload, _owner_of(principal))
        finally:
            upload.cleanup()
    except Exception as e:
        status = describe_error(e)[0]
        result = _UPLOAD_RESULTS.get(status, "invalid" if status < 500 else "error")
        if isinstance(e, QuotaExceeded):
            result = "quota"
            metrics.adapter_quota_rejections.labels(kind=e.kind).inc()
        metrics.adapter_uploads.labels(result=result).inc()
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
async def get_adapter(adapter_id: str, request: Request, owner: str | None = None,
                      principal: Principal = Depends(inference_principal)):
    """One record: the caller's own adapter, else the public one (`owner`: a tenant's, global admins only)."""
    return record_json(await run_in_threadpool(_lookup, get_state(request), adapter_id, principal, owner))


@router.delete("/v1/adapters/{adapter_id}", responses=ERROR_RESPONSES)
async def delete_adapter(adapter_id: str, request: Request, owner: str | None = None,
                         principal: Principal = Depends(admin_principal)):
    """Delete (admin key; `owner`: a tenant's adapter, global admins only): requests already running
    finish; new ones get 404."""
    record = await run_in_threadpool(remove, get_state(request), adapter_id, principal, owner)
    return {"id": record.id, "object": "adapter", "deleted": True}


def remove(state: ServerState, adapter_id: str, principal: Principal, owner: str | None = None) -> AdapterRecord:
    """Threadpool: delete what ``adapter_id`` names for the caller (also vLLM's unload route)."""
    record = _lookup(state, adapter_id, principal, owner)
    if principal.tenant is not None and record.owner != principal.tenant:
        raise PermissionDenied(f"adapter {adapter_id!r} is public; only a global admin key deletes it")
    rt = state.require()
    rt.store.delete(record.id, expect=record, owner=record.owner)  # only the version checked above (else 404)
    rt.engine.forget_adapter(record.digest)  # running requests keep their pinned version
    event("adapter deleted", adapter_id=record.id, owner=record.owner)
    return record
