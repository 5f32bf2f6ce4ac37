"""Admission: the one place a request (generate or classify) gets its adapter slot.

``Admission.admit`` asks the residency (``server.lora.residency``) to make the request's adapter version
resident and pin it, and turns the answer into one of three outcomes for the caller's queue:

- admitted: ``adapter_slot`` is set and the request is pinned (``release`` unpins it once, when it leaves);
- wait (False): no slot is free now (``AdapterBusy``: every fitting slot is pinned), or the adapter is
  still being read on a loader thread (``AdapterLoading``). The request keeps its place. A slot wait is
  bounded: past ``slot_wait_s`` it fails with 503. A load in flight is bounded by the deadline instead;
- failed: a ``ServingError`` (a corrupt file, a deleted adapter, the slot wait exceeded) is raised for the
  caller to answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from server.common.errors import Unavailable
from server.lora import residency
from server.lora.residency import AdapterBusy, AdapterLoading, Residency


class Claim(residency.Claim, Protocol):
    """The adapter fields shared by ``Request`` and ``ClassifyJob``."""

    adapter_slot: int
    pinned: bool
    slot_wait_since: float | None


class Admission:
    def __init__(self, residency: Residency, slot_wait_s: float, clock: Callable[[], float] = time.monotonic,
                 retry_after: Callable[[], float | None] = lambda: None):
        self.residency = residency
        self.slot_wait_s = slot_wait_s
        self.clock = clock
        self.retry_after = retry_after  # the Retry-After a slot-wait failure suggests

    def admit(self, item: Claim) -> bool:
        """True once ``item`` holds a pinned slot; False to wait and try at a later step; raises
        ``ServingError`` when it can never be admitted."""
        try:
            item.adapter_slot = self.residency.acquire(item)
        except AdapterLoading:
            return False
        except AdapterBusy:
            now = self.clock()
            if item.slot_wait_since is None:
                item.slot_wait_since = now
            elif now - item.slot_wait_since > self.slot_wait_s:
                raise Unavailable(f"no adapter slot became free within {self.slot_wait_s:g} s (all slots pinned "
                                  "by running requests)", retry_after=self.retry_after()) from None
            return False
        item.pinned = True
        item.slot_wait_since = None
        return True

    def release(self, item: Claim) -> None:
        """Unpin (once; a second call is a no-op)."""
        if item.pinned:
            item.pinned = False
            self.residency.release(item)
