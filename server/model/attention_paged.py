"""The CPU torch attention over the paged KV cache: cost follows the tokens actually attended to.

Two differences from the dense reference, both measured in bench/bench_attention.py:

- K/V are gathered by whole *blocks* (``index_select`` of ``[block_size, kv_heads, head_dim]`` pages, one
  index per block) instead of row by row, straight from the cache's storage viewed as pages.
- Decoding sequences are grouped by length (sorted, and a group closed when padding it to its longest
  member would waste more than ``MAX_WASTE`` of its blocks), and each group gets one SDPA call padded
  only to its own longest sequence. A batch with one long and 31 short sequences no longer pays 32 long
  ones: the work is sum(len) up to that bound, not B * Lmax.

Prefill chunks each get one causal call over their own blocks (cached prefix plus the chunk), as in the
reference. The groups, block tables and masks are built once per step and shared by every layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from server.model.attention import StepAttention, StepShape, causal_mask

MAX_WASTE = 0.25  # a decode group may pad at most this share of its blocks beyond what it attends to


def length_groups(num_blocks: list[int], max_waste: float = MAX_WASTE) -> list[list[int]]:
    """Indices of ``num_blocks`` grouped for padded calls: longest first; a group padded to its first
    (longest) member never holds more than (1 + max_waste) times the blocks its members use."""
    order = sorted(range(len(num_blocks)), key=lambda i: -num_blocks[i])
    groups: list[list[int]] = []
    used = 0
    for i in order:
        if groups and (len(groups[-1]) + 1) * num_blocks[groups[-1][0]] <= (1 + max_waste) * (used + num_blocks[i]):
            groups[-1].append(i)
            used += num_blocks[i]
        else:
            groups.append([i])
            used = num_blocks[i]
    return groups


def _block_table(row_table: torch.Tensor, seqs: torch.Tensor, num_blocks: int, block_size: int) -> torch.Tensor:
    """[len(seqs), num_blocks] physical block ids, read from the row table's first row of each block
    (entries past a sequence's own blocks name block 0: masked out)."""
    return (row_table[seqs, 0:num_blocks * block_size:block_size] // block_size).contiguous()


class PagedAttention(StepAttention):
    def __init__(self, row_table: torch.Tensor, block_size: int, scaling: float, shape: StepShape,
                 max_waste: float = MAX_WASTE):
        dev = row_table.device
        self.scaling = scaling
        self.block_size = bs = block_size
        self.num_decode = len(shape.decodes)
        # decode groups: (flat rows of the group [n] or None for all, block table [n, M], mask [n,1,1,M*bs] | None)
        self.groups: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]] = []
        lens = [length for _, length in shape.decodes]
        nblocks = [-(-length // bs) for length in lens]
        groups = length_groups(nblocks, max_waste) if lens else []
        for members in groups:
            m = nblocks[members[0]]
            seqs = torch.tensor([shape.decodes[i][0] for i in members], device=dev)
            table = _block_table(row_table, seqs, m, bs)
            glens = torch.tensor([lens[i] for i in members], device=dev)
            mask = None
            if any(lens[i] != m * bs for i in members):  # SDPA without a mask takes its faster kernel
                mask = (torch.arange(m * bs, device=dev)[None, :] < glens[:, None])[:, None, None, :]
            idx = None if len(groups) == 1 and members == sorted(members) else torch.tensor(members, device=dev)
            self.groups.append((idx, table, mask))
        # prefill chunks: (first flat row, n, block table [M], causal mask [n, M*bs])
        self.prefills: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
        offset = self.num_decode
        for seq, start, n in shape.prefills:
            m = -(-(start + n) // bs)
            table = _block_table(row_table, torch.tensor([seq], device=dev), m, bs)[0]
            self.prefills.append((offset, n, table, causal_mask(start, n, m * bs, dev)))
            offset += n

    def _gather(self, pages: torch.Tensor, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[*table.shape[:-1], kvH, M * bs, hd]: the pages named by ``table``, one index per block."""
        kvh, hd = pages.shape[2:]
        lead = table.shape[:-1]
        x = pages.index_select(0, table.reshape(-1)).view(*lead, table.shape[-1] * self.block_size, kvh, hd)
        return x.transpose(-3, -2).to(dtype)

    def run(self, q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor) -> torch.Tensor:
        bs = self.block_size
        k_pages = k_rows.view(-1, bs, *k_rows.shape[1:])  # [num_blocks, bs, kvH, hd], no copy
        v_pages = v_rows.view(-1, bs, *v_rows.shape[1:])
        out = torch.empty_like(q)
        B = self.num_decode
        for idx, table, mask in self.groups:
            qg = q[:B] if idx is None else q.index_select(0, idx)  # [n, H, hd]
            k = self._gather(k_pages, table, q.dtype)  # [n, kvH, L, hd]
            v = self._gather(v_pages, table, q.dtype)
            o = F.scaled_dot_product_attention(qg[:, :, None, :], k, v, attn_mask=mask, scale=self.scaling,
                                               enable_gqa=True)[:, :, 0, :]  # [n, H, hd]
            if idx is None:
                out[:B] = o
            else:
                out.index_copy_(0, idx, o)
        for start, n, table, mask in self.prefills:
            k = self._gather(k_pages, table, q.dtype)  # [kvH, L, hd]
            v = self._gather(v_pages, table, q.dtype)
            qc = q[start:start + n].transpose(0, 1)  # [H, n, hd]
            o = F.scaled_dot_product_attention(qc, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=True)
            out[start:start + n] = o.transpose(0, 1)
        return out
