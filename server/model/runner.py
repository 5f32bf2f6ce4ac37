"""The model runner: one forward over a FLAT token batch that mixes prefill chunks and decode tokens.

It drives the Hugging Face Llama model's own submodules (embedding, each decoder layer's norms, q/k/v/o
projections, rotary embedding, MLP, final norm, lm_head) on ``x [T, d]`` instead of calling the HF forward
with a padded batch (gpt-fast / vLLM style). The projections may be ``LowRankLinear`` wrappers that read
the step's plan from ``pool.step(token_slots)``: the runner enters that context itself, with one slot per
token in exactly the order of the rows of ``x``.

Flat order of a step: every single-token chunk (decodes) first, then the multi-token prefill chunks.
Attention over the paged cache is one of the backends of ``attention.py``, chosen once here and planned
once per step (``StepShape`` -> ``StepAttention``), then run by every layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from server.model.attention import StepAttention, StepShape, make_attention
from server.model.kvcache import PagedKVCache

StepContext = Callable[[torch.Tensor], contextlib.AbstractContextManager]


@dataclass
class Chunk:
    """New tokens of one sequence for this step: positions ``start .. start + len(tokens) - 1``."""

    seq: int  # the sequence's slot in the KV cache
    tokens: list[int]
    start: int  # tokens already in the cache for this sequence
    adapter_slot: int = -1  # device slot of the sequence's adapter; -1 = base only
    all_logits: bool = False  # logits of every token ``[n, V]`` (prompt logprobs), not only the last ``[V]``


def _no_context(token_slots: torch.Tensor) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


class ModelRunner:
    def __init__(self, model: nn.Module, cache: PagedKVCache, step_context: StepContext | None = None,
                 attention: str = "auto"):
        self.model = model
        self.cache = cache
        self.step_context = step_context or _no_context
        cfg = model.config
        self.device = next(model.parameters()).device
        self.num_heads = int(cfg.num_attention_heads)
        self.kv_heads = int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.scaling = self.head_dim ** -0.5
        self.vocab_size = int(cfg.vocab_size)
        self.attention, self._plan_attention = make_attention(attention, cache, self.scaling, self.num_heads)

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk], all_positions: bool = False) -> list[torch.Tensor]:
        """Run one step. Returns, per chunk in the given order, the logits of its last token ``[V]``
        (or of every token ``[n, V]`` when ``all_positions`` or the chunk's ``all_logits``)."""
        if not chunks:
            return []
        order = sorted(range(len(chunks)), key=lambda i: len(chunks[i].tokens) > 1)  # decodes first, stable
        ordered = [chunks[i] for i in order]
        num_decode = sum(1 for c in ordered if len(c.tokens) == 1)
        ids: list[int] = []
        positions: list[int] = []
        seqs: list[int] = []
        slots: list[int] = []
        for c in ordered:
            n = len(c.tokens)
            if c.start + n > self.cache.max_len:
                raise ValueError(f"sequence {c.seq}: position {c.start + n - 1} is beyond the KV cache's "
                                 f"max_len of {self.cache.max_len}")
            ids.extend(c.tokens)
            positions.extend(range(c.start, c.start + n))
            seqs.extend([c.seq] * n)
            slots.extend([c.adapter_slot] * n)
        dev = self.device
        # One host->device transfer of the step's metadata: [4, T]
        host = torch.tensor([ids, positions, seqs, slots], dtype=torch.long)
        ids_t, pos_t, seq_t, _ = host.to(dev, non_blocking=True)
        write_rows = self.cache.row_table[seq_t, pos_t]  # [T]

        attn = self._plan_attention(StepShape(decodes=[(c.seq, c.start + 1) for c in ordered[:num_decode]],
                                              prefills=[(c.seq, c.start, len(c.tokens)) for c in ordered[num_decode:]]))
        with self.step_context(host[3]):  # the pool plans from host slots: no device sync
            hidden = self._layers(ids_t, pos_t, write_rows, attn)  # [T, d], before the final norm
            bounds = [0]
            for c in ordered:
                bounds.append(bounds[-1] + len(c.tokens))
            if all_positions:
                out_ordered = list(torch.split(self._logits(hidden), [len(c.tokens) for c in ordered]))
            elif any(c.all_logits for c in ordered):  # one lm_head call over the rows wanted, then split
                rows = [r for j, c in enumerate(ordered)
                        for r in (range(bounds[j], bounds[j + 1]) if c.all_logits else (bounds[j + 1] - 1,))]
                sizes = [len(c.tokens) if c.all_logits else 1 for c in ordered]
                parts = torch.split(self._logits(hidden[torch.tensor(rows, device=dev)]), sizes)
                out_ordered = [p if c.all_logits else p[0] for p, c in zip(parts, ordered, strict=True)]
            else:
                last = torch.tensor(bounds[1:], device=dev) - 1
                out_ordered = list(self._logits(hidden[last]))  # [n_chunks, V] -> rows
        result: list[torch.Tensor] = [torch.empty(0)] * len(chunks)
        for j, i in enumerate(order):
            result[i] = out_ordered[j]
        return result

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.lm_head(m.model.norm(hidden)).float()  # [N, V]

    def _layers(self, ids: torch.Tensor, pos: torch.Tensor, write_rows: torch.Tensor, attn: StepAttention) -> torch.Tensor:
        inner = self.model.model
        x = inner.embed_tokens(ids)  # [T, d]
        cos, sin = inner.rotary_emb(x, pos[None])  # each [1, T, head_dim]
        cos, sin = cos[0], sin[0]
        T = x.shape[0]
        for i, layer in enumerate(inner.layers):
            sa = layer.self_attn
            h = layer.input_layernorm(x)
            q = sa.q_proj(h).view(T, self.num_heads, self.head_dim)
            k = sa.k_proj(h).view(T, self.kv_heads, self.head_dim)
            v = sa.v_proj(h).view(T, self.kv_heads, self.head_dim)
            q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)  # cos [T, 1, hd] broadcasts over heads
            k_rows, v_rows = self.cache.layer(i)
            k_rows.index_copy_(0, write_rows, k.to(k_rows.dtype))
            v_rows.index_copy_(0, write_rows, v.to(v_rows.dtype))
            o = attn.run(q, k_rows, v_rows)  # [T, H, hd]
            x = x + sa.o_proj(o.reshape(T, self.num_heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x
