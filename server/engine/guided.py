"""Structured output by constrained decoding: JSON (any object, or a JSON schema), a regex, or a choice list.

The grammar engine is llguidance (chosen by measurement, BENCHMARKS.md "Constrained decoding"): it builds
the grammar lazily, so compiling a schema costs milliseconds whatever the vocabulary, and every stage of
it is bounded by explicit limits (grammar size, lexer fuel per compile and per token), so a hostile schema
fails with an error instead of stalling the engine.

``Guides`` (one per engine, so per tokenizer) compiles a ``GuideSpec`` once into a matcher template, cached
(LRU) by spec; each request gets its own copy (``Guide``). Compiling runs on the caller's thread (the API
runs it in a threadpool under a wall-clock bound), never on the engine thread: ``start`` on the engine's
submit path finds the template in the cache.

The sampler's hook (``mask_rows``, the last logits processor, before picking; ``advance_rows`` after)
touches only rows that carry a guide; a batch without one skips both. ``mask_rows`` fills every
constrained row's bitmask in one call and sets the logits of disallowed tokens to -inf after every other
processor (logit_bias, penalties), so none of them can lift a forbidden token; ``advance_rows`` first checks
every row's token against the mask it was drawn under (a row with no mask this step fails) and only then
feeds the tokens to the matchers, so a failing row changes no matcher (``isolation.sample_isolating`` may
rerun the rows alone). A guide whose grammar cannot continue is ``complete``: the request ends there with
finish_reason "stop".
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Literal

import torch

from server.common.errors import InvalidParameter

MAX_SCHEMA_CHARS = 64 * 1024  # a JSON schema, serialised
MAX_SCHEMA_DEPTH = 64  # nesting of objects and lists in a schema
MAX_REGEX_CHARS = 4096
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024
COMPILE_TIMEOUT_S = 10.0  # the API's wall-clock bound on one compile (the limits below bound the work itself)
CACHE_ENTRIES = 256
# llguidance's own bounds: grammar size (its default 500k), and lexer work while building and per token
LIMITS = dict(max_grammar_size=200_000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000,
              max_lexer_states=50_000)

Kind = Literal["json_object", "json_schema", "regex", "choice"]


@dataclass(frozen=True)
class GuideSpec:
    """What a request constrains its output to. ``source``: the schema as canonical JSON, the regex, or the
    choices as a JSON list; ``field``: the request field it came from (errors name it)."""

    kind: Kind
    source: str
    field: str = dc_field(compare=False)  # not part of the cache key: the same schema compiles once

    @classmethod
    def json_object(cls, field: str) -> GuideSpec:
        return cls("json_object", '{"type":"object"}', field)

    @classmethod
    def json_schema(cls, schema: dict | str, field: str) -> GuideSpec:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise InvalidParameter(f"{field}: not valid JSON ({e})", param=field) from None
        if not isinstance(schema, dict | bool):
            raise InvalidParameter(f"{field}: a JSON schema is an object, got {type(schema).__name__}", param=field)
        if _depth(schema) > MAX_SCHEMA_DEPTH:
            raise InvalidParameter(f"{field}: the schema nests deeper than {MAX_SCHEMA_DEPTH} levels", param=field)
        text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
        if len(text) > MAX_SCHEMA_CHARS:
            raise InvalidParameter(f"{field}: the schema has {len(text)} characters (at most {MAX_SCHEMA_CHARS})",
                                   param=field)
        return cls("json_schema", text, field)

    @classmethod
    def regex(cls, pattern: str, field: str) -> GuideSpec:
        if not pattern or len(pattern) > MAX_REGEX_CHARS:
            raise InvalidParameter(f"{field}: a regex of 1 to {MAX_REGEX_CHARS} characters", param=field)
        return cls("regex", pattern, field)

    @classmethod
    def choice(cls, choices: Sequence[str], field: str) -> GuideSpec:
        if not 1 <= len(choices) <= MAX_CHOICES or any(not c or len(c) > MAX_CHOICE_CHARS for c in choices):
            raise InvalidParameter(f"{field}: 1 to {MAX_CHOICES} non-empty strings of at most {MAX_CHOICE_CHARS} "
                                   "characters", param=field)
        return cls("choice", json.dumps(list(choices)), field)

    def conflicts(self, min_tokens: int, ignore_eos: bool) -> list[str]:
        """Sampling options a grammar cannot honour (it decides where the output ends)."""
        return [f"{name} cannot be combined with {self.field}: the grammar decides where the output ends"
                for name, on in (("min_tokens", min_tokens > 0), ("ignore_eos", ignore_eos)) if on]

    def grammar(self) -> str:
        """The llguidance grammar of this spec."""
        import llguidance as ll

        m = ll.LLMatcher
        if self.kind in ("json_object", "json_schema"):
            # whitespace is not free: a model could otherwise spend its tokens on blanks between fields
            return m.grammar_from_json_schema(self.source, defaults={"whitespace_flexible": False})
        if self.kind == "regex":
            return m.grammar_from_regex(self.source)
        # a choice is one of the literal strings: a Lark alternation of JSON-quoted literals
        alts = " | ".join(json.dumps(c) for c in json.loads(self.source))
        return m.grammar_from_lark(f"start: {alts}")


def _depth(value) -> int:
    """Nesting depth of JSON containers, without recursion (a hostile schema may nest thousands deep)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            if d <= MAX_SCHEMA_DEPTH:
                todo.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


class Guide:
    """One request's matcher: its position in the grammar."""

    def __init__(self, matcher):
        self.matcher = matcher
        self.mask: torch.Tensor | None = None  # [V] this step's mask (0 / -inf), set by mask_rows

    @property
    def complete(self) -> bool:
        """The grammar allows nothing more: the output is whole."""
        return bool(self.matcher.is_stopped())

    def check(self) -> None:
        if self.matcher.is_error():
            raise ValueError(f"the grammar matcher failed: {self.matcher.get_error()}")


class Guides:
    """Compiled grammars for one tokenizer, cached by spec; a request's ``Guide`` is a copy of its template."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Sequence[int], cache_entries: int = CACHE_ENTRIES):
        self.vocab_size = vocab_size
        self._hf = tokenizer
        self._eos = sorted(eos_ids)
        self._ll_tok = None  # llguidance's view of the tokenizer: built on the first compile (~2 s for 49k tokens)
        self._cache: OrderedDict[GuideSpec, object] = OrderedDict()
        self._lock = threading.Lock()
        self._entries = cache_entries

    def _tokenizer(self):
        import llguidance.hf

        with self._lock:
            if self._ll_tok is None:
                self._ll_tok = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size, eos_token=self._eos)
            return self._ll_tok

    def compile(self, spec: GuideSpec) -> None:
        """Compile ``spec`` into the cache (any thread but the engine's; llguidance drops the GIL while it
        builds). An invalid schema or regex, or one past the limits, raises InvalidParameter naming its field."""
        self._template(spec)

    def start(self, spec: GuideSpec) -> Guide:
        """A fresh matcher for one request (compiles on this thread if the spec is not cached)."""
        return Guide(self._template(spec).deep_copy())

    def _template(self, spec: GuideSpec):
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        import llguidance as ll

        try:
            matcher = ll.LLMatcher(self._tokenizer(), spec.grammar(), log_level=0, limits=ll.LLParserLimits(**LIMITS))
        except (ValueError, TypeError, UnicodeError) as e:
            raise InvalidParameter(f"{spec.field}: {e}", param=spec.field) from None
        if matcher.is_error():
            raise InvalidParameter(f"{spec.field}: {matcher.get_error()}", param=spec.field)
        with self._lock:
            self._cache[spec] = matcher
            while len(self._cache) > self._entries:
                self._cache.popitem(last=False)
        return matcher


# ---- the sampler's hook (engine thread) ----------------------------------------------------------------
_executor = None  # llguidance's thread pool for filling masks, made on first use


def mask_rows(logits: torch.Tensor, guides: Sequence[Guide | None]) -> None:
    """logits [B, V], IN PLACE: every guided row's disallowed tokens at -inf (the logits processors' last
    step, ``logits.mask_grammar``). Each guide keeps its row's mask [V] (0 where allowed, -inf elsewhere)
    for ``advance_rows`` to check the picked token against."""
    import llguidance  # not llguidance.torch: its import pulls in torch.compile (seconds)

    global _executor
    rows = [i for i, g in enumerate(guides) if g is not None]
    for i in rows:
        guides[i].check()  # type: ignore[union-attr]
    V = logits.shape[1]
    words = (V + 31) // 32
    bitmask = torch.zeros(len(rows), words, dtype=torch.int32)  # [G, ceil(V/32)], filled by llguidance
    if _executor is None:
        _executor = llguidance.LLExecutor()
    _executor.unsafe_compute_mask_ptr([(guides[i].matcher, k) for k, i in enumerate(rows)],  # type: ignore[union-attr]
                                      bitmask.data_ptr(), words * 4, len(rows))
    bias = bitmask_bias(bitmask.to(logits.device), V).to(logits.dtype)  # [G, V]
    logits.index_add_(0, torch.tensor(rows, device=logits.device), bias)
    for k, i in enumerate(rows):
        guides[i].mask = bias[k]  # type: ignore[union-attr]


def advance_rows(guides: Sequence[Guide | None], tokens: Sequence[int]) -> None:
    """Feed each guided row its sampled token, after checking them all against the masks they were drawn
    under (so a failing row leaves every matcher as it was). A guide without a mask for this step was never
    masked: its token is refused, whatever it is (the mask cannot be bypassed)."""
    rows = [i for i, g in enumerate(guides) if g is not None]
    for i in rows:
        if guides[i].mask is None:  # type: ignore[union-attr]
            raise ValueError(f"row {i}: its token was drawn without its grammar mask")
    allowed = torch.stack([guides[i].mask[tokens[i]] == 0 for i in rows]).tolist()  # type: ignore[index,union-attr]
    for ok, i in zip(allowed, rows, strict=True):
        if not ok:
            raise ValueError(f"row {i}: token {tokens[i]} is outside its grammar")
    for i in rows:
        g = guides[i]
        g.mask = None  # type: ignore[union-attr]  # one mask, one token
        if not g.matcher.consume_token(tokens[i]):  # type: ignore[union-attr]
            raise ValueError(f"the grammar matcher refused token {tokens[i]}: {g.matcher.get_error()}")  # type: ignore[union-attr]


_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()  # [256, 8]: byte -> its bits, low first
_BIAS = torch.zeros(256, 8).masked_fill(~_BITS, float("-inf"))  # [256, 8]: byte -> 0 per set bit, else -inf
_bias_on: dict[torch.device, torch.Tensor] = {}


def bitmask_bias(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, W] int32 bitmask (token t allowed iff bit t % 32 of word t // 32) -> [R, vocab] float: 0 where
    allowed, -inf elsewhere. One table lookup per byte (little-endian: byte t // 8 holds bit t % 8), then
    added to the logits (a boolean masked_fill of the unpacked mask was slower on CPU)."""
    table = _bias_on.get(bitmask.device)
    if table is None:
        table = _bias_on[bitmask.device] = _BIAS.to(bitmask.device)
    by = bitmask.contiguous().view(torch.uint8).long()  # [R, 4W]
    return torch.nn.functional.embedding(by, table).reshape(bitmask.shape[0], -1)[:, :vocab]
