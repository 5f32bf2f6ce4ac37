"""SGMV-style Triton kernels for the batched low-rank op (CUDA). Importable without triton installed.

Per used rank bucket, two launches over the plan's segments (one segment = the tokens of one slot):

    shrink  grid (segments, token tiles, modules):  h[m, tok, :R] = A_m[slot] @ x[order[tok]]  fp32 acc
    expand  grid (segments, token tiles, N tiles):  y[order[tok], n] += B[slot][n, :] @ h[tok]  fp32 acc

The shrink's third axis runs over the projections that read the same input (q/k/v, gate/up): one launch
computes h for all of them (``TritonLowRank._shrink``).

Rows of A (and of B^T) past the module's actual rank (``slots.ranks``) are never read: the shrink masks
them and the expand's rank loop stops at the rank, so bytes and FLOPs follow each adapter's rank. The
expand scatters straight into y through ``order`` (every token is written by exactly one program) and
applies out_scale (DoRA/EDoRA's g) in the same pass. MoR's router is a cheap torch step between the two
launches, shared with the torch backend.

Precision: both GEMMs accumulate in fp32, and h stays fp32 between them (an fp32 scratch, never rounded to
the activation dtype). With fp32 activations every dot is IEEE fp32 (``input_precision="ieee"``: tl.dot's
default would round the operands to TF32). The expand multiplies the fp32 h by B widened to fp32 (exact
in TF32 for 16-bit B: "tf32x3", see ``dot_precision``), and only g * (y + B h) is rounded to the output
dtype, once.

Tiles: a bucket whose longest segment has at most ``DECODE_MAX`` tokens (decode steps) runs with token
tiles of 1, 2 or 4 rows (the smallest power of two holding the segment) and a broadcast multiply-and-sum
instead of ``tl.dot``, which needs 16 rows: a one-token segment no longer computes 15 masked rows. Longer
segments use 16-row ``tl.dot`` tiles. Both variants are one kernel each (``DOT`` is a compile-time switch).

These kernels have run only under the Triton interpreter (CPU, ``TRITON_INTERPRET=1``; tests/
test_ops_triton.py) and been compiled for sm_90 without a GPU (tests/test_ops_triton_compile.py), never
run on a GPU: their speed there is unmeasured.
"""

from __future__ import annotations

import torch

from server.lora.buffers import ModuleSlots
from server.lora.ops.torch_cpu import route
from server.lora.plan import BatchPlan, BucketPlan

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # triton is an optional extra: the torch path serves without it
    AVAILABLE = False

BLOCK_M = 16  # tokens per tile of the tl.dot kernels (tl.dot needs >= 16 rows)
DECODE_MAX = 4  # a bucket whose segments are all this short runs the small-tile (dot-free) kernels
VEC_ELEMS = 4096  # bound on the [rows, K, R] products a small-tile program holds at once


if AVAILABLE:

    # Builtins only (tl.full, tl.reduce; not tl.zeros, tl.sum): triton.language's own @jit helpers are fixed
    # at triton's import, so a process that imported triton before setting TRITON_INTERPRET (a test
    # session) could not interpret these kernels.

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _mma(a, b, DOT: tl.constexpr, PRECISION: tl.constexpr):
        """a [M, K] @ b [K, N] accumulated in fp32: ``tl.dot`` at ``PRECISION`` (``dot_precision``) for
        16-row tiles, else one broadcast multiply and a sum over K in fp32 (tiles of 1-4 rows, below
        tl.dot's minimum)."""
        if DOT:
            out = tl.dot(a, b, input_precision=PRECISION)
        else:
            out = tl.reduce(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], 1, _add)
        return out

    @triton.jit
    def _shrink_kernel(x_ptr, order_ptr, a_ptrs, rank_ptrs, seg_start_ptr, seg_slot_ptr, h_ptr,
                       d_in, R, stride_x, stride_a_slot, stride_a_row, stride_h_module, stride_h,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, DOT: tl.constexpr,
                       PRECISION: tl.constexpr):
        seg = tl.program_id(0)
        start = tl.load(seg_start_ptr + seg)
        end = tl.load(seg_start_ptr + seg + 1)
        m0 = start + tl.program_id(1) * BLOCK_M
        if m0 < end:
            module = tl.program_id(2)  # which projection of the group reading x (pointer tables, as vLLM's)
            a_ptr = tl.load(a_ptrs + module).to(tl.pointer_type(x_ptr.dtype.element_ty))
            rank_ptr = tl.load(rank_ptrs + module).to(tl.pointer_type(tl.int32))
            h_ptr += module * stride_h_module
            slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
            rank = tl.load(rank_ptr + slot)
            tok = m0 + tl.arange(0, BLOCK_M)  # [BM] positions in the bucket's token range
            tok_ok = tok < end
            rows = tl.load(order_ptr + tok, mask=tok_ok, other=0).to(tl.int64)  # [BM] rows of x
            r = tl.arange(0, BLOCK_R)
            acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
            for k0 in range(0, d_in, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_ok = k < d_in
                x = tl.load(x_ptr + rows[:, None] * stride_x + k[None, :],
                            mask=tok_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
                a = tl.load(a_ptr + slot * stride_a_slot + r[None, :] * stride_a_row + k[:, None],
                            mask=(r[None, :] < rank) & k_ok[:, None], other=0.0)  # [BK, BR] = A^T tile
                acc += _mma(x, a, DOT, PRECISION)
            out = h_ptr + tok[:, None] * stride_h + r[None, :]
            tl.store(out, acc, mask=tok_ok[:, None] & (r[None, :] < R))  # h is fp32: no rounding here

    @triton.jit
    def _expand_kernel(h_ptr, bt_ptr, rank_ptr, seg_start_ptr, seg_slot_ptr, order_ptr, y_ptr, g_ptr,
                       d_out, stride_h, stride_b_slot, stride_b_row, stride_y, stride_g,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT: tl.constexpr,
                       PRECISION: tl.constexpr, SCALED: tl.constexpr):
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
            acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
            for r0 in range(0, rank, BLOCK_R):  # stops at this module's rank, not the bucket's
                r = r0 + tl.arange(0, BLOCK_R)
                r_ok = r < rank
                h = tl.load(h_ptr + tok[:, None] * stride_h + r[None, :],
                            mask=tok_ok[:, None] & r_ok[None, :], other=0.0)  # [BM, BR] fp32
                b = tl.load(bt_ptr + slot * stride_b_slot + r[:, None] * stride_b_row + n[None, :],
                            mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # [BR, BN]
                acc += _mma(h, b.to(tl.float32), DOT, PRECISION)
            rows = tl.load(order_ptr + tok, mask=tok_ok, other=0).to(tl.int64)
            out = y_ptr + rows[:, None] * stride_y + n[None, :]
            ok = tok_ok[:, None] & n_ok[None, :]
            y = tl.load(out, mask=ok, other=0.0).to(tl.float32) + acc
            if SCALED:  # out_scale (DoRA, EDoRA): the slot's g, ones for slots without it
                g = tl.load(g_ptr + slot * stride_g + n, mask=n_ok, other=1.0)  # [BN]
                y = y * g.to(tl.float32)[None, :]
            tl.store(out, y.to(y_ptr.dtype.element_ty), mask=ok)  # the one rounding


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << (max(n, 1) - 1).bit_length())


def tile_rows(max_segment: int) -> int:
    """Token rows per tile for a bucket whose longest segment has ``max_segment`` tokens: the smallest
    power of two holding it when it is a decode segment (<= DECODE_MAX: the dot-free kernels), else
    BLOCK_M (the tl.dot kernels)."""
    return _pow2(max_segment, least=1) if max_segment <= DECODE_MAX else BLOCK_M


def dot_precision(dtype: torch.dtype, expand: bool) -> str:
    """``tl.dot``'s input precision for activations of ``dtype``. fp32: "ieee" (the default, TF32, would
    round both operands to 10 mantissa bits). fp16/bf16: the shrink's operands are 16-bit, their products
    exact in fp32 whatever the setting; the expand's are h (fp32) and B widened from 16 bits, which TF32
    holds exactly (bf16 has 7 mantissa bits, fp16 10, TF32 10), so "tf32x3" (h as two TF32 parts, three
    tensor-core MMAs) loses only h's bits past about the 21st, where "ieee" would leave the tensor cores
    for the CUDA cores (a prefill-sized expand would then cost a sizeable fraction of the base GEMM)."""
    if dtype == torch.float32:
        return "ieee"
    return "tf32x3" if expand else "tf32"


class TritonLowRank:
    """``op(x, y, plan, slots)`` on CUDA (or on CPU tensors under TRITON_INTERPRET=1).

    Projections reading one input (``slots.group``: q/k/v, gate/up) share the shrink launch: the first of
    them called in a step computes h for every member (grid axis 2 over the members, their A tables and
    rank tables reached through pointer tables), the others read their slice. The expands stay one
    launch per module (each has its own B and output)."""

    name = "triton"

    def __init__(self, block_k: int = 64, block_n: int = 64):
        if not AVAILABLE:
            raise RuntimeError("the triton backend needs the optional extra: pip install triton")
        self.block_k = block_k
        self.block_n = block_n
        # (id of the first module, bucket) -> (that module, [2, members] int64 device pointers: A, ranks).
        # The slot buffers are allocated once per pool, so the pointers hold; the module is kept so the
        # id cannot be reused by another.
        self._tables: dict[tuple[int, int], tuple[ModuleSlots, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor, y: torch.Tensor, plan: BatchPlan, slots: ModuleSlots) -> torch.Tensor:
        if plan.buckets:
            assert plan.order is not None
            x = x.contiguous()
            for bp in plan.buckets:
                order = plan.order[bp.start:bp.stop]  # [n] rows of x and y
                rows = tile_rows(bp.max_segment)
                tiles = triton.cdiv(bp.max_segment, rows)
                h = self._shrink(x, plan, bp, slots, rows, tiles)  # [n, R] fp32
                if bp.mor_rows is not None:
                    h = route(h, x.index_select(0, order.index_select(0, bp.mor_rows)), bp.mor_rows, bp.mor_index,
                              slots)
                bt = slots.bt[bp.bucket]  # [n_b, R, d_out]
                g = slots.out_scale[bp.slot_base:]  # [n_b..., d_out] indexed by local slot
                _expand_kernel[(bp.num_segments, tiles, triton.cdiv(slots.d_out, self.block_n))](
                    h, bt, slots.ranks[bp.slot_base:], bp.seg_starts, bp.seg_slots, order, y, g,
                    slots.d_out, h.stride(0), bt.stride(0), bt.stride(1), y.stride(0), g.stride(0),
                    BLOCK_M=rows, BLOCK_N=self.block_n, BLOCK_R=16, DOT=rows == BLOCK_M,
                    PRECISION=dot_precision(y.dtype, expand=True),
                    SCALED=plan.scale_rows is not None)
        return y  # base tokens keep W0 x: out_scale applies to adapter tokens only, in the expand

    def _shrink(self, x: torch.Tensor, plan: BatchPlan, bp: BucketPlan, slots: ModuleSlots, rows: int,
                tiles: int) -> torch.Tensor:
        """This module's h [n, R] (fp32) for bucket ``bp``: ONE launch for its whole group the first time a
        member asks with this x in this step, kept in the plan until every member has read it; a member
        asking twice (another forward) recomputes."""
        group = slots.group
        members = [slots] if group is None else group.members
        key = ("triton-h", id(members[0]), bp.bucket)
        index = 0 if group is None else slots.group_index
        seen = plan.shared.get(key)
        if seen is None or seen[0] != (x.data_ptr(), tuple(x.shape)) or index in seen[2]:
            if x.dtype != slots.a_flat.dtype:
                raise TypeError(f"activations are {x.dtype} but the slot buffers {slots.a_flat.dtype}")
            a = slots.a[bp.bucket]  # [n_b, R, d_in]; every member's table has this layout
            h = torch.empty(len(members), bp.num_tokens, bp.rank, device=x.device, dtype=torch.float32)
            dot = rows == BLOCK_M
            block_r = _pow2(bp.rank, least=16 if dot else 1)
            # the small tiles hold a [rows, K, R] product: K shrinks as R grows (registers on a GPU)
            block_k = self.block_k if dot else max(16, min(self.block_k, _pow2_floor(VEC_ELEMS // (rows * block_r))))
            tables = self._pointer_tables(members, bp)
            _shrink_kernel[(bp.num_segments, tiles, len(members))](
                x, plan.order[bp.start:bp.stop], tables[0], tables[1], bp.seg_starts, bp.seg_slots, h,
                slots.d_in, bp.rank, x.stride(0), a.stride(0), a.stride(1), h.stride(0), h.stride(1),
                BLOCK_M=rows, BLOCK_K=block_k, BLOCK_R=block_r, DOT=dot,
                PRECISION=dot_precision(x.dtype, expand=False))
            # keyed by x's storage and shape: x stays alive in the caller while the group's members run
            seen = plan.shared[key] = ((x.data_ptr(), tuple(x.shape)), h, set())
        seen[2].add(index)
        if len(seen[2]) == len(members):  # all read: free it now, not at the end of the step
            del plan.shared[key]
        return seen[1][index]

    def _pointer_tables(self, members: list[ModuleSlots], bp: BucketPlan) -> torch.Tensor:
        key = (id(members[0]), bp.bucket)
        kept = self._tables.get(key)
        if kept is None:
            ptrs = [[m.a[bp.bucket].data_ptr() for m in members], [m.ranks[bp.slot_base:].data_ptr() for m in members]]
            kept = self._tables[key] = (members[0], torch.tensor(ptrs, dtype=torch.int64,
                                                                 device=members[0].a_flat.device))
        return kept[1]


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)
