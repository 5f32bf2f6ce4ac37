"""The per-step batch plan: built ONCE per engine step on the host, shared by every LowRankLinear.

A step carries ``token_slots [T]`` (the device slot of each token's adapter, -1 = base only). Slots are
grouped by rank bucket in the pool (bucket ``b`` owns the contiguous global slots
``[bucket_base[b], bucket_base[b] + bucket_size[b])``), so sorting the adapter tokens by global slot
sorts them by bucket, then by slot: every bucket's tokens form one contiguous range of ``order``, and
inside it every slot's tokens form one segment (SGMV/grouped-GEMM form, as SGLang's LoRABatchInfo).

The plan is computed from CPU tensors (no device synchronisation), and all its index tensors travel to
the device in one transfer; layers read it and never call ``.item()`` or ``.tolist()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class MergedBatchError(RuntimeError):
    """A plan with tokens of other adapters (or the base) was built while an adapter is merged."""


@dataclass(frozen=True)
class SlotTable:
    """Host-side view of the pool's slot metadata (CPU tensors, one entry per global slot)."""

    bucket_base: tuple[int, ...]  # first global slot of each bucket
    bucket_size: tuple[int, ...]  # slots per bucket
    bucket_rank: tuple[int, ...]  # rank rows per slot in each bucket
    occupied: torch.Tensor  # [S] bool: a resident adapter holds the slot
    scaled: torch.Tensor  # [S] bool: the adapter carries out_scale in some module
    mor_index: torch.Tensor  # [S] long: index into the MoR tables, -1 for non-MoR adapters
    row0: torch.Tensor  # [S] long: the slot's first row in every module's flat A/B^T tables
    slot_rank: torch.Tensor  # [S] long: rank rows the resident adapter uses (its largest module)
    zero_row: int  # the all-zero row of the flat tables (target of padded gathers)

    @property
    def num_slots(self) -> int:
        return int(self.occupied.shape[0])


@dataclass(frozen=True)
class BucketPlan:
    """The adapter tokens of one rank bucket: ``order[start:stop]`` of the step."""

    bucket: int  # index into the pool's buckets (and into ModuleSlots.a / .bt)
    rank: int  # rank rows per slot of this bucket (the padded width of h)
    slot_base: int  # global slot of the bucket's local slot 0
    max_segment: int  # host int: most tokens of one slot in this bucket (kernel grid size)
    start: int  # host int: first position of this bucket's tokens in ``BatchPlan.order``
    stop: int  # host int: one past the last position
    lo: int  # host int: first local slot with tokens; grouped GEMMs run over local slots lo..hi only
    offs: torch.Tensor  # [hi - lo + 1] int32: cumulative token count per local slot lo..hi (grouped-GEMM offsets)
    local_slots: torch.Tensor  # [stop - start] long: bucket-local slot of each token
    seg_starts: torch.Tensor  # [S_b + 1] int32: segment boundaries, relative to ``start``
    seg_slots: torch.Tensor  # [S_b] int32: bucket-local slot of each segment
    mor_rows: torch.Tensor | None  # [m] long: positions (relative to ``start``) of MoR tokens
    mor_index: torch.Tensor | None  # [m] long: MoR table entry of each such token

    @property
    def num_tokens(self) -> int:
        return self.stop - self.start

    @property
    def num_segments(self) -> int:
        return int(self.seg_slots.shape[0])


@dataclass(frozen=True)
class BatchPlan:
    num_tokens: int  # T: rows of the flattened activations every layer must see
    token_slots: torch.Tensor  # [T] long on the device, -1 = base only
    order: torch.Tensor | None  # [T_a] long: adapter tokens sorted by (bucket, slot); None if T_a == 0
    buckets: tuple[BucketPlan, ...]  # the buckets used this step, ascending
    scale_rows: torch.Tensor | None  # [T] long: out_scale table row per token (S = all-ones row); None if unused
    merged: bool = False  # every token uses the merged adapter: layers run the (merged) base alone
    num_segments: int = 0  # host int: distinct adapters in the step (segments over all buckets)
    rows: torch.Tensor | None = None  # [N, R] long: flat-table row of rank row k of each token, R = the step's
    #   largest slot rank, the zero row past a token's own rank (and for base tokens); None if N * R > ROWS_CAP
    rows_by_token: bool = False  # rows are in token order (N = T; most tokens have adapters), else ``order`` (N = T_a)
    single: tuple[int, int, int] | None = None  # (bucket, local slot, rank rows) when ONE adapter has tokens
    mor_pos: torch.Tensor | None = None  # [m] long: positions of the MoR tokens among the rows' N tokens
    mor_index: torch.Tensor | None = None  # [m] long: their MoR table entries
    kept_rows: torch.Tensor | None = None  # [K * R] long: flat-table rows of the step's K adapters (their
    #   rank rows padded to R with the zero row), adapter k at rows k*R..k*R+R-1; set when
    #   K * R <= KEPT_MAX_ROWS and no token uses MoR. Projection groups keep these rows across steps.
    kept_key: tuple | None = None  # (pool generation, the K slots, R): the kept rows stay valid while it holds
    dense_mask: torch.Tensor | None = None  # [T, K * R] in the pool dtype: 1 where column k*R + j belongs
    #   to the token's own adapter (all zero for base tokens); set when K <= DENSE_MAX_ADAPTERS and
    #   K * R <= DENSE_MAX_COLS (the dense formulation)
    seg_index: torch.Tensor | None = None  # [K * M] long: token at place m of adapter k's segment, M = the
    #   longest segment; places past a segment's length repeat one of its tokens (seg_valid zeroes them)
    seg_valid: torch.Tensor | None = None  # [K, M, 1] in the pool dtype: 1 for real places; None when every
    #   segment has M tokens
    seg_m: int = 0  # host int: M
    shared: dict = field(default_factory=dict, compare=False)  # per projection group: its h this step
    choices: dict = field(default_factory=dict, compare=False)  # the op's formulation per module shape,
    #   decided once per step (host work per module: one dict lookup)

    @property
    def has_adapters(self) -> bool:
        return bool(self.buckets) and not self.merged


def build_plan(token_slots: torch.Tensor, table: SlotTable, device: torch.device | str,
               merged_slot: int | None = None, dtype: torch.dtype = torch.float32, generation: int = 0) -> BatchPlan:
    """Plan one step. ``token_slots`` may live on any device; it is read once on the host here. ``dtype``
    is the activations' (the dense formulation's mask); ``generation`` counts the pool's slot writes."""
    host = token_slots.detach().to("cpu", torch.long).reshape(-1)  # [T]
    T = int(host.shape[0])
    S = table.num_slots
    _check_slots(host, table)
    dev_slots = token_slots.detach().to(device=device, dtype=torch.long).reshape(-1)
    if merged_slot is not None:
        if T and not bool((host == merged_slot).all()):
            others = sorted(set(host.tolist()) - {merged_slot})
            raise MergedBatchError(f"adapter in slot {merged_slot} is merged into the base weights but the batch "
                                   f"also has slots {others[:8]}: call pool.unmerge() before a mixed batch")
        return BatchPlan(T, dev_slots, None, (), None, merged=True)
    adapter_tok = (host >= 0).nonzero().squeeze(1)  # [T_a]
    if adapter_tok.numel() == 0:
        return BatchPlan(T, dev_slots, None, (), None)
    slots = host[adapter_tok]
    sorted_slots, perm = torch.sort(slots, stable=True)
    order = adapter_tok[perm]  # [T_a]
    counts = torch.bincount(sorted_slots, minlength=S)  # [S]

    pack = _Pack()
    h_order = pack.add(order)
    specs = []
    pos = 0
    for b, (base, size, rank) in enumerate(zip(table.bucket_base, table.bucket_size, table.bucket_rank,
                                               strict=True)):
        cnt = counts[base:base + size]  # [n_b]
        n = int(cnt.sum())
        if n == 0:
            continue
        bslots = sorted_slots[pos:pos + n]
        used = cnt.nonzero().squeeze(1)  # [S_b]
        lo, hi = int(used[0]), int(used[-1])
        mor = table.mor_index[bslots]
        mor_rows = (mor >= 0).nonzero().squeeze(1)
        handles = [pack.add(cnt[lo:hi + 1].cumsum(0)), pack.add(bslots - base),
                   pack.add(torch.cat([torch.zeros(1, dtype=torch.long), cnt[used].cumsum(0)])), pack.add(used),
                   pack.add(mor_rows) if mor_rows.numel() else None,
                   pack.add(mor[mor_rows]) if mor_rows.numel() else None]
        specs.append((b, rank, base, int(cnt.max()), pos, pos + n, lo, handles))
        pos += n
    h_scale = None
    if bool(table.scaled[sorted_slots].any()):
        # Tokens of the base or of adapters without out_scale read row S of the table: all ones.
        h_scale = pack.add(torch.where((host >= 0) & table.scaled[host.clamp(min=0)], host, torch.full_like(host, S)))
    # The row table: in token order when most tokens carry adapters (no gather of x, no scatter of y).
    # One adapter alone (a single segment): its rows in ``order``, so the op can use plain slot views.
    single = None
    if len(specs) == 1 and specs[0][3] == specs[0][5] - specs[0][4]:
        b, _, base_slot, _, _, _, _, _ = specs[0]
        slot = int(sorted_slots[0])
        single = (b, slot - base_slot, int(table.slot_rank[slot]))
    by_token = single is None and 2 * sorted_slots.numel() >= T
    subject = host if by_token else sorted_slots  # [N] slots of the rows' tokens, -1 = base
    known = subject >= 0
    subject = subject.clamp(min=0)
    R = int(table.slot_rank[sorted_slots].max())
    h_rows = None
    if 0 < R and subject.numel() * R <= ROWS_CAP:
        k = torch.arange(R)  # [R]
        rank = torch.where(known, table.slot_rank[subject], 0)[:, None]  # [N, 1]
        h_rows = pack.add(torch.where(k < rank, table.row0[subject][:, None] + k, table.zero_row))  # [N, R]
    mor_all = torch.where(known, table.mor_index[subject], -1)  # [N]
    mor_pos = (mor_all >= 0).nonzero().squeeze(1)
    h_mor = (pack.add(mor_pos), pack.add(mor_all[mor_pos])) if mor_pos.numel() else None
    # The step's K adapters' rank rows, each padded to R with the zero row (projection groups keep them
    # across steps): the dense formulation puts them side by side as K*R columns with a per-token mask,
    # the segments one runs one small GEMM per adapter over its tokens padded to the longest segment.
    h_kept = h_seg = h_lens = h_which = None
    seg_m, padded = 0, False
    used = (counts > 0).nonzero().squeeze(1)  # [K] slots in use, ascending
    K = int(used.shape[0])
    if 0 < R and K * R <= KEPT_MAX_ROWS and not mor_pos.numel():
        k = torch.arange(R)
        h_kept = pack.add(torch.where(k[None, :] < table.slot_rank[used][:, None], table.row0[used][:, None] + k,
                                      table.zero_row))  # [K, R]
        lens = counts[used]  # [K] tokens per adapter: the segments of ``order``, in its order
        seg_m, padded = int(lens.max()), bool((lens < lens.max()).any())
        place = torch.arange(seg_m)
        starts = lens.cumsum(0) - lens  # [K] first position of each segment in ``order``
        # past its length a segment repeats its first token: a valid index whose h row is then zeroed
        h_seg = pack.add(order[starts[:, None] + torch.where(place[None, :] < lens[:, None], place[None, :], 0)])
        h_lens = pack.add(lens)
        if K <= DENSE_MAX_ADAPTERS and K * R <= DENSE_MAX_COLS:
            which = torch.full((S,), -1, dtype=torch.long)
            which[used] = torch.arange(K)
            h_which = pack.add(torch.where(host >= 0, which[host.clamp(min=0)], -1))

    dev = pack.send(device)
    dense_mask = seg_valid = None
    if h_which is not None:
        tok_k = dev[h_which]  # [T] index of the token's adapter among the K, -1 = base
        col_k = torch.arange(K, device=tok_k.device).repeat_interleave(R)  # [K * R]
        dense_mask = (tok_k[:, None] == col_k[None, :]).to(dtype)  # [T, K * R]
    if padded:
        assert h_lens is not None
        place = torch.arange(seg_m, device=dev[h_lens].device)
        seg_valid = (place[None, :] < dev[h_lens][:, None]).to(dtype)[:, :, None]  # [K, M, 1]
    buckets = tuple(
        BucketPlan(b, rank, base, longest, start, stop, lo, dev[h[0]].to(torch.int32), dev[h[1]],
                   dev[h[2]].to(torch.int32), dev[h[3]].to(torch.int32),
                   None if h[4] is None else dev[h[4]], None if h[5] is None else dev[h[5]])
        for b, rank, base, longest, start, stop, lo, h in specs)
    return BatchPlan(
        T, dev_slots, dev[h_order], buckets, None if h_scale is None else dev[h_scale],
        num_segments=int((counts > 0).sum()),
        rows=None if h_rows is None else dev[h_rows].view(subject.numel(), R), rows_by_token=by_token,
        single=single,
        mor_pos=None if h_mor is None else dev[h_mor[0]], mor_index=None if h_mor is None else dev[h_mor[1]],
        kept_rows=None if h_kept is None else dev[h_kept],
        kept_key=None if h_kept is None else (generation, tuple(used.tolist()), R),
        dense_mask=dense_mask, seg_index=None if h_seg is None else dev[h_seg], seg_valid=seg_valid, seg_m=seg_m)


ROWS_CAP = 1 << 18  # largest [T_a, R] row table built per step (the gather path is for short segments)
DENSE_MAX_ADAPTERS = 8  # the dense formulation's GEMMs grow with K: past a few adapters it never wins
DENSE_MAX_COLS = 64  # K * R: bounds the dense GEMMs (their multiply-adds grow with T * K * R)
KEPT_MAX_ROWS = 256  # K * R: the rows groups.ProjectionGroup keeps per module (32 rank-8 adapters)


class _Pack:
    """Collect host long tensors, move them to the device in ONE transfer, hand back views."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []

    def add(self, t: torch.Tensor) -> int:
        self.parts.append(t.reshape(-1))
        return len(self.parts) - 1

    def send(self, device: torch.device | str) -> list[torch.Tensor]:
        packed = torch.cat(self.parts).to(device)
        return list(torch.split(packed, [p.numel() for p in self.parts]))


def _check_slots(host: torch.Tensor, table: SlotTable) -> None:
    bad = (host < -1) | (host >= table.num_slots)
    if bool(bad.any()):
        raise ValueError(f"token_slots holds {sorted(set(host[bad].tolist()))[:8]}: each entry must be -1 or a "
                         f"slot in [0, {table.num_slots})")
    used = host[host >= 0]
    free = used[~table.occupied[used]]
    if free.numel():
        raise ValueError(f"token_slots names slots {sorted(set(free.tolist()))[:8]} that hold no resident adapter "
                         "(acquire the adapter first)")
