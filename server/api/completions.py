"""POST /v1/completions and /v1/chat/completions: OpenAI request -> GenerateParams -> engine events ->
OpenAI response or SSE stream. No tensor work here: tokenising runs in a threadpool on the HTTP side's own
tokenizer copy, and the model runs on the engine thread.

Order of refusals: auth and rate limit (dependencies), body validation (422), capacity (429/503, before
tokenising), then the engine's own checks at submit (404 unknown adapter, 400 context length, 422).
The first event is awaited before the response starts, so a request that fails before its first token
(adapter load failure, deadline) still gets its proper status code; later failures arrive as an SSE
error event followed by ``data: [DONE]``.

A stream's buffers are bounded: the request's event queue holds at most max_tokens small events, and
uvicorn stops accepting writes once the socket's buffer is past its high-water mark. A client that stops
reading (RELIABILITY row 27) makes one write wait; after --stream-write-timeout seconds the request is
cancelled in the engine (its running slot, KV blocks and adapter pin are freed) and the response ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from server.api.deps import (
    ERROR_RESPONSES,
    HUNG_GRACE_S,
    adapter_of,
    get_state,
    inference_principal,
    watch_disconnect,
)
from server.api.middleware import describe_error
from server.api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatRequest,
    ChatResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    SamplingRequest,
    Usage,
)
from server.api.structured import compile_guide
from server.common.auth import Principal
from server.common.errors import BadRequest, DeadlineExceeded, InvalidParameter, ServingError
from server.engine import GenerateEvent, GenerateParams, RequestHandle

router = APIRouter(tags=["generate"])
log = logging.getLogger("rankserve.http")


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
async def completions(body: CompletionRequest, request: Request,
                      principal: Principal = Depends(inference_principal)):
    """OpenAI text completion; `model` is an adapter id or the base model's name."""
    return await _generate(request, body, principal, chat=False)


@router.post("/v1/chat/completions", response_model=ChatResponse, responses=ERROR_RESPONSES)
async def chat_completions(body: ChatRequest, request: Request, principal: Principal = Depends(inference_principal)):
    """OpenAI chat completion; the prompt is the tokenizer's chat template with the generation prompt."""
    return await _generate(request, body, principal, chat=True)


def _prompt_ids(tokenizer, body: SamplingRequest, vocab_size: int) -> list[int]:
    if isinstance(body, ChatRequest):
        if not getattr(tokenizer, "chat_template", None):
            raise BadRequest("this base model's tokenizer has no chat template: use /v1/completions", param="messages")
        # a message's name reaches the template, which renders it where the model's format has a place for it
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in body.messages]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert isinstance(body, CompletionRequest)
    prompt = body.prompt
    if isinstance(prompt, list) and isinstance(prompt[0], int):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise InvalidParameter(f"prompt: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})",
                                   param="prompt")
        return list(prompt)  # type: ignore[arg-type]
    text = prompt if isinstance(prompt, str) else prompt[0]
    return list(tokenizer(text)["input_ids"])


class EventReader:
    """One request's events; the client's disconnect cancels it (the engine frees it within one step), and
    a hung engine turns into 504 instead of a request that never ends."""

    def __init__(self, handle: RequestHandle, request: Request, deadline: float):
        self.handle = handle
        self.deadline = deadline
        self._it = handle.events().__aiter__()
        self._watch = watch_disconnect(request, handle.cancel)

    @classmethod
    async def open(cls, engine, params: GenerateParams, request: Request, deadline: float
                   ) -> tuple[EventReader, GenerateEvent | None]:
        """Submit, then await the first event: a request that fails before its first token raises here, so it
        still gets its proper status code."""
        reader = cls(engine.submit_generate(params), request, deadline)
        try:
            first = await reader.next()
            if first is not None and first.error is not None:
                raise first.error
        except BaseException:
            await reader.close()
            raise
        return reader, first

    async def next(self) -> GenerateEvent | None:
        timeout = max(0.0, self.deadline - time.monotonic()) + HUNG_GRACE_S
        try:
            return await asyncio.wait_for(self._it.__anext__(), timeout)
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            self.handle.cancel()
            raise DeadlineExceeded(f"request {self.handle.request_id} got no answer from the engine by its deadline") from None

    async def close(self) -> None:
        self._watch.cancel()
        self.handle.cancel()  # a no-op once finished; otherwise frees the request's slot, KV and adapter pin
        await self._it.aclose()


async def _generate(request: Request, body: SamplingRequest, principal: Principal, chat: bool):
    state = get_state(request)
    deadline = time.monotonic() + state.settings.request_timeout
    rt = state.require()
    engine = rt.engine
    if body.n != 1:
        raise InvalidParameter(f"n={body.n}: this server returns one choice per request (n must be 1)", param="n")
    adapter_id = adapter_of(state, body.model)
    engine.check_capacity()  # 429 / 503 before any tokenising (RELIABILITY row 19)
    prompt_ids = await run_in_threadpool(_prompt_ids, rt.tokenizer, body,
                                         int(rt.base.model.config.vocab_size))
    guide = await compile_guide(engine, body.guide_spec())  # 400 for an invalid schema/regex, before anything is queued
    max_tokens = body.max_tokens
    if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    if max_tokens is None:  # chat default: whatever the context leaves (the engine refuses 0 with 400)
        max_tokens = max(1, engine.max_model_len - len(prompt_ids))
    rid = request.state.request_id
    request.state.user = body.user  # the end-user id goes into the access log line
    params = GenerateParams(
        prompt_ids=prompt_ids, adapter_id=adapter_id, owner=principal.tenant, max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=max(0, body.top_k or 0), seed=body.seed,
        stop=body.stop_list, min_tokens=body.min_tokens, ignore_eos=body.ignore_eos, request_id=rid,
        deadline=deadline, guide=guide)
    reader, first = await EventReader.open(engine, params, request, deadline)
    shape = _Shape(("chatcmpl-" if chat else "cmpl-") + rid, int(time.time()), body.model, chat)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StalledReaderGuard(_sse(reader, first, shape, usage), reader.handle,
                                  state.settings.stream_write_timeout, media_type="text/event-stream",
                                  headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        text, last = [], first
        ev = first
        while ev is not None:
            if ev.error is not None:
                raise ev.error
            text.append(ev.text_delta)
            last = ev
            if ev.finish_reason is not None:
                break
            ev = await reader.next()
    finally:
        await reader.close()
    if last is not None and last.finish_reason == "abort":  # only the disconnect watcher cancels a request
        return Response(status_code=499)  # nobody reads it; the access log and requests_total say "client gone"
    return shape.response("".join(text), last)


class _Shape:
    """The OpenAI response and chunk shapes of one request."""

    def __init__(self, rid: str, created: int, model: str, chat: bool):
        self.rid, self.created, self.model, self.chat = rid, created, model, chat

    @staticmethod
    def usage(ev: GenerateEvent | None) -> Usage:
        p, c = (ev.prompt_tokens, ev.completion_tokens) if ev is not None else (0, 0)
        return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

    def response(self, text: str, last: GenerateEvent | None):
        reason = last.finish_reason if last is not None else "abort"
        if self.chat:
            return ChatResponse(id=self.rid, created=self.created, model=self.model, usage=self.usage(last),
                                choices=[ChatChoice(index=0, message=AssistantMessage(content=text), finish_reason=reason)])
        return CompletionResponse(id=self.rid, created=self.created, model=self.model, usage=self.usage(last),
                                  choices=[CompletionChoice(index=0, text=text, finish_reason=reason)])

    def chunk(self, delta: str | None, reason: str | None, role: bool = False) -> str:
        if self.chat:
            d: dict = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
            choice = {"index": 0, "delta": d, "finish_reason": reason, "logprobs": None}
            obj = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                   "choices": [choice]}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}
            obj = {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                   "choices": [choice]}
        return sse(obj)

    def usage_chunk(self, last: GenerateEvent | None) -> str:
        obj = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": [], "usage": self.usage(last).model_dump()}
        return sse(obj)


class _Stalled(Exception):
    pass


class StalledReaderGuard(StreamingResponse):
    """An SSE response whose every write must complete within `write_timeout` seconds. A write waits while
    the client does not read (uvicorn's flow control); past the timeout the engine request is cancelled,
    the event generator is closed, and the app returns, so uvicorn closes the connection."""

    def __init__(self, content, handle: RequestHandle, write_timeout: float, **kw):
        super().__init__(content, **kw)
        self.handle = handle
        self.write_timeout = write_timeout

    async def __call__(self, scope, receive, send) -> None:
        async def timed_send(message) -> None:
            try:
                await asyncio.wait_for(send(message), self.write_timeout)
            except asyncio.TimeoutError:
                raise _Stalled from None

        try:
            await super().__call__(scope, receive, timed_send)
        except _Stalled:
            self.handle.cancel()
            log.warning("stream aborted: the client read nothing for %g s", self.write_timeout,
                        extra={"fields": {"request_id": self.handle.request_id}})
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]  # runs _sse's finally: reader.close()


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _sse(reader: EventReader, first: GenerateEvent | None, shape: _Shape, include_usage: bool) -> AsyncIterator[str]:
    """SSE in OpenAI's shape; an error after the first token is an error event, then [DONE]."""
    last = None
    try:
        if shape.chat:
            yield shape.chunk(None, None, role=True)
        ev = first
        while ev is not None:
            last = ev
            if ev.error is not None:
                yield sse(describe_error(ev.error)[1])
                break
            if shape.chat and ev.text_delta:
                yield shape.chunk(ev.text_delta, None)
            if ev.finish_reason is not None:
                yield shape.chunk(None if shape.chat else ev.text_delta, ev.finish_reason)
                break
            if not shape.chat and ev.text_delta:
                yield shape.chunk(ev.text_delta, None)
            ev = await reader.next()
        if include_usage and last is not None and last.error is None:
            yield shape.usage_chunk(last)
    except ServingError as e:  # the hung-engine guard
        yield sse(describe_error(e)[1])
    finally:
        await reader.close()
    yield "data: [DONE]\n\n"
