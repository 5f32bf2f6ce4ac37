"""Adapter residency for admission (``server.engine.admission``): store -> pool (CPU LRU -> device slot), pinned while in use.

The request captured its adapter's digest (the version) at submit; the loader given to the pool loads
exactly that version or fails with 404 when the adapter was deleted or replaced meanwhile, so no request
ever mixes two versions. A version that failed to load is remembered, and later requests for it fail at
submit instead of queueing for a load that cannot succeed.

Loads from the store run on loader threads, not on the engine thread (as S-LoRA and LoRAX do): at submit,
``prefetch`` starts reading and validating a version that is neither resident nor in the CPU tier; while
that runs, ``acquire`` answers ``AdapterLoading`` (an ``AdapterBusy``), so the request keeps its place and everything else keeps
stepping; the finished load lands in the CPU tier and wakes the engine, whose acquire then only copies it
into a slot. A load that fails on a loader thread is retried once on the engine thread, which owns the
one failure path (the 424 and the remembered failure). ``prefetch=False`` loads on the engine thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from adapters_store.basemodels import BaseModel
from adapters_store.format import AdapterFormatError, CompiledAdapter
from server.common.errors import AdapterLoadFailed, UnknownAdapter
from server.common.metrics import Metrics
from server.lora.pool import AdapterPool, PoolExhausted

log = logging.getLogger("rankserve.residency")


class AdapterBusy(Exception):
    """No device slot can take the adapter right now (all pinned); try again at a later step."""


class AdapterLoading(AdapterBusy):
    """The adapter is being read from the store on a loader thread; try again at a later step. This wait is
    bounded by the request's deadline, not by the slot wait."""


class Claim(Protocol):
    """What residency reads of a request or classify job: the adapter version it captured at submit."""

    adapter_id: str | None
    key: str | None  # the adapter's digest; None = the base model


class Residency(Protocol):
    def acquire(self, req: Claim) -> int: ...  # device slot (-1 = base); raises AdapterBusy or ServingError
    def release(self, req: Claim) -> None: ...


class AdapterResidency:
    MAX_FAILED = 1024

    def __init__(self, pool: AdapterPool, store, base: BaseModel, metrics: Metrics | None,
                 prefetch: bool = True, loader_threads: int = 2, on_loaded: Callable[[], None] | None = None):
        self.pool = pool
        self.base = base
        self.store = store
        self.metrics = metrics
        self.failed: OrderedDict[str, str] = OrderedDict()  # digest -> why it could not load
        self._published: dict[tuple[str, str], float] = {}
        self.on_loaded = on_loaded  # the engine's wake-up
        self._loads: dict[str, Future] = {}  # digest -> its load running on a loader thread
        self._loads_lock = threading.Lock()
        self._executor = (ThreadPoolExecutor(loader_threads, thread_name_prefix="rankserve-adapter-load")
                          if prefetch else None)

    def prefetch(self, adapter_id: str, digest: str) -> None:
        """Any thread (submit): start loading this version on a loader thread unless it is resident, in the
        CPU tier, already loading, or known to fail."""
        if self._executor is None or digest in self.failed or self.pool.cached(digest):
            return
        with self._loads_lock:
            if digest in self._loads:
                return
            self._loads[digest] = self._executor.submit(self._fetch, adapter_id, digest)

    def loading(self, digest: str) -> bool:
        with self._loads_lock:
            return digest in self._loads

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _fetch(self, adapter_id: str, digest: str) -> None:
        start = time.monotonic()
        try:
            adapter = self._loader(adapter_id, digest, [])()
            self.pool.put_cpu(digest, adapter)
            if self.metrics is not None:
                self.metrics.adapter_load_duration.labels(source="disk").observe(time.monotonic() - start)
        except Exception as e:  # the engine thread loads it again and reports the failure its usual way
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
        loaded: list[bool] = []
        start = time.monotonic()
        try:
            slot = self.pool.acquire(req.key, self._loader(adapter_id, req.key, loaded))
        except PoolExhausted:
            raise AdapterBusy() from None
        except UnknownAdapter:
            raise
        except Exception as e:  # a corrupt file, a misfit for the pool, CUDA OOM after the pool's retry, ...
            why = "; ".join(e.problems) if isinstance(e, AdapterFormatError) else f"{type(e).__name__}: {e}"
            self.failed[req.key] = why
            while len(self.failed) > self.MAX_FAILED:
                self.failed.popitem(last=False)
            raise AdapterLoadFailed(f"adapter {adapter_id!r} failed to load: {why}", param="model") from None
        if cold and self.metrics is not None:  # made resident now: from the store (disk) or the CPU tier
            source = "disk" if loaded else "cpu"
            self.metrics.adapter_load_duration.labels(source=source).observe(time.monotonic() - start)
        return slot

    def release(self, req: Claim) -> None:
        if req.key is not None:
            self.pool.release(req.key)

    def _loader(self, adapter_id: str, digest: str, loaded: list[bool]) -> Callable[[], CompiledAdapter]:
        def load() -> CompiledAdapter:
            ok = False
            try:
                adapter = self._load_version(adapter_id, digest)
                ok = True
                loaded.append(True)
                return adapter
            finally:
                if self.metrics is not None:
                    self.metrics.adapter_loads.labels(result="ok" if ok else "error").inc()

        return load

    def _load_version(self, adapter_id: str, digest: str) -> CompiledAdapter:
        """Exactly the version captured at submit (validated against the base), or 404 if it is gone."""
        try:
            return self.store.load(adapter_id, base=self.base, digest=digest)
        except Exception as e:
            if getattr(e, "http_status", None) != 404:
                raise
        try:
            current = self.store.get(adapter_id).digest
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
