"""Adapter residency for admission (``server.engine.admission``): store -> pool (CPU LRU -> device slot), pinned while in use.

The request captured its adapter's digest (the version) at submit; the loader given to the pool loads
exactly that version or fails with 404 when the adapter was deleted or replaced meanwhile, so no request
ever mixes two versions. A version that failed to load is remembered, and later requests for it fail at
submit instead of queueing for a load that cannot succeed.

Loads from the store run on loader threads, not on the engine thread (as S-LoRA and LoRAX do): at submit,
``prefetch`` starts reading and validating a version that is neither resident nor in the CPU tier; while
that runs, ``acquire`` answers ``AdapterLoading`` (an ``AdapterBusy``), so the request keeps its place and everything else keeps
stepping; the finished load lands in the CPU tier and wakes the engine, whose acquire then only copies it
into a slot. A load that fails on a loader thread is retried on the engine thread, which owns the one
failure path. ``prefetch=False`` loads on the engine thread.

Failures are of two kinds (RELIABILITY rows 22, 23, 39). A permanent one (the file is not a valid adapter
for this base, or no longer matches its digest) answers 424 and is remembered, so later requests for that
version fail at once; deleting or re-uploading the adapter clears the memo (``forget``). A transient one
(an I/O error, out of memory) is retried with back-off while the request waits in place; out of memory
first drops the CPU tier and cached device memory. After the last retry the request gets 503 with
Retry-After, and nothing is remembered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import torch

from adapters_store.basemodels import BaseModel
from adapters_store.format import AdapterFormatError, CompiledAdapter
from adapters_store.tenancy import resolve
from server.common.errors import AdapterLoadFailed, TaskMismatch, Unavailable, UnknownAdapter
from server.common.metrics import Metrics
from server.lora.load_process import LoaderProcesses, init_message
from server.lora.pool import AdapterPool, PoolExhausted

log = logging.getLogger("rankserve.residency")
RETRY_BACKOFF_S = (0.05, 0.2, 0.8, 3.2)  # waits before each retry of a transiently failed load
PREFETCH_HOLD_S = 60.0  # a prefetched adapter stays in the CPU tier at least this long, or until acquired


def out_of_memory(e: BaseException) -> bool:
    oom = (MemoryError, *((torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else ()))
    return isinstance(e, oom) or "out of memory" in str(e).lower()


def transient(e: BaseException) -> bool:
    """Worth retrying: the same read may succeed later (EIO, a full page cache, memory pressure)."""
    return isinstance(e, OSError) or out_of_memory(e)


class AdapterBusy(Exception):
    """No device slot can take the adapter right now (all pinned); try again at a later step."""


class AdapterLoading(AdapterBusy):
    """The adapter is being read from the store on a loader thread; try again at a later step. This wait is
    bounded by the request's deadline, not by the slot wait."""


class Claim(Protocol):
    """What residency reads of a request or classify job: the adapter version it captured at submit."""

    adapter_id: str | None  # the plain id, for messages
    key: str | None  # the adapter's digest; None = the base model
    store_key: str | None  # where it lives in the store (its tenant's namespace); None = adapter_id


class Residency(Protocol):
    def acquire(self, req: Claim) -> int: ...  # device slot (-1 = base); raises AdapterBusy or ServingError
    def release(self, req: Claim) -> None: ...


class AdapterResidency:
    MAX_FAILED = 1024

    def __init__(self, pool: AdapterPool, store, base: BaseModel, metrics: Metrics | None,
                 prefetch: bool = True, loader_threads: int = 2, on_loaded: Callable[[], None] | None = None,
                 loader_processes: int = 0):
        self.pool = pool
        self.base = base
        self.store = store
        self.metrics = metrics
        self.failed: OrderedDict[str, str] = OrderedDict()  # digest -> why it can never load (permanent)
        self._retries: dict[str, tuple[int, float]] = {}  # digest -> (transient failures, next try at)
        self._published: dict[tuple[str, str], float] = {}
        self.on_loaded = on_loaded  # the engine's wake-up
        self._loads: dict[str, Future] = {}  # digest -> its load running on a loader thread
        self._loads_lock = threading.Lock()
        self._executor = (ThreadPoolExecutor(loader_threads, thread_name_prefix="rankserve-adapter-load")
                          if prefetch else None)
        # loads in other processes, the loader threads only waiting on them (load_process); started with
        # the engine (``start_processes``), used once they have imported torch
        self._loader_processes = loader_processes if prefetch else 0
        self._procs: LoaderProcesses | None = None
        self._procs_lock = threading.Lock()

    def prefetch(self, adapter_id: str, digest: str, store_key: str | None = None) -> None:
        """Any thread (submit): start loading this version on a loader thread unless it is resident, in the
        CPU tier, already loading, or known to fail."""
        if self._executor is None or digest in self.failed or self.pool.cached(digest):
            return
        with self._loads_lock:
            if digest in self._loads:
                return
            self._loads[digest] = self._executor.submit(self._fetch, adapter_id, digest, store_key)

    def lookup(self, adapter_id: str | None, owner: str | None, task: str):
        """At submit: (storage key, record) of ``adapter_id`` for tenant ``owner`` (its own, else the public
        one, never another tenant's), checked for ``task`` and known load failures, and its read started
        (``prefetch``). None for the base model."""
        if adapter_id is None:
            return None
        try:
            store_key, record = resolve(self.store, adapter_id, owner)
        except Exception as e:
            if getattr(e, "http_status", None) == 404:
                raise UnknownAdapter(f"adapter {adapter_id!r} does not exist", param="model") from None
            raise
        if record.task != task:
            raise TaskMismatch(f"adapter {adapter_id!r} is a {record.task} adapter; this endpoint needs {task}",
                               param="model")
        self.check(adapter_id, record.digest)
        self.prefetch(adapter_id, record.digest, store_key)
        return store_key, record

    def loading(self, digest: str) -> bool:
        with self._loads_lock:
            return digest in self._loads

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        with self._procs_lock:
            self._loader_processes = 0
            if self._procs is not None:
                self._procs.close()

    def start_processes(self) -> None:
        self._processes()

    def _processes(self) -> LoaderProcesses | None:
        with self._procs_lock:
            if self._procs is None and self._loader_processes > 0:
                init = init_message(self.store, self.base, self.pool.layout, self.pool.max_rank,
                                    self.pool.max_experts)
                if init is None:  # a store other processes cannot read: threads only
                    self._loader_processes = 0
                    return None
                try:
                    self._procs = LoaderProcesses(self._loader_processes, init)
                except Exception as e:  # noqa: BLE001 - no worker (no interpreter to start, no memory): threads
                    log.warning("adapter loader processes could not start (%s: %s); loading on threads",
                                type(e).__name__, e)
                    self._loader_processes = 0
            return self._procs

    def _fetch(self, adapter_id: str, digest: str, store_key: str | None) -> None:
        start = time.monotonic()
        try:
            procs = self._processes()
            got = procs.load(store_key or adapter_id, digest) if procs is not None else None
            if got is not None:  # read, validated and packed in a loader process
                self.pool.put_cpu(digest, got[0], hold_s=PREFETCH_HOLD_S, prepared=got[1])
                if self.metrics is not None:
                    self.metrics.adapter_loads.labels(result="ok").inc()
                    self.metrics.adapter_load_duration.labels(source="disk").observe(time.monotonic() - start)
                return
            adapter = self._loader(adapter_id, store_key, digest, [])()
            self.pool.put_cpu(digest, adapter, hold_s=PREFETCH_HOLD_S)
            if self.metrics is not None:
                self.metrics.adapter_load_duration.labels(source="disk").observe(time.monotonic() - start)
        except Exception as e:  # the engine thread loads it again and reports the failure its usual way
            if out_of_memory(e):
                self.pool.free_memory()
            log.info("adapter %r (%s) failed to load on a loader thread: %s: %s", adapter_id, digest[:12],
                     type(e).__name__, e)
        finally:
            with self._loads_lock:
                self._loads.pop(digest, None)
            if self.on_loaded is not None:
                self.on_loaded()

    def check(self, adapter_id: str, digest: str) -> None:
        why = self.failed.get(digest)
        if why is not None:
            raise AdapterLoadFailed(f"adapter {adapter_id!r} failed to load: {why}", param="model")

    def acquire(self, req: Claim) -> int:
        """Device slot for ``req.key`` (-1 for the base); AdapterBusy when every slot is pinned."""
        if req.key is None:
            return -1
        adapter_id = req.adapter_id
        cold = self.pool.slot_of(req.key) is None
        if cold and self.loading(req.key):
            raise AdapterLoading()  # being read on a loader thread; the request keeps its place
        retry = self._retries.get(req.key)
        if cold and retry is not None and time.monotonic() < retry[1]:
            raise AdapterLoading()  # backing off after a transient failure; bounded by the deadline
        loaded: list[bool] = []
        start = time.monotonic()
        try:
            slot = self.pool.acquire(req.key, self._loader(adapter_id, req.store_key, req.key, loaded))
        except PoolExhausted:
            raise AdapterBusy() from None
        except UnknownAdapter:
            raise
        except Exception as e:  # a corrupt file, a misfit for the pool, an I/O error, out of memory, ...
            why = "; ".join(e.problems) if isinstance(e, AdapterFormatError) else f"{type(e).__name__}: {e}"
            if transient(e):
                self._retry_later(adapter_id, req.key, e, why)
            self.failed[req.key] = why
            while len(self.failed) > self.MAX_FAILED:
                self.failed.popitem(last=False)
            raise AdapterLoadFailed(f"adapter {adapter_id!r} failed to load: {why}", param="model") from None
        self._retries.pop(req.key, None)
        if cold and self.metrics is not None:  # made resident now: from the store (disk) or the CPU tier
            source = "disk" if loaded else "cpu"
            self.metrics.adapter_load_duration.labels(source=source).observe(time.monotonic() - start)
        return slot

    def _retry_later(self, adapter_id: str | None, key: str, e: BaseException, why: str) -> None:
        """A transient failure: wait in place (AdapterLoading) and try again after a back-off, at most
        len(RETRY_BACKOFF_S) times, then 503. Out of memory first frees what the pool can give back."""
        attempts = self._retries.get(key, (0, 0.0))[0] + 1
        if out_of_memory(e):
            freed = self.pool.free_memory()
            log.warning("out of memory loading adapter %r: dropped %d bytes of the CPU tier", adapter_id, freed)
        if attempts > len(RETRY_BACKOFF_S):
            self._retries.pop(key, None)
            raise Unavailable(f"adapter {adapter_id!r} could not be loaded after {attempts} attempts ({why}); "
                              "retry later", param="model", retry_after=5.0) from None
        self._retries[key] = (attempts, time.monotonic() + RETRY_BACKOFF_S[attempts - 1])
        log.warning("adapter %r failed to load (attempt %d, retrying in %.2f s): %s", adapter_id, attempts,
                    RETRY_BACKOFF_S[attempts - 1], why)
        raise AdapterLoading() from None

    def forget(self, digest: str) -> None:
        """A delete or a re-upload of this version: forget why it failed, so the next request tries again."""
        self.failed.pop(digest, None)
        self._retries.pop(digest, None)

    def release(self, req: Claim) -> None:
        if req.key is not None:
            self.pool.release(req.key)

    def _loader(self, adapter_id: str, store_key: str | None, digest: str,
                loaded: list[bool]) -> Callable[[], CompiledAdapter]:
        def load() -> CompiledAdapter:
            ok = False
            try:
                adapter = self._load_version(adapter_id, store_key or adapter_id, digest)
                ok = True
                loaded.append(True)
                return adapter
            finally:
                if self.metrics is not None:
                    self.metrics.adapter_loads.labels(result="ok" if ok else "error").inc()

        return load

    def _load_version(self, adapter_id: str, store_key: str, digest: str) -> CompiledAdapter:
        """Exactly the version captured at submit (validated against the base), read by its storage key (the
        caller's namespace), or 404 if it is gone. Messages name the plain id."""
        try:
            return self.store.load(store_key, base=self.base, digest=digest)
        except Exception as e:
            if getattr(e, "http_status", None) != 404:
                raise
        try:
            current = self.store.get(store_key).digest
        except Exception:
            current = None
        if current == digest:  # the record still names this version, so the bytes on disk are damaged
            raise AdapterFormatError(f"the stored file of {adapter_id!r} no longer matches its digest {digest[:12]}")
        raise UnknownAdapter(f"adapter {adapter_id!r} was deleted or replaced by another version", param="model")

    def publish(self) -> None:
        """Copy the pool's counters and gauges into the metrics (counters by their increase)."""
        if self.metrics is None:
            return
        stats = self.pool.stats
        m = self.metrics
        for name, counter in (("hits", m.cache_hits), ("misses", m.cache_misses), ("evictions", m.evictions)):
            for tier, value in getattr(stats, name).items():
                last = self._published.get((name, tier), 0.0)
                if value > last:
                    counter.labels(tier=tier).inc(value - last)
                    self._published[(name, tier)] = value
        m.pool_gauges(stats.resident, stats.resident_bytes, stats.capacity_bytes)
