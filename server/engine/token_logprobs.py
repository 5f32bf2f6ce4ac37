"""The log-probability of each sampled token, for the requests that ask (``GenerateParams.token_logprobs``):
the LoRAX/TGI routes' ``details`` and stream tokens.

Kept apart on purpose, as one small function the engine calls after sampling: the OpenAI logprobs path
(top-k alternatives, prompt logprobs) is being built separately and is meant to replace it. The value is
log softmax of the model's raw logits at the sampled token: before temperature, top-k/top-p and any
grammar mask (as vLLM's default; TGI reports them after its warpers), so a greedy unconstrained token is
always the argmax of the distribution it is reported under. A step where no request asks costs one
scan of the rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def record(logits: torch.Tensor, reqs: Sequence, tokens: Sequence) -> None:
    """logits [B, V] (the step's, row i for reqs[i]); append each asking request's sampled-token logprob to
    its ``logprobs`` list (rows whose sampling failed, an exception in ``tokens``, are skipped)."""
    rows = [i for i, r in enumerate(reqs) if r.logprobs is not None and isinstance(tokens[i], int)]
    if not rows:
        return
    idx = torch.tensor(rows, device=logits.device)
    picked = torch.tensor([tokens[i] for i in rows], device=logits.device)
    lp = torch.log_softmax(logits[idx].float(), dim=-1)  # [R, V]
    values = lp.gather(1, picked[:, None])[:, 0].tolist()  # [R]
    for i, v in zip(rows, values, strict=True):
        reqs[i].logprobs.append(v)
