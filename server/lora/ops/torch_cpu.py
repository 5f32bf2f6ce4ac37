"""The vectorised torch path of the batched low-rank op (CPU, and any device without Triton).

Per step and module: one gather of the adapter tokens' activations x, the correction computed by one of
the formulations below (never a Python loop over adapters or tokens), scattered back into y with one
``index_add_``; then out_scale as a per-token row gather of the module's g table (row S = ones).

- single (one adapter in the step): two GEMMs on views of its slot, no copy of any weight.
- rows gather (decode-like steps: less than ``GROUPED_MIN_WORK`` per adapter segment, see there):
  ``plan.rows`` names, for every token, the flat-table rows of its adapter's rank, padded to the step's
  largest rank with the zero row. One ``index_select`` + ``bmm`` for the shrink, one weighted
  ``embedding_bag`` for the expand (reads B^T rows in place), whatever the number of buckets; DRAM reads
  follow each adapter's rank (the padding reads one cached zero row). When most tokens carry adapters the
  table is in token order: no gather of x, no scatter into y.
- grouped (prefill-like steps): per used rank bucket, ``torch._grouped_mm`` over the used local slots
  lo..hi reads each slot's weights in place. Its CPU build loops over groups (~1 us per empty group,
  ~4 us per small one), so it pays off only on long segments. Needs torch 2.9+ and 16-byte row strides.
- bucket gather: per bucket, gathers each token's [R_b, d] rows and runs ``bmm``: the fallback where
  neither of the above applies (unaligned shapes, a row table over ``plan.ROWS_CAP``).

``strategy``: "auto" (the choice above), or "gather" / "grouped" to force one for tests and benchmarks.
MoR multiplies rank row i*r + j of h by the token's router weight v_i (``route``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from server.lora.buffers import ModuleSlots
from server.lora.plan import BatchPlan, BucketPlan


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


# Grouped GEMMs beat the per-token gather once an adapter segment carries enough work: the gather reads
# each token's rank rows (tokens x rank x (d_in + d_out) elements), the grouped GEMMs read each adapter
# once but pay a fixed cost per group. Measured on CPU (bench/bench_op_choice.py, torch 2.13, d_in x d_out
# from 256 x 256 to 2048 x 2048, ranks 8 and 16, 5 and 16 adapters, 1-128 tokens per segment, one thread),
# the crossover sits at tokens per segment x rank x (d_in + d_out) of 64K-130K elements; below it grouped
# was up to 2.3x slower (decode over a few adapters), above it up to 30x faster (prefill).
GROUPED_MIN_WORK = 96 << 10


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
            if plan.single is not None and self.strategy == "auto":
                self._single(x, y, plan, slots)
            elif self._rows(plan, slots) and plan.rows_by_token:
                self._gather_rows(x, y, plan, slots)
            elif self._rows(plan, slots):
                xs = x.index_select(0, plan.order)  # [T_a, d_in]
                y.index_add_(0, plan.order, self._gather_rows(xs, None, plan, slots))
            else:
                xs = x.index_select(0, plan.order)  # [T_a, d_in], adapter tokens sorted by (bucket, slot)
                for bp in plan.buckets:
                    delta = self._bucket(xs[bp.start:bp.stop], bp, slots)  # [n, d_out]
                    y.index_add_(0, plan.order[bp.start:bp.stop], delta)
        if plan.scale_rows is not None:
            y.mul_(slots.out_scale.index_select(0, plan.scale_rows))  # [T, d_out] rows of g
        return y

    def _single(self, x: torch.Tensor, y: torch.Tensor, plan: BatchPlan, slots: ModuleSlots) -> None:
        """One adapter in the step: two plain GEMMs on views of its slot, no weight copy."""
        assert plan.single is not None and plan.order is not None
        bucket, local, rank = plan.single
        a = slots.a[bucket][local, :rank]  # [r, d_in] view
        bt = slots.bt[bucket][local, :rank]  # [r, d_out] view
        whole = plan.order.shape[0] == plan.num_tokens  # every token uses it: ``order`` is the identity
        xs = x if whole else x.index_select(0, plan.order)  # [N, d_in]
        h = xs @ a.T  # [N, r]
        if plan.mor_pos is not None:
            assert plan.mor_index is not None
            h = route(h, xs.index_select(0, plan.mor_pos), plan.mor_pos, plan.mor_index, slots)
        if whole:
            y.addmm_(h, bt)
        else:
            y.index_add_(0, plan.order, h @ bt)

    def _rows(self, plan: BatchPlan, slots: ModuleSlots) -> bool:
        """Decode-like steps (a few tokens per adapter) take one padded gather over every bucket."""
        if plan.rows is None or self.strategy == "grouped":
            return False
        work = len(plan.order) * plan.rows.shape[1] * (slots.d_in + slots.d_out)
        return self.strategy == "gather" or work < GROUPED_MIN_WORK * plan.num_segments

    def _gather_rows(self, xs: torch.Tensor, y: torch.Tensor | None, plan: BatchPlan,
                     slots: ModuleSlots) -> torch.Tensor:
        """Each token's rank rows straight from the flat tables: DRAM reads follow each adapter's rank;
        rows past it point to the one zero row (which stays in cache). xs [N, d_in] are the rows' tokens;
        with ``y`` [N, d_out] the correction is accumulated into it, else returned."""
        assert plan.rows is not None
        N, R = plan.rows.shape
        flat = plan.rows.reshape(-1)  # [N * R]
        a = slots.a_flat.index_select(0, flat).view(N, R, slots.d_in)
        # x as the row operand ([n, 1, d] @ [n, d, R]): MKL runs [n, R, d] @ [n, d, 1] ~10x slower
        h = torch.bmm(xs.unsqueeze(1), a.transpose(1, 2)).squeeze(1)  # [N, R]
        if plan.mor_pos is not None:
            assert plan.mor_index is not None
            h = route(h, xs.index_select(0, plan.mor_pos), plan.mor_pos, plan.mor_index, slots)
        # The expand sum_k h[t, k] * B^T[rows[t, k]] is a weighted embedding bag per token: it reads the rows
        # in place instead of materialising a [N, R, d_out] gather (measured ~2.5x faster than gather + bmm).
        delta = F.embedding_bag(plan.rows, slots.bt_flat, mode="sum", per_sample_weights=h)  # [N, d_out]
        return delta if y is None else y.add_(delta)

    def _bucket(self, xb: torch.Tensor, bp: BucketPlan, slots: ModuleSlots) -> torch.Tensor:
        a, bt = slots.a[bp.bucket], slots.bt[bp.bucket]  # [n_b, R, d_in], [n_b, R, d_out]
        grouped = self._grouped(bp, slots, xb.element_size())
        hi = bp.lo + bp.offs.shape[0]  # grouped GEMMs run over the used local slots lo..hi only
        if grouped:
            h = torch._grouped_mm(xb, a[bp.lo:hi].transpose(1, 2), offs=bp.offs)  # [n, R]
        else:
            h = torch.bmm(xb.unsqueeze(1), a.index_select(0, bp.local_slots).transpose(1, 2)).squeeze(1)
        if bp.mor_rows is not None:
            assert bp.mor_index is not None
            h = route(h, xb.index_select(0, bp.mor_rows), bp.mor_rows, bp.mor_index, slots)
        if grouped:
            return torch._grouped_mm(h, bt[bp.lo:hi], offs=bp.offs)  # [n, d_out]
        return torch.bmm(h.unsqueeze(1), bt.index_select(0, bp.local_slots)).squeeze(1)

    def _grouped(self, bp: BucketPlan, slots: ModuleSlots, itemsize: int) -> bool:
        if self.strategy == "gather" or not HAS_GROUPED_MM:
            return False
        if not aligned(slots.d_in, slots.d_out, bp.rank, itemsize):
            return False
        work = bp.num_tokens * bp.rank * (slots.d_in + slots.d_out)
        return self.strategy == "grouped" or work >= GROUPED_MIN_WORK * bp.num_segments


def route(h: torch.Tensor, xm: torch.Tensor, pos: torch.Tensor, entries: torch.Tensor,
          slots: ModuleSlots) -> torch.Tensor:
    """MoR: multiply rank row i*r + j of h [n, R] by v_i = softmax(G x)_i at rows ``pos`` [m] (MoR tokens,
    activations ``xm`` [m, d_in], MoR table entries ``entries`` [m])."""
    assert slots.gate is not None and slots.gate_bias is not None and slots.row_expert is not None
    gate = slots.gate.index_select(0, entries)  # [m, E, d_in]: E is small (router experts)
    logits = torch.bmm(gate, xm.unsqueeze(2)).squeeze(2)  # [m, E]
    v = torch.softmax(logits + slots.gate_bias.index_select(0, entries), dim=-1)  # [m, E]
    experts = slots.row_expert.index_select(0, entries)[:, :h.shape[1]]  # [m, R]
    return h.index_copy(0, pos, h.index_select(0, pos) * v.gather(1, experts))
