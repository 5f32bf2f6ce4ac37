"""The vectorised torch path of the batched low-rank op (CPU, and any device without Triton).

Per step and module: one gather of the adapter tokens' activations, then per USED rank bucket (a short
host-side list from the plan, never a loop over adapters or tokens) a segmented shrink ``h = A x`` and
expand ``B h`` over the bucket's slot buffers, scattered back with one ``index_add_``. Cost follows the
bucket's rank, never the pool-wide maximum. Two formulations of the segmented products:

- ``grouped``: ``torch._grouped_mm`` with per-slot offsets over the used local slots lo..hi reads each
  slot's weights in place (no weight copy). Its CPU build loops over groups (~1 us per empty group,
  ~4 us per small one), so it wins when segments are long (prefill). Needs torch 2.9+ and row strides
  that are multiples of 16 bytes.
- ``gather``: copies each token's A/B rows ([n, R, d]) and runs ``bmm``: fewer, larger calls, which
  wins when segments hold a token or two (decode).
- ``auto`` (default): per bucket and step, ``grouped`` when it is usable and the bucket averages at
  least ``GROUPED_MIN_TOKENS`` tokens per segment, else ``gather`` (bench/bench_lowrank.py measured it).

MoR scales h per token by the router weight of each rank row's expert; out_scale is a per-token row
gather of the module's g table (row S = ones), applied after the correction and before the bias.
"""

from __future__ import annotations

import torch

from server.ops.buffers import ModuleSlots
from server.plan import BatchPlan, BucketPlan


def _grouped_mm_works() -> bool:
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None:
        return False
    try:
        out = fn(torch.ones(2, 8), torch.ones(2, 8, 4), offs=torch.tensor([1, 2], dtype=torch.int32))
    except (RuntimeError, NotImplementedError):
        return False
    return bool(out.shape == (2, 4) and torch.all(out == 8))


def aligned(*sizes_and_dtype: int) -> bool:
    """grouped_mm needs every row stride (in bytes) to be a multiple of 16."""
    *sizes, itemsize = sizes_and_dtype
    return all(n * itemsize % 16 == 0 for n in sizes)


HAS_GROUPED_MM = _grouped_mm_works()


GROUPED_MIN_TOKENS = 4  # average tokens per segment from which grouped beats gather on CPU


class TorchLowRank:
    """``op(x, y, plan, slots)``: y [T, d_out] holds W0 x (no bias); returns g * (y + B h') in place."""

    def __init__(self, strategy: str = "auto"):
        if strategy not in ("auto", "grouped", "gather"):
            raise ValueError(f"strategy {strategy!r} is not one of auto, grouped, gather")
        if strategy == "grouped" and not HAS_GROUPED_MM:
            raise ValueError("strategy 'grouped' needs torch._grouped_mm on this build")
        self.strategy = strategy
        self.name = f"torch-{strategy}"

    def __call__(self, x: torch.Tensor, y: torch.Tensor, plan: BatchPlan, slots: ModuleSlots) -> torch.Tensor:
        if plan.buckets:
            assert plan.order is not None
            xs = x.index_select(0, plan.order)  # [T_a, d_in], adapter tokens sorted by (bucket, slot)
            for bp in plan.buckets:
                xb = xs[bp.start:bp.stop]  # [n, d_in]
                a, bt = slots.a[bp.bucket], slots.bt[bp.bucket]  # [n_b, R, d_in], [n_b, R, d_out]
                if self._grouped(bp, slots, x.element_size()):
                    hi = bp.lo + bp.offs.shape[0]
                    h = torch._grouped_mm(xb, a[bp.lo:hi].transpose(1, 2), offs=bp.offs)  # [n, R]
                    if bp.mor_rows is not None:
                        h = route(h, xb.index_select(0, bp.mor_rows), bp, slots)
                    delta = torch._grouped_mm(h, bt[bp.lo:hi], offs=bp.offs)  # [n, d_out]
                else:
                    # x as the row operand ([n, 1, d] @ [n, d, R]): MKL runs [n, R, d] @ [n, d, 1] ~10x slower
                    h = torch.bmm(xb.unsqueeze(1), a.index_select(0, bp.local_slots).transpose(1, 2)).squeeze(1)
                    if bp.mor_rows is not None:
                        h = route(h, xb.index_select(0, bp.mor_rows), bp, slots)
                    delta = torch.bmm(h.unsqueeze(1), bt.index_select(0, bp.local_slots)).squeeze(1)
                y.index_add_(0, plan.order[bp.start:bp.stop], delta)
        if plan.scale_rows is not None:
            y.mul_(slots.out_scale.index_select(0, plan.scale_rows))  # [T, d_out] rows of g
        return y

    def _grouped(self, bp: BucketPlan, slots: ModuleSlots, itemsize: int) -> bool:
        if self.strategy == "gather" or not HAS_GROUPED_MM:
            return False
        if not aligned(slots.d_in, slots.d_out, bp.rank, itemsize):
            return False
        return self.strategy == "grouped" or bp.num_tokens >= GROUPED_MIN_TOKENS * bp.num_segments


def route(h: torch.Tensor, xm: torch.Tensor, bp: BucketPlan, slots: ModuleSlots) -> torch.Tensor:
    """MoR: multiply rank row i*r + j of h [n, R] by v_i = softmax(G x)_i for the bucket's MoR tokens,
    whose activations are ``xm`` [m, d_in] (rows ``bp.mor_rows`` of the bucket)."""
    assert bp.mor_rows is not None and bp.mor_index is not None
    assert slots.gate is not None and slots.gate_bias is not None and slots.row_expert is not None
    gate = slots.gate.index_select(0, bp.mor_index)  # [m, E, d_in]: E is small (router experts)
    logits = torch.bmm(gate, xm.unsqueeze(2)).squeeze(2)  # [m, E]
    v = torch.softmax(logits + slots.gate_bias.index_select(0, bp.mor_index), dim=-1)  # [m, E]
    experts = slots.row_expert.index_select(0, bp.mor_index)[:, :bp.rank]  # [m, R]
    return h.index_copy(0, bp.mor_rows, h.index_select(0, bp.mor_rows) * v.gather(1, experts))
