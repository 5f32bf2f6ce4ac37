"""The adapter pool: device slots grouped by rank bucket, a CPU LRU tier in front, pin/refcount.

    store/loader -> CPU tier (CompiledAdapter LRU in bytes, packed: image.py) -> device slot (copies)

Every target linear of the base is wrapped in a ``LowRankLinear`` (``install``) that owns a view of the
pool's preallocated buffers (``buffers.ModuleSlots``, views of shape-grouped tables). Buckets hold
``n_b`` slots of ``R_b`` rank rows each; an adapter goes to the smallest bucket that fits its largest
module (MoR: N*r rows) and spills into larger buckets when those are full. ``acquire`` pins; only idle
(unpinned) adapters are evicted, least recently used first; ``PoolExhausted`` when every fitting slot
is pinned. The device tier is called "gpu" in the stats even on CPU, so metric names stay stable.

Thread-safety: the engine thread acquires, releases, plans and merges; the residency's loader threads
``put_cpu``; submit (on the event loop) reads ``cached`` without the lock. A lock guards the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from adapters_store.basemodels import BaseModel
from adapters_store.format import CompiledAdapter
from server.common.metrics import TIERS
from server.lora import merge as merging
from server.lora.buffers import ModuleSlots, check_fit, default_buckets, for_slots, run_staged
from server.lora.cpu_tier import CpuTier
from server.lora.groups import ProjectionGroup, shared_input_groups
from server.lora.image import Layout, Packed, prepare
from server.lora.layer import LowRankLinear, StepContext
from server.lora.ops import select_backend
from server.lora.plan import BatchPlan, SlotTable, build_plan


class PoolExhausted(RuntimeError):
    """Every slot that could hold the adapter is pinned by a running request."""


@dataclass
class PoolStats:
    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    misses: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    evictions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    load_seconds: dict[str, float] = field(default_factory=lambda: {"loader": 0.0, "copy": 0.0})
    resident: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    resident_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    capacity_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))


@dataclass
class _Resident:
    adapter: CompiledAdapter
    slot: int
    mor_entry: int  # -1 when not MoR
    refs: int = 0
    forget: bool = False  # forget() was called while pinned: free at the last release


def make_pool(base: BaseModel, device: torch.device, dtype: torch.dtype, max_slots: int, max_rank: int,
              cpu_bytes: int) -> AdapterPool:
    """A pool with the default buckets, installed into the base model (its target linears wrapped)."""
    pool = AdapterPool(base, device, dtype, max_slots=max_slots, max_rank=max_rank, cpu_bytes=cpu_bytes)
    pool.install()
    return pool


class AdapterPool:
    def __init__(self, base: BaseModel, device: torch.device | str, dtype: torch.dtype, max_slots: int = 32,
                 max_rank: int = 64, cpu_bytes: int = 1 << 30, buckets: list[tuple[int, int]] | None = None,
                 mor_entries: int | None = None, max_experts: int = 8, backend: str | None = None):
        if max_slots < 1 or max_rank < 1:
            raise ValueError(f"max_slots ({max_slots}) and max_rank ({max_rank}) must be >= 1")
        self.base = base
        self.device = torch.device(device)
        self.dtype = dtype
        layout = buckets if buckets is not None else default_buckets(max_slots, max_rank)
        self.buckets = sorted((r, n) for r, n in layout if n > 0)
        self.bucket_base = [sum(n for _, n in self.buckets[:b]) for b in range(len(self.buckets))]
        self.num_slots = sum(n for _, n in self.buckets)
        self.max_rank = max(r for r, _ in self.buckets)
        self.mor_entries = max(1, self.num_slots // 4) if mor_entries is None else mor_entries
        self.max_experts = max_experts
        self.cpu_bytes = cpu_bytes
        self.op = select_backend(self.device, backend)
        self.context = StepContext()
        targets = sorted(base.targets.items())
        # every module's per-slot ranks in one table (row m = module m's ``ranks``): a write sets a slot's
        # column for all modules in one op
        self._ranks = torch.zeros(len(targets), self.num_slots, device=self.device, dtype=torch.int32)
        # the modules' slot tables as views of one tensor per input / output width (image.py)
        self.layout = Layout.of(targets)
        self._a_tables, self._bt_tables, tables = self.layout.allocate(sum(r * n for r, n in self.buckets),
                                                                       self.device, dtype)
        self.slots: dict[str, ModuleSlots] = {
            path: ModuleSlots.allocate(d_in, d_out, self.buckets, self.mor_entries, max_experts, self.device, dtype,
                                       ranks=self._ranks[m], tables=tables[path])
            for m, (path, (d_in, d_out)) in enumerate(targets)
        }
        self.layers: dict[str, LowRankLinear] = {}
        self._lock = threading.RLock()
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # LRU order: oldest first
        self._cpu = CpuTier(cpu_bytes)
        self._free = [list(range(b0, b0 + n)) for b0, (_, n) in zip(self.bucket_base, self.buckets, strict=True)]
        self._free_mor = list(range(self.mor_entries))
        self._occupied = torch.zeros(self.num_slots, dtype=torch.bool)
        self._scaled = torch.zeros(self.num_slots, dtype=torch.bool)
        self._mor_index = torch.full((self.num_slots,), -1, dtype=torch.long)
        self._slot_rank = torch.zeros(self.num_slots, dtype=torch.long)
        row_start = [sum(r * n for r, n in self.buckets[:b]) for b in range(len(self.buckets))]
        self._row0 = torch.tensor([row_start[b] + local * r for b, (r, n) in enumerate(self.buckets)
                                   for local in range(n)], dtype=torch.long)
        self._zero_row = sum(r * n for r, n in self.buckets)
        self._slot_bucket = [b for b, (_, n) in enumerate(self.buckets) for _ in range(n)]  # global slot -> bucket
        self._slot_rows = [r for r, n in self.buckets for _ in range(n)]  # global slot -> its rank rows
        self._row0_of = self._row0.tolist()
        self._merged: tuple[str, dict[str, torch.Tensor]] | None = None
        self._generation = 0  # slot writes and frees so far: cached gathers of slot rows and plans key on it
        self._last_plan: tuple[tuple, BatchPlan] | None = None  # (key, plan) of the previous step
        for members in shared_input_groups(self.slots):
            if len({self.slots[p].d_in for p in members}) == 1:
                group = ProjectionGroup([self.slots[p] for p in members])
                for i, p in enumerate(members):
                    self.slots[p].group, self.slots[p].group_index = group, i
        # W0 copies for merge mode (merge.py): the base's pristine fp32 host copy when the server kept one
        # (keep_pristine: taken before any cast, so copying it back equals the cast weight bitwise), else
        # taken at a module's first merge and kept for later ones
        self._w0: dict[str, torch.Tensor] = dict(base.pristine) if base.pristine is not None else {}
        # bytes of one rank row across every module (A and B^T rows): a resident slot holds rank-rows of them
        self._row_bytes = sum(m.d_in + m.d_out for m in self.slots.values()) * (torch.finfo(dtype).bits // 8)
        self._stats = PoolStats()
        self._stats.capacity_bytes["gpu"] = sum(s.num_bytes() for s in self.slots.values())
        self._stats.capacity_bytes["cpu"] = cpu_bytes

    # ----------------------------------------------------------------- wiring
    def install(self) -> None:
        """Replace every target nn.Linear of the base model by a LowRankLinear (idempotent)."""
        model = self.base.model
        for path in self.slots:
            layer = model.get_submodule(path)
            if isinstance(layer, LowRankLinear):
                self.layers[path] = layer
                continue
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            wrapped = LowRankLinear(layer, path, self.slots[path], self.context, self.op)
            setattr(parent, name, wrapped)
            self.layers[path] = wrapped

    # ---------------------------------------------------------------- residency
    def acquire(self, key: str, loader: Callable[[], CompiledAdapter]) -> int:
        """Pin the adapter ``key`` (its digest) in a device slot and return the slot."""
        with self._lock:
            res = self._resident.get(key)
            if res is not None:
                self._stats.hits["gpu"] += 1
                res.refs += 1
                self._resident.move_to_end(key)
                return res.slot
            self._stats.misses["gpu"] += 1
            adapter = self._from_cpu(key, loader)
            # checked and packed on the loader thread (put_cpu) when it read the adapter
            need, packed = self._cpu.prepared(key) or (None, None)
            if need is None:
                need = check_fit(adapter, self.slots, self.max_rank, self.max_experts)
            mor = not adapter.mergeable
            slot, mor_entry = self._take_slot(need, mor)
            start = time.perf_counter()
            try:
                self._write(slot, mor_entry, need, adapter, packed)
            except BaseException:
                self._give_back(slot, mor_entry)
                raise
            self._stats.load_seconds["copy"] += time.perf_counter() - start
            self._resident[key] = _Resident(adapter, slot, mor_entry, refs=1)
            self._update_gauges()
            return slot

    def release(self, key: str) -> None:
        with self._lock:
            res = self._resident.get(key)
            if res is None or res.refs <= 0:
                raise KeyError(f"adapter {key!r} is not pinned in the pool")
            res.refs -= 1
            if res.refs == 0 and res.forget:
                self._evict(key)

    def adapter(self, key: str) -> CompiledAdapter:
        """The CPU copy of a resident or cached adapter (heads, labels, metadata)."""
        with self._lock:
            res = self._resident.get(key)
            if res is not None:
                return res.adapter
            adapter = self._cpu.get(key)
            if adapter is not None:
                return adapter
            raise KeyError(f"adapter {key!r} is neither resident nor cached")

    def slot_of(self, key: str) -> int | None:
        with self._lock:
            res = self._resident.get(key)
            return None if res is None else res.slot

    def cached(self, key: str) -> bool:
        """Resident in a slot or held in the CPU tier: acquiring it reads nothing from the store. Called at
        submit on the event loop, so it does not wait for the pool's lock (the engine thread may hold it
        through a slot copy); a stale answer costs one needless or one missed prefetch, nothing else."""
        return key in self._resident or key in self._cpu

    def put_cpu(self, key: str, adapter: CompiledAdapter, hold_s: float = 0.0,
                prepared: tuple[int, Packed | None] | None = None) -> None:
        """Hold an adapter loaded elsewhere (the residency's loader threads) in the CPU tier, LRU-bounded.
        ``hold_s`` > 0: a prefetch for a waiting request; no eviction takes it before its first acquire (or
        before ``hold_s`` seconds pass), even if the tier must run over its bytes meanwhile. ``prepared``:
        its fit and packed form made already (a loader process: ``load_process``), else made here."""
        if prepared is None:  # on the caller's (loader) thread, before the lock: fit check and packing (image.py)
            adapter, prepared = prepare(adapter, self.slots, self.layout, self.max_rank, self.max_experts)
        with self._lock:
            if key not in self._resident and key not in self._cpu:
                self._stats.misses["cpu"] += 1  # the loader thread's read; the acquire that follows is a hit
                self._cpu.put(key, adapter, hold_s, prepared)
                self._update_gauges()

    def forget(self, key: str) -> None:
        """Drop ``key`` from every tier; a pinned adapter leaves at its last release."""
        with self._lock:
            self._cpu.drop(key)
            res = self._resident.get(key)
            if res is not None:
                if res.refs == 0:
                    self._evict(key)
                else:
                    res.forget = True
            self._update_gauges()

    def free_memory(self) -> int:
        """After an out-of-memory: drop the CPU tier (copies the store can give again) and hand cached device
        memory back to the driver. Resident adapters stay: their slots are preallocated. Returns the bytes
        dropped from the CPU tier."""
        with self._lock:
            dropped = self._cpu.clear()
            self._update_gauges()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return dropped

    @property
    def stats(self) -> PoolStats:
        with self._lock:
            s = self._stats
            return PoolStats(dict(s.hits), dict(s.misses), dict(s.evictions), dict(s.load_seconds),
                             dict(s.resident), dict(s.resident_bytes), dict(s.capacity_bytes))

    # --------------------------------------------------------------------- steps
    def plan(self, token_slots: torch.Tensor) -> BatchPlan:
        """The step's plan. Steady decoding repeats the previous step's token slots over unchanged slots:
        that plan is reused (a fresh per-step scratch, the same tensors and choices) instead of rebuilt."""
        with self._lock:
            merged_slot = None if self._merged is None else self._resident[self._merged[0]].slot
            host = token_slots.detach().to("cpu", torch.long).reshape(-1)
            key = (host.numpy().tobytes(), self._generation, merged_slot)
            last = self._last_plan
            if last is not None and last[0] == key:
                return dataclasses.replace(last[1], shared={})
            table = SlotTable(tuple(self.bucket_base), tuple(n for _, n in self.buckets),
                              tuple(r for r, _ in self.buckets), self._occupied, self._scaled, self._mor_index,
                              self._row0, self._slot_rank, self._zero_row)
            plan = build_plan(host if token_slots.device.type == "cpu" else token_slots, table, self.device,
                              merged_slot, self.dtype, self._generation)
            self._last_plan = (key, plan)
            return plan

    @contextlib.contextmanager
    def step(self, token_slots: torch.Tensor) -> Iterator[BatchPlan]:
        """Every LowRankLinear reads this step's plan until the block exits."""
        plan = self.plan(token_slots)
        self.context.plan = plan
        try:
            yield plan
        finally:
            self.context.plan = None

    # --------------------------------------------------------------------- merge
    def merge(self, key: str) -> None:
        """Fold the resident adapter ``key`` into the base weights (pinned while merged). Steps must then
        name only its slot until ``unmerge``. MoR raises ``merge.NotMergeable``."""
        with self._lock:
            if self._merged is not None:
                raise RuntimeError(f"adapter {self._merged[0]!r} is already merged: unmerge it first")
            res = self._resident.get(key)
            if res is None:
                raise KeyError(f"adapter {key!r} is not resident: acquire it before merging")
            saved = merging.merge_into(self.layers, res.adapter, self._w0)
            res.refs += 1
            self._merged = (key, saved)

    def unmerge(self) -> None:
        """Restore W0 bitwise from the kept copies (no-op when nothing is merged)."""
        with self._lock:
            if self._merged is None:
                return
            key, saved = self._merged
            merging.restore(self.layers, saved)
            self._merged = None
            self.release(key)

    @property
    def merged(self) -> str | None:
        return None if self._merged is None else self._merged[0]

    # ------------------------------------------------------------------ internals
    def _from_cpu(self, key: str, loader: Callable[[], CompiledAdapter]) -> CompiledAdapter:
        adapter = self._cpu.take(key)
        if adapter is not None:
            self._stats.hits["cpu"] += 1
            return adapter
        self._stats.misses["cpu"] += 1
        start = time.perf_counter()
        adapter = for_slots(loader())
        self._stats.load_seconds["loader"] += time.perf_counter() - start
        self._cpu.put(key, adapter)
        return adapter

    def _take_slot(self, need: int, mor: bool) -> tuple[int, int]:
        fits = [b for b, (r, _) in enumerate(self.buckets) if r >= need]
        if mor and not self._free_mor:
            victim = next((k for k, r in self._resident.items() if r.refs == 0 and r.mor_entry >= 0), None)
            if victim is None:
                raise PoolExhausted(f"all {self.mor_entries} MoR entries are pinned by running requests")
            self._evict(victim)
        slot = next((self._free[b].pop(0) for b in fits if self._free[b]), None)
        if slot is None:
            fit_slots = {s for b in fits for s in range(self.bucket_base[b], self.bucket_base[b] + self.buckets[b][1])}
            victim = next((k for k, r in self._resident.items() if r.refs == 0 and r.slot in fit_slots), None)
            if victim is None:
                raise PoolExhausted(f"all {len(fit_slots)} slots with >= {need} rank rows are pinned by running "
                                    "requests")
            slot = self._resident[victim].slot
            self._evict(victim)
            self._free[self._bucket_of(slot)].remove(slot)
        mor_entry = self._free_mor.pop(0) if mor else -1
        return slot, mor_entry

    def _write(self, slot: int, mor_entry: int, rank_rows: int, adapter: CompiledAdapter,
               packed: Packed | None = None) -> None:
        """Every module of ``adapter`` into ``slot``, on the engine thread. Packed (image.py): one copy per
        shape group; else staged per module, run as one batched zero and copy. Ranks: one op."""
        self._generation += 1
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        zeros: list[torch.Tensor] = []
        if packed is not None and packed.rows <= self._slot_rows[slot]:
            row0, rows = self._row0_of[slot], packed.rows
            filled = max(ms.packed_write(slot, rows) for ms in self.slots.values())  # rows left by the last one
            for tables, parts in ((self._a_tables, packed.a), (self._bt_tables, packed.bt)):
                copies += ((t[:, row0:row0 + rows], part) for t, part in zip(tables, parts, strict=True))
                if filled > rows:
                    zeros += (t[:, row0 + rows:row0 + filled] for t in tables)
            run_staged(copies, zeros)
            self._ranks[:, slot] = packed.ranks
        else:
            modules = adapter.modules
            ranks = [ms.stage(slot, mor_entry, modules.get(path), copies, zeros) for path, ms in self.slots.items()]
            run_staged(copies, zeros)
            self._ranks[:, slot] = torch.tensor(ranks, dtype=torch.int32)
        self._occupied[slot] = True
        self._scaled[slot] = any(m.out_scale is not None for m in adapter.modules.values())
        self._mor_index[slot] = mor_entry
        self._slot_rank[slot] = rank_rows

    def _evict(self, key: str) -> None:
        res = self._resident.pop(key)
        self._give_back(res.slot, res.mor_entry)
        self._stats.evictions["gpu"] += 1
        self._update_gauges()

    def _give_back(self, slot: int, mor_entry: int) -> None:
        # Stale rows stay in the buffers: the plan refuses unoccupied slots, and the next write overwrites.
        self._generation += 1  # no cached plan may name the slot again
        self._occupied[slot] = False
        self._scaled[slot] = False
        self._mor_index[slot] = -1
        self._free[self._bucket_of(slot)].append(slot)
        if mor_entry >= 0:
            self._free_mor.append(mor_entry)

    def _bucket_of(self, slot: int) -> int:
        return self._slot_bucket[slot]

    def _update_gauges(self) -> None:
        s = self._stats
        s.resident["gpu"] = len(self._resident)
        s.resident["cpu"] = len(self._cpu)
        s.resident_bytes["cpu"] = self._cpu.used_bytes
        s.evictions["cpu"] = self._cpu.evictions
        # device bytes of the occupied slots (each its bucket's rank rows) across all modules
        rows = self._slot_rows
        s.resident_bytes["gpu"] = sum(rows[r.slot] for r in self._resident.values()) * self._row_bytes
