"""Classification on the engine thread: pending classify calls of any adapters run as ONE padded batch.

Calls arrive tokenised (``encode``, run off the engine thread) and are budgeted in tokens like generate:
a batch takes rows, oldest call first, while its padded size (rows x longest row) stays within
``max_tokens``; a call with more rows than fit runs over several steps, so no step grows with the size
of one request (and none runs long enough to trip the hang watchdog). A call is admitted (its adapter
pinned) through ``engine.admission``, the path generate requests take, and keeps its pin until its last
row is done.

The backbone forward (HF, right-padded ``[B, L]``) runs under ``pool.step(token_slots)`` with one slot per
token, flattened row-major, so rows of different adapters share the pass; each adapter's pooling
(``last`` real token for decoders, ``mean``/``first`` for encoders, from its metadata) and head are then
applied to its own rows. A fault in one call's rows (its forward or its head) fails that call alone: the
batch is run again call by call to find it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import torch
from torch import nn

from server.common.errors import (
    AdapterLoadFailed,
    ContextLengthExceeded,
    InvalidParameter,
    RequestFailed,
    ServingError,
)
from server.engine.admission import Admission
from server.engine.request import ClassifyJob
from server.lora.pool import AdapterPool

log = logging.getLogger("rankserve.engine")
Result = tuple[str, dict[str, float]]
Piece = tuple[ClassifyJob, int, int]  # a call's rows start..stop in this batch


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids per text, untruncated (over-long inputs are refused by the engine, never cut)."""
    return [list(ids) for ids in tokenizer(list(texts))["input_ids"]]


def check_rows(rows: list[list[int]], max_len: int, vocab_size: int) -> None:
    """Refuse (400) empty inputs, inputs over the context (never truncated), ids outside the vocabulary."""
    if not rows or any(not r for r in rows):
        raise InvalidParameter("input must be a non-empty list of non-empty inputs", param="input")
    long = [(i, len(r)) for i, r in enumerate(rows) if len(r) > max_len]
    if long:
        i, n = long[0]
        raise ContextLengthExceeded(f"input[{i}] is {n} tokens; this model's maximum context length is {max_len} "
                                    f"({len(long)} inputs over it)", param="input")
    if any(not 0 <= t < vocab_size for r in rows for t in r):
        raise InvalidParameter(f"input: token ids must be in [0, {vocab_size})", param="input")


class ClassifyStep:
    def __init__(self, model: nn.Module, is_decoder: bool, pad_id: int, pool: AdapterPool, admission: Admission,
                 max_tokens: int, before_run: Callable[[], None]):
        self.model = model
        self.is_decoder = is_decoder
        self.pad_id = pad_id
        self.pool = pool
        self.admission = admission
        self.max_tokens = max_tokens  # padded tokens (rows x longest row) per batch
        self.before_run = before_run  # e.g. restore the base weights if a generate batch merged an adapter
        self.jobs: deque[ClassifyJob] = deque()  # appended from the caller's thread, consumed here
        self.busy = False

    def run_pending(self) -> bool:
        """Admit what fits, run it as one batch; True if anything ran."""
        pieces = self._take()
        if not pieces:
            return False
        self.busy = True
        try:
            self.before_run()
            for (job, _, _), out in zip(pieces, self._run_isolating(pieces), strict=True):
                if isinstance(out, BaseException):
                    self._fail(job, out)
                else:
                    job.results.extend(out)
                    if len(job.results) == len(job.rows):
                        job.resolve(job.results)
                        self.admission.release(job)
        finally:
            self.busy = False
        return True

    def _take(self) -> list[Piece]:
        """Rows for one batch under the token budget, calls in arrival order (a call may be split)."""
        pieces: list[Piece] = []
        count, longest = 0, 0
        for job in list(self.jobs):
            if job.done:
                self._drop(job)
                continue
            if not job.pinned:
                try:
                    if not self.admission.admit(job):
                        continue  # no slot yet, or its adapter is still loading: it keeps its place
                except ServingError as e:
                    self._fail(job, e)
                    continue
            start = job.next_row
            while job.next_row < len(job.rows):
                wide = max(longest, len(job.rows[job.next_row]))
                if count and (count + 1) * wide > self.max_tokens:
                    break
                count, longest = count + 1, wide
                job.next_row += 1
            if job.next_row > start:
                pieces.append((job, start, job.next_row))
            if job.next_row == len(job.rows):
                self.jobs.remove(job)  # every row is in a batch; the pin stays until the results are in
            else:
                break  # the budget is full
        return pieces

    def _run_isolating(self, pieces: list[Piece]) -> list[list[Result] | BaseException]:
        try:
            return self._forward(pieces)
        except Exception as e:
            if len(pieces) == 1:
                log.exception("classify call failed in the engine")
                return [RequestFailed(f"classification failed: {type(e).__name__}: {e}")]
        return [out for piece in pieces for out in self._run_isolating([piece])]

    def reap(self, now: float) -> None:
        for job in list(self.jobs):
            if job.done or job.expired(now):
                self._drop(job)

    def fail_all(self, err: ServingError) -> None:
        while self.jobs:
            self._fail(self.jobs[0], err)

    def _fail(self, job: ClassifyJob, err: BaseException) -> None:
        job.resolve(None, err)
        self._drop(job)

    def _drop(self, job: ClassifyJob) -> None:
        if job in self.jobs:
            self.jobs.remove(job)
        self.admission.release(job)

    @torch.inference_mode()
    def _forward(self, pieces: list[Piece]) -> list[list[Result] | BaseException]:
        rows = [row for job, start, stop in pieces for row in job.rows[start:stop]]
        slots = [job.adapter_slot for job, start, stop in pieces for _ in range(stop - start)]
        default_pooling = "last" if self.is_decoder else "mean"
        poolings = [self.pool.adapter(job.key).meta.pooling or default_pooling
                    for job, start, stop in pieces for _ in range(stop - start)]
        dev = next(self.model.parameters()).device
        B, L = len(rows), max(len(r) for r in rows)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r)
            mask[b, :len(r)] = 1
        token_slots = torch.tensor(slots)[:, None].expand(B, L).reshape(-1)  # [B*L] row-major, on the host
        with self.pool.step(token_slots):
            hidden = pooled_hidden(self.model, self.is_decoder, ids.to(dev), mask.to(dev), poolings)  # [B, d]
        out: list[list[Result] | BaseException] = []
        row = 0
        for job, start, stop in pieces:
            try:
                out.append(self._head(job, hidden[row:row + stop - start]))
            except Exception as e:  # this call's head alone
                log.exception("classify head failed for adapter %r", job.adapter_id)
                out.append(RequestFailed(f"classification failed: {type(e).__name__}: {e}"))
            row += stop - start
        return out

    def _head(self, job: ClassifyJob, hidden: torch.Tensor) -> list[Result] | BaseException:
        """The adapter's task head on its rows' pooled features [n, d] -> (label, scores) per row."""
        adapter = self.pool.adapter(job.key)
        if adapter.head_weight is None:
            return AdapterLoadFailed(f"adapter {job.adapter_id!r} has no classification head")
        h = hidden.float()
        logits = h @ adapter.head_weight.to(h.device, torch.float32).T  # [n, num_labels]
        if adapter.head_bias is not None:
            logits = logits + adapter.head_bias.to(h.device, torch.float32)
        probs = logits.softmax(dim=-1).cpu()
        labels = adapter.meta.labels or [f"LABEL_{i}" for i in range(probs.shape[1])]
        return [(labels[int(p.argmax())], {lab: float(v) for lab, v in zip(labels, p.tolist(), strict=True)})
                for p in probs]


def pooled_hidden(model: nn.Module, is_decoder: bool, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  poolings: list[str]) -> torch.Tensor:
    """Classification features: the HF backbone forward on a right-padded batch ``[B, L]`` -> ``[B, d]``.

    Decoders use ``model.model`` (the final norm is applied inside), encoders the backbone itself. Pooling
    per row: ``last`` real token, ``first`` token, or the masked ``mean``."""
    backbone = model.model if is_decoder else model
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, d]
    lengths = attention_mask.sum(dim=1)  # [B]
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, lengths - 1]
    first = hidden[:, 0]
    m = attention_mask[:, :, None].to(hidden.dtype)
    mean = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)
    pick = {"last": last, "first": first, "mean": mean}
    return torch.stack([pick[p][b] for b, p in enumerate(poolings)])  # [B, d]
