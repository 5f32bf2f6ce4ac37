"""Attention of one step over the paged KV cache (the reference torch path: SDPA on gathered rows).

The decodes share one batched call: each sequence's keys and values are gathered through the cache's row
table into a padded ``[B, Lmax]`` batch, masked per sequence. Each prefill chunk gets its own causal call
over its cached prefix plus itself. Both gather copies of the cached rows every layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class AttentionPlan:
    """Index tensors for one step's attention, built once and shared by every layer.

    ``decodes``: (sequence slot, length with the new token) of each one-token chunk, in flat order first;
    ``prefills``: (sequence slot, start, new tokens) of each multi-token chunk, in flat order after them."""

    def __init__(self, row_table: torch.Tensor, scaling: float, decodes: list[tuple[int, int]],
                 prefills: list[tuple[int, int, int]]):
        dev = row_table.device
        self.scaling = scaling
        self.num_decode = num_decode = len(decodes)
        self.decode_rows = self.decode_mask = None
        if num_decode:
            lens = [length for _, length in decodes]
            lmax = max(lens)
            seq_ids = torch.tensor([seq for seq, _ in decodes], device=dev)
            self.decode_rows = row_table[seq_ids, :lmax].contiguous()  # [B, Lmax]
            lens_t = torch.tensor(lens, device=dev)
            self.decode_mask = (torch.arange(lmax, device=dev)[None, :] < lens_t[:, None])[:, None, None, :]  # [B,1,1,Lmax]
        # prefill chunks: (first flat row, n, cache rows [L], causal mask [n, L] with the cached prefix visible)
        self.prefills: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
        offset = num_decode
        for seq, start, n in prefills:
            total = start + n
            rows = row_table[seq, :total]
            q_pos = torch.arange(start, total, device=dev)
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
