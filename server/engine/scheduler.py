"""Continuous, iteration-level batching across adapters.

Every engine step the scheduler builds one batch under a token budget (``max_batch_tokens``): running
requests first (a decode costs one token, an unfinished prompt continues as a chunk: chunked prefill),
then new requests admitted from a bounded waiting queue while ``max_running`` and the KV cache allow.
Finished requests leave between steps, so the batch changes every iteration. Cache blocks are taken as
positions advance; when they run out, the most recently admitted request is preempted (recompute).

Fairness: the waiting queue is one FIFO per adapter, and admission takes the head of each adapter's FIFO
in turn (round-robin, the rotation kept across steps), so a hot adapter with a long queue cannot starve
the cold ones behind it.

Residency: before a request is admitted its adapter is made resident and pinned (``engine.admission``, the
path classify jobs take too; unpinned when it leaves). No free slot: the request keeps its place and waits,
at most ``slot_wait_s``, then fails with ``Unavailable``. Any ``ServingError`` (a corrupt file, a deleted
adapter, the slot wait exceeded) fails every request waiting for that same adapter version, and nothing
else.

Threading: ``add``/``remove_waiting``/counts may be called from any thread (a lock guards the waiting
queue only, never held while an adapter loads); ``schedule``/``finish`` run on the engine thread.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from server.common.errors import QueueFull, ServingError
from server.engine.admission import Admission
from server.engine.request import Request
from server.lora.residency import Residency


class KVSpace(Protocol):
    def can_allocate(self, num_tokens: int, spare_blocks: int = 0) -> bool: ...
    def allocate(self, num_tokens: int) -> int: ...
    def grow(self, seq: int, num_tokens: int) -> bool: ...
    def free(self, seq: int) -> None: ...


@dataclass
class Batch:
    chunks: list[tuple[Request, int]] = field(default_factory=list)  # (request, new tokens this step)
    failed: list[tuple[Request, ServingError]] = field(default_factory=list)  # left the queue with an error
    preempted: list[Request] = field(default_factory=list)  # sent back to the queue to free cache blocks


class Scheduler:
    def __init__(self, residency: Residency, kv: KVSpace, max_batch_tokens: int, max_running: int,
                 max_queue: int, slot_wait_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        if max_batch_tokens < 1 or max_running < 1 or max_queue < 0:
            raise ValueError(f"max_batch_tokens={max_batch_tokens}, max_running={max_running} must be >= 1 "
                             f"and max_queue={max_queue} >= 0")
        self.admission = Admission(residency, slot_wait_s, clock, self.retry_after)
        self.kv = kv
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        self.max_queue = max_queue
        self.clock = clock
        self.running: list[Request] = []
        self._lock = threading.Lock()
        self._queues: OrderedDict[str | None, deque[Request]] = OrderedDict()  # rotation order = dict order
        self._waiting = 0
        self._recent_e2e = 1.0  # seconds, an EWMA used to suggest Retry-After

    # ---- any thread -------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return self._waiting

    @property
    def num_running(self) -> int:
        return len(self.running)

    def retry_after(self) -> float:
        """Seconds a refused client should wait: the queue ahead of it at the recent request latency."""
        waves = (self._waiting + len(self.running)) / self.max_running
        return float(min(60.0, max(1.0, round(waves * self._recent_e2e))))

    def check_capacity(self, n: int = 1) -> None:
        """Raise QueueFull when ``n`` new requests could not be queued; cheap, before any tokenisation."""
        if self._waiting + n > self.max_queue:
            raise QueueFull(f"the waiting queue is full ({self.max_queue} requests); retry later",
                            retry_after=self.retry_after())

    def add(self, req: Request) -> None:
        self.add_all([req])

    def add_all(self, reqs: list[Request]) -> None:
        """Queue every request in order, or none (QueueFull) when the queue cannot hold them all."""
        with self._lock:
            if self._waiting + len(reqs) > self.max_queue:
                self.check_capacity(len(reqs))
            for req in reqs:
                self._queues.setdefault(req.key, deque()).append(req)
            self._waiting += len(reqs)

    def remove_waiting(self, req: Request) -> bool:
        """Take a request out of the queue (cancel, deadline); False when it is not waiting."""
        with self._lock:
            q = self._queues.get(req.key)
            if q is None or req not in q:
                return False
            q.remove(req)
            self._waiting -= 1
            if not q:
                del self._queues[req.key]
            return True

    def waiting(self) -> list[Request]:
        with self._lock:
            return [r for q in self._queues.values() for r in q]

    # ---- engine thread ----------------------------------------------------------------------------
    def schedule(self) -> Batch:
        batch = Batch()
        budget = self.max_batch_tokens
        for req in list(self.running):  # decodes and unfinished prompts of admitted requests come first
            n = min(req.num_tokens - req.num_computed, budget)
            if n <= 0 or req not in self.running:
                continue
            # cache blocks on demand; when none are free the newest request yields its blocks (it is
            # recomputed later), so the oldest always progresses and nothing deadlocks
            while not self.kv.grow(req.seq, req.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is req:
                    break
            if req in self.running:
                batch.chunks.append((req, n))
                budget -= n
        busy: set[str | None] = set()
        while budget > 0 and len(self.running) < self.max_running and not batch.preempted:
            req = self._next_waiting(busy)
            # one spare block per running request, so that admitting does not force a preemption at once
            if req is None or not self.kv.can_allocate(req.num_tokens, spare_blocks=len(self.running)):
                if req is not None:
                    self._requeue_front(req)
                break
            try:
                admitted = self.admission.admit(req)
            except ServingError as e:
                batch.failed.append((req, e))
                batch.failed.extend((r, e) for r in self._drain_key(req.key))
                continue
            if not admitted:
                busy.add(req.key)
                self._requeue_front(req)
                continue
            req.seq = self.kv.allocate(req.num_tokens)
            req.scheduled_at = self.clock()
            self.running.append(req)
            n = min(req.num_tokens, budget)
            batch.chunks.append((req, n))
            budget -= n
        return batch

    def finish(self, req: Request) -> None:
        """Release a running request's KV space and adapter pin; safe to call twice."""
        if req in self.running:
            self.running.remove(req)
            if req.scheduled_at is not None:
                self._recent_e2e = 0.8 * self._recent_e2e + 0.2 * max(0.0, self.clock() - req.arrival)
        try:
            if req.seq >= 0:
                self.kv.free(req.seq)
        finally:
            req.seq = -1
            self.admission.release(req)

    def _preempt(self, req: Request) -> None:
        """Give a running request's cache blocks and adapter pin back and requeue it at the front of its
        adapter's queue; it keeps its generated tokens and recomputes their keys when readmitted."""
        self.running.remove(req)
        try:
            self.kv.free(req.seq)
        finally:
            req.seq = -1
            req.num_computed = 0
            req.preemptions += 1
            self.admission.release(req)
            self._requeue_front(req)

    def _next_waiting(self, skip: set[str | None]) -> Request | None:
        """Pop the head of the next adapter's FIFO in the rotation (skipping adapters without a slot)."""
        with self._lock:
            for key in list(self._queues):
                if key in skip:
                    continue
                q = self._queues[key]
                req = q.popleft()
                self._waiting -= 1
                del self._queues[key]
                if q:
                    self._queues[key] = q  # re-inserted at the end: this adapter had its turn
                return req
            return None

    def _requeue_front(self, req: Request) -> None:
        """Undo ``_next_waiting``: the request keeps its place and its adapter its turn."""
        with self._lock:
            q = self._queues.get(req.key)
            if q is None:
                self._queues[req.key] = q = deque()
                self._queues.move_to_end(req.key, last=False)
            else:
                self._queues.move_to_end(req.key, last=False)
            q.appendleft(req)
            self._waiting += 1

    def _drain_key(self, key: str | None) -> list[Request]:
        with self._lock:
            q = self._queues.pop(key, deque())
            self._waiting -= len(q)
            return list(q)
