"""Projections that read the same input share one shrink GEMM: q/k/v of an attention layer, gate/up of
an MLP (BERT: query/key/value).

In the dense formulation (``ops.torch_cpu``: the step's K adapters side by side as K*R columns) every
module of a group multiplies the same x by its own [K*R, d_in] rows. A group stacks them into one
[d_in, n*K*R] operand, so the first member called in a step computes h for all n members in ONE GEMM and
the others read their slice. The stacked rows are kept across steps while the step's adapter set (and
the pool's slot contents) stay the same (``BatchPlan.dense_key``): in steady decoding no weight is
gathered at all.

Within one step a group is called with one input; a member called with another input recomputes, so
sharing never changes a result, only the count of GEMMs. The kept rows are bounded by
``plan.DENSE_MAX_COLS`` rows per module (the size of one rank-64 adapter).
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
    """The dense-formulation state of modules sharing an input: stacked rows for the current adapter set,
    and this step's h for every member."""

    def __init__(self, members: list) -> None:  # list[ModuleSlots] (buffers imports this module)
        self.members = members
        self.shapes = tuple((m.d_in, m.d_out) for m in members)
        self._key: tuple | None = None
        self._a_t: torch.Tensor | None = None  # [d_in, n * K*R]
        self._bt: list[torch.Tensor] = []  # per member [K*R, d_out]

    def dense_h(self, x: torch.Tensor, plan: BatchPlan, index: int) -> torch.Tensor:
        """Member ``index``'s h = (x A^T) * mask, [T, K*R] (a strided view). The group's h lives in the
        plan (``plan.shared``), so it goes with the step."""
        step = plan.shared.get(id(self))
        if step is None or step[0] != x.data_ptr() or step[1] != tuple(x.shape):
            a_t = self._rows(plan)[0]
            assert plan.dense_mask is not None
            kr = plan.dense_mask.shape[1]
            h = torch.mm(x, a_t).view(x.shape[0], len(self.members), kr).mul_(plan.dense_mask[:, None, :])
            # keyed by x's storage and shape: x stays alive in the caller while the group's members run
            plan.shared[id(self)] = step = (x.data_ptr(), tuple(x.shape), h)
        return step[2][:, index]

    def dense_bt(self, plan: BatchPlan, index: int) -> torch.Tensor:
        return self._rows(plan)[1][index]

    def _rows(self, plan: BatchPlan) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self._key != plan.dense_key or self._a_t is None:
            rows = plan.dense_rows
            assert rows is not None
            self._a_t = torch.cat([m.a_flat.index_select(0, rows) for m in self.members]).T.contiguous()
            self._bt = [m.bt_flat.index_select(0, rows) for m in self.members]
            self._key = plan.dense_key
        return self._a_t, self._bt
