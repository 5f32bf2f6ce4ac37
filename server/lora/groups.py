"""Projections that read the same input share one shrink GEMM: q/k/v of an attention layer, gate/up of
an MLP (BERT: query/key/value).

Two formulations of ``ops.torch_cpu`` work on the step's K adapters' rank rows (``BatchPlan.kept_rows``,
each adapter padded to R rows) rather than on per-token gathers:

- dense: the rows side by side as K*R columns, h = (x A^T) * mask over every token;
- segments: one small GEMM per adapter over its tokens padded to the longest segment (one ``bmm``):
  h [K, M, R] = x[seg] A_k^T, y[seg] += h B_k.

In both, every module of a group multiplies the same x by its own rows, so a group stacks them into one
operand and the first member called in a step computes h for all n members in ONE GEMM; the others
read their slice. The stacked rows are kept across steps while the step's adapter set (and the pool's
slot contents) stay the same (``BatchPlan.kept_key``): in steady decoding no weight is gathered at all.

Within one step a group is called with one input; a member called with another input recomputes, so
sharing never changes a result, only the count of GEMMs. The kept rows are bounded by
``plan.KEPT_MAX_ROWS`` rows per module.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from server.lora.plan import BatchPlan

SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))


def shared_input_groups(paths: Iterable[str]) -> list[tuple[str, ...]]:
    """Partition module paths into groups that read one input: siblings named as in ``SHARED_INPUT``
    (in that order), every other path alone."""
    paths = sorted(paths)
    present = set(paths)
    groups: list[tuple[str, ...]] = []
    grouped: set[str] = set()
    for path in paths:
        parent, _, name = path.rpartition(".")
        for names in SHARED_INPUT:
            if name == names[0]:
                members = tuple(f"{parent}.{n}" if parent else n for n in names)
                members = tuple(m for m in members if m in present)
                if len(members) > 1:
                    groups.append(members)
                    grouped.update(members)
    return groups + [(p,) for p in paths if p not in grouped]


class ProjectionGroup:
    """The kept-rows state of modules sharing an input: stacked rows for the current adapter set, and this
    step's h for every member."""

    def __init__(self, members: list) -> None:  # list[ModuleSlots] (buffers imports this module)
        self.members = members
        self.shapes = tuple((m.d_in, m.d_out) for m in members)
        self._key: tuple | None = None
        self._forms: dict[str, object] = {}  # per formulation, its stacked rows for ``_key``

    def dense_h(self, x: torch.Tensor, plan: BatchPlan, index: int) -> torch.Tensor:
        """Member ``index``'s h = (x A^T) * mask, [T, K*R] (a strided view). The group's h lives in the
        plan (``plan.shared``), so it goes with the step."""
        h = self._shared_h(x, plan, "dense")
        if h is None:
            assert plan.dense_mask is not None
            kr = plan.dense_mask.shape[1]
            h = torch.mm(x, self._rows(plan, "dense").T).view(x.shape[0], len(self.members), kr)
            h.mul_(plan.dense_mask[:, None, :])
            self._keep_h(x, plan, "dense", h)
        return h[:, index]

    def dense_bt(self, plan: BatchPlan, index: int) -> torch.Tensor:
        """Member ``index``'s B rows of the K adapters, [K*R, d_out]."""
        return self._rows(plan, "bt")[index]  # type: ignore[index]

    def seg_h(self, x: torch.Tensor, plan: BatchPlan, index: int) -> torch.Tensor:
        """Member ``index``'s h [K, M, R] over the step's segments (a strided view; padding places zero)."""
        h = self._shared_h(x, plan, "segments")
        if h is None:
            assert plan.seg_index is not None
            K = len(plan.kept_key[1])  # type: ignore[index]
            xs = x.index_select(0, plan.seg_index).view(K, plan.seg_m, x.shape[1])  # [K, M, d_in]
            h = torch.bmm(xs, self._rows(plan, "segments").transpose(1, 2))  # [K, M, n*R]
            if plan.seg_valid is not None:
                h.mul_(plan.seg_valid)
            self._keep_h(x, plan, "segments", h)
        R = plan.kept_key[2]  # type: ignore[index]
        return h[:, :, index * R:(index + 1) * R]

    def seg_b(self, plan: BatchPlan, index: int) -> torch.Tensor:
        """Member ``index``'s B rows per adapter, [K, R, d_out] (a view of the kept rows)."""
        bt = self._rows(plan, "bt")[index]  # type: ignore[index]
        R = plan.kept_key[2]  # type: ignore[index]
        return bt.view(bt.shape[0] // R, R, bt.shape[1])

    def _shared_h(self, x: torch.Tensor, plan: BatchPlan, form: str) -> torch.Tensor | None:
        # keyed by x's storage and shape: x stays alive in the caller while the group's members run
        step = plan.shared.get((id(self), form))
        if step is None or step[0] != x.data_ptr() or step[1] != tuple(x.shape):
            return None
        return step[2]

    def _keep_h(self, x: torch.Tensor, plan: BatchPlan, form: str, h: torch.Tensor) -> None:
        plan.shared[(id(self), form)] = (x.data_ptr(), tuple(x.shape), h)

    def _rows(self, plan: BatchPlan, form: str):
        """The members' rows of the step's K adapters in ``form``'s layout, built once per adapter set:
        "dense" [n*K*R, d_in] (the members' A one under the other), "segments" [K, n*R, d_in] (per adapter,
        the members' A one under the other), "bt" per member [K*R, d_out]. The GEMMs read A through a
        transposed view: a rebuild is gathers and one cat, no transposing copy (2.5-13x cheaper)."""
        if self._key != plan.kept_key:
            self._forms.clear()
            self._key = plan.kept_key
        kept = self._forms.get(form)
        if kept is None:
            rows = plan.kept_rows
            assert rows is not None and plan.kept_key is not None
            if form == "bt":
                kept = [m.bt_flat.index_select(0, rows) for m in self.members]
            else:
                a = [m.a_flat.index_select(0, rows) for m in self.members]  # n x [K*R, d_in]
                if form == "segments":
                    K, R = len(plan.kept_key[1]), plan.kept_key[2]
                    a = [t.view(K, R, -1) for t in a]
                kept = a[0] if len(a) == 1 else torch.cat(a, dim=1 if form == "segments" else 0)
            self._forms[form] = kept
        return kept
