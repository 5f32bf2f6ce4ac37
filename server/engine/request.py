"""The engine's request types: what the HTTP layer submits, what it receives, how events cross threads, and
the state the engine keeps per request (scheduling, adapter pin, tokens, output).

Events are produced on the engine thread and consumed on the caller's asyncio loop: ``EventSink``
captures that loop at submit time and delivers with ``loop.call_soon_threadsafe`` into an
``asyncio.Queue``. A caller without a running loop (a script, a benchmark thread) gets a plain thread
queue instead and reads with ``events_sync``.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from server.common.errors import ContextLengthExceeded, DeadlineExceeded, InvalidParameter, ServingError
from server.common.metrics import Metrics
from server.engine.guided import GuideSpec
from server.engine.logprobs import TokenLogprobs
from server.engine.output import OutputState
from server.engine.sampler import RowSampling, SamplingParams
from server.engine.tokens import TokenState


@dataclass
class GenerateParams:
    prompt_ids: list[int]
    adapter_id: str | None = None  # None = the base model
    owner: str | None = None  # the caller's tenant; must match the adapter's owner unless it is public
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] | tuple[str, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    request_id: str = ""
    deadline: float | None = None  # time.monotonic() seconds; None = the engine's request_timeout_s
    stop_token_ids: list[int] | tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_p: float = 0.0
    logprobs: int | None = None  # see server.engine.logprobs
    prompt_logprobs: int | None = None
    guide: GuideSpec | None = None  # structured output (compile it first with engine.guides.compile, off-loop)

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed, min_tokens=self.min_tokens,
                              ignore_eos=self.ignore_eos, stop=tuple(self.stop or ()),
                              stop_token_ids=tuple(self.stop_token_ids or ()),
                              include_stop_str_in_output=self.include_stop_str_in_output,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              repetition_penalty=self.repetition_penalty,
                              logit_bias=tuple(sorted((self.logit_bias or {}).items())), min_p=self.min_p,
                              logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs)

    def checked(self, vocab_size: int, max_model_len: int) -> SamplingParams:
        """The sampling parameters, or 400 naming every problem (the engine's own check, behind the HTTP
        schema's), and 400 when prompt + max_tokens exceed the context."""
        sp = self.sampling()
        problems = sp.validate(vocab_size)
        if not self.prompt_ids:
            problems.append("prompt is empty")
        if self.guide is not None:
            problems += self.guide.conflicts(self.min_tokens, self.ignore_eos)
        if problems:
            raise InvalidParameter("; ".join(problems), param="prompt" if not self.prompt_ids else None)
        total = len(self.prompt_ids) + self.max_tokens
        if total > max_model_len:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {max_model_len} tokens; the request needs "
                f"{total} ({len(self.prompt_ids)} in the prompt + {self.max_tokens} max_tokens)", param="max_tokens")
        return sp


@dataclass(frozen=True)
class GenerateEvent:
    text_delta: str
    token_ids: list[int]
    finish_reason: str | None  # None while streaming; "stop" | "length" | "abort" | "error" at the end
    prompt_tokens: int
    completion_tokens: int
    error: ServingError | None = None
    logprobs: list[TokenLogprobs] | None = None  # aligned with token_ids, when the request asked
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # first event only: per prompt token (None first)


class EventSink:
    def __init__(self, loop: asyncio.AbstractEventLoop | None):
        self.loop = loop
        self.aq: asyncio.Queue[GenerateEvent] | None = asyncio.Queue() if loop is not None else None
        self.tq: queue.Queue[GenerateEvent] | None = None if loop is not None else queue.Queue()

    @classmethod
    def for_caller(cls) -> EventSink:
        try:
            return cls(asyncio.get_running_loop())
        except RuntimeError:
            return cls(None)

    def push(self, ev: GenerateEvent) -> bool:
        """Engine thread. False when the caller's loop is gone (the request should then be aborted)."""
        if self.tq is not None:
            self.tq.put(ev)
            return True
        assert self.loop is not None and self.aq is not None
        try:
            self.loop.call_soon_threadsafe(self.aq.put_nowait, ev)
            return True
        except RuntimeError:  # loop closed
            return False


class RequestHandle:
    def __init__(self, request_id: str, sink: EventSink, on_cancel: Callable[[GenRequest], None]):
        self.request_id = request_id
        self._on_cancel = on_cancel
        self._sink = sink
        self._req: GenRequest | None = None
        self.finished = False

    def push(self, ev: GenerateEvent) -> None:
        if not self._sink.push(ev):
            self.cancel()

    async def events(self) -> AsyncIterator[GenerateEvent]:
        """Events until (and including) the one with a finish_reason. Leaving early cancels the request."""
        if self._sink.aq is None:
            raise RuntimeError("this request was submitted outside an asyncio loop: use events_sync()")
        try:
            while not self.finished:
                ev = await self._sink.aq.get()
                self.finished = ev.finish_reason is not None
                yield ev
        finally:
            if not self.finished:
                self.cancel()

    def events_sync(self, timeout: float | None = None) -> Iterator[GenerateEvent]:
        if self._sink.tq is None:
            raise RuntimeError("this request was submitted from an asyncio loop: use events()")
        try:
            while not self.finished:
                ev = self._sink.tq.get(timeout=timeout)
                self.finished = ev.finish_reason is not None
                yield ev
        finally:
            if not self.finished:
                self.cancel()

    def cancel(self) -> None:
        """Client gone: the engine removes the request within one step and frees its slot and pin."""
        if self._req is not None and not self._req.done:
            self._on_cancel(self._req)


@dataclass(eq=False)
class Request:
    """What the scheduler tracks per request; the engine subclasses it with outputs and the event sink.

    Its adapter claim (``key``, ``adapter_id``, ``store_key``, ``adapter_slot``, ``pinned``, ``slot_wait_since``)
    is what ``engine.admission`` reads and writes, the same fields as a ``ClassifyJob``'s."""

    request_id: str
    key: str | None  # residency key: the adapter's digest captured at submit; None = base model
    tokens: TokenState  # prompt + generated ids: the one copy
    max_tokens: int
    adapter_id: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # monotonic seconds
    num_computed: int = 0  # tokens whose keys/values are in the cache
    seq: int = -1  # KV sequence slot while admitted
    adapter_slot: int = -1
    pinned: bool = False
    scheduled_at: float | None = None
    slot_wait_since: float | None = None
    preemptions: int = 0  # times its cache was taken back; it then recomputes prompt + generated tokens
    store_key: str | None = None  # where the adapter lives in the store (its tenant's namespace); None = adapter_id

    @property
    def num_tokens(self) -> int:
        """Prompt + generated tokens known so far."""
        return len(self.tokens)


@dataclass(eq=False)
class GenRequest(Request):
    """A generate request inside the engine: scheduling state plus outputs and timings."""

    handle: RequestHandle | None = None
    out: OutputState | None = None
    rows: RowSampling | None = None
    done: bool = False
    last_token_at: float | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # filled during prefill when asked for
    prompt_logprobs_sent: bool = False

    @property
    def wants_prompt_logits(self) -> bool:
        """Whether this step's chunk must return every position's logits: prompt logprobs still missing."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.tokens.num_prompt

    def event(self, delta: str = "", token_ids: list[int] | None = None, reason: str | None = None,
              error: ServingError | None = None, logprobs: list[TokenLogprobs] | None = None) -> GenerateEvent:
        """An event for the caller, its usage counts read from the token state; the first carries the prompt
        logprobs."""
        prompt_lps = None
        if self.prompt_logprobs is not None and not self.prompt_logprobs_sent and error is None:
            prompt_lps, self.prompt_logprobs_sent = self.prompt_logprobs, True
        return GenerateEvent(delta, token_ids or [], reason, self.tokens.num_prompt, self.tokens.num_generated,
                             error, logprobs, prompt_lps)

    def observe_token(self, now: float, metrics: Metrics | None) -> None:
        if metrics is not None:
            metrics.generation_tokens.inc()
            if self.last_token_at is None:
                metrics.ttft.observe(now - self.arrival)
            else:
                metrics.itl.observe(now - self.last_token_at)
        self.last_token_at = now


@dataclass(eq=False)
class ClassifyJob:
    """One classify call: token rows for one adapter, answered through an asyncio future on the caller's loop.

    Its rows may run over several engine steps (the padded batch is bounded in tokens); it holds its adapter
    pin from admission until its last row is done."""

    adapter_id: str
    key: str
    rows: list[list[int]]  # token ids per input, tokenised off the engine thread
    deadline: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    arrival: float = field(default_factory=time.monotonic)
    adapter_slot: int = -1
    pinned: bool = False
    slot_wait_since: float | None = None
    done: bool = False
    next_row: int = 0  # rows before this one are in a batch already
    results: list = field(default_factory=list)  # (label, scores) per finished row, in order
    store_key: str | None = None  # where the adapter lives in the store; None = adapter_id

    @classmethod
    def create(cls, adapter_id: str, key: str, rows: list[list[int]], timeout_s: float,
               store_key: str | None = None) -> ClassifyJob:
        loop = asyncio.get_running_loop()
        return cls(adapter_id, key, rows, time.monotonic() + timeout_s, loop, loop.create_future(),
                   store_key=store_key)

    async def wait(self) -> list[tuple[str, dict[str, float]]]:
        try:
            return await self.future
        finally:
            self.done = True  # answered, failed, or the caller went away: the engine skips it

    def resolve(self, result: list[tuple[str, dict[str, float]]] | None, error: BaseException | None = None) -> None:
        """Engine thread: settle the future on the caller's loop (ignored if the caller has gone)."""
        self.done = True

        def settle() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass

    def expired(self, now: float) -> bool:
        if now > self.deadline and not self.done:
            self.resolve(None, DeadlineExceeded("classification exceeded its deadline"))
            return True
        return False
