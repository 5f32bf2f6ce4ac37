"""The pool's CPU tier: adapters read from the store, kept on the host so that making one resident again
reads nothing, bounded in bytes (least recently used out first).

Prefetches for waiting requests are held: no eviction takes one before its first ``take`` (or before its
hold lapses), even if the tier has to run over its bytes meanwhile; the waiting queue bounds by how much.
Not thread-safe on its own: the pool calls it under its lock (``__contains__`` excepted, see the pool).
"""

from __future__ import annotations

import time
from collections import OrderedDict

from adapters_store.format import CompiledAdapter


class CpuTier:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.evictions = 0
        self._items: OrderedDict[str, CompiledAdapter] = OrderedDict()  # LRU order: oldest first
        self._sizes: dict[str, int] = {}  # key -> its adapter's bytes (counted once, at put)
        self._prepared: dict[str, object] = {}  # key -> what the putter prepared for its slot write (``put``)
        self._held: dict[str, float] = {}  # prefetched keys -> monotonic time their hold ends

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> CompiledAdapter | None:
        return self._items.get(key)

    def take(self, key: str) -> CompiledAdapter | None:
        """The adapter for an acquire (a use: most recent now, and a prefetch's hold ends), or None."""
        adapter = self._items.get(key)
        if adapter is not None:
            self._items.move_to_end(key)
            self._held.pop(key, None)
        return adapter

    def prepared(self, key: str):
        """What was given with ``put`` to make the adapter resident faster (the pool's fit and packing, done
        off the engine thread), or None."""
        return self._prepared.get(key)

    def put(self, key: str, adapter: CompiledAdapter, hold_s: float = 0.0, prepared: object = None) -> None:
        """Keep ``adapter`` (one larger than the whole tier is not kept); ``hold_s`` > 0 holds it.
        ``prepared``: kept beside it for ``prepared`` (the pool's: its slot rank rows and packed form)."""
        size = adapter.num_bytes()
        if size > self.capacity_bytes or key in self._items:
            return
        if hold_s > 0:
            self._held[key] = time.monotonic() + hold_s
        self._items[key] = adapter
        self._sizes[key] = size
        if prepared is not None:
            self._prepared[key] = prepared
        self.used_bytes += size
        if self.used_bytes > self.capacity_bytes:
            self._evict()

    def drop(self, key: str) -> None:
        self._held.pop(key, None)
        self._prepared.pop(key, None)
        if self._items.pop(key, None) is not None:
            self.used_bytes -= self._sizes.pop(key)

    def clear(self) -> int:
        """Drop everything, holds included (out of memory); returns the bytes dropped."""
        dropped = self.used_bytes
        self.evictions += len(self._items)
        self._items.clear()
        self._sizes.clear()
        self._prepared.clear()
        self._held.clear()
        self.used_bytes = 0
        return dropped

    def _evict(self) -> None:
        """Least recently used first, passing over prefetches still held for their request."""
        now = time.monotonic()
        self._held = {k: t for k, t in self._held.items() if t > now}
        for key in [k for k in self._items if k not in self._held]:
            if self.used_bytes <= self.capacity_bytes:
                break
            del self._items[key]
            self._prepared.pop(key, None)
            self.used_bytes -= self._sizes.pop(key)
            self.evictions += 1
