"""The model runner: one forward over a FLAT token batch that mixes prefill chunks and decode tokens.

It drives the Hugging Face Llama model's own submodules (embedding, each decoder layer's norms, q/k/v/o
projections, rotary embedding, MLP, final norm, lm_head) on ``x [T, d]`` instead of calling the HF forward
with a padded batch (gpt-fast / vLLM style). The projections may be ``LowRankLinear`` wrappers that read
the step's plan from ``pool.step(token_slots)``: the runner enters that context itself, with one slot per
token in exactly the order of the rows of ``x``.

Flat order of a step: every single-token chunk (decodes) first, then the multi-token prefill chunks. The
decodes share one batched attention call (keys gathered through the paged cache's row table, padded,
masked per sequence); each prefill chunk gets its own causal call over its cached prefix plus itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from server.kvcache import PagedKVCache

StepContext = Callable[[torch.Tensor], contextlib.AbstractContextManager]


@dataclass
class Chunk:
    """New tokens of one sequence for this step: positions ``start .. start + len(tokens) - 1``."""

    seq: int  # the sequence's slot in the KV cache
    tokens: list[int]
    start: int  # tokens already in the cache for this sequence
    adapter_slot: int = -1  # device slot of the sequence's adapter; -1 = base only


def _no_context(token_slots: torch.Tensor) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


class ModelRunner:
    def __init__(self, model: nn.Module, cache: PagedKVCache, step_context: StepContext | None = None):
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

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk], all_positions: bool = False) -> list[torch.Tensor]:
        """Run one step. Returns, per chunk in the given order, the logits of its last token ``[V]``
        (or of every token ``[n, V]`` when ``all_positions``)."""
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

        attn = _AttentionPlan(self, ordered, num_decode)
        with self.step_context(host[3]):  # the pool plans from host slots: no device sync
            hidden = self._layers(ids_t, pos_t, write_rows, attn)  # [T, d], before the final norm
            bounds = [0]
            for c in ordered:
                bounds.append(bounds[-1] + len(c.tokens))
            if all_positions:
                out_ordered = list(torch.split(self._logits(hidden), [len(c.tokens) for c in ordered]))
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

    def _layers(self, ids: torch.Tensor, pos: torch.Tensor, write_rows: torch.Tensor, attn: _AttentionPlan) -> torch.Tensor:
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


class _AttentionPlan:
    """Index tensors for one step's attention, built once and shared by every layer."""

    def __init__(self, runner: ModelRunner, ordered: list[Chunk], num_decode: int):
        table = runner.cache.row_table
        dev = table.device
        self.scaling = runner.scaling
        self.num_decode = num_decode
        self.decode_rows = self.decode_mask = None
        if num_decode:
            dec = ordered[:num_decode]
            lens = [c.start + 1 for c in dec]
            lmax = max(lens)
            seq_ids = torch.tensor([c.seq for c in dec], device=dev)
            self.decode_rows = table[seq_ids, :lmax].contiguous()  # [B, Lmax]
            lens_t = torch.tensor(lens, device=dev)
            self.decode_mask = (torch.arange(lmax, device=dev)[None, :] < lens_t[:, None])[:, None, None, :]  # [B,1,1,Lmax]
        # prefill chunks: (first flat row, n, cache rows [L], causal mask [n, L] with the cached prefix visible)
        self.prefills: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
        offset = num_decode
        for c in ordered[num_decode:]:
            n, total = len(c.tokens), c.start + len(c.tokens)
            rows = table[c.seq, :total]
            q_pos = torch.arange(c.start, total, device=dev)
            mask = torch.arange(total, device=dev)[None, :] <= q_pos[:, None]  # [n, L]
            self.prefills.append((offset, n, rows, mask))
            offset += n

    def run(self, q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor) -> torch.Tensor:
        """q [T, H, hd] (decodes first) -> attention output [T, H, hd]."""
        out = torch.empty_like(q)
        B = self.num_decode
        if B:
            shape = (*self.decode_rows.shape, *k_rows.shape[1:])  # [B, Lmax, kvH, hd]
            # index_select on flat rows: several times faster than advanced indexing on CPU
            k = k_rows.index_select(0, self.decode_rows.view(-1)).view(shape).transpose(1, 2).to(q.dtype)
            v = v_rows.index_select(0, self.decode_rows.view(-1)).view(shape).transpose(1, 2).to(q.dtype)
            o = F.scaled_dot_product_attention(q[:B, :, None, :], k, v, attn_mask=self.decode_mask,
                                               scale=self.scaling, enable_gqa=True)  # [B, H, 1, hd]
            out[:B] = o[:, :, 0, :]
        for start, n, rows, mask in self.prefills:
            k = k_rows.index_select(0, rows).transpose(0, 1).to(q.dtype)  # [kvH, L, hd]
            v = v_rows.index_select(0, rows).transpose(0, 1).to(q.dtype)
            qc = q[start:start + n].transpose(0, 1)  # [H, n, hd]
            o = F.scaled_dot_product_attention(qc, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=True)
            out[start:start + n] = o.transpose(0, 1)
        return out


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
