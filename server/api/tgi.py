"""LoRAX/TGI-compatible generation: POST /generate, POST /generate_stream, and POST / (what the `lorax` and
`text_generation` clients call: it streams when the body says ``"stream": true``, else answers a one-element
list), with ``{"inputs", "parameters": {"adapter_id", ...}}`` answered in LoRAX's shapes: generated_text,
``details`` (finish_reason length | eos_token | stop_sequence, token counts, seed, each token with its
logprob), and SSE events ``{"token", "generated_text", "details"}``. Errors on these routes use LoRAX's
``{"error", "error_type"}``.

Logprobs come from the engine's logprob data path (``server.engine.logprobs``: the raw model distribution,
before temperature, top-k/top-p and grammar masks): each generated token's under ``details.tokens``, and with
``decoder_input_details`` each prompt token's under ``details.prefill`` (the first token's logprob null).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool

from server.api.completions import EventReader, StalledReaderGuard
from server.api.deps import adapter_of, get_state, inference_principal
from server.api.middleware import describe_error
from server.api.schemas import INT32, MAX_STOP, MAX_STOP_CHARS, MAX_TEMPERATURE, Finite, Strict, Text
from server.api.structured import compile_guide
from server.common.auth import Principal
from server.common.errors import InvalidParameter, ServingError
from server.engine import GenerateEvent, GenerateParams
from server.engine.guided import GuideSpec
from server.engine.output import eos_ids
from server.engine.sampler import SEED_MAX

router = APIRouter(tags=["generate (LoRAX/TGI)"])
DEFAULT_MAX_NEW_TOKENS = 20  # TGI's and LoRAX's clients' default
# fields the clients always send; served only at these values (anything else is refused, naming it)
NO_OP = {"adapter_source": (None,), "merged_adapters": (None,), "api_token": (None,),
         "repetition_penalty": (None, 1.0), "frequency_penalty": (None, 0.0), "typical_p": (None, 1.0),
         "best_of": (None, 1), "watermark": (False,), "top_n_tokens": (None, 0), "return_k_alternatives": (None,)}


class LoraxResponseFormat(Strict):
    type: Literal["json_object"]
    schema_: dict[str, Any] | None = Field(None, alias="schema")


class TgiGrammar(Strict):
    type: Literal["json", "regex"]
    value: str | dict[str, Any]


class TgiParameters(Strict):
    adapter_id: Text | None = Field(None, max_length=256, description="None: the base model")
    do_sample: bool = False
    max_new_tokens: int | None = Field(None, ge=1, le=INT32)
    ignore_eos_token: bool = False
    return_full_text: bool = False
    stop: list[Text] = Field(default_factory=list, max_length=MAX_STOP)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    temperature: Finite | None = Field(None, ge=0.0, le=MAX_TEMPERATURE)
    top_k: int | None = Field(None, ge=0, le=INT32)
    top_p: Finite | None = Field(None, gt=0.0, le=1.0)
    truncate: int | None = Field(None, ge=1, le=INT32, description="keep only the last N prompt tokens")
    details: bool = False
    decoder_input_details: bool = Field(False, description="details.prefill: the prompt tokens with their logprobs")
    response_format: LoraxResponseFormat | None = None
    grammar: TgiGrammar | None = None
    adapter_source: Any = None
    merged_adapters: Any = None
    api_token: Any = None
    repetition_penalty: Any = None
    frequency_penalty: Any = None
    typical_p: Any = None
    best_of: Any = None
    watermark: Any = False
    top_n_tokens: Any = None
    return_k_alternatives: Any = None

    @model_validator(mode="after")
    def _served(self):
        for name, ok in NO_OP.items():
            if getattr(self, name) not in ok:
                raise ValueError(f"parameters.{name}: not supported by this server")
        if any(not s or len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"parameters.stop: non-empty strings of at most {MAX_STOP_CHARS} characters")
        if self.response_format is not None and self.grammar is not None:
            raise ValueError("parameters.grammar: only one of response_format and grammar")
        return self

    @property
    def sampling(self) -> bool:
        """TGI: sampling when asked, or when any warper is set; else greedy (and temperature 0 is greedy)."""
        warped = self.temperature not in (None, 1.0) or bool(self.top_k) or self.top_p not in (None, 1.0)
        return (self.do_sample or warped) and self.temperature != 0

    def guide(self) -> GuideSpec | None:
        if self.response_format is not None:
            field = "parameters.response_format"
            s = self.response_format.schema_
            return GuideSpec.json_schema(s, field) if s is not None else GuideSpec.json_object(field)
        if self.grammar is not None:
            field = "parameters.grammar"
            if self.grammar.type == "json":
                return GuideSpec.json_schema(self.grammar.value, field)
            if not isinstance(self.grammar.value, str):
                raise InvalidParameter(f"{field}: a regex grammar's value is a string", param=field)
            return GuideSpec.regex(self.grammar.value, field)
        return None


class TgiRequest(Strict):
    inputs: Text = Field(min_length=1)
    parameters: TgiParameters = Field(default_factory=TgiParameters)
    stream: bool = False


def tgi_error(exc: BaseException) -> JSONResponse:
    status, payload, retry_after = describe_error(exc)
    kind = "overloaded" if status in (429, 503) else "validation" if status < 500 else "generation"
    headers = {"Retry-After": str(max(1, int(retry_after)))} if retry_after is not None else None
    return JSONResponse({"error": payload["error"]["message"], "error_type": kind}, status_code=status, headers=headers)


async def _parse(request: Request) -> TgiRequest:
    try:
        return TgiRequest.model_validate(json.loads(await request.body()))
    except json.JSONDecodeError as e:
        raise InvalidParameter(f"malformed JSON: {e}") from None
    except UnicodeDecodeError as e:  # json.loads decodes bytes first: not UTF-8 (or -16/-32) at all
        raise InvalidParameter(f"malformed JSON: the body is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        if first.get("type") == "extra_forbidden":
            msg = "not supported by this server (unknown field)"
        raise InvalidParameter(f"{where}: {msg}" if where and not msg.startswith(where) else msg,
                               param=where or None) from None


class _Run:
    """One TGI request submitted to the engine: its reader and what the answer needs."""

    def __init__(self, body: TgiRequest, reader: EventReader, first: GenerateEvent | None, eos: frozenset[int],
                 specials: frozenset[int], tokenizer, prompt_ids: list[int]):
        self.body, self.reader, self.first, self.eos, self.specials = body, reader, first, eos, specials
        self.tokenizer, self.prompt_ids = tokenizer, prompt_ids
        self.text: list[str] = []
        self.tokens: list[dict] = []
        self.prefill: list[dict] = []
        self.last: GenerateEvent | None = None

    def take(self, ev: GenerateEvent) -> list[dict]:
        """The event's tokens in TGI's shape (text: the event's text, on its last token)."""
        self.last = ev
        self.text.append(ev.text_delta)
        if ev.prompt_logprobs is not None:  # the first event: the prompt tokens, each decoded alone (as TGI)
            texts = self.tokenizer.batch_decode([[i] for i in self.prompt_ids])
            self.prefill = [{"id": i, "text": t, "logprob": e.logprob if e is not None else None}
                            for i, t, e in zip(self.prompt_ids, texts, ev.prompt_logprobs, strict=True)]
        out = []
        lps = ev.logprobs or [None] * len(ev.token_ids)  # none asked: /generate without details
        for k, (tid, lp) in enumerate(zip(ev.token_ids, lps, strict=True)):
            text = ev.text_delta if k == len(ev.token_ids) - 1 else ""
            out.append({"id": tid, "text": text, "logprob": lp.logprob if lp is not None else None,
                        "special": tid in self.specials})
        self.tokens += out
        return out

    def finish_reason(self) -> str:
        ev = self.last
        if ev is None or ev.finish_reason == "length":
            return "length"
        if ev.finish_reason == "stop" and self.tokens and self.tokens[-1]["id"] not in self.eos \
                and self.body.parameters.stop:
            return "stop_sequence"
        return "eos_token"  # EOS, or a grammar that completed (where LoRAX's model emits EOS)

    def generated_text(self) -> str:
        text = "".join(self.text)
        return self.body.inputs + text if self.body.parameters.return_full_text else text

    def details(self, stream: bool) -> dict:
        p = self.body.parameters
        ev = self.last
        d = {"finish_reason": self.finish_reason(), "prompt_tokens": ev.prompt_tokens if ev else 0,
             "generated_tokens": ev.completion_tokens if ev else 0, "seed": p.seed if p.sampling else None}
        if not stream:
            d.update(prefill=self.prefill, tokens=self.tokens, best_of_sequences=None)
        return d


async def _start(request: Request, principal: Principal, streams: bool | None = None) -> _Run:
    """Parse, validate and submit; ``streams``: whether the route streams (None: as the body says)."""
    state = get_state(request)
    deadline = time.monotonic() + state.settings.request_timeout
    body = await _parse(request)
    if streams is False and body.stream:
        raise InvalidParameter("stream: use POST /generate_stream (or POST / with stream)", param="stream")
    p = body.parameters
    streaming = bool(streams or (streams is None and body.stream))
    if p.decoder_input_details and streaming:
        raise InvalidParameter("parameters.decoder_input_details: not available when streaming (as TGI)",
                               param="parameters.decoder_input_details")
    rt = state.require()
    engine = rt.engine
    adapter_id = adapter_of(state, p.adapter_id) if p.adapter_id is not None else None
    engine.check_capacity()
    ids = await run_in_threadpool(lambda: list(rt.tokenizer(body.inputs)["input_ids"]))
    if p.truncate is not None:
        ids = ids[-p.truncate:]
    guide = await compile_guide(engine, p.guide())
    params = GenerateParams(
        prompt_ids=ids, adapter_id=adapter_id, owner=principal.tenant,
        max_tokens=p.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=(p.temperature or 1.0) if p.sampling else 0.0, top_p=p.top_p or 1.0, top_k=p.top_k or 0,
        seed=p.seed, stop=p.stop, ignore_eos=p.ignore_eos_token, request_id=request.state.request_id,
        deadline=deadline, guide=guide, logprobs=0 if p.details or streaming else None,  # stream tokens carry theirs
        prompt_logprobs=0 if p.decoder_input_details else None)
    readers, firsts = await EventReader.open(engine, [params], request, deadline)
    specials = frozenset(int(i) for i in rt.tokenizer.all_special_ids)
    return _Run(body, readers[0], firsts[0], eos_ids(rt.base), specials, rt.tokenizer, ids)


async def _answer(run: _Run) -> dict:
    try:
        ev = run.first
        while ev is not None:
            if ev.error is not None:
                raise ev.error
            run.take(ev)
            if ev.finish_reason is not None:
                break
            ev = await run.reader.next()
    finally:
        await run.reader.close()
    out: dict = {"generated_text": run.generated_text()}
    if run.body.parameters.details:
        out["details"] = run.details(stream=False)
    return out


async def _events(run: _Run) -> AsyncIterator[str]:
    try:
        ev = run.first
        while ev is not None:
            if ev.error is not None:
                yield _sse({"error": describe_error(ev.error)[1]["error"]["message"], "error_type": "generation"})
                return
            final = ev.finish_reason is not None
            for k, tok in enumerate(run.take(ev)):
                last = final and k == len(ev.token_ids) - 1
                yield _sse({"token": tok, "generated_text": run.generated_text() if last else None,
                            "details": run.details(stream=True) if last and run.body.parameters.details else None})
            if final:
                return
            ev = await run.reader.next()
    except ServingError as e:
        yield _sse({"error": e.message, "error_type": "generation"})
    finally:
        await run.reader.close()


def _sse(obj: dict) -> str:
    return f"data:{json.dumps(obj, separators=(',', ':'))}\n\n"


def _stream(request: Request, run: _Run) -> StalledReaderGuard:
    return StalledReaderGuard(_events(run), [run.reader.handle], get_state(request).settings.stream_write_timeout,
                              media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/generate")
async def generate(request: Request, principal: Principal = Depends(inference_principal)):
    """LoRAX/TGI: `{"inputs", "parameters": {"adapter_id", "max_new_tokens", ..., "details"}}`."""
    try:
        return await _answer(await _start(request, principal, streams=False))
    except Exception as e:
        return tgi_error(e)


@router.post("/generate_stream")
async def generate_stream(request: Request, principal: Principal = Depends(inference_principal)):
    """LoRAX/TGI: the same request, answered as server-sent events, one per token."""
    try:
        return _stream(request, await _start(request, principal, streams=True))
    except Exception as e:
        return tgi_error(e)


@router.post("/")
async def compat_generate(request: Request, principal: Principal = Depends(inference_principal)):
    """What the `lorax` and `text_generation` clients call: a stream when `stream` is true, else `[response]`."""
    try:
        run = await _start(request, principal)
        if run.body.stream:
            return _stream(request, run)
        return [await _answer(run)]
    except Exception as e:
        return tgi_error(e)
