"""Token sampling: the request's sampling parameters and one vectorised pick per row of a step's logits.

``sample`` picks one token per row, vectorised across the batch: greedy rows take the argmax; sampled rows
apply temperature, top-k and top-p on one sort and draw by inverse CDF with a uniform number from the
request's own ``torch.Generator`` (so a seeded request gives the same tokens whatever else is in the batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from server.engine.guided import Guide, advance_rows, mask_rows
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

    def validate(self) -> list[str]:
        """Every problem with the parameters, each naming its field (the engine's own check, behind the
        HTTP schema's: callers in-process reach the engine without it)."""
        p = []
        if self.max_tokens < 1:
            p.append(f"max_tokens must be >= 1, got {self.max_tokens}")
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
        return p


@dataclass
class RowSampling:
    """What ``sample`` needs per row: the params, the request's generator and its tokens so far."""

    params: SamplingParams
    generator: torch.Generator
    tokens: TokenState = field(default_factory=TokenState)
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
    guides = [r.guide for r in rows]
    guided = any(g is not None for g in guides)
    if guided:  # constrained rows: tokens outside the grammar get -inf (rows without a guide pay nothing)
        logits, grammar_bias = mask_rows(logits, guides)
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
    if guided:
        advance_rows(guides, grammar_bias, tokens)
    return tokens
