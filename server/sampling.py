"""Token sampling and the per-request output state (detokenisation, stop rules).

``sample`` picks one token per row of a step's logits, vectorised across the batch: greedy rows take the
argmax; sampled rows apply temperature, top-k and top-p on one sort and draw by inverse CDF with a uniform
number from the request's own ``torch.Generator`` (so a seeded request gives the same tokens whatever else
is in the batch). ``OutputState`` turns sampled tokens into text deltas: incremental detokenisation over a
short window, EOS, min_tokens, max_tokens, and stop strings (text that could begin a stop string is held
back; the stop string itself is never returned).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # <= 0: off
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()

    def validate(self) -> list[str]:
        """Every problem with the parameters, each naming its field."""
        p = []
        if self.max_tokens < 1:
            p.append(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            p.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            p.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            p.append(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if any(not s for s in self.stop):
            p.append("stop strings must be non-empty")
        return p


@dataclass
class RowSampling:
    """What ``sample`` needs per row: the params, the request's generator and its tokens so far."""

    params: SamplingParams
    generator: torch.Generator
    num_generated: int = 0


def make_generator(seed: int | None, fallback: torch.Generator) -> torch.Generator:
    """A request's own CPU generator: seeded when asked, else seeded from the engine's generator."""
    g = torch.Generator()
    s = seed if seed is not None else int(torch.randint(0, 2**62, (1,), generator=fallback))
    return g.manual_seed(s)


def sample(logits: torch.Tensor, rows: list[RowSampling], eos_ids: torch.Tensor) -> list[int]:
    """logits [B, V] (fp32) -> one token id per row."""
    B, V = logits.shape
    dev = logits.device
    if eos_ids.numel():
        # min_tokens: EOS cannot be drawn until enough tokens exist
        hold = [r.num_generated < r.params.min_tokens for r in rows]
        if any(hold):
            held = torch.tensor(hold, device=dev)[:, None]  # [B, 1]
            is_eos = torch.zeros(V, dtype=torch.bool, device=dev)
            is_eos[eos_ids.to(dev)] = True
            logits = logits.masked_fill(held & is_eos[None, :], float("-inf"))
    out = logits.argmax(dim=-1)  # [B]; greedy rows keep this
    sampled = [i for i, r in enumerate(rows) if r.params.temperature > 0]
    if sampled:
        idx = torch.tensor(sampled, device=dev)
        sub = logits[idx]  # [S, V]
        temps = torch.tensor([rows[i].params.temperature for i in sampled], device=dev)
        top_k = torch.tensor([rows[i].params.top_k if rows[i].params.top_k > 0 else V for i in sampled], device=dev)
        top_p = torch.tensor([rows[i].params.top_p for i in sampled], device=dev)
        sorted_logits, order = (sub / temps[:, None]).sort(dim=-1, descending=True)  # [S, V]
        rank = torch.arange(V, device=dev)[None, :]
        sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        cum = probs.cumsum(dim=-1)
        # top-p keeps the smallest prefix whose mass reaches top_p (the first token always stays)
        probs = probs.masked_fill((cum - probs) >= top_p[:, None], 0.0)
        cum = probs.cumsum(dim=-1)
        u = torch.cat([torch.rand(1, generator=rows[i].generator) for i in sampled]).to(dev)  # [S]
        target = (u * cum[:, -1])[:, None].contiguous()
        pick = torch.searchsorted(cum, target).clamp_max(V - 1)  # [S, 1]
        out[idx] = order.gather(1, pick)[:, 0]
    return out.tolist()


class Detokenizer:
    """Incremental decoding over a short window, so the cost per token does not grow with the text.

    The window starts a few prompt tokens back so that the first generated token's leading space (and
    multi-token characters) decode as they would in the full text."""

    CONTEXT = 5

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-self.CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):  # an incomplete UTF-8 sequence waits
            delta = after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """At the end: text still held for an incomplete character, decoded as it stands (with U+FFFD)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):] if len(after) > len(before) else ""


@dataclass
class OutputState:
    """A request's generated tokens and text. ``append`` returns (text delta, finish reason or None)."""

    params: SamplingParams
    detok: Detokenizer
    eos_ids: frozenset[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of ``text`` already returned

    def append(self, token: int) -> tuple[str, str | None]:
        p = self.params
        self.token_ids.append(token)
        n = len(self.token_ids)
        if token in self.eos_ids and not p.ignore_eos and n > p.min_tokens:
            return self._flush(), "stop"
        self.text += self.detok.push(token)
        if p.stop and n >= p.min_tokens:
            cut = self._find_stop()
            if cut is not None:
                delta = self.text[self.emitted:cut] if cut > self.emitted else ""
                self.text = self.text[:cut]
                self.emitted = len(self.text)
                return delta, "stop"
        if n >= p.max_tokens:
            return self._flush(), "length"
        end = len(self.text) - self._held_back()
        delta = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta, None

    def _flush(self) -> str:
        self.text += self.detok.flush()
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
