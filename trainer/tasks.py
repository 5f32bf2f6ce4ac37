"""What the loop optimises for each task: logits and loss from a padded batch.

generate: the causal-LM logits; loss = token-mean cross-entropy on positions whose label is not -100
(completion tokens only when the data has a prompt).
classify: the base's final hidden states, pooled, through a linear head [num_labels, hidden]. Pooling
matches the adapter metadata that the server reads: decoders take the LAST non-pad token's hidden
state after the final norm (``model.model(...)``), encoders the mean over non-pad tokens (or the
first token). Batches are right-padded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters_store.basemodels import BaseModel


def default_pooling(base: BaseModel) -> str:
    return "last" if base.is_decoder else "mean"


def make_head(base: BaseModel, num_labels: int) -> nn.Linear:
    """A linear head initialised like transformers' classifiers: N(0, 0.02) weight, zero bias."""
    head = nn.Linear(base.hidden_size, num_labels)
    nn.init.normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head


def final_hidden(base: BaseModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden state [B, L, H]: after the final norm for decoders, the encoder output for encoders."""
    backbone = base.model.model if base.is_decoder else base.model
    return backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, L, H] -> [B, H] over non-pad tokens (right padding)."""
    mask = attention_mask.to(hidden.dtype)  # [B, L]
    if pooling == "last":
        last = attention_mask.long().sum(dim=1) - 1  # [B]
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "mean":
        return (hidden * mask[:, :, None]).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1)
    if pooling == "first":
        return hidden[:, 0]
    raise ValueError(f"pooling must be last, mean or first, got {pooling!r}")


def logits(base: BaseModel, batch: dict[str, torch.Tensor], head: nn.Module | None, pooling: str | None) -> torch.Tensor:
    """generate: [B, L, V]; classify: [B, num_labels]."""
    if head is None:
        return base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    hidden = final_hidden(base, batch["input_ids"], batch["attention_mask"])
    return head(pool(hidden, batch["attention_mask"], pooling or default_pooling(base)))


def loss_and_count(out: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy of a batch and the number of terms it averages (tokens or examples)."""
    if "label" in batch:
        return F.cross_entropy(out.float(), batch["label"]), int(batch["label"].numel())
    labels = batch["labels"][:, 1:]  # predict token t+1 from position t
    count = int((labels != -100).sum())
    if count == 0:  # every label masked (a prompt longer than max_length): contributes nothing
        return out.sum() * 0.0, 0
    flat = out[:, :-1].reshape(-1, out.shape[-1]).float()
    return F.cross_entropy(flat, labels.reshape(-1), ignore_index=-100), count
