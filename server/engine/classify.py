"""Classification on the engine thread: pending classify calls of any adapters run as ONE padded batch.

The backbone forward (HF, right-padded ``[B, L]``) runs under ``pool.step(token_slots)`` with one slot per
token, flattened row-major, so rows of different adapters share the pass; each adapter's pooling
(``last`` real token for decoders, ``mean``/``first`` for encoders, from its metadata) and head are then
applied to its own rows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch
from torch import nn

from server.common.errors import AdapterLoadFailed, ServingError, Unavailable
from server.engine.admission import Admission
from server.engine.request import ClassifyJob
from server.lora.pool import AdapterPool

Result = list[tuple[str, dict[str, float]]]


class ClassifyStep:
    def __init__(self, model: nn.Module, is_decoder: bool, tokenizer, pool: AdapterPool, admission: Admission,
                 max_len: int, max_rows: int, before_run: Callable[[], None]):
        self.model = model
        self.is_decoder = is_decoder
        self.tokenizer = tokenizer
        self.pool = pool
        self.admission = admission
        self.max_len = max_len
        self.max_rows = max_rows
        self.before_run = before_run  # e.g. restore the base weights if a generate batch merged an adapter
        self.jobs: deque[ClassifyJob] = deque()  # appended from the caller's thread, consumed here
        self.busy = False

    def run_pending(self) -> bool:
        """Admit what fits (adapters resident and pinned), run it as one batch; True if anything ran."""
        if not self.jobs:
            return False
        batch: list[ClassifyJob] = []
        rows = 0
        for job in list(self.jobs):
            if job.done:
                self.jobs.remove(job)
                continue
            if rows and rows + len(job.texts) > self.max_rows:
                break
            try:
                if not self.admission.admit(job):
                    continue  # no slot yet, or its adapter is still loading: it keeps its place
            except ServingError as e:
                self.jobs.remove(job)
                job.resolve(None, e)
                continue
            self.jobs.remove(job)
            batch.append(job)
            rows += len(job.texts)
        if not batch:
            return False
        self.busy = True
        try:
            self.before_run()
            for job, result in zip(batch, self._forward(batch), strict=True):
                if isinstance(result, ServingError):
                    job.resolve(None, result)
                else:
                    job.resolve(result)
        except BaseException as e:
            for job in batch:
                job.resolve(None, Unavailable(f"classification failed: {type(e).__name__}: {e}"))
            raise
        finally:
            self.busy = False
            for job in batch:
                self.admission.release(job)
        return True

    def reap(self, now: float) -> None:
        for job in list(self.jobs):
            if job.done or job.expired(now):
                self.jobs.remove(job)

    def fail_all(self, err: ServingError) -> None:
        while self.jobs:
            self.jobs.popleft().resolve(None, err)

    @torch.inference_mode()
    def _forward(self, batch: list[ClassifyJob]) -> list[Result | ServingError]:
        encoded: list[list[int]] = []
        slots: list[int] = []
        poolings: list[str] = []
        default_pooling = "last" if self.is_decoder else "mean"
        for job in batch:
            pooling = self.pool.adapter(job.key).meta.pooling or default_pooling
            for text in job.texts:
                ids = self.tokenizer(text, truncation=True, max_length=self.max_len)["input_ids"]
                encoded.append(ids or [self.tokenizer.pad_token_id or 0])
                slots.append(job.adapter_slot)
                poolings.append(pooling)
        dev = next(self.model.parameters()).device
        B, L = len(encoded), max(len(e) for e in encoded)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((B, L), pad, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)
        for b, e in enumerate(encoded):
            ids[b, :len(e)] = torch.tensor(e)
            mask[b, :len(e)] = 1
        token_slots = torch.tensor(slots)[:, None].expand(B, L).reshape(-1)  # [B*L] row-major, on the host
        with self.pool.step(token_slots):
            hidden = pooled_hidden(self.model, self.is_decoder, ids.to(dev), mask.to(dev), poolings)  # [B, d]
        results: list[Result | ServingError] = []
        row = 0
        for job in batch:
            adapter = self.pool.adapter(job.key)
            n = len(job.texts)
            h = hidden[row:row + n].float()
            row += n
            if adapter.head_weight is None:
                results.append(AdapterLoadFailed(f"adapter {job.adapter_id!r} has no classification head"))
                continue
            logits = h @ adapter.head_weight.to(h.device, torch.float32).T  # [n, num_labels]
            if adapter.head_bias is not None:
                logits = logits + adapter.head_bias.to(h.device, torch.float32)
            probs = logits.softmax(dim=-1).cpu()
            labels = adapter.meta.labels or [f"LABEL_{i}" for i in range(probs.shape[1])]
            results.append([(labels[int(p.argmax())], {lab: float(v) for lab, v in zip(labels, p.tolist(), strict=True)})
                            for p in probs])
        return results


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
