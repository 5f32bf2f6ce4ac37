"""Plain references for the OpenAI tests: Hugging Face's own forward of a base model, and greedy decoding with
the sampling controls written out token by token (no batching, no vectorised processors)."""

from __future__ import annotations

import torch


@torch.no_grad()
def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: row i is the log-softmax of the logits after ids[: i + 1] (HF forward, fp32)."""
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


@torch.no_grad()
def greedy_reference(model, prompt: list[int], steps: int, presence: float = 0.0, frequency: float = 0.0,
                     repetition: float = 1.0, bias: dict[int, float] | None = None) -> list[int]:
    """Greedy ids after logit_bias, then the repetition penalty (over prompt and output), then the frequency and
    presence penalties (over the output), the order vLLM and the engine apply them in."""
    ids = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([ids])).logits[0, -1].float().tolist()
        for t, b in (bias or {}).items():
            logits[t] += b
        output = ids[len(prompt):]
        for t in set(ids):
            logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
        for t in set(output):
            logits[t] -= frequency * output.count(t) + presence
        ids.append(max(range(len(logits)), key=logits.__getitem__))
    return ids[len(prompt):]
