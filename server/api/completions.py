"""POST /v1/completions and /v1/chat/completions: OpenAI request -> GenerateParams -> engine events ->
OpenAI response or SSE stream. No tensor work here: tokenising runs in a threadpool on the HTTP side's own
tokenizer copy, and the model runs on the engine thread.

One request may hold several prompts (a list of strings or of token-id lists) and several choices per
prompt (``n``, ``best_of``): each is its own engine sequence, all queued at once or none (429), choice
``index = prompt_index * n + j``. The n sequences of a prompt do not share their prefill: each computes
the prompt's keys and values itself (they run in the same step, one forward, but n times the prompt's
tokens). ``best_of`` > n generates best_of sequences and returns the n with the highest cumulative logprob.

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
import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from adapters_store.chat import NoChatTemplate, render_chat
from server.api.deps import (
    ERROR_RESPONSES,
    HUNG_GRACE_S,
    adapter_of,
    get_state,
    inference_principal,
    watch_disconnect,
)
from server.api.middleware import describe_error
from server.api.openai_shapes import Choice, Shape, TokenTexts, sse
from server.api.schemas import (
    ChatMessage,
    ChatRequest,
    ChatResponse,
    CompletionRequest,
    CompletionResponse,
    SamplingRequest,
)
from server.api.structured import compile_guide
from server.common.auth import Principal
from server.common.errors import BadRequest, DeadlineExceeded, InvalidParameter, ServingError
from server.engine import GenerateEvent, GenerateParams, RequestHandle
from server.engine.sampler import SEED_MAX, SEED_MIN

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


def chat_ids(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True,
             add_special_tokens: bool = False) -> list[int]:
    """The token ids of chat messages through the base tokenizer's chat template, rendered by the code the
    trainer renders chat data with (``adapters_store.chat``): an adapter trained on chats is served alike."""
    # a message's name reaches the template, which renders it where the model's format has a place for it
    rendered = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in messages]
    try:
        text = render_chat(tokenizer, rendered, add_generation_prompt)
    except NoChatTemplate:
        raise BadRequest("this base model's tokenizer has no chat template: use /v1/completions",
                         param="messages") from None
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _prompt_ids(tokenizer, body: SamplingRequest, vocab_size: int) -> list[list[int]]:
    """Token ids per prompt; ids outside the vocabulary (prompt, logit_bias, stop_token_ids) are 400s."""
    for name, ids in (("logit_bias", list(body.bias_ids)), ("stop_token_ids", body.stop_token_ids or [])):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidParameter(f"{name}: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})",
                                   param=name)
    if isinstance(body, ChatRequest):
        return [chat_ids(tokenizer, body.messages)]
    assert isinstance(body, CompletionRequest)
    out = []
    for prompt in body.prompts:
        if isinstance(prompt, list):
            bad = [t for t in prompt if not 0 <= t < vocab_size]
            if bad:
                raise InvalidParameter(f"prompt: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})",
                                       param="prompt")
            out.append(list(prompt))
        else:
            out.append(list(tokenizer(prompt)["input_ids"]))
    return out


def _seed(seed: int | None, j: int) -> int | None:
    """Choice j's seed: seed + j (as vLLM), wrapped into the generator's range."""
    if seed is None or j == 0:
        return seed
    return (seed + j - SEED_MIN) % (SEED_MAX - SEED_MIN + 1) + SEED_MIN


class EventReader:
    """One engine sequence's events; a hung engine turns into 504 instead of a request that never ends.
    ``readers`` opens one per sequence of a request under ONE disconnect watcher, which cancels them all."""

    def __init__(self, handle: RequestHandle, deadline: float, watch: asyncio.Future):
        self.handle = handle
        self.deadline = deadline
        self._it = handle.events().__aiter__()
        self._watch = watch

    @classmethod
    async def open(cls, engine, params: list[GenerateParams], request: Request, deadline: float
                   ) -> tuple[list[EventReader], list[GenerateEvent | None]]:
        """Submit the sequences (all or none), then await every one's first event: a request that fails before
        its first token raises here, so it still gets its proper status code. One disconnect watcher cancels
        them all (the engine frees them in a step). Shared by the OpenAI and LoRAX/TGI routes."""
        handles = engine.submit_many(params)
        watch = watch_disconnect(request, lambda: [h.cancel() for h in handles])
        readers = [cls(h, deadline, watch) for h in handles]
        firsts: list[GenerateEvent | None] = []
        try:
            for reader in readers:
                ev = await reader.next()
                if ev is not None and ev.error is not None:
                    raise ev.error
                firsts.append(ev)
        except BaseException:
            for reader in readers:
                await reader.close()
            raise
        return readers, firsts

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
    adapter_id = adapter_of(state, body.model)
    engine.check_capacity()  # 429 / 503 before any tokenising (RELIABILITY row 19)
    prompts = await run_in_threadpool(_prompt_ids, rt.tokenizer, body, int(rt.base.model.config.vocab_size))
    guide = await compile_guide(engine, body.guide_spec())  # 400 for an invalid schema/regex, before anything is queued
    rid = request.state.request_id
    request.state.user = body.user  # the end-user id goes into the access log line
    k = body.num_logprobs  # type: ignore[attr-defined]
    n = body.n
    best_of = (body.best_of if isinstance(body, CompletionRequest) else None) or n
    echo = isinstance(body, CompletionRequest) and body.echo
    params, choices = [], []
    for i, ids in enumerate(prompts):
        max_tokens = body.max_tokens
        if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        if max_tokens is None:  # chat default: whatever the context leaves (the engine refuses 0 with 400)
            max_tokens = max(1, engine.max_model_len - len(ids))
        for j in range(best_of):
            params.append(GenerateParams(
                prompt_ids=ids, adapter_id=adapter_id, owner=principal.tenant, max_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=max(0, body.top_k or 0),
                seed=_seed(body.seed, j), stop=body.stop_list, min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
                request_id=rid if len(prompts) * best_of == 1 else f"{rid}-{i}-{j}", deadline=deadline,
                stop_token_ids=body.stop_token_ids or (), include_stop_str_in_output=body.include_stop_str_in_output,
                presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                repetition_penalty=body.repetition_penalty or 1.0, logit_bias=body.bias_ids, min_p=body.min_p or 0.0,
                logprobs=k if k is not None or best_of == n else 0,  # best_of ranks by the chosen tokens' logprobs
                prompt_logprobs=k if echo else None, guide=guide))
            choices.append(Choice(index=i * n + j, prompt_index=i))
    readers, firsts = await EventReader.open(engine, params, request, deadline)
    texts = TokenTexts(rt.tokenizer, body.return_tokens_as_token_ids)
    shape = Shape(("chatcmpl-" if chat else "cmpl-") + rid, int(time.time()), body.model, chat, texts, k is not None)
    echoed = None
    if echo:
        assert isinstance(body, CompletionRequest)
        echoed = [(p if isinstance(p, str) else texts.tokenizer.decode(p), ids)
                  for p, ids in zip(body.prompts, prompts, strict=True)]
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StalledReaderGuard(_sse(readers, firsts, choices, shape, usage, echoed), [r.handle for r in readers],
                                  state.settings.stream_write_timeout, media_type="text/event-stream",
                                  headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        await asyncio.gather(*(_collect(r, ev, c) for r, ev, c in zip(readers, firsts, choices, strict=True)))
    finally:
        for reader in readers:
            await reader.close()
    if any(c.finish_reason == "abort" for c in choices):  # only the disconnect watcher cancels a request
        return Response(status_code=499)  # nobody reads it; the access log and requests_total say "client gone"
    returned = choices
    if best_of > n:  # per prompt, the n most likely of its best_of sequences, renumbered
        returned = []
        for i in range(len(prompts)):
            ranked = sorted(choices[i * best_of:(i + 1) * best_of], key=lambda c: -c.cumulative_logprob)[:n]
            for j, c in enumerate(ranked):
                c.index = i * n + j
                if k is None:
                    c.logprobs = []
            returned += ranked
    return await run_in_threadpool(shape.response, returned, choices, echoed)


def _take(choice: Choice, ev: GenerateEvent) -> None:
    """Add one event's tokens, text and counts to its choice."""
    choice.text += ev.text_delta
    choice.token_ids += ev.token_ids
    if ev.logprobs:
        choice.logprobs += ev.logprobs
    if ev.prompt_logprobs is not None:
        choice.prompt_logprobs = ev.prompt_logprobs
    choice.prompt_tokens, choice.completion_tokens = ev.prompt_tokens, ev.completion_tokens
    choice.finish_reason = ev.finish_reason


async def _collect(reader: EventReader, first: GenerateEvent | None, choice: Choice) -> None:
    ev = first
    while ev is not None:
        if ev.error is not None:
            raise ev.error
        _take(choice, ev)
        if ev.finish_reason is not None:
            return
        ev = await reader.next()
    choice.finish_reason = choice.finish_reason or "abort"


class _Stalled(Exception):
    pass


class StalledReaderGuard(StreamingResponse):
    """An SSE response whose every write must complete within `write_timeout` seconds. A write waits while
    the client does not read (uvicorn's flow control); past the timeout the engine requests are cancelled,
    the event generator is closed, and the app returns, so uvicorn closes the connection."""

    def __init__(self, content, handles: list[RequestHandle], write_timeout: float, **kw):
        super().__init__(content, **kw)
        self.handles = handles
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
            for handle in self.handles:
                handle.cancel()
            log.warning("stream aborted: the client read nothing for %g s", self.write_timeout,
                        extra={"fields": {"request_id": self.handles[0].request_id}})
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]  # runs _sse's finally: reader.close()


async def _pump(reader: EventReader, i: int, queue: asyncio.Queue) -> None:
    """Sequence i's events after its first, into the stream's one queue (the hung-engine guard's error too)."""
    try:
        while True:
            ev = await reader.next()
            await queue.put((i, ev))
            if ev is None or ev.finish_reason is not None or ev.error is not None:
                return
    except ServingError as e:
        await queue.put((i, e))


def _chunks(shape: Shape, choice: Choice, ev: GenerateEvent, echoed: list | None) -> list[str]:
    """The SSE chunks of one engine event of a choice (its first carries the echoed prompt)."""
    text, ids = ev.text_delta, list(ev.token_ids)
    entries: list = list(ev.logprobs) if ev.logprobs else [None] * len(ids)
    if echoed is not None and not choice.started:
        prompt_text, prompt_ids = echoed[choice.prompt_index]
        text = prompt_text + text
        ids = prompt_ids + ids
        entries = list(ev.prompt_logprobs or [None] * len(prompt_ids)) + entries
    _take(choice, ev)
    choice.started = True
    logprobs = shape.chunk_logprobs(choice, entries, ids)
    if not shape.chat:
        if text or logprobs is not None or ev.finish_reason is not None:
            return [shape.chunk(choice.index, text, ev.finish_reason, logprobs=logprobs)]
        return []
    out = [shape.chunk(choice.index, text, None, logprobs=logprobs)] if text or logprobs is not None else []
    if ev.finish_reason is not None:
        out.append(shape.chunk(choice.index, None, ev.finish_reason))
    return out


async def _sse(readers: list[EventReader], firsts: list[GenerateEvent | None], choices: list[Choice], shape: Shape,
               include_usage: bool, echoed: list | None) -> AsyncIterator[str]:
    """SSE in OpenAI's shape, the choices' chunks interleaved as their tokens come; an error after the first
    token is an error event, then [DONE]."""
    queue: asyncio.Queue = asyncio.Queue()
    pumps: list[asyncio.Future] = []
    failed = False
    try:
        if shape.chat:
            for c in choices:
                yield shape.chunk(c.index, None, None, role=True)
        for i, ev in enumerate(firsts):
            queue.put_nowait((i, ev))
            if ev is not None and ev.finish_reason is None:
                pumps.append(asyncio.ensure_future(_pump(readers[i], i, queue)))
        running = len(readers)
        while running:
            i, ev = await queue.get()
            if isinstance(ev, ServingError) or (ev is not None and ev.error is not None):
                failed = True
                yield sse(describe_error(ev if isinstance(ev, ServingError) else ev.error)[1])
                break
            if ev is None:  # cancelled: the client is gone
                running -= 1
                continue
            for chunk in _chunks(shape, choices[i], ev, echoed):
                yield chunk
            running -= ev.finish_reason is not None
        if include_usage and not failed:
            yield shape.usage_chunk(choices)
    finally:
        for pump in pumps:
            pump.cancel()
        for reader in readers:
            await reader.close()
    yield "data: [DONE]\n\n"
