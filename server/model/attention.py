"""Attention of one step over the paged KV cache: the backends, and the choice between them.

Every backend takes the same description of the step (decodes first, then prefill chunks, as the runner
orders the flat batch) and returns ``[T, H, hd]`` for ``q [T, H, hd]``; all of them read K/V from the
cache's flat rows ``[num_blocks * block_size, kv_heads, head_dim]`` after the step's new rows are written.

- ``dense``: the reference. Every decoding sequence's keys are gathered row by row into a padded
  ``[B, Lmax]`` batch and masked; each prefill chunk gets its own causal call. Simple, and its cost grows
  with B * Lmax whatever the lengths.
- ``paged`` (``attention_paged.py``): the CPU torch path; cost follows the tokens actually attended to.
- ``flashinfer`` (``attention_flashinfer.py``): FlashInfer's batch decode/prefill kernels reading the
  pages in place (CUDA only).

``auto`` is ``flashinfer`` on CUDA when the package imports, else ``paged``. The choice is made once, when
the runner is built (``make_attention``), never per step.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "dense", "paged", "flashinfer")


@dataclass(frozen=True)
class StepShape:
    """What attention needs to know of one step; lengths are host ints (planning never syncs a device).

    ``decodes``: (sequence slot, length with the new token) of each one-token chunk, in flat order first;
    ``prefills``: (sequence slot, start, new tokens) of each multi-token chunk, in flat order after them."""

    decodes: list[tuple[int, int]]
    prefills: list[tuple[int, int, int]]


class StepAttention(abc.ABC):
    """One step's attention, planned once and run by every layer."""

    @abc.abstractmethod
    def run(self, q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor) -> torch.Tensor:
        """q [T, H, hd] (decodes first) -> attention output [T, H, hd]."""


class DenseAttention(StepAttention):
    """The reference: SDPA over rows gathered through the row table, decodes padded to the longest."""

    def __init__(self, row_table: torch.Tensor, scaling: float, shape: StepShape):
        dev = row_table.device
        self.scaling = scaling
        decodes, prefills = shape.decodes, shape.prefills
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
            self.prefills.append((offset, n, rows, causal_mask(start, n, total, dev)))
            offset += n

    def run(self, q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor) -> torch.Tensor:
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


def causal_mask(start: int, n: int, width: int, device: torch.device) -> torch.Tensor:
    """[n, width] bool: query at position start + i sees cache positions 0 .. start + i (columns beyond the
    sequence, e.g. the unused tail of its last block, are never visible)."""
    q_pos = torch.arange(start, start + n, device=device)
    return torch.arange(width, device=device)[None, :] <= q_pos[:, None]


Planner = Callable[[StepShape], StepAttention]


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend ``name`` means on ``device`` (``auto`` resolved); an impossible choice is an error."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {', '.join(BACKENDS)}")
    if name == "auto":
        if device.type == "cuda":
            from server.model.attention_flashinfer import flashinfer_available

            return "flashinfer" if flashinfer_available() else "paged"
        return "paged"
    if name == "flashinfer" and device.type != "cuda":
        raise ValueError("attention backend 'flashinfer' needs a CUDA device")
    return name


def make_attention(name: str, cache, scaling: float, num_heads: int) -> tuple[str, Planner]:
    """(resolved backend name, a planner: StepShape -> StepAttention) for ``cache``, chosen once."""
    backend = resolve_backend(name, cache.row_table.device)
    if backend == "dense":
        return backend, lambda shape: DenseAttention(cache.row_table, scaling, shape)
    if backend == "paged":
        from server.model.attention_paged import PagedAttention

        return backend, lambda shape: PagedAttention(cache.row_table, cache.block_size, scaling, shape)
    from server.model.attention_flashinfer import checked_flashinfer

    fi = checked_flashinfer(cache, scaling, num_heads, strict=name == "flashinfer")
    if fi is None:  # auto, and FlashInfer failed its start-up check (logged): the torch path instead
        return make_attention("paged", cache, scaling, num_heads)
    return backend, fi.plan
