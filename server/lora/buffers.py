"""The preallocated slot buffers of ONE adapted linear module (owned by the pool, read by the ops).

Layout: every rank row of every slot lives in one flat table per module, bucket after bucket, with one
extra all-zero row at the end (``zero_row``) that padded gathers point to:

    a_flat  [rows + 1, d_in]    lora_a rows; rows past the adapter's rank are zero
    bt_flat [rows + 1, d_out]   lora_b transposed (row k = column k of lora_b), zero past the rank
    a[b]    [n_b, R_b, d_in]    view of bucket b's rows (n_b slots of R_b rows); bt[b] likewise

Slot s of bucket b starts at flat row ``row0(s) = start_b + local * R_b`` in every module alike, so one
per-step table of row indices (``BatchPlan.rows``) serves every layer.

Zero rows make rank padding inside a bucket exact; the buckets keep that padding small. A MoR module
(rank r, N experts) is stored as an ordinary module of rank N*r: row ``i*r + j`` of ``a`` holds
``lambda[i, j] * A[j]`` and column ``i*r + j`` of lora_b already matches that order, so the op only
has to multiply row ``i*r + j`` of h by the token's router weight ``v_i`` (see ``row_expert``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from adapters_store.format import AdapterFormatError, CompiledAdapter, ModuleWeights
from server.lora.groups import ProjectionGroup


@dataclass
class ModuleSlots:
    d_in: int
    d_out: int
    a_flat: torch.Tensor  # [rows + 1, d_in], last row zero
    bt_flat: torch.Tensor  # [rows + 1, d_out], last row zero
    a: list[torch.Tensor]  # per bucket [n_b, R_b, d_in], views of a_flat
    bt: list[torch.Tensor]  # per bucket [n_b, R_b, d_out], views of bt_flat
    ranks: torch.Tensor  # [S] int32: this module's effective rank per global slot (0 = module absent)
    out_scale: torch.Tensor  # [S + 1, d_out]: g per slot; ones for slots without it, row S = ones (base)
    gate: torch.Tensor | None  # [M, E, d_in]: MoR router weights per MoR table entry, zero past N
    gate_bias: torch.Tensor | None  # [M, E]: 0 for the adapter's N experts, -inf for padding experts
    row_expert: torch.Tensor | None  # [M, R_max] long: expert of each rank row (i for row i*r + j)
    group: ProjectionGroup | None = None  # the modules reading the same input (set by the pool), see groups.py
    group_index: int = 0  # this module's place in ``group``
    _scaled_slots: set[int] = field(default_factory=set)  # slots whose out_scale row is not all ones
    # per global slot: its (A rows [R_b, d_in], B^T rows [R_b, d_out]) views, made once, not at every write
    _slot_rows: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # per global slot: rows that may be nonzero; past them the slot is all zeros already (no tail to clear)
    _filled: list[int] = field(default_factory=list)

    def num_bytes(self) -> int:
        tensors = [self.a_flat, self.bt_flat, self.ranks, self.out_scale]
        tensors += [t for t in (self.gate, self.gate_bias, self.row_expert) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    @classmethod
    def allocate(cls, d_in: int, d_out: int, buckets: list[tuple[int, int]], mor_entries: int, max_experts: int,
                 device: torch.device, dtype: torch.dtype, ranks: torch.Tensor | None = None,
                 tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> ModuleSlots:
        """Zeroed buffers for ``buckets`` = [(rank R_b, slots n_b), ...] and ``mor_entries`` MoR entries.
        ``ranks``: where this module's per-slot ranks live (int32 [S], zero), e.g. a row of the pool's table
        of every module's ranks, so that a write sets one slot's ranks for all modules in one op. ``tables``:
        this module's zeroed (a_flat, bt_flat), e.g. views of the pool's shape-grouped tables (image.py)."""
        num_slots = sum(n for _, n in buckets)
        max_rank = max(r for r, _ in buckets)
        gate = gate_bias = row_expert = None
        if mor_entries:
            gate = torch.zeros(mor_entries, max_experts, d_in, device=device, dtype=dtype)
            gate_bias = torch.full((mor_entries, max_experts), float("-inf"), device=device, dtype=dtype)
            row_expert = torch.zeros(mor_entries, max_rank, device=device, dtype=torch.long)
        rows = sum(r * n for r, n in buckets)
        if tables is None:
            tables = (torch.zeros(rows + 1, d_in, device=device, dtype=dtype),
                      torch.zeros(rows + 1, d_out, device=device, dtype=dtype))
        a_flat, bt_flat = tables
        assert a_flat.shape == (rows + 1, d_in) and bt_flat.shape == (rows + 1, d_out), "slot tables misshapen"
        starts = [sum(r * n for r, n in buckets[:b]) for b in range(len(buckets))]
        a = [a_flat[s:s + r * n].view(n, r, d_in) for s, (r, n) in zip(starts, buckets, strict=True)]
        bt = [bt_flat[s:s + r * n].view(n, r, d_out) for s, (r, n) in zip(starts, buckets, strict=True)]
        if ranks is None:
            ranks = torch.zeros(num_slots, device=device, dtype=torch.int32)
        return cls(
            d_in, d_out, a_flat, bt_flat, a=a, bt=bt, ranks=ranks,
            out_scale=torch.ones(num_slots + 1, d_out, device=device, dtype=dtype),
            gate=gate, gate_bias=gate_bias, row_expert=row_expert,
            _slot_rows=[(a[b][i], bt[b][i]) for b, (_, n) in enumerate(buckets) for i in range(n)],
            _filled=[0] * num_slots,
        )

    def stage(self, slot: int, mor_entry: int, mw: ModuleWeights | None, copies: list[tuple[torch.Tensor, torch.Tensor]],
              zeros: list[torch.Tensor]) -> int:
        """Queue this module's part of a slot write: (destination, source) copies and regions to zero, run
        for every module together by ``run_staged`` (two batched calls instead of ~6 calls per module).
        Returns the module's rank rows in the slot (0 = absent), which the caller stores in ``ranks``.
        With ``lora_b`` in the serving layout (``serving_layout``) every copy reads contiguous memory; rows
        past the adapter's rank are cleared only where an earlier occupant left nonzero rows."""
        a, bt = self._slot_rows[slot]  # [R_b, d_in], [R_b, d_out]
        r = 0
        if mw is not None:
            rows = serving_rows(mw)  # [R', d_in]
            r = rows.shape[0]
            if r == a.shape[0]:
                copies += ((a, rows), (bt, mw.lora_b.T))
            else:
                copies += ((a[:r], rows), (bt[:r], mw.lora_b.T))
        if self._filled[slot] > r:
            zeros += (a[r:self._filled[slot]], bt[r:self._filled[slot]])
        self._filled[slot] = r
        if mw is None or mw.out_scale is None:
            self._unit_scale(slot)
        else:
            copies.append((self.out_scale[slot], mw.out_scale))
            self._scaled_slots.add(slot)
        if mw is not None and mw.gate is not None:
            assert self.gate is not None and self.gate_bias is not None and self.row_expert is not None
            n = mw.num_experts
            self.gate[mor_entry, :n].copy_(mw.gate)
            self.gate[mor_entry, n:].zero_()
            self.gate_bias[mor_entry, :n] = 0
            self.gate_bias[mor_entry, n:] = float("-inf")
            self.row_expert[mor_entry].zero_()
            self.row_expert[mor_entry, :r].copy_(torch.arange(n).repeat_interleave(mw.rank))
        return r

    def packed_write(self, slot: int, rows: int) -> int:
        """The pool writes ``rows`` rows of a packed adapter (image.py) into this module's slot rows itself:
        return how many rows the last occupant may have left nonzero (for the pool to clear), record the new
        high-water mark, and put the slot's out_scale back to ones if it was not."""
        left, self._filled[slot] = self._filled[slot], rows
        self._unit_scale(slot)
        return left

    def _unit_scale(self, slot: int) -> None:
        if slot in self._scaled_slots:  # rows start at ones and only ever leave them through write
            self.out_scale[slot].fill_(1)
            self._scaled_slots.discard(slot)


@torch.no_grad()
def run_staged(copies: list[tuple[torch.Tensor, torch.Tensor]], zeros: list[torch.Tensor]) -> None:
    """Run staged slot writes (``ModuleSlots.stage``): one batched zero, one batched copy (casting)."""
    if zeros:
        torch._foreach_zero_(zeros)
    if copies:
        torch._foreach_copy_([d for d, _ in copies], [s for _, s in copies])


def serving_layout(mw: ModuleWeights) -> ModuleWeights:
    """The same module with ``lora_b`` [d_out, r] stored column-major (its transpose contiguous): equal
    values and shape, but the slot copy of B^T then reads contiguous rows (about 4x faster than copying
    from the row-major transpose). Meant for the loader threads, off the engine's step."""
    if mw.lora_b.T.is_contiguous():
        return mw
    return replace(mw, lora_b=mw.lora_b.T.contiguous().T)


def serving_rows(mw: ModuleWeights) -> torch.Tensor:
    """The rows the slot stores as A: lora_a [r, d_in], or for MoR lambda-scaled copies [N*r, d_in] in
    lora_b's column order, so that B (v-weighted rows) equals B h' of DESIGN.md exactly in real arithmetic."""
    if mw.gate is None:
        return mw.lora_a
    assert mw.rank_scale is not None
    lam = mw.rank_scale.float()  # [N, r]
    return (lam[:, :, None] * mw.lora_a.float()[None, :, :]).reshape(-1, mw.lora_a.shape[1])  # [N*r, d_in]


def for_slots(adapter: CompiledAdapter) -> CompiledAdapter:
    """The adapter as the CPU tier keeps it: equal values, every ``lora_b`` laid out for the slot copy
    (``serving_layout``), so making it resident later is a few contiguous copies per module."""
    modules = {path: serving_layout(mw) for path, mw in adapter.modules.items()}
    if all(modules[p] is mw for p, mw in adapter.modules.items()):
        return adapter
    return replace(adapter, modules=modules)


def check_fit(adapter: CompiledAdapter, slots: dict[str, ModuleSlots], max_rank: int, max_experts: int) -> int:
    """The rank rows a slot needs for ``adapter`` (MoR: N*r), or one AdapterFormatError listing every misfit
    with the buffers (a module the base does not adapt, a shape, too many experts or rank rows)."""
    problems = []
    need = 0
    for path, mw in sorted(adapter.modules.items()):
        if path not in slots:
            problems.append(f"module {path!r} is not a target of the base")
            continue
        d_in, d_out = slots[path].d_in, slots[path].d_out
        cols = mw.rank * max(1, mw.num_experts)
        if tuple(mw.lora_a.shape) != (mw.rank, d_in):
            problems.append(f"{path}.lora_a has shape {tuple(mw.lora_a.shape)}, expected ({mw.rank}, {d_in})")
        if tuple(mw.lora_b.shape) != (d_out, cols):
            problems.append(f"{path}.lora_b has shape {tuple(mw.lora_b.shape)}, expected ({d_out}, {cols})")
        if mw.num_experts > max_experts:
            problems.append(f"{path}.gate has {mw.num_experts} experts, the pool allows {max_experts}")
        need = max(need, cols)
    if need > max_rank:
        problems.append(f"adapter needs {need} rank rows per module (rank x experts), the pool's max_rank is "
                        f"{max_rank}")
    if problems:
        raise AdapterFormatError(problems)
    return need


def default_buckets(max_slots: int, max_rank: int) -> list[tuple[int, int]]:
    """Ranks 8, 16, 32, ... up to max_rank, slots split evenly (the largest buckets kept if too few)."""
    ranks = [r for r in (8 << i for i in range(16)) if r < max_rank] + [max_rank]
    ranks = ranks[-max_slots:]
    share, extra = divmod(max_slots, len(ranks))
    return [(r, share + (1 if i < extra else 0)) for i, r in enumerate(ranks)]
