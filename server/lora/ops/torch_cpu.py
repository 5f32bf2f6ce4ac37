"""The vectorised torch path of the batched low-rank op (CPU, and any device without Triton).

Per step and module: the correction is computed by ONE of the formulations below (never a Python loop over
adapters or tokens), then out_scale as a per-token row gather of the module's g table (row S = ones).

- single (one adapter in the step): two GEMMs on views of its slot, no copy of any weight, no mask.
- dense (a few adapters, ``plan.dense_mask``): the step's K adapters' rank rows side by side as
  K*R columns; h = (x A^T) * mask over every token, y += h B. It does K times the low-rank multiply-adds,
  in two plain GEMMs; projections reading one input share the shrink GEMM and the K adapters' rows are
  kept across steps (``groups.ProjectionGroup``), so steady decoding gathers no weight at all.
- segments (``plan.seg_index``): per adapter, its tokens padded to the longest segment M; one ``bmm``
  [K, M, d_in] x [K, d_in, n*R] shrinks every member of a projection group, one ``bmm`` per member
  expands, one ``index_add_`` scatters. Kept rows as for dense; it does K*M/T_a times the useful work
  (1 when the segments are even), with a handful of calls per group whatever K is.
- bgmv (``plan.rows``, fp32 on CPU, once ``cpu_kernel`` is built): the same row table through one fused
  C++ call per module (per token: h = A_rows x, y += B_rows h), no weight copied, no intermediate tensor.
- rows gather (``plan.rows``): for every token, the flat-table rows of its adapter's rank, padded to the
  step's largest rank with the zero row. One ``index_select`` + ``bmm`` for the shrink, one weighted
  ``embedding_bag`` for the expand (reads B^T rows in place), whatever the number of buckets. When most
  tokens carry adapters the table is in token order: no gather of x, no scatter into y.
- grouped (long segments): per used rank bucket, ``torch._grouped_mm`` over the used local slots lo..hi
  reads each slot's weights in place; a fixed cost per group. Needs torch 2.9+ and 16-byte row strides.
- bucket gather: per bucket, gathers each token's [R_b, d] rows and runs ``bmm``: the fallback where none
  of the above applies (unaligned shapes, a row table over ``plan.ROWS_CAP``).

``strategy`` "auto" picks, per step and module shape, the formulation with the lowest cost in a model
fitted to measurements (``COST``); "gather" / "dense" / "grouped" force one for tests and benchmarks.
MoR multiplies rank row i*r + j of h by the token's router weight v_i (``route``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from server.lora.buffers import ModuleSlots
from server.lora.groups import ProjectionGroup
from server.lora.ops import cpu_kernel
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
_NO_TOKENS = torch.empty(0, dtype=torch.long)  # bgmv: the row table is in token order


STRATEGIES = ("auto", "grouped", "gather", "dense", "segments", "bgmv")

# Cost model, microseconds per module call, D = d_in + d_out, R = rank rows, K = adapters in the step:
#   gather   c0 + c1 * N*R*D                 (N row-table tokens: the per-token rows read)
#   bgmv     c0 + c1 * N*R*D                 (the same rows, read in place by the fused kernel)
#   dense    c0 + c1 * T*K*R*D               (two GEMMs over all T tokens; the K adapters' rows are kept)
#   grouped  c0 * buckets + c1 * T_a*R*D + c2 * K   (each adapter read once, a fixed cost per group)
#   segments c0 + c2 * n + c1 * K*M*R*D_group + c3 * K*R*D_group
#            (per projection group of n members; K*M padded places; c3: the K adapters' kept rows read)
# Least-squares fit (relative error; median 13-18%) of bench/bench_op_choice.py, torch 2.13, one thread,
# thread CPU time: d 256x256, 256x688, 576x1536, 2048x2048, ranks 8 and 16, 2-32 adapters, 1-128 tokens
# per adapter (2026-12-02; bgmv and segments from a second run, median error 8% and 18%). segments' fixed
# cost is split between the group (x gather, shrink) and each member (expand, scatter) by their call
# counts. Only the ratios between formulations matter for the choice.
COST = {"gather": (25.0, 1.40e-4), "dense": (7.9, 1.48e-5), "grouped": (22.3, 6.07e-5, 4.05),
        "segments": (9.3, 3.48e-5, 6.0, 3.91e-5), "bgmv": (3.1, 6.9e-5)}


def costs(plan: BatchPlan, shapes: list[tuple[int, int]], grouped_ok: bool, bgmv_ok: bool = False) -> dict[str, float]:
    """Estimated microseconds of each formulation this step can use for modules of ``shapes`` [(d_in,
    d_out)] that read one input: the dense one shares the shrink and keeps its rows across steps (no
    gather term, one fixed cost), the others run per module."""
    K = plan.num_segments
    out = {}
    if plan.rows is not None:
        c0, c1 = COST["gather"]
        out["gather"] = sum(c0 + c1 * plan.rows.numel() * (d_in + d_out) for d_in, d_out in shapes)
        if bgmv_ok:
            c0, c1 = COST["bgmv"]
            out["bgmv"] = sum(c0 + c1 * plan.rows.numel() * (d_in + d_out) for d_in, d_out in shapes)
    if plan.dense_mask is not None:
        c0, c1 = COST["dense"]
        out["dense"] = c0 + c1 * plan.num_tokens * plan.dense_mask.shape[1] * sum(a + b for a, b in shapes)
    if plan.seg_index is not None:
        c0, c1, c2, c3 = COST["segments"]
        R, K = plan.kept_key[2], len(plan.kept_key[1])  # type: ignore[index]
        width = R * sum(a + b for a, b in shapes)
        out["segments"] = c0 + c2 * len(shapes) + c1 * plan.seg_index.shape[0] * width + c3 * K * width
    if grouped_ok:
        c0, c1, c2 = COST["grouped"]
        work = sum(bp.num_tokens * bp.rank for bp in plan.buckets)
        out["grouped"] = sum(c0 * len(plan.buckets) + c1 * work * (d_in + d_out) + c2 * K for d_in, d_out in shapes)
    return out


class TorchLowRank:
    """``op(x, y, plan, slots)``: y [T, d_out] holds W0 x (no bias); returns g * (y + B h') in place."""

    def __init__(self, strategy: str = "auto"):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
        if strategy == "grouped" and not HAS_GROUPED_MM:
            raise ValueError("strategy 'grouped' needs torch._grouped_mm on this build")
        if strategy in ("auto", "bgmv"):
            cpu_kernel.start()  # on a background thread: the torch formulations serve until it is ready
        if strategy == "bgmv" and cpu_kernel.get(wait=True) is None:
            raise ValueError(f"strategy 'bgmv' needs the fused CPU kernel: {cpu_kernel.error() or 'disabled'}")
        self.strategy = strategy
        self.name = f"torch-{strategy}"

    def __call__(self, x: torch.Tensor, y: torch.Tensor, plan: BatchPlan, slots: ModuleSlots) -> torch.Tensor:
        if plan.buckets:
            assert plan.order is not None
            form = self.choose(plan, slots, x.element_size())
            if form == "single":
                self._single(x, y, plan, slots)
            elif form == "dense":
                self._dense(x, y, plan, slots)
            elif form == "segments":
                self._segments(x, y, plan, slots)
            elif form == "bgmv":
                self._bgmv(x, y, plan, slots)
            elif form == "gather" and plan.rows_by_token:
                self._gather_rows(x, y, plan, slots)
            elif form == "gather":
                xs = x.index_select(0, plan.order)  # [T_a, d_in]
                y.index_add_(0, plan.order, self._gather_rows(xs, None, plan, slots))
            else:  # per bucket: grouped GEMMs where aligned ("grouped"), else the bucket gather
                xs = x.index_select(0, plan.order)  # [T_a, d_in], adapter tokens sorted by (bucket, slot)
                grouped = form == "grouped"
                for bp in plan.buckets:
                    delta = self._bucket(xs[bp.start:bp.stop], bp, slots, grouped)  # [n, d_out]
                    y.index_add_(0, plan.order[bp.start:bp.stop], delta)
        if plan.scale_rows is not None:
            y.mul_(slots.out_scale.index_select(0, plan.scale_rows))  # [T, d_out] rows of g
        return y

    def choose(self, plan: BatchPlan, slots: ModuleSlots, itemsize: int) -> str:
        """single, dense, segments, bgmv, gather, grouped or bucket, for this step and the module's group of
        projections reading one input (one choice for the whole group; cached in the plan per group shape
        and per whether the fused kernel can serve: built, and fp32 slots)."""
        shapes = ((slots.d_in, slots.d_out),) if slots.group is None else slots.group.shapes
        kernel = slots.a_flat.dtype == torch.float32 and cpu_kernel.get() is not None
        key = (self.strategy, shapes, kernel)
        form = plan.choices.get(key)
        if form is None:
            form = plan.choices[key] = self._choose(plan, list(shapes), itemsize, kernel)
        return form

    def _choose(self, plan: BatchPlan, shapes: list[tuple[int, int]], itemsize: int, kernel: bool) -> str:
        grouped_ok = HAS_GROUPED_MM and all(aligned(d_in, d_out, bp.rank, itemsize)
                                            for d_in, d_out in shapes for bp in plan.buckets)
        bgmv_ok = (kernel and itemsize == 4 and plan.rows is not None and plan.mor_pos is None
                   and plan.rows.device.type == "cpu")
        if self.strategy == "auto":
            if plan.single is not None:  # one adapter: plain GEMMs on its slot's views, no mask
                return "single"
            options = costs(plan, shapes, grouped_ok, bgmv_ok)
            return min(options, key=options.__getitem__) if options else "bucket"
        if self.strategy == "dense" and plan.dense_mask is not None:
            return "dense"
        if self.strategy == "segments" and plan.seg_index is not None:
            return "segments"
        if self.strategy == "bgmv" and bgmv_ok:
            return "bgmv"
        if self.strategy == "grouped":
            return "grouped" if grouped_ok else "bucket"
        return "gather" if plan.rows is not None else "bucket"

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

    @staticmethod
    def _dense(x: torch.Tensor, y: torch.Tensor, plan: BatchPlan, slots: ModuleSlots) -> None:
        """The step's K adapters side by side: h = (x A_K^T) * mask [T, K*R], y += h B_K: two GEMMs over
        every token, the shrink shared by the modules reading the same x, the K adapters' rows kept
        across steps (``groups.ProjectionGroup``)."""
        group = _group(slots)
        y.addmm_(group.dense_h(x, plan, slots.group_index), group.dense_bt(plan, slots.group_index))

    @staticmethod
    def _segments(x: torch.Tensor, y: torch.Tensor, plan: BatchPlan, slots: ModuleSlots) -> None:
        """Per adapter over its (padded) segment: h [K, M, R] shared by the group, delta = h B_k, scattered
        into the tokens' rows (padding places carry h = 0 and add nothing)."""
        group = _group(slots)
        delta = torch.bmm(group.seg_h(x, plan, slots.group_index), group.seg_b(plan, slots.group_index))
        assert plan.seg_index is not None
        y.index_add_(0, plan.seg_index, delta.view(-1, y.shape[1]))

    @staticmethod
    def _bgmv(x: torch.Tensor, y: torch.Tensor, plan: BatchPlan, slots: ModuleSlots) -> None:
        """The row table through the fused kernel: y[t] += B_rows(t) (A_rows(t) x[t]) in place."""
        assert plan.rows is not None and plan.order is not None
        kernel = cpu_kernel.get()
        assert kernel is not None
        if x.stride(1) != 1:
            x = x.contiguous()
        kernel.bgmv_(x, y, slots.a_flat, slots.bt_flat, plan.rows, _NO_TOKENS if plan.rows_by_token else plan.order)

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

    @staticmethod
    def _bucket(xb: torch.Tensor, bp: BucketPlan, slots: ModuleSlots, grouped: bool) -> torch.Tensor:
        a, bt = slots.a[bp.bucket], slots.bt[bp.bucket]  # [n_b, R, d_in], [n_b, R, d_out]
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


def _group(slots: ModuleSlots) -> ProjectionGroup:
    if slots.group is None:  # a pool built without groups (not through AdapterPool)
        slots.group = ProjectionGroup([slots])
    return slots.group


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
