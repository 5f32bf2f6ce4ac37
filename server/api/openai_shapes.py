"""The OpenAI response and stream-chunk shapes of /v1/completions and /v1/chat/completions: choices, usage and
logprobs, built from the engine's results (``GenerateEvent``, ``TokenLogprobs``). No engine work here.

Logprobs (see ``server.engine.logprobs`` for what they are computed from) are shaped as vLLM's server does:

- completions (legacy): ``tokens`` (each token decoded alone), ``token_logprobs`` (None for the first prompt
  token), ``top_logprobs`` (text -> logprob: the k most likely plus the chosen token), ``text_offset`` (each
  token's offset in the choice's text, as the running sum of the token texts before it);
- chat: ``content``, per generated token ``{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}``.

A logprob too small for JSON (-inf) is written as -9999.0, as vLLM does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from server.api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatLogprobs,
    ChatResponse,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    TopLogprob,
    Usage,
)
from server.engine.logprobs import TokenLogprobs

FLOOR = -9999.0


def finite(lp: float) -> float:
    return lp if lp > FLOOR else FLOOR


class TokenTexts:
    """Each token id decoded alone (the text a logprob entry names), remembered per id; or, with vLLM's
    ``return_tokens_as_token_ids``, ``token_id:<id>`` (many byte tokens decode alike, as U+FFFD)."""

    def __init__(self, tokenizer, as_ids: bool = False):
        self.tokenizer = tokenizer
        self.as_ids = as_ids
        self.cache: dict[int, str] = {}

    def __call__(self, ids: list[int]) -> list[str]:
        if self.as_ids:
            return [f"token_id:{i}" for i in ids]
        missing = sorted({i for i in ids if i not in self.cache})
        if missing:
            for i, text in zip(missing, self.tokenizer.batch_decode([[i] for i in missing]), strict=True):
                self.cache[i] = text
        return [self.cache[i] for i in ids]


@dataclass
class Choice:
    """One returned sequence as it accumulates: its text, tokens, logprobs and end."""

    index: int
    prompt_index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    offset: int = 0  # characters of logprob token text already returned (the next text_offset)
    started: bool = False  # a stream has sent its first chunk (the echoed prompt goes with it)

    @property
    def cumulative_logprob(self) -> float:
        return sum(lp.logprob for lp in self.logprobs)


def completion_logprobs(texts: TokenTexts, entries: list[TokenLogprobs | None], ids: list[int],
                        start_offset: int) -> tuple[CompletionLogprobs, int]:
    """The legacy logprobs object of ``entries`` (tokens ``ids``; an entry None has no logprob: the first
    prompt token), and the offset after them."""
    wanted = list(ids) + [t for e in entries if e is not None for t, _ in e.top]
    names = dict(zip(wanted, texts(wanted), strict=True))
    out = CompletionLogprobs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
    offset = start_offset
    for tok, e in zip(ids, entries, strict=True):
        out.tokens.append(names[tok])
        out.text_offset.append(offset)
        offset += len(names[tok])
        if e is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(finite(e.logprob))
        top = {names[t]: finite(v) for t, v in e.top}
        top.setdefault(names[tok], finite(e.logprob))
        out.top_logprobs.append(top)
    return out, offset


def chat_logprobs(texts: TokenTexts, entries: list[TokenLogprobs]) -> ChatLogprobs:
    wanted = [e.token for e in entries] + [t for e in entries for t, _ in e.top]
    names = dict(zip(wanted, texts(wanted), strict=True))

    def top(tok: int, lp: float) -> TopLogprob:
        return TopLogprob(token=names[tok], logprob=finite(lp), bytes=list(names[tok].encode("utf-8")))

    return ChatLogprobs(content=[ChatTokenLogprob(**top(e.token, e.logprob).model_dump(),
                                                  top_logprobs=[top(t, v) for t, v in e.top]) for e in entries])


def usage(choices: list[Choice]) -> Usage:
    """Prompt tokens once per prompt (however many choices it has), completion tokens of every sequence."""
    prompts = {c.prompt_index: c.prompt_tokens for c in choices}
    p, c = sum(prompts.values()), sum(ch.completion_tokens for ch in choices)
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


class Shape:
    """The response and chunk shapes of one request."""

    def __init__(self, rid: str, created: int, model: str, chat: bool, texts: TokenTexts, want_logprobs: bool):
        self.rid, self.created, self.model, self.chat = rid, created, model, chat
        self.texts, self.want_logprobs = texts, want_logprobs

    def response(self, choices: list[Choice], counted: list[Choice], echo: list[tuple[str, list[int]]] | None):
        """``choices``: those returned; ``counted``: every sequence generated (usage); ``echo``: per prompt its
        text and ids, when echoed."""
        use = usage(counted)
        if self.chat:
            return ChatResponse(id=self.rid, created=self.created, model=self.model, usage=use, choices=[
                ChatChoice(index=c.index, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                           logprobs=chat_logprobs(self.texts, c.logprobs) if self.want_logprobs else None)
                for c in choices])
        out = []
        for c in choices:
            prefix, lps, offset = "", None, 0
            if echo is not None:
                prefix, prompt_ids = echo[c.prompt_index]
                if self.want_logprobs:
                    lps, offset = completion_logprobs(self.texts, c.prompt_logprobs or [None] * len(prompt_ids),
                                                      prompt_ids, 0)
            if self.want_logprobs:
                gen, _ = completion_logprobs(self.texts, list(c.logprobs), c.token_ids, offset)
                lps = gen if lps is None else CompletionLogprobs(
                    text_offset=lps.text_offset + gen.text_offset, token_logprobs=lps.token_logprobs + gen.token_logprobs,
                    tokens=lps.tokens + gen.tokens, top_logprobs=lps.top_logprobs + gen.top_logprobs)
            out.append(CompletionChoice(index=c.index, text=prefix + c.text, finish_reason=c.finish_reason, logprobs=lps))
        return CompletionResponse(id=self.rid, created=self.created, model=self.model, usage=use, choices=out)

    def chunk(self, index: int, delta: str | None, reason: str | None, role: bool = False,
              logprobs: dict | None = None) -> str:
        if self.chat:
            d: dict = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
            choice = {"index": index, "delta": d, "finish_reason": reason, "logprobs": logprobs}
            obj = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                   "choices": [choice]}
        else:
            choice = {"index": index, "text": delta or "", "finish_reason": reason, "logprobs": logprobs}
            obj = {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                   "choices": [choice]}
        return sse(obj)

    def chunk_logprobs(self, choice: Choice, entries: list[TokenLogprobs | None], ids: list[int]) -> dict | None:
        """The logprobs of one chunk's tokens (their text offsets continue the choice's)."""
        if not self.want_logprobs or not ids:
            return None
        if self.chat:
            return chat_logprobs(self.texts, [e for e in entries if e is not None]).model_dump()
        lps, choice.offset = completion_logprobs(self.texts, entries, ids, choice.offset)
        return lps.model_dump()

    def usage_chunk(self, choices: list[Choice]) -> str:
        obj = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": [], "usage": usage(choices).model_dump()}
        return sse(obj)


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
