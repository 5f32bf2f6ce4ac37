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

from dataclasses import dataclass

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

    @property
    def has_adapters(self) -> bool:
        return bool(self.buckets) and not self.merged


def build_plan(token_slots: torch.Tensor, table: SlotTable, device: torch.device | str,
               merged_slot: int | None = None) -> BatchPlan:
    """Plan one step. ``token_slots`` may live on any device; it is read once on the host here."""
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

    # Pack every long tensor, send once, then slice views on the device.
    pieces: list[torch.Tensor] = [order]
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
        seg_starts = torch.cat([torch.zeros(1, dtype=torch.long), cnt[used].cumsum(0)])
        mor = table.mor_index[bslots]
        mor_rows = (mor >= 0).nonzero().squeeze(1)
        lo, hi = int(used[0]), int(used[-1])
        parts = [cnt[lo:hi + 1].cumsum(0), bslots - base, seg_starts, used]
        if mor_rows.numel():
            parts += [mor_rows, mor[mor_rows]]
        specs.append((b, rank, base, int(cnt.max()), lo, pos, pos + n, bool(mor_rows.numel())))
        pieces += parts
        pos += n
    scaled = table.scaled[sorted_slots]
    if bool(scaled.any()):
        # Tokens of the base or of adapters without out_scale read row S of the table: all ones.
        pieces.append(torch.where((host >= 0) & table.scaled[host.clamp(min=0)], host, torch.full_like(host, S)))
    packed = torch.cat(pieces).to(device)
    views = list(torch.split(packed, [p.numel() for p in pieces]))
    dev_order = views.pop(0)
    buckets = []
    for b, rank, base, longest, lo, start, stop, has_mor in specs:
        offs, local, seg_starts, used = views[:4]
        del views[:4]
        mor_rows = mor_index = None
        if has_mor:
            mor_rows, mor_index = views[:2]
            del views[:2]
        buckets.append(BucketPlan(b, rank, base, longest, start, stop, lo, offs.to(torch.int32), local,
                                  seg_starts.to(torch.int32), used.to(torch.int32), mor_rows, mor_index))
    scale_rows = views.pop(0) if views else None
    return BatchPlan(T, dev_slots, dev_order, tuple(buckets), scale_rows)


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
