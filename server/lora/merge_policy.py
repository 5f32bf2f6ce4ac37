"""When merge mode folds the one running adapter into the base weights, and when it restores them.

Merging costs a pass over the adapted weights, so it waits for ``after_steps`` single-adapter steps in a row:
traffic flickering between adapters does not merge and unmerge every step. Any step with another adapter
(or the base) restores W0 first (``pool.unmerge``, bitwise), and so does a classify batch. MoR adapters
are never merged (their router depends on the input).
"""

from __future__ import annotations

from collections.abc import Iterable

from server.lora.pool import AdapterPool

MERGE_AFTER_STEPS = 3  # consecutive single-adapter steps before the adapter is folded in


class MergePolicy:
    def __init__(self, pool: AdapterPool, enabled: bool, after_steps: int = MERGE_AFTER_STEPS):
        self.pool = pool
        self.enabled = enabled
        self.after_steps = after_steps
        self.merged: str | None = None  # the digest folded into W0
        self._last_single: str | None = None
        self._single_steps = 0

    def before_step(self, keys: Iterable[str | None]) -> None:
        """Called with the adapter keys of every running request before each generate step."""
        if not self.enabled:
            return
        distinct = set(keys)
        single = next(iter(distinct)) if len(distinct) == 1 else None
        if self.merged != single:
            self.unmerge()
        self._single_steps = self._single_steps + 1 if single is not None and single == self._last_single else 0
        self._last_single = single
        if (single is not None and self.merged is None and self._single_steps >= self.after_steps
                and self.pool.adapter(single).mergeable):
            self.pool.merge(single)
            self.merged = single

    def unmerge(self) -> None:
        """Restore the base weights exactly (a no-op when nothing is merged)."""
        if self.merged is not None:
            self.pool.unmerge()
            self.merged = None
