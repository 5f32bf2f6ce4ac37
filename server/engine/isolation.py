"""One request's fault fails that request alone (RELIABILITY row 36).

A generate step runs every request's work batched: one forward, one vectorised sample. When a batched call
raises, these helpers run it again on smaller groups (halves for the forward, single rows for sampling)
until they find the requests it raises for; every other request keeps its result. Re-running a forward is
safe: each chunk writes the same keys and values to the same cache rows again.

The cost is paid only when something raised; a clean step runs exactly one forward and one sample. A
device-fatal error (a CUDA fault poisons every later call) is not one request's: it propagates, the engine
is marked dead and the process restarts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from server.engine.logprobs import TokenLogprobs
from server.engine.sampler import RowSampling, sample_step

log = logging.getLogger("rankserve.engine")
T = TypeVar("T")


def device_fatal(e: BaseException) -> bool:
    """A CUDA error that leaves the device unusable (out of memory is not one)."""
    fatal = getattr(torch, "AcceleratorError", ())
    return (isinstance(e, fatal) if fatal else False) or "CUDA error" in str(e) or "device-side assert" in str(e)


def forward_isolating(forward: Callable[[list[T]], list[torch.Tensor]], chunks: list[T]
                      ) -> list[torch.Tensor | Exception]:
    """``forward(chunks)`` -> per chunk its logits, or the exception that chunk alone raises."""
    try:
        return list(forward(chunks))
    except Exception as e:
        if device_fatal(e):
            raise
        if len(chunks) == 1:
            log.warning("a request's forward failed: %s: %s", type(e).__name__, e)
            return [e]
    half = len(chunks) // 2
    return forward_isolating(forward, chunks[:half]) + forward_isolating(forward, chunks[half:])


def sample_isolating(logits: torch.Tensor, rows: Sequence[RowSampling], eos_ids: torch.Tensor
                     ) -> tuple[list[int | Exception], list[TokenLogprobs | None] | None]:
    """``sample`` over the batch; if it raises, row by row, so only the rows that raise fail."""
    try:
        return sample_step(logits, list(rows), eos_ids)
    except Exception:
        pass
    out: list[int | Exception] = []
    lps: list[TokenLogprobs | None] = []
    for i, row in enumerate(rows):
        try:
            toks, lp = sample_step(logits[i:i + 1], [row], eos_ids)
            out.append(toks[0])
            lps.append(lp[0] if lp else None)
        except Exception as e:
            log.warning("a request's sampling failed: %s: %s", type(e).__name__, e)
            out.append(e)
            lps.append(None)
    return out, lps
