"""A request's output: sampled tokens become text deltas and a finish reason.

``OutputState.append`` records each sampled token in the request's ``TokenState`` (the one write of a
generated id) and decides what text may be returned: incremental detokenisation over a short window, EOS,
min_tokens, max_tokens, ``stop_token_ids`` and stop strings (text that could begin a stop string is held
back; the stop string, or the stop token's text, is returned only with ``include_stop_str_in_output``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.guided import Guide
from server.engine.sampler import SamplingParams
from server.engine.tokens import TokenState


class Detokenizer:
    """Incremental decoding over a short window, so the cost per token does not grow with the text.

    It reads the request's ``TokenState`` in place through two offsets: ``prefix`` (where the window starts)
    and ``read`` (ids already turned into text). The window starts a few prompt tokens back so that the
    first generated token's leading space (and multi-token characters) decode as they would in the full
    text."""

    CONTEXT = 5

    def __init__(self, tokenizer, tokens: TokenState):
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.read = tokens.num_prompt
        self.prefix = max(0, self.read - self.CONTEXT)
        # transformers' ``decode`` first walks its argument through ``to_py_obj`` (for tensors and arrays),
        # which cost 4x the Rust decode itself here (~10% of a decode step's engine time, twice per token);
        # our ids are already a list of ints, so go straight to ``_decode``, what ``decode`` then calls
        decode = getattr(tokenizer, "_decode", None)
        self._decode_list = decode if callable(decode) else tokenizer.decode

    def _decode(self, start: int, stop: int) -> str:
        return self._decode_list(self.tokens.ids[start:stop], skip_special_tokens=True)

    def step(self) -> str:
        """Text the ids appended since the last call complete (held back while a character is incomplete)."""
        end = len(self.tokens)
        before = self._decode(self.prefix, self.read)
        after = self._decode(self.prefix, end)
        if len(after) > len(before) and not after.endswith("\ufffd"):  # an incomplete UTF-8 sequence waits
            self.prefix, self.read = self.read, end
            return after[len(before):]
        return ""

    def flush(self, end: int | None = None) -> str:
        """At the end: text still held for an incomplete character, decoded as it stands (with U+FFFD).
        ``end``: decode ids before this index only (an EOS that ends the request is not text)."""
        end = len(self.tokens) if end is None else end
        before = self._decode(self.prefix, self.read)
        after = self._decode(self.prefix, end)
        self.prefix, self.read = self.read, end
        return after[len(before):] if len(after) > len(before) else ""


@dataclass
class OutputState:
    """A request's generated text. ``append`` records a token and returns (text delta, finish reason or None)."""

    params: SamplingParams
    tokenizer: object
    tokens: TokenState
    eos_ids: frozenset[int]
    guide: Guide | None = None  # structured output: the request ends where its grammar is complete
    text: str = ""
    emitted: int = 0  # characters of ``text`` already returned
    detok: Detokenizer = field(init=False)

    def __post_init__(self) -> None:
        self.detok = Detokenizer(self.tokenizer, self.tokens)

    def append(self, token: int) -> tuple[str, str | None]:
        p = self.params
        self.tokens.append(token)
        n = self.tokens.num_generated
        if token in self.eos_ids and not p.ignore_eos and n > p.min_tokens:
            return self._flush(len(self.tokens) - 1), "stop"
        if p.stop_token_ids and token in p.stop_token_ids and n > p.min_tokens:
            return self._flush(None if p.include_stop_str_in_output else len(self.tokens) - 1), "stop"
        self.text += self.detok.step()
        if p.stop and n >= p.min_tokens:
            cut = self._find_stop()
            if cut is not None:
                if p.include_stop_str_in_output:
                    cut += min(len(s) for s in p.stop if self.text.startswith(s, cut))
                delta = self.text[self.emitted:cut] if cut > self.emitted else ""
                self.text = self.text[:cut]
                self.emitted = len(self.text)
                return delta, "stop"
        if self.guide is not None and self.guide.complete:
            return self._flush(), "stop"
        if n >= p.max_tokens:
            return self._flush(), "length"
        end = len(self.text) - self._held_back()
        delta = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta, None

    def _flush(self, end: int | None = None) -> str:
        self.text += self.detok.flush(end)
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta

    def _find_stop(self) -> int | None:
        # text that could begin a stop string is never returned, so a match starts at or after ``emitted``
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.params.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest tail of the unreturned text that is a proper prefix of a stop string."""
        tail = self.text[self.emitted:]
        best = 0
        for s in self.params.stop:
            for k in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:k]):
                    best = k
                    break
        return best


def eos_ids(base) -> frozenset[int]:
    """Every id that ends generation: the tokenizer's EOS and the generation config's (often a list)."""
    ids = set()
    if base.tokenizer.eos_token_id is not None:
        ids.add(int(base.tokenizer.eos_token_id))
    gen_cfg = getattr(base.model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, list | tuple):
        ids.update(int(i) for i in extra)
    return frozenset(ids)
