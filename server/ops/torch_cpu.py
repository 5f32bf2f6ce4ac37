"""The vectorised torch path of the batched low-rank op (CPU, and any device without Triton).

Per step and module: one gather of the adapter tokens' activations, then per USED rank bucket (a short
host-side list from the plan, never a loop over adapters or tokens) a segmented shrink ``h = A x`` and
expand ``B h`` over the bucket's slot buffers, scattered back with one ``index_add_``. Cost follows the
bucket's rank, never the pool-wide maximum. Two formulations of the segmented products:

- ``grouped``: ``torch._grouped_mm`` with per-slot offsets reads each used slot's weights in place (no
  copy of any weight); empty slots cost nothing. Needs a torch whose CPU build has it (2.9+).
- ``gather``: gathers each token's A/B rows ([n, R, d] copies) and runs ``bmm``: works everywhere.

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
        out = fn(torch.ones(2, 4), torch.ones(2, 4, 3), offs=torch.tensor([1, 2], dtype=torch.int32))
    except (RuntimeError, NotImplementedError):
        return False
    return bool(out.shape == (2, 3) and torch.all(out == 4))


HAS_GROUPED_MM = _grouped_mm_works()


class TorchLowRank:
    """``op(x, y, plan, slots)``: y [T, d_out] holds W0 x (no bias); returns g * (y + B h') in place."""

    def __init__(self, strategy: str | None = None):
        strategy = strategy or ("grouped" if HAS_GROUPED_MM else "gather")
        if strategy not in ("grouped", "gather"):
            raise ValueError(f"strategy {strategy!r} is not one of grouped, gather")
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
                h = self._shrink(xb, slots.a[bp.bucket], bp)  # [n, R]
                if bp.mor_rows is not None:
                    h = route(h, xb.index_select(0, bp.mor_rows), bp, slots)
                delta = self._expand(h, slots.bt[bp.bucket], bp)  # [n, d_out]
                y.index_add_(0, plan.order[bp.start:bp.stop], delta)
        if plan.scale_rows is not None:
            y.mul_(slots.out_scale.index_select(0, plan.scale_rows))  # [T, d_out] rows of g
        return y

    def _shrink(self, xb: torch.Tensor, a: torch.Tensor, bp: BucketPlan) -> torch.Tensor:
        if self.strategy == "grouped":
            return torch._grouped_mm(xb, a.transpose(1, 2), offs=bp.offs)  # [n, R]
        return torch.bmm(a.index_select(0, bp.local_slots), xb.unsqueeze(2)).squeeze(2)  # [n, R, d] @ [n, d, 1]

    def _expand(self, h: torch.Tensor, bt: torch.Tensor, bp: BucketPlan) -> torch.Tensor:
        if self.strategy == "grouped":
            return torch._grouped_mm(h, bt, offs=bp.offs)  # [n, d_out]
        return torch.bmm(h.unsqueeze(1), bt.index_select(0, bp.local_slots)).squeeze(1)  # [n, 1, R] @ [n, R, d]


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
