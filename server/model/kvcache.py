"""Paged KV cache: fixed pages of ``block_size`` tokens shared by all sequences (vLLM style).

Layout per layer: K and V as flat token rows ``[num_blocks * block_size, kv_heads, head_dim]``. A sequence
owns a *sequence slot* (0..max_seqs-1) and a list of blocks; ``row_table[seq_slot, pos]`` is the flat row
that holds position ``pos``. Joining or leaving the batch only moves block ids between a free list and a
table: no tensor of the batch is ever copied.

Blocks are taken on demand (``grow``) as a sequence's positions advance. When none are free the
scheduler preempts the most recently admitted request (its blocks return here; it is recomputed later).
"""

from __future__ import annotations

import torch

from server.common.machine import host_share_bytes


def kv_budget_bytes(device: torch.device, gpu_memory_utilization: float) -> int:
    """Bytes for the KV cache when none is configured, read once the weights and adapter slots are allocated.

    CUDA: what is still free below ``gpu_memory_utilization`` of the device (as vLLM's setting of that name,
    without its profiling run: activations live in the remaining share). CPU: 1/8 of the host's available
    memory. ``PagedKVCache.for_model`` then caps it at what ``max_seqs`` full-length sequences can use."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return max(0, int(gpu_memory_utilization * total) - (total - free))
    return host_share_bytes()


class KVCacheFull(RuntimeError):
    """Not enough free blocks or sequence slots for the requested reservation."""


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        max_seqs: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if num_blocks <= 0 or block_size <= 0 or max_seqs <= 0 or max_len <= 0:
            raise ValueError(f"kv cache sizes must be positive: num_blocks={num_blocks} block_size={block_size} "
                             f"max_seqs={max_seqs} max_len={max_len}")
        self.block_size = block_size
        self.max_len = max_len
        self.num_blocks = num_blocks
        rows = num_blocks * block_size
        # [layers, 2 (k, v), rows, kv_heads, head_dim]
        self.data = torch.zeros(num_layers, 2, rows, kv_heads, head_dim, dtype=dtype, device=device)
        # row_table[seq_slot, pos] -> flat row; unused entries point at row 0 (always masked out)
        self.row_table = torch.zeros(max_seqs, max_len, dtype=torch.long, device=device)
        self._free_blocks = list(range(num_blocks - 1, -1, -1))  # a stack: pop() is O(1)
        self._free_seqs = list(range(max_seqs - 1, -1, -1))
        self._blocks: dict[int, list[int]] = {}  # seq slot -> its blocks
        self._offsets = torch.arange(block_size, dtype=torch.long)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def num_free_seqs(self) -> int:
        return len(self._free_seqs)

    @property
    def num_active(self) -> int:
        return len(self._blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int, spare_blocks: int = 0) -> bool:
        """Room for a new sequence of ``num_tokens`` that still leaves ``spare_blocks`` free."""
        return (num_tokens <= self.max_len and bool(self._free_seqs)
                and self.blocks_for(num_tokens) + spare_blocks <= len(self._free_blocks))

    def allocate(self, num_tokens: int) -> int:
        """A sequence slot with blocks for its first ``num_tokens`` positions; it ``grow``s later."""
        if num_tokens > self.max_len:
            raise KVCacheFull(f"{num_tokens} tokens exceed the cache's max_len of {self.max_len}")
        need = self.blocks_for(num_tokens)
        if not self._free_seqs or need > len(self._free_blocks):
            raise KVCacheFull(f"need {need} blocks and a sequence slot; {len(self._free_blocks)} blocks and "
                              f"{len(self._free_seqs)} slots free")
        seq = self._free_seqs.pop()
        self._blocks[seq] = []
        self.grow(seq, num_tokens)
        return seq

    def grow(self, seq: int, num_tokens: int) -> bool:
        """Make positions ``0 .. num_tokens - 1`` of ``seq`` addressable; False (nothing taken) when the
        free blocks do not suffice: the caller then preempts someone."""
        if num_tokens > self.max_len:
            raise KVCacheFull(f"{num_tokens} tokens exceed the cache's max_len of {self.max_len}")
        blocks = self._blocks[seq]
        need = self.blocks_for(num_tokens) - len(blocks)
        if need <= 0:
            return True
        if need > len(self._free_blocks):
            return False
        new = [self._free_blocks.pop() for _ in range(need)]
        rows = (torch.tensor(new, dtype=torch.long)[:, None] * self.block_size + self._offsets).flatten()
        start = len(blocks) * self.block_size
        n = min(rows.numel(), self.max_len - start)
        self.row_table[seq, start:start + n] = rows[:n].to(self.row_table.device)
        blocks.extend(new)
        return True

    def free(self, seq: int) -> None:
        """Return a sequence's blocks; a second free of the same slot is a no-op (abort paths may race)."""
        blocks = self._blocks.pop(seq, None)
        if blocks is None:
            return
        self._free_blocks.extend(reversed(blocks))
        self._free_seqs.append(seq)

    def blocks_of(self, seq: int) -> list[int]:
        """The blocks of sequence slot ``seq`` in position order (host list; FlashInfer's page indices)."""
        return self._blocks[seq]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K rows, V rows) of layer i, each [rows, kv_heads, head_dim]."""
        return self.data[i, 0], self.data[i, 1]

    @classmethod
    def for_model(cls, config, budget_bytes: int, block_size: int, max_seqs: int, max_len: int,
                  dtype: torch.dtype, device: torch.device | str) -> PagedKVCache:
        """A cache for an HF decoder config within ``budget_bytes`` (but always room for one full-length
        sequence, and never more than ``max_seqs`` full-length ones)."""
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        per_token = cls.bytes_per_token(config.num_hidden_layers, config.num_key_value_heads, head_dim, dtype)
        tokens = min(max_seqs * max_len, max(budget_bytes // per_token, max_len))
        return cls(config.num_hidden_layers, config.num_key_value_heads, head_dim,
                   num_blocks=-(-tokens // block_size), block_size=block_size, max_seqs=max_seqs,
                   max_len=max_len, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class NoKVCache:
    """For encoder bases, which generate nothing: no sequence is ever admitted."""

    def can_allocate(self, num_tokens: int, spare_blocks: int = 0) -> bool:
        return False

    def allocate(self, num_tokens: int) -> int:
        raise KVCacheFull("an encoder base has no KV cache")

    def grow(self, seq: int, num_tokens: int) -> bool:
        return False

    def free(self, seq: int) -> None:
        pass
