"""What the HTTP layer holds: settings, keys, metrics, and the runtime (base model, store, engine) that a
background thread loads after the server is already answering probes (so /ready says 503 while loading).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from adapters_store.basemodels import BaseModel, load_base
from adapters_store.locations import open_store as open_location
from adapters_store.store import AdapterStore
from adapters_store.validate import Limits
from server.common.auth import FailedKeyLimiter, KeyRing, RateLimiter
from server.common.config import Settings
from server.common.errors import Unavailable
from server.common.logs import event
from server.common.metrics import Metrics
from server.demo import ensure_demo_adapters
from server.engine import Engine


@dataclass
class Runtime:
    base: BaseModel
    store: AdapterStore
    engine: Engine
    tokenizer: Any = None  # the HTTP side's own copy: its encodes never contend with the engine thread's

    def __post_init__(self) -> None:
        if self.tokenizer is None:
            self.tokenizer = copy.deepcopy(self.base.tokenizer)


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics
    keys: KeyRing
    limiter: RateLimiter
    bad_keys: FailedKeyLimiter
    runtime: Runtime | None = None
    load_error: str | None = None
    draining: bool = False
    inflight: int = 0  # non-probe HTTP requests being served (the drain waits for 0)
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def create(cls, settings: Settings, metrics: Metrics | None = None, runtime: Runtime | None = None) -> ServerState:
        return cls(settings=settings, metrics=metrics or Metrics(model=settings.base_name),
                   keys=KeyRing(settings.api_keys, settings.admin_keys),
                   limiter=RateLimiter(settings.rate_limit, settings.rate_burst),
                   bad_keys=FailedKeyLimiter(settings.bad_key_rate, settings.bad_key_burst), runtime=runtime)

    def require(self) -> Runtime:
        """The loaded runtime, or 503 while loading / after a failed load / while draining."""
        if self.draining:
            raise Unavailable("the server is draining (shutting down)", retry_after=5)
        if self.runtime is None:
            why = f"failed to load: {self.load_error}" if self.load_error else "still loading the base model"
            raise Unavailable(f"the server is {why}", retry_after=5)
        return self.runtime

    @property
    def healthy(self) -> bool:
        return self.load_error is None and (self.runtime is None or self.runtime.engine.healthy)

    @property
    def failure(self) -> str | None:
        """Why /health says 503, in words; None while healthy."""
        if self.load_error is not None:
            return f"failed to load: {self.load_error}"
        return self.runtime.engine.failure if self.runtime is not None else None

    @property
    def ready(self) -> bool:
        return self.runtime is not None and not self.draining and self.runtime.engine.ready

    def begin_drain(self) -> None:
        """Readiness 503 at once and new requests 503; what is in flight continues."""
        self.draining = True
        if self.runtime is not None:
            self.runtime.engine.drain(0)  # sets the engine's draining flag; does not wait

    def idle(self) -> bool:
        engine = self.runtime.engine if self.runtime is not None else None
        return self.inflight == 0 and (engine is None or (engine.num_running == 0 and engine.num_waiting == 0))

    def wait_drained(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.idle():
                return True
            time.sleep(0.05)
        return self.idle()

    def close(self, stop_engine: bool = True) -> None:
        if stop_engine and self.runtime is not None:
            self.runtime.engine.shutdown()


def open_store(settings: Settings) -> AdapterStore:
    limits = Limits(max_file_bytes=settings.max_upload_bytes, max_rank=settings.max_rank)
    return open_location(settings.store, limits, cache_dir=settings.store_cache or None,
                         cache_bytes=settings.store_cache_bytes)


def load_runtime(settings: Settings, metrics: Metrics) -> Runtime:
    started = time.monotonic()
    base = load_base(settings.model)
    store = open_store(settings)
    if settings.demo_adapters:
        ensure_demo_adapters(store, base)
    records = store.list()
    foreign = sorted(r.id for r in records if r.base_fingerprint != base.fingerprint)
    if foreign:  # kept on disk, not served: they fail validation against this base at load time
        event("adapters for another base model are not served", logging.WARNING, adapters=foreign[:20],
              count=len(foreign))
    if store.broken:
        event("unreadable adapters are not served", logging.WARNING, adapters=sorted(store.broken)[:20])
    engine = Engine(base, store, settings.engine_config(), metrics)
    runtime = Runtime(base, store, engine)  # copies the tokenizer before the engine thread uses it
    engine.start()
    event("runtime loaded", model=settings.model, family=base.family, adapters=len(records) - len(foreign),
          seconds=round(time.monotonic() - started, 2))
    return runtime


def start_loading(state: ServerState, on_failure: Callable[[], None] | None = None) -> threading.Thread:
    """Load in a thread; the server answers probes meanwhile. A failure is logged and marks health 503."""

    def run() -> None:
        try:
            state.runtime = load_runtime(state.settings, state.metrics)
            if state.draining:  # SIGTERM arrived while loading
                state.runtime.engine.drain(0)
        except Exception as e:
            state.load_error = f"{type(e).__name__}: {e}"
            logging.getLogger("rankserve").exception("loading the runtime failed")
            if on_failure is not None:
                on_failure()

    t = threading.Thread(target=run, name="rankserve-loader", daemon=True)
    t.start()
    return t
