"""Shape-grouped slot tables and the packed form of an adapter: a cold adapter made resident in a few copies.

Every module's slot rows live in its own table (``buffers.ModuleSlots.a_flat`` / ``bt_flat``). The pool
allocates those tables as views of ONE tensor per input width and one per output width (``Layout``):

    A[d_in]    [M_g, rows + 1, d_in]     view m = a_flat of the group's m-th module
    BT[d_out]  [M_g, rows + 1, d_out]    view m = bt_flat

and the CPU tier keeps a LoRA-shaped adapter packed the same way (``pack``: [M_g, r, d] per group, zero rows
where a module's rank is below the adapter's largest or the module is absent). Making it resident is then
one copy per group (5 for a Llama stack: d_in in {hidden, intermediate}, d_out in {hidden, kv, intermediate})
instead of two per module, plus one op for the ranks: host work on the engine thread that no longer grows
with the number of layers, and on a GPU one host-to-device transfer per group. Packing runs where the adapter
is read (the loader threads), and the adapter's own A and B become views of the packed tensors, so the tier
holds one copy. MoR and out_scale (DoRA, EDoRA) adapters keep the per-module write
(``buffers.ModuleSlots.stage``); so does anything ``pack`` declines (mixed dtypes, no module at all).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from adapters_store.format import AdapterFormatError, CompiledAdapter, ModuleWeights
from server.lora.buffers import ModuleSlots, check_fit, for_slots


@dataclass(frozen=True)
class Layout:
    """The pool's modules grouped by input and by output width (each group in the pool's module order)."""

    paths: tuple[str, ...]  # every target module, in the pool's order (the rows of its ranks table)
    a_groups: tuple[tuple[int, tuple[str, ...]], ...]  # (d_in, modules)
    bt_groups: tuple[tuple[int, tuple[str, ...]], ...]  # (d_out, modules)

    @classmethod
    def of(cls, targets: list[tuple[str, tuple[int, int]]]) -> Layout:
        a: dict[int, list[str]] = {}
        bt: dict[int, list[str]] = {}
        for path, (d_in, d_out) in targets:
            a.setdefault(d_in, []).append(path)
            bt.setdefault(d_out, []).append(path)
        return cls(tuple(p for p, _ in targets), tuple((d, tuple(ps)) for d, ps in a.items()),
                   tuple((d, tuple(ps)) for d, ps in bt.items()))

    def allocate(self, rows: int, device: torch.device, dtype: torch.dtype
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Zeroed group tables of ``rows`` rows (+1 zero row) and each module's (a_flat, bt_flat) views."""
        a_tables = [torch.zeros(len(ps), rows + 1, d, device=device, dtype=dtype) for d, ps in self.a_groups]
        bt_tables = [torch.zeros(len(ps), rows + 1, d, device=device, dtype=dtype) for d, ps in self.bt_groups]
        a_of = {p: t[i] for t, (_, ps) in zip(a_tables, self.a_groups, strict=True) for i, p in enumerate(ps)}
        bt_of = {p: t[i] for t, (_, ps) in zip(bt_tables, self.bt_groups, strict=True) for i, p in enumerate(ps)}
        return a_tables, bt_tables, {p: (a_of[p], bt_of[p]) for p in self.paths}


@dataclass
class Packed:
    """An adapter as the slot tables take it: ``rows`` rank rows for every module (zero past its rank)."""

    rows: int
    a: list[torch.Tensor]  # per ``Layout.a_groups``: [M_g, rows, d_in]
    bt: list[torch.Tensor]  # per ``Layout.bt_groups``: [M_g, rows, d_out] (B transposed)
    ranks: torch.Tensor  # int32 [len(Layout.paths)]: each module's own rank (0 = absent)


def prepare(adapter: CompiledAdapter, slots: dict[str, ModuleSlots], layout: Layout, max_rank: int,
            max_experts: int) -> tuple[CompiledAdapter, tuple[int, Packed | None] | None]:
    """What the pool's CPU tier keeps for an adapter read off the engine thread: (the adapter, (its slot
    rank rows, its packed form or None)); (adapter in the serving layout, None) for a misfit, which the
    acquire checks again and reports with every problem."""
    try:
        need = check_fit(adapter, slots, max_rank, max_experts)
    except AdapterFormatError:
        return for_slots(adapter), None
    packed = pack(adapter, layout)
    return (for_slots(adapter), (need, None)) if packed is None else (packed[0], (need, packed[1]))


def pack(adapter: CompiledAdapter, layout: Layout) -> tuple[CompiledAdapter, Packed] | None:
    """(the same adapter with its A and B as views of the packed tensors, the packed form), or None when the
    per-module write must serve it (MoR, out_scale, mixed dtypes, no module). Shapes must already fit the
    pool (``buffers.check_fit``)."""
    modules = adapter.modules
    if not modules or any(mw.gate is not None or mw.out_scale is not None for mw in modules.values()):
        return None
    dtypes = {t.dtype for mw in modules.values() for t in (mw.lora_a, mw.lora_b)}
    if len(dtypes) != 1:
        return None
    dtype = dtypes.pop()
    rows = max(mw.rank for mw in modules.values())
    if rows == 0:
        return None
    a = [_group([modules.get(p) for p in ps], rows, d, dtype, lambda mw: mw.lora_a) for d, ps in layout.a_groups]
    bt = [_group([modules.get(p) for p in ps], rows, d, dtype, lambda mw: mw.lora_b.T) for d, ps in layout.bt_groups]
    ranks = {p: mw.rank for p, mw in modules.items()}
    head = {} if adapter.head_weight is None else {  # own copies: views would pin the whole file's buffer
        "head_weight": adapter.head_weight.clone(),
        "head_bias": None if adapter.head_bias is None else adapter.head_bias.clone()}
    packed = Packed(rows, a, bt, rank_table(layout, ranks))
    return replace(adapter, modules=module_views(packed, layout, ranks), **head), packed


def packed_shapes(layout: Layout, rows: int) -> list[tuple[int, int, int]]:
    """The shapes ``pack`` gives its groups, A groups first, then the B^T groups."""
    return [(len(ps), rows, d) for d, ps in (*layout.a_groups, *layout.bt_groups)]


def rank_table(layout: Layout, ranks: dict[str, int]) -> torch.Tensor:
    """int32 [len(layout.paths)]: each module's rank, 0 where the adapter has none."""
    return torch.tensor([ranks.get(p, 0) for p in layout.paths], dtype=torch.int32)


def module_views(packed: Packed, layout: Layout, ranks: dict[str, int]) -> dict[str, ModuleWeights]:
    """Each module of ``ranks`` as views of the packed tensors: A = rows [:r] of its A-group entry, B = the
    transpose of rows [:r] of its B^T-group entry (what ``pack`` copied there)."""
    views: dict[str, list[torch.Tensor]] = {}
    for tables, groups in ((packed.a, layout.a_groups), (packed.bt, layout.bt_groups)):
        for t, (_, ps) in zip(tables, groups, strict=True):
            for i, p in enumerate(ps):
                if p in ranks:
                    views.setdefault(p, []).append(t[i])
    return {p: ModuleWeights(lora_a=views[p][0][:r], lora_b=views[p][1][:r].T) for p, r in ranks.items()}


def _group(mws: list[ModuleWeights | None], rows: int, width: int, dtype: torch.dtype, part) -> torch.Tensor:
    """[len(mws), rows, width]: one stack when every module is present at full rank, else zero-padded."""
    if all(mw is not None and mw.rank == rows for mw in mws):
        return torch.stack([part(mw) for mw in mws])
    out = torch.zeros(len(mws), rows, width, dtype=dtype)
    for i, mw in enumerate(mws):
        if mw is not None and mw.rank:
            out[i, :mw.rank] = part(mw)
    return out
