"""Logits processors: the step-wise pipeline between the model's logits and the pick.

``process(logits, rows, eos_ids)`` runs ``PIPELINE`` in order; each processor is a function
``(logits [B, V], rows, ctx) -> None`` that edits, IN PLACE, only the rows that asked for it (``logits`` is
already the step's private copy, so the raw logits the logprobs are computed from stay untouched):

1. ``hold_stop_tokens``: while a row has fewer than ``min_tokens`` tokens, EOS and its ``stop_token_ids``
   cannot be drawn;
2. ``apply_logit_bias``: ``logits[id] += bias`` (OpenAI ``logit_bias``, values in [-100, 100]);
3. ``apply_penalties``: repetition (HF/vLLM: over prompt + output, ``l / p`` if ``l > 0`` else ``l * p``),
   then frequency and presence (OpenAI: over the output, ``l -= f * count + p * (count > 0)``).

4. ``mask_grammar``: structured output's token mask (``guided.mask_rows``: tokens outside the row's grammar
   at -inf), LAST, so no processor above can lift a token the grammar forbids.

Temperature, top-k, top-p and min-p are not processors: they shape the draw in ``sampler.sample`` (none of
them can raise a -inf logit).

The hot path: a row that asks for none of these has ``params.processed`` False and no ``guide``, and when no
row in the step asks the pipeline is skipped entirely (no copy, no per-row work).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from server.engine.guided import Guide, mask_rows
from server.engine.tokens import TokenState


@dataclass
class StepContext:
    eos_ids: torch.Tensor  # [E] long, host


@dataclass
class ProcessorState:
    """A row's processor state, built on its first step and kept on the logits' device: the logit_bias
    as tensors, and the penalties' token statistics, updated with the tokens added since the last step
    (usually one), so a step costs O(new tokens), not O(sequence)."""

    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # ids [K] long, values [K]
    counts: torch.Tensor | None = None  # [V]: occurrences of each id in the output
    seen: torch.Tensor | None = None  # [V] bool: the id occurs in the prompt or the output
    counted: int = 0  # output tokens already in ``counts``
    extra: dict = field(default_factory=dict)  # room for further processors' per-row state


class Row(Protocol):
    """What a processor reads per row (``sampler.RowSampling``)."""

    params: object  # sampler.SamplingParams
    tokens: TokenState
    proc: ProcessorState
    guide: Guide | None

    @property
    def num_generated(self) -> int: ...


def bias_tensors(row: Row, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    st = row.proc
    if st.bias is None:
        pairs = row.params.logit_bias  # type: ignore[attr-defined]
        st.bias = (torch.tensor([t for t, _ in pairs], dtype=torch.long, device=device),
                   torch.tensor([b for _, b in pairs], dtype=torch.float32, device=device))
    return st.bias


def penalty_stats(row: Row, device: torch.device, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts [V], seen [V]) of the row, brought up to date with its newest tokens."""
    st = row.proc
    toks = row.tokens
    if st.counts is None:
        st.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        st.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        prompt = torch.tensor(toks.ids[:toks.num_prompt], dtype=torch.long, device=device)
        st.seen[prompt] = True
    new = toks.ids[toks.num_prompt + st.counted:]
    if new:
        ids = torch.tensor(new, dtype=torch.long, device=device)
        st.counts.index_add_(0, ids, torch.ones(len(new), device=device))
        st.seen[ids] = True
        st.counted += len(new)
    assert st.seen is not None
    return st.counts, st.seen


def hold_stop_tokens(logits: torch.Tensor, rows: Sequence[Row], ctx: StepContext) -> None:
    held = [i for i, r in enumerate(rows)
            if r.num_generated < r.params.min_tokens and (ctx.eos_ids.numel() or r.params.stop_token_ids)]
    for i in held:
        ids = list(rows[i].params.stop_token_ids)
        if ctx.eos_ids.numel():
            ids += ctx.eos_ids.tolist()
        logits[i, torch.tensor(ids, device=logits.device)] = float("-inf")


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[Row], ctx: StepContext) -> None:
    for i, r in enumerate(rows):
        if r.params.logit_bias:  # type: ignore[attr-defined]
            ids, bias = bias_tensors(r, logits.device)
            logits[i].index_add_(0, ids, bias)


def apply_penalties(logits: torch.Tensor, rows: Sequence[Row], ctx: StepContext) -> None:
    idx = [i for i, r in enumerate(rows) if r.params.penalized]  # type: ignore[attr-defined]
    if not idx:
        return
    stats = [penalty_stats(rows[i], logits.device, logits.shape[1]) for i in idx]
    dev = logits.device
    reps = [rows[i].params.repetition_penalty for i in idx]  # type: ignore[attr-defined]
    freqs = [rows[i].params.frequency_penalty for i in idx]  # type: ignore[attr-defined]
    pres = [rows[i].params.presence_penalty for i in idx]  # type: ignore[attr-defined]
    at = torch.tensor(idx, device=dev)
    sub = logits[at]  # [P, V]
    if any(r != 1 for r in reps):
        seen = torch.stack([s for _, s in stats])  # [P, V]
        rep = torch.tensor(reps, device=dev)[:, None]  # [P, 1]
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    if any(freqs) or any(pres):
        counts = torch.stack([c for c, _ in stats])  # [P, V]
        sub = sub - torch.tensor(freqs, device=dev)[:, None] * counts
        sub = sub - torch.tensor(pres, device=dev)[:, None] * (counts > 0).to(sub.dtype)
    logits[at] = sub


def mask_grammar(logits: torch.Tensor, rows: Sequence[Row], ctx: StepContext) -> None:
    guides = [r.guide for r in rows]
    if any(g is not None for g in guides):
        mask_rows(logits, guides)


Processor = Callable[[torch.Tensor, Sequence[Row], StepContext], None]
PIPELINE: list[Processor] = [hold_stop_tokens, apply_logit_bias, apply_penalties, mask_grammar]


def process(logits: torch.Tensor, rows: Sequence[Row], eos_ids: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> the processed logits (a copy; the input is untouched). Returns the input itself
    when no row asks for a processor."""
    if not any(r.params.processed or r.guide is not None for r in rows):  # type: ignore[attr-defined]
        return logits
    out = logits.clone()
    ctx = StepContext(eos_ids)
    for proc in PIPELINE:
        proc(out, rows, ctx)
    return out
