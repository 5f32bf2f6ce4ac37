"""vLLM's dynamic adapter routes: POST /v1/load_lora_adapter ``{"lora_name", "lora_path"}`` and
POST /v1/unload_lora_adapter ``{"lora_name"}``, answered as vLLM answers them (plain-text success lines).

Loading reads a server-side path, so it is held tighter than an upload: admin keys only, and only under
``--adapter-root`` (unset: the route is refused). The path (absolute, or relative to the root) and every file
read are resolved (symlinks and ``..`` followed) and must stay under the root, else 403. The files are then
copied, without following a final symlink, into the store's staging area and registered exactly as an
upload (``adapters.register``: a PEFT pair ``adapter_config.json`` + ``adapter_model.safetensors`` is
converted, a compiled ``*.safetensors`` validated; tenant keys load into their namespace, within quota),
so nothing reads the source path after the copy. Unloading is the delete route's ``adapters.remove``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from server.api.adapters import register, remove
from server.api.deps import ERROR_RESPONSES, admin_principal, get_state
from server.api.schemas import Strict, Text
from server.api.uploads import CONFIG, WEIGHTS, SpooledFile, Upload, UploadTooLarge
from server.common.auth import PermissionDenied, Principal
from server.common.errors import InvalidParameter
from server.common.logs import event
from server.state import ServerState

router = APIRouter(tags=["adapters"])
CHUNK = 1 << 20


class LoadLoraRequest(Strict):
    lora_name: Text = Field(min_length=1, max_length=256, description="the adapter id it is served under")
    lora_path: Text = Field(min_length=1, max_length=4096,
                            description="a PEFT directory or a compiled *.safetensors, under --adapter-root")


class UnloadLoraRequest(Strict):
    lora_name: Text = Field(min_length=1, max_length=256)
    lora_int_id: int | None = Field(None, description="accepted as vLLM's clients send it; the name decides")


def under_root(root: str | None, path: str | Path) -> Path:
    """``path`` (relative to the root, or absolute) with every symlink and ``..`` resolved; 403 unless it is
    the root or inside it."""
    if not root:
        raise PermissionDenied("loading adapters from server paths is disabled: start the server with "
                               "--adapter-root DIR", param="lora_path")
    base = Path(root).resolve()
    real = (base / path).resolve()  # an absolute path replaces the base
    if real != base and base not in real.parents:
        raise PermissionDenied(f"lora_path: {str(path)!r} is outside the server's --adapter-root", param="lora_path")
    return real


def _sources(root: str | None, lora_path: str) -> dict[str, Path]:
    """The files to register, by the name an upload would give them."""
    real = under_root(root, lora_path)
    if real.is_dir():
        names = {p.name for p in real.iterdir()}
        if {CONFIG, WEIGHTS} <= names:
            return {n: under_root(root, real / n) for n in (CONFIG, WEIGHTS)}
        compiled = sorted(n for n in names if n.endswith(".safetensors"))
        if len(compiled) == 1:
            return {compiled[0]: under_root(root, real / compiled[0])}
        raise InvalidParameter(f"lora_path: the directory holds neither the PEFT pair {CONFIG} + {WEIGHTS} nor "
                               f"exactly one compiled *.safetensors (found {sorted(names)[:10]})", param="lora_path")
    if real.is_file() and real.name.endswith(".safetensors"):
        return {real.name: real}
    raise InvalidParameter(f"lora_path: {lora_path!r} is not a directory or a *.safetensors file on the server",
                           param="lora_path")


def _read(path: Path, cap: int) -> Iterator[bytes]:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))  # resolved above: a symlink now is a swap
    with os.fdopen(fd, "rb") as f:
        size = 0
        while chunk := f.read(CHUNK):
            size += len(chunk)
            if size > cap:
                raise UploadTooLarge(f"lora_path: {path.name} exceeds the upload cap of {cap} bytes",
                                     param="lora_path")
            yield chunk


def _load(state: ServerState, body: LoadLoraRequest, owner: str | None):
    """Threadpool: copy the files into staging, then register them as an upload."""
    store = state.require().store
    upload = Upload(store)
    try:
        for name, path in _sources(state.settings.adapter_root, body.lora_path).items():
            staged = store.spool()
            upload.files.append(SpooledFile("files", name, staged))
            store.write_spool(staged, _read(path, state.settings.max_upload_bytes))
        return register(state, body.lora_name, upload, owner)
    finally:
        upload.cleanup()


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=ERROR_RESPONSES | {409: {}})
async def load_lora_adapter(body: LoadLoraRequest, request: Request, principal: Principal = Depends(admin_principal)):
    """vLLM: load an adapter from a server path under --adapter-root (admin key)."""
    state = get_state(request)
    if body.lora_name in (state.settings.base_name, state.settings.model):
        raise InvalidParameter(f"lora_name {body.lora_name!r} is the base model's name", param="lora_name")
    record = await run_in_threadpool(_load, state, body, principal.tenant)
    state.require().engine.adapter_published(record.digest)
    event("adapter loaded from a server path", adapter_id=record.id, owner=record.owner)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=ERROR_RESPONSES)
async def unload_lora_adapter(body: UnloadLoraRequest, request: Request,
                              principal: Principal = Depends(admin_principal)):
    """vLLM: unload (delete) an adapter; requests already running finish."""
    await run_in_threadpool(remove, get_state(request), body.lora_name, principal)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
