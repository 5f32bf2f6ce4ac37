"""Log-probabilities the engine returns with tokens: for every route (OpenAI, and any other) to format.

What they are computed from (the same choice as vLLM's default, ``logprobs_mode=raw_logprobs``): the log-softmax
of the model's raw logits at that position, in fp32, BEFORE any logits processor (min_tokens hold, stop-token
hold, logit_bias, penalties) and before temperature, top-k, top-p and min-p. They are the model's own
distribution, whatever the request's sampling settings, which is what scoring (lm-evaluation-harness) needs.
A greedy request without processors therefore always picks the argmax of these logprobs.

The data path: ``GenerateParams.logprobs`` (k >= 0: the chosen token's logprob and the k most likely
alternatives) and ``prompt_logprobs`` (the same for every prompt token but the first) reach the sampler and
the engine step; each ``GenerateEvent`` carries ``logprobs`` aligned with its ``token_ids``, and the first
event of a request carries ``prompt_logprobs``. Requests that ask for neither pay nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # alternatives per position at most (vLLM's default max_logprobs; OpenAI allows 20)


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """One position: the token there, its logprob, and the ``k`` most likely ids with theirs, best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, ks: list[int]) -> list[TokenLogprobs]:
    """logits [N, V] (raw, fp32), chosen [N] -> per row its ``TokenLogprobs`` with ``ks[i]`` alternatives.

    One logsumexp, one gather and one top-k for the whole batch, then the device->host copies: the chosen
    token's value and its top-k entry are the same fp32 operation (``logit - lse``), so a greedy pick's
    logprob equals its top-1 value exactly."""
    logits = logits.float()
    lse = logits.logsumexp(dim=-1, keepdim=True)  # [N, 1]: log-softmax = logits - lse, never materialised [N, V]
    picked = (logits.gather(1, chosen.to(logits.device).long()[:, None]) - lse)[:, 0]  # [N]
    kmax = min(max(ks, default=0), logits.shape[1])
    if kmax > 0:
        top_v, top_i = logits.topk(kmax, dim=-1)  # [N, kmax]
        top_v, top_i = (top_v - lse).tolist(), top_i.tolist()
    picked_l, chosen_l = picked.tolist(), chosen.tolist()
    out = []
    for i, k in enumerate(ks):
        top = tuple(zip(top_i[i][:k], top_v[i][:k], strict=True)) if kmax > 0 and k > 0 else ()
        out.append(TokenLogprobs(int(chosen_l[i]), float(picked_l[i]), top))
    return out


def record_prompt_logprobs(found: list[TokenLogprobs | None], ids: list[int], num_prompt: int, start: int,
                           logits: torch.Tensor, k: int | None) -> None:
    """A prefill chunk's every-position logits [n, V] (positions ``start ..``) -> the logprobs of the prompt
    tokens they predict, appended to ``found`` (which starts as ``[None]``: the first token has none).

    Positions already recorded are skipped, so a chunk recomputed after a preemption adds nothing twice."""
    first = len(found) - 1 - start  # the chunk's first row whose target is not yet recorded
    last = min(logits.shape[0], num_prompt - 1 - start)  # rows predicting a prompt token
    if last <= first:
        return
    first = max(first, 0)
    targets = torch.tensor(ids[start + first + 1:start + last + 1], device=logits.device)
    found.extend(token_logprobs(logits[first:last], targets, [k or 0] * (last - first)))


def take_prompt_logprobs(found: list[TokenLogprobs | None], ids: list[int], num_prompt: int, start: int,
                         logits: torch.Tensor, k: int | None) -> torch.Tensor | Exception:
    """``record_prompt_logprobs``, then the chunk's last position's logits ``[V]`` (what the sampler takes);
    an error is returned, not raised: it is this request's alone."""
    try:
        record_prompt_logprobs(found, ids, num_prompt, start, logits, k)
        return logits[-1]
    except Exception as e:
        return e
