"""Token sampling: the request's sampling parameters and one vectorised pick per row of a step's logits.

``sample`` works in three steps over the whole batch:

1. logprobs: for the rows that asked, the raw logits' log-softmax is kept (``logprobs``: before any
   processor, as vLLM's default);
2. logits processors (``logits.process``: min_tokens hold, logit_bias, penalties, then the grammar mask of
   structured-output rows; skipped when no row asks for one);
3. the pick: greedy rows take the argmax; sampled rows apply temperature, min-p, top-k and top-p on one
   sort and draw by inverse CDF with a uniform number from the request's own ``torch.Generator`` (so a
   seeded request gives the same tokens whatever else is in the batch);
4. structured output: each guided row's token is checked against the mask it was drawn under, then fed to
   its grammar matcher (``guided.advance_rows``), as the very last thing, so a failure anywhere before
   changes no matcher (``isolation.sample_isolating`` may rerun the rows one by one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch

from server.engine.guided import Guide, advance_rows
from server.engine.logits import ProcessorState, process
from server.engine.logprobs import MAX_LOGPROBS, TokenLogprobs, token_logprobs
from server.engine.tokens import TokenState

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # what torch.Generator.manual_seed takes
GREEDY_BELOW = 1e-5  # a temperature under this is greedy (as vLLM): dividing by a denormal would overflow


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
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1 = off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    min_p: float = 0.0
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and k alternatives
    prompt_logprobs: int | None = None  # the same for each prompt token (but the first)

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @cached_property  # read per row every step: computed once
    def processed(self) -> bool:
        """Whether any logits processor applies to this request (False: the step skips them for it)."""
        return self.min_tokens > 0 or bool(self.logit_bias) or self.penalized

    def validate(self, vocab_size: int | None = None) -> list[str]:
        """Every problem with the parameters, each naming its field (the engine's own check, behind the
        HTTP schema's: callers in-process reach the engine without it)."""
        p = []
        if self.max_tokens < 0:
            p.append(f"max_tokens must be >= 0, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            p.append(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            p.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            p.append(f"top_k must be >= -1 (0 or -1 = off), got {self.top_k}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            p.append(f"seed must be in [{SEED_MIN}, {SEED_MAX}], got {self.seed}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            p.append(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if any(not s for s in self.stop):
            p.append("stop strings must be non-empty")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (math.isfinite(v) and -2 <= v <= 2):
                p.append(f"{name} must be in [-2, 2], got {v}")
        if not (math.isfinite(self.repetition_penalty) and 0 < self.repetition_penalty <= 10):
            p.append(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if not (math.isfinite(self.min_p) and 0 <= self.min_p <= 1):
            p.append(f"min_p must be in [0, 1], got {self.min_p}")
        if any(not (math.isfinite(b) and -100 <= b <= 100) for _, b in self.logit_bias):
            p.append("logit_bias values must be in [-100, 100]")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= MAX_LOGPROBS:
                p.append(f"{name} must be in [0, {MAX_LOGPROBS}], got {v}")
        if vocab_size is not None:
            for name, ids in (("logit_bias", [t for t, _ in self.logit_bias]),
                              ("stop_token_ids", list(self.stop_token_ids))):
                bad = [t for t in ids if not 0 <= t < vocab_size]
                if bad:
                    p.append(f"{name}: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
        return p


@dataclass
class RowSampling:
    """What ``sample`` needs per row: the params, the request's generator and its tokens so far."""

    params: SamplingParams
    generator: torch.Generator
    tokens: TokenState = field(default_factory=TokenState)
    proc: ProcessorState = field(default_factory=ProcessorState)
    guide: Guide | None = None  # structured output: the request's grammar matcher (engine.guided)

    @property
    def num_generated(self) -> int:
        return self.tokens.num_generated


def make_generator(seed: int | None, fallback: torch.Generator) -> torch.Generator:
    """A request's own CPU generator: seeded when asked, else seeded from the engine's generator."""
    g = torch.Generator()
    s = seed if seed is not None else int(torch.randint(0, 2**62, (1,), generator=fallback))
    return g.manual_seed(s)


def sample(logits: torch.Tensor, rows: list[RowSampling], eos_ids: torch.Tensor) -> list[int]:
    """logits [B, V] (fp32) -> one token id per row."""
    return sample_step(logits, rows, eos_ids)[0]


def sample_step(logits: torch.Tensor, rows: list[RowSampling], eos_ids: torch.Tensor
                ) -> tuple[list[int], list[TokenLogprobs | None] | None]:
    """logits [B, V] (fp32) -> one token id per row, and per row its ``TokenLogprobs`` (None for a row that
    asked for none; the list itself is None when no row did)."""
    B, V = logits.shape
    dev = logits.device
    raw = logits
    logits = process(raw, rows, eos_ids)
    out = logits.argmax(dim=-1)  # [B]; greedy rows keep this
    sampled = [i for i, r in enumerate(rows) if r.params.temperature >= GREEDY_BELOW]
    if sampled:
        idx = torch.tensor(sampled, device=dev)
        sub = logits[idx]  # [S, V]
        temps = torch.tensor([rows[i].params.temperature for i in sampled], device=dev)
        top_k = torch.tensor([min(rows[i].params.top_k, V) if rows[i].params.top_k > 0 else V for i in sampled],
                             device=dev)
        top_p = torch.tensor([rows[i].params.top_p for i in sampled], device=dev)
        sorted_logits, order = (sub / temps[:, None]).sort(dim=-1, descending=True)  # [S, V]
        rank = torch.arange(V, device=dev)[None, :]
        sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], float("-inf"))
        min_ps = [rows[i].params.min_p for i in sampled]
        if any(min_ps):  # min-p: drop tokens less likely than min_p x the most likely one (rank 0)
            logp = sorted_logits.log_softmax(dim=-1)
            floor = logp[:, :1] + torch.tensor(min_ps, device=dev).clamp_min(1e-45).log()[:, None]
            sorted_logits = sorted_logits.masked_fill(logp < floor, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        cum = probs.cumsum(dim=-1)
        # top-p keeps the smallest prefix whose mass reaches top_p (the first token always stays)
        probs = probs.masked_fill((cum - probs) >= top_p[:, None], 0.0)
        cum = probs.cumsum(dim=-1)
        u = torch.cat([torch.rand(1, generator=rows[i].generator) for i in sampled]).to(dev)  # [S]
        target = (u * cum[:, -1])[:, None].contiguous()
        pick = torch.searchsorted(cum, target).clamp_max(V - 1)  # [S, 1]
        out[idx] = order.gather(1, pick)[:, 0]
    tokens = out.tolist()
    lps: list[TokenLogprobs | None] | None = None
    wants = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if wants:
        at = torch.tensor(wants, device=dev)
        found = token_logprobs(raw[at], out[at], [rows[i].params.logprobs or 0 for i in wants])
        lps = [None] * B
        for i, lp in zip(wants, found, strict=True):
            lps[i] = lp
    if any(r.guide is not None for r in rows):  # last: a failure before it leaves every matcher as it was
        advance_rows([r.guide for r in rows], tokens)
    return tokens, lps
