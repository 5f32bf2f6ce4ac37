"""SGMV-style Triton kernels for the batched low-rank op (CUDA). Importable without triton installed.

Per used rank bucket, two launches over the plan's segments (one segment = the tokens of one slot):

    shrink  grid (segments, token tiles):          h[tok, :R] = A[slot] @ x[order[tok]]       fp32 acc
    expand  grid (segments, token tiles, N tiles): y[order[tok], n] += B[slot][n, :] @ h[tok] fp32 acc

Rows of A (and of B^T) past the module's actual rank (``slots.ranks``) are never read: the shrink masks
them and the expand's rank loop stops at the rank, so bytes and FLOPs follow each adapter's rank. The
expand scatters straight into y through ``order`` (every token is written by exactly one program). MoR's
router and out_scale are cheap torch epilogues shared with the torch backend.
"""

from __future__ import annotations

import torch

from server.lora.buffers import ModuleSlots
from server.lora.ops.torch_cpu import route
from server.lora.plan import BatchPlan

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # triton is an optional extra: the torch path serves without it
    AVAILABLE = False

BLOCK_M = 16  # tokens per tile (tl.dot needs >= 16)


if AVAILABLE:

    @triton.jit
    def _shrink_kernel(x_ptr, order_ptr, a_ptr, rank_ptr, seg_start_ptr, seg_slot_ptr, h_ptr,
                       d_in, R, stride_x, stride_a_slot, stride_a_row, stride_h,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        seg = tl.program_id(0)
        start = tl.load(seg_start_ptr + seg)
        end = tl.load(seg_start_ptr + seg + 1)
        m0 = start + tl.program_id(1) * BLOCK_M
        if m0 < end:
            slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
            rank = tl.load(rank_ptr + slot)
            tok = m0 + tl.arange(0, BLOCK_M)  # [BM] positions in the bucket's token range
            tok_ok = tok < end
            rows = tl.load(order_ptr + tok, mask=tok_ok, other=0).to(tl.int64)  # [BM] rows of x
            r = tl.arange(0, BLOCK_R)
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, d_in, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_ok = k < d_in
                x = tl.load(x_ptr + rows[:, None] * stride_x + k[None, :],
                            mask=tok_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
                a = tl.load(a_ptr + slot * stride_a_slot + r[None, :] * stride_a_row + k[:, None],
                            mask=(r[None, :] < rank) & k_ok[:, None], other=0.0)  # [BK, BR] = A^T tile
                acc += tl.dot(x, a)
            out = h_ptr + tok[:, None] * stride_h + r[None, :]
            tl.store(out, acc.to(h_ptr.dtype.element_ty), mask=tok_ok[:, None] & (r[None, :] < R))

    @triton.jit
    def _expand_kernel(h_ptr, bt_ptr, rank_ptr, seg_start_ptr, seg_slot_ptr, order_ptr, y_ptr,
                       d_out, stride_h, stride_b_slot, stride_b_row, stride_y,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        seg = tl.program_id(0)
        start = tl.load(seg_start_ptr + seg)
        end = tl.load(seg_start_ptr + seg + 1)
        m0 = start + tl.program_id(1) * BLOCK_M
        if m0 < end:
            slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
            rank = tl.load(rank_ptr + slot)
            tok = m0 + tl.arange(0, BLOCK_M)
            tok_ok = tok < end
            n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < d_out
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for r0 in range(0, rank, BLOCK_R):  # stops at this module's rank, not the bucket's
                r = r0 + tl.arange(0, BLOCK_R)
                r_ok = r < rank
                h = tl.load(h_ptr + tok[:, None] * stride_h + r[None, :],
                            mask=tok_ok[:, None] & r_ok[None, :], other=0.0)  # [BM, BR]
                b = tl.load(bt_ptr + slot * stride_b_slot + r[:, None] * stride_b_row + n[None, :],
                            mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # [BR, BN]
                acc += tl.dot(h, b)
            rows = tl.load(order_ptr + tok, mask=tok_ok, other=0).to(tl.int64)
            out = y_ptr + rows[:, None] * stride_y + n[None, :]
            ok = tok_ok[:, None] & n_ok[None, :]
            y = tl.load(out, mask=ok, other=0.0)
            tl.store(out, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=ok)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << (max(n, 1) - 1).bit_length())


class TritonLowRank:
    """``op(x, y, plan, slots)`` on CUDA (or on CPU tensors under TRITON_INTERPRET=1)."""

    name = "triton"

    def __init__(self, block_k: int = 64, block_n: int = 64):
        if not AVAILABLE:
            raise RuntimeError("the triton backend needs the optional extra: pip install triton")
        self.block_k = block_k
        self.block_n = block_n

    def __call__(self, x: torch.Tensor, y: torch.Tensor, plan: BatchPlan, slots: ModuleSlots) -> torch.Tensor:
        if plan.buckets:
            assert plan.order is not None
            x = x.contiguous()
            for bp in plan.buckets:
                a, bt = slots.a[bp.bucket], slots.bt[bp.bucket]  # [n_b, R, d_in], [n_b, R, d_out]
                order = plan.order[bp.start:bp.stop]  # [n] rows of x and y
                ranks = slots.ranks[bp.slot_base:]  # [n_b...] indexed by local slot
                h = x.new_empty(bp.num_tokens, bp.rank)  # [n, R]
                tiles = triton.cdiv(bp.max_segment, BLOCK_M)
                _shrink_kernel[(bp.num_segments, tiles)](
                    x, order, a, ranks, bp.seg_starts, bp.seg_slots, h,
                    slots.d_in, bp.rank, x.stride(0), a.stride(0), a.stride(1), h.stride(0),
                    BLOCK_M=BLOCK_M, BLOCK_K=self.block_k, BLOCK_R=_pow2(bp.rank))
                if bp.mor_rows is not None:
                    h = route(h, x.index_select(0, order.index_select(0, bp.mor_rows)), bp.mor_rows, bp.mor_index,
                              slots)
                _expand_kernel[(bp.num_segments, tiles, triton.cdiv(slots.d_out, self.block_n))](
                    h, bt, ranks, bp.seg_starts, bp.seg_slots, order, y,
                    slots.d_out, h.stride(0), bt.stride(0), bt.stride(1), y.stride(0),
                    BLOCK_M=BLOCK_M, BLOCK_N=self.block_n, BLOCK_R=16)
        if plan.scale_rows is not None:
            y.mul_(slots.out_scale.index_select(0, plan.scale_rows))  # [T, d_out] rows of g
        return y
