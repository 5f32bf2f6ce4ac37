"""POST /tokenize, POST /detokenize and GET /version, as vLLM's server answers them. Every adapter shares the
base model's tokenizer; a ``model`` that names no adapter visible to the caller is a 404 all the same."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from adapters_store.tenancy import resolve
from server.api.completions import chat_ids
from server.api.deps import ERROR_RESPONSES, adapter_of, get_state, inference_principal
from server.api.schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from server.common.auth import Principal
from server.common.errors import InvalidParameter, UnknownAdapter
from server.state import ServerState

router = APIRouter(tags=["tokenize"])
try:
    VERSION = version("rankserve")
except PackageNotFoundError:  # run from a checkout without installing
    VERSION = "0.1.0"


async def _check_model(state: ServerState, model: str | None, principal: Principal) -> None:
    adapter_id = None if model is None else adapter_of(state, model)
    if adapter_id is None:
        return
    try:
        await run_in_threadpool(resolve, state.require().store, adapter_id, principal.tenant)
    except Exception as e:
        if getattr(e, "http_status", None) == 404:
            raise UnknownAdapter(f"adapter {adapter_id!r} does not exist", param="model") from None
        raise


def _tokenize(tokenizer, body: TokenizeRequest) -> list[int]:
    if body.messages is not None:
        return chat_ids(tokenizer, body.messages, body.add_generation_prompt, bool(body.add_special_tokens))
    special = True if body.add_special_tokens is None else body.add_special_tokens
    return list(tokenizer(body.prompt, add_special_tokens=special)["input_ids"])


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, request: Request, principal: Principal = Depends(inference_principal)):
    """Token ids of a prompt or of chat messages (the ids a completion request would use)."""
    state = get_state(request)
    rt = state.require()
    await _check_model(state, body.model, principal)
    ids = await run_in_threadpool(_tokenize, rt.tokenizer, body)
    strs = await run_in_threadpool(rt.tokenizer.convert_ids_to_tokens, ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=rt.engine.max_model_len, tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest, request: Request, principal: Principal = Depends(inference_principal)):
    """The text of token ids."""
    state = get_state(request)
    rt = state.require()
    await _check_model(state, body.model, principal)
    vocab = int(rt.base.model.config.vocab_size)
    bad = [t for t in body.tokens if t >= vocab]
    if bad:
        raise InvalidParameter(f"tokens: token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="tokens")
    return DetokenizeResponse(prompt=await run_in_threadpool(rt.tokenizer.decode, body.tokens))


@router.get("/version", response_model=VersionResponse)
async def server_version():
    """The server's version (no key needed, as vLLM's)."""
    return VersionResponse(version=VERSION)
