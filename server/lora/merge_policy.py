"""When merge mode folds the one running adapter into the base weights, and when it restores them.

Merging costs a pass over the adapted weights, so it waits for a run of single-adapter steps in a row
(``after_steps`` at first). Any step with another adapter (or the base) restores W0 first (``pool.unmerge``,
bitwise), and so does a classify batch. A merge that was undone before it ran as many steps as it waited
for did not pay: the wait doubles (up to ``MAX_WAIT_STEPS``), so traffic that flickers between one and
several adapters settles into running unmerged instead of merging and unmerging over and over; a merge that
lasts ``LONG_MERGE_STEPS`` brings the wait back to ``after_steps``. MoR adapters are never merged (their
router depends on the input).
"""

from __future__ import annotations

from collections.abc import Iterable

from server.common.metrics import Metrics
from server.lora.pool import AdapterPool

MERGE_AFTER_STEPS = 1  # consecutive single-adapter steps before the adapter is folded in (at first): a merge
#   is one in-place pass over the adapted weights (W0 copies are kept after the first), about one step's cost
MAX_WAIT_STEPS = 256
LONG_MERGE_STEPS = 64


class MergePolicy:
    def __init__(self, pool: AdapterPool, enabled: bool, after_steps: int = MERGE_AFTER_STEPS,
                 metrics: Metrics | None = None):
        self.pool = pool
        self.enabled = enabled
        self.after_steps = after_steps
        self.metrics = metrics
        self.wait = after_steps  # single-adapter steps in a row needed now
        self.merges = 0
        self._last_single: str | None = None
        self._single_steps = 0
        self._merged_steps = 0

    @property
    def merged(self) -> str | None:
        """The digest folded into W0 (the pool's state: one source of truth)."""
        return self.pool.merged

    def before_step(self, keys: Iterable[str | None]) -> None:
        """Called with the adapter keys of every running request before each generate step."""
        if not self.enabled:
            return
        distinct = set(keys)
        single = next(iter(distinct)) if len(distinct) == 1 else None
        if self.merged is not None and self.merged == single:
            self._merged_steps += 1
            return
        self.unmerge()
        self._single_steps = self._single_steps + 1 if single is not None and single == self._last_single else 0
        self._last_single = single
        if (single is not None and self._single_steps >= self.wait and self.pool.adapter(single).mergeable):
            self.pool.merge(single)
            self.merges += 1
            self._merged_steps = 1
            if self.metrics is not None:
                self.metrics.adapter_merges.inc()

    def unmerge(self) -> None:
        """Restore the base weights exactly (a no-op when nothing is merged), and adapt the wait to how long
        the merge lasted."""
        if self.merged is None:
            return
        self.pool.unmerge()
        if self._merged_steps < self.wait:
            self.wait = min(MAX_WAIT_STEPS, 2 * self.wait)
        elif self._merged_steps >= LONG_MERGE_STEPS:
            self.wait = self.after_steps
        self._single_steps = 0
