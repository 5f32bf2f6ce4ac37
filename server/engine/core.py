"""The engine: the resident base model, stepped in its own thread; the HTTP layer's only door to it.

``submit_generate`` and ``classify`` are called from the asyncio loop. They validate (adapter exists and
is the caller's, task, context length, sampling parameters), capture the adapter's version (its digest),
and queue the work; they never wait on the model. The engine thread loops: reap cancellations and
deadlines, run pending classifications as one batch, then one generate step (scheduler -> runner ->
sampler), and delivers events back to each caller's loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque

import torch

from adapters_store.basemodels import BaseModel, keep_pristine
from server.common.config import EngineConfig
from server.common.errors import (
    DeadlineExceeded,
    InvalidParameter,
    QueueFull,
    RequestFailed,
    ServingError,
    TaskMismatch,
    Unavailable,
)
from server.common.machine import host_share_bytes
from server.common.metrics import Metrics
from server.engine.classify import ClassifyStep, check_rows
from server.engine.guided import Guides
from server.engine.isolation import forward_isolating, sample_isolating
from server.engine.logprobs import take_prompt_logprobs
from server.engine.output import OutputState, eos_ids
from server.engine.request import ClassifyJob, EventSink, GenerateParams, GenRequest, RequestHandle
from server.engine.sampler import RowSampling, make_generator
from server.engine.scheduler import Request, Scheduler
from server.engine.tokens import TokenState
from server.lora.merge_policy import MergePolicy
from server.lora.pool import AdapterPool, make_pool
from server.lora.residency import AdapterResidency
from server.model.device import resolve_device
from server.model.kvcache import NoKVCache, PagedKVCache, kv_budget_bytes
from server.model.runner import Chunk, ModelRunner

log = logging.getLogger("rankserve.engine")


class Engine:
    def __init__(self, base: BaseModel, store, config: EngineConfig | None = None,
                 metrics: Metrics | None = None, pool: AdapterPool | None = None):
        self.base = base
        self.store = store
        self.config = cfg = config or EngineConfig()
        self.metrics = metrics
        self.device, self.dtype = resolve_device(cfg)
        keep_pristine(base, strict=False)  # fp32 host W0 for DoRA magnitudes at upload, before any cast or merge
        base.model.to(device=self.device, dtype=self.dtype)
        self.tokenizer = base.tokenizer
        self.max_model_len = min(cfg.max_model_len, base.max_positions)
        self.pool = pool if pool is not None else make_pool(base, self.device, self.dtype, cfg.max_slots,
                                                            cfg.max_rank, cfg.cpu_cache_bytes or host_share_bytes())
        self._wake = threading.Event()
        self.residency = AdapterResidency(self.pool, store, base, metrics, prefetch=cfg.async_adapter_loads,
                                          on_loaded=self._wake.set, loader_processes=cfg.loader_processes)
        self.merging = MergePolicy(self.pool, cfg.merge_single_adapter, metrics=metrics)
        self.cache = self.runner = None
        kv: PagedKVCache | NoKVCache = NoKVCache()  # encoder bases generate nothing
        if base.is_decoder:  # sized after the weights and adapter slots are in place
            budget = cfg.kv_cache_bytes or kv_budget_bytes(self.device, cfg.gpu_memory_utilization)
            self.cache = kv = PagedKVCache.for_model(base.model.config, budget, cfg.kv_block_size,
                                                     cfg.max_running, self.max_model_len, self.dtype, self.device)
            self.runner = ModelRunner(base.model, self.cache, self.pool.step, attention=cfg.attention)
        self.scheduler = Scheduler(self.residency, kv, cfg.max_batch_tokens, cfg.max_running, cfg.max_queue,
                                   cfg.slot_wait_s)
        self.classifier = ClassifyStep(base.model, base.is_decoder, self.tokenizer.pad_token_id or 0, self.pool,
                                       self.scheduler.admission, max(cfg.max_batch_tokens, self.max_model_len),
                                       before_run=self.merging.unmerge)
        self._eos = eos_ids(base)
        self._eos_tensor = torch.tensor(sorted(self._eos), dtype=torch.long)
        self.guides = Guides(self.tokenizer, int(base.model.config.vocab_size), self._eos)  # structured output
        self._gen = torch.Generator().manual_seed(cfg.seed)
        self._gen_lock = threading.Lock()
        self._ids = itertools.count()
        self._cancels: deque[GenRequest] = deque()
        self._forgets: deque[str] = deque()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._draining = False
        self._error: BaseException | None = None
        self._busy_since: float | None = None

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="rankserve-engine", daemon=True)
        self._thread.start()
        self.residency.start_processes()  # the loader processes import torch meanwhile (seconds)

    def drain(self, timeout: float) -> bool:
        """Stop admitting (new submits get Unavailable); True once everything in flight has finished."""
        self._draining = True
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._idle() or not self.healthy:
                break
            time.sleep(0.01)
        return self._idle()

    def shutdown(self) -> None:
        self._draining = True
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30 if self.healthy else 1)  # a hung step may never return
        self.residency.close()

    @property
    def healthy(self) -> bool:
        return self.failure is None

    @property
    def failure(self) -> str | None:
        """Why the engine is unhealthy, in words; None while it is healthy."""
        if self._error is not None:
            return f"the engine failed: {type(self._error).__name__}: {self._error}"
        if self._thread is not None and not self._thread.is_alive() and not self._stop:
            return "the engine thread stopped"
        busy = self._busy_since
        if busy is not None and time.monotonic() - busy >= self.config.hang_timeout_s:
            return f"one engine step has run for {time.monotonic() - busy:.0f} s (hang timeout {self.config.hang_timeout_s:g} s)"
        return None

    def abandon(self, err: ServingError) -> int:
        """Give every request still in the engine its last event (an error), from any thread, without touching
        the scheduler: for a hung engine thread that will never do it, just before the process exits. Returns
        how many generate requests were told."""
        told = 0
        for req in list(self.scheduler.running) + self.scheduler.waiting():
            if not req.done:
                req.done = True
                req.handle.push(req.event(reason="error", error=err))
                told += 1
        self.classifier.fail_all(err)
        return told

    @property
    def ready(self) -> bool:
        return self._thread is not None and not self._draining and not self._stop and self.healthy

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting + len(self.classifier.jobs)

    # ---- submit (any thread, typically the asyncio loop) ------------------------------------------
    def check_capacity(self) -> None:
        """Raise Unavailable (draining, dead) or QueueFull before the caller tokenises anything."""
        if not self.ready:
            why = "draining" if self._draining else ("not started" if self._thread is None else "unhealthy")
            raise Unavailable(f"the engine is {why}", retry_after=5.0)
        self.scheduler.check_capacity()

    def submit_generate(self, params: GenerateParams) -> RequestHandle:
        return self.submit_many([params])[0]

    def submit_many(self, batch: list[GenerateParams]) -> list[RequestHandle]:
        """Queue several requests (an OpenAI request's prompts x choices) all or none: every one is
        validated, and the queue must hold them all (else 429), before any is queued."""
        self.check_capacity()
        if not self.base.is_decoder:
            raise TaskMismatch(f"base model {self.base.name!r} is an encoder: it classifies, it does not generate",
                               param="model")
        if len(batch) > self.config.max_queue:
            raise InvalidParameter(f"the request needs {len(batch)} sequences; this server queues at most "
                                   f"{self.config.max_queue}", param="n")
        reqs = [self._request(p) for p in batch]
        self.scheduler.add_all(reqs)
        if self.metrics is not None:
            self.metrics.waiting.set(self.num_waiting)
        self._wake.set()
        return [r.handle for r in reqs]  # type: ignore[misc]

    def _request(self, params: GenerateParams) -> GenRequest:
        store_key, record = self.residency.lookup(params.adapter_id, params.owner, "generate") or (None, None)
        sp = params.checked(int(self.base.model.config.vocab_size), self.max_model_len)
        rid = params.request_id or f"gen-{next(self._ids)}"
        now = time.monotonic()
        deadline = params.deadline if params.deadline is not None else now + self.config.request_timeout_s
        handle = RequestHandle(rid, EventSink.for_caller(), self.cancel)
        tokens = TokenState(list(params.prompt_ids))
        guide = self.guides.start(params.guide) if params.guide is not None else None
        req = GenRequest(request_id=rid, key=record.digest if record else None, tokens=tokens,
                         max_tokens=params.max_tokens, adapter_id=params.adapter_id, arrival=now, deadline=deadline,
                         handle=handle, out=OutputState(sp, self.tokenizer, tokens, self._eos, guide),
                         rows=RowSampling(sp, self._generator(sp.seed), tokens, guide=guide),
                         store_key=store_key,
                         prompt_logprobs=None if sp.prompt_logprobs is None else [None])
        handle._req = req
        return req

    async def classify(self, adapter_id: str, rows: list[list[int]], owner: str | None = None
                       ) -> list[tuple[str, dict[str, float]]]:
        """Label each input, given as token ids (``engine.classify.encode``, off the engine thread)."""
        self.check_capacity()
        if len(self.classifier.jobs) >= self.config.max_queue:
            raise QueueFull(f"the classification queue is full ({self.config.max_queue} calls); retry later",
                            retry_after=self.scheduler.retry_after())
        if adapter_id is None:
            raise TaskMismatch("classification needs a classify adapter (it carries the head)", param="model")
        store_key, record = self.residency.lookup(adapter_id, owner, "classify")
        check_rows(rows, self.max_model_len, int(self.base.model.config.vocab_size))
        job = ClassifyJob.create(adapter_id, record.digest, [list(r) for r in rows], self.config.request_timeout_s,
                                 store_key)
        self.classifier.jobs.append(job)
        self._wake.set()
        return await job.wait()

    def _generator(self, seed: int | None) -> torch.Generator:
        with self._gen_lock:  # several submitting threads may draw unseeded requests' seeds at once
            return make_generator(seed, self._gen)

    def forget_adapter(self, digest: str) -> None:
        """After a delete: drop that version from the pool's tiers once no running request pins it
        (any thread; done on the engine thread), and forget any load failure of it. Running requests finish
        with the version they pinned."""
        self.residency.forget(digest)
        self._forgets.append(digest)
        self._wake.set()

    def adapter_published(self, digest: str) -> None:
        """After an upload (any thread): a version that failed to load before (the same bytes, re-uploaded
        over a damaged file) is tried again."""
        self.residency.forget(digest)

    def cancel(self, req: GenRequest) -> None:
        """Called by RequestHandle.cancel (any thread): the engine frees it within one step."""
        self._cancels.append(req)
        self._wake.set()

    # ---- the engine thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop:
                self._wake.clear()
                self._busy_since = time.monotonic()  # a step stuck past hang_timeout_s marks us unhealthy
                try:
                    worked = self._iteration()
                finally:
                    self._busy_since = None
                if not worked:
                    self._wake.wait(0.05)
        except BaseException as e:  # the engine is dead: health says so, every caller gets an error
            self._error = e
            log.exception("engine thread failed; health now reports unhealthy")
        finally:
            self._fail_everything(Unavailable("the engine stopped" if self._error is None else
                                              f"the engine failed: {type(self._error).__name__}: {self._error}"))

    def _iteration(self) -> bool:
        self._reap()
        worked = self.classifier.run_pending()
        batch = self.scheduler.schedule()
        for req in batch.preempted:
            log.info("request %s preempted (KV cache full); it will recompute %d tokens", req.request_id,
                     req.num_tokens)
        for req, err in batch.failed:
            self._finish(req, "error", err)  # type: ignore[arg-type]
        if batch.chunks:
            self._step(batch.chunks)
            worked = True
        self._gauges()
        return worked

    def _step(self, chunks: list[tuple[Request, int]]) -> None:
        reqs: list[GenRequest] = [r for r, _ in chunks]  # type: ignore[misc]
        self.merging.before_step(r.key for r in self.scheduler.running)
        run = [Chunk(r.seq, r.tokens.ids[r.num_computed:r.num_computed + n], r.num_computed, r.adapter_slot,
                     r.wants_prompt_logits) for r, n in chunks]
        logits = forward_isolating(self.runner.forward, run)  # type: ignore[union-attr]
        m = self.metrics
        if m is not None:
            m.batch_size.observe(len(chunks))
            m.batch_distinct_adapters.observe(len({r.key for r in reqs if r.key is not None}))
        ready: list[tuple[GenRequest, torch.Tensor]] = []
        for (r, n), c, lg in zip(chunks, run, logits, strict=True):
            num_prompt = r.tokens.num_prompt
            if c.all_logits and not isinstance(lg, Exception):  # prompt logprobs, then the last position's logits
                lg = take_prompt_logprobs(r.prompt_logprobs, r.tokens.ids, num_prompt, c.start, lg,  # type: ignore[attr-defined]
                                          r.rows.params.prompt_logprobs)  # type: ignore[attr-defined]
            if isinstance(lg, Exception):
                self._fail_alone(r, "forward", lg)  # type: ignore[arg-type]
                continue
            if r.num_computed < num_prompt and m is not None and not r.preemptions:
                if r.num_computed == 0 and r.scheduled_at is not None:
                    m.queue_time.observe(r.scheduled_at - r.arrival)
                m.prompt_tokens.inc(min(n, num_prompt - r.num_computed))
            r.num_computed += n
            if r.num_computed == r.num_tokens and r.max_tokens == 0:  # scoring only: prompt logprobs, no token
                self._finish(r, "length", None)  # type: ignore[arg-type]
            elif r.num_computed == r.num_tokens:
                ready.append((r, lg))  # type: ignore[arg-type]
        if not ready:
            return
        tokens, lps = sample_isolating(torch.stack([lg for _, lg in ready]), [r.rows for r, _ in ready],
                                       self._eos_tensor)
        now = time.monotonic()
        for i, ((r, _), tok) in enumerate(zip(ready, tokens, strict=True)):
            if isinstance(tok, Exception):
                self._fail_alone(r, "sampling", tok)
                continue
            try:
                delta, reason = r.out.append(tok)  # the one write of a generated id (into r.tokens)
            except Exception as e:
                self._fail_alone(r, "detokenisation", e)
                continue
            r.observe_token(now, m)
            lp = [lps[i]] if lps is not None and lps[i] is not None else None
            if reason is not None:
                self._finish(r, reason, None, delta, [tok], lp)
            else:
                r.handle.push(r.event(delta, [tok], logprobs=lp))

    def _fail_alone(self, req: GenRequest, stage: str, err: Exception) -> None:
        """A fault in this request's own work: it fails, everything else goes on (RELIABILITY row 36)."""
        log.error("request %s failed in %s: %s: %s", req.request_id, stage, type(err).__name__, err)
        self._finish(req, "error", RequestFailed(f"request {req.request_id} failed in {stage}: "
                                                 f"{type(err).__name__}: {err}"))

    def _reap(self) -> None:
        """Cancelled requests leave (within one step of cancel()); expired deadlines fail with 504."""
        while self._cancels:
            req = self._cancels.popleft()
            if not req.done:
                self._finish(req, "abort", None)
        while self._forgets:
            self.pool.forget(self._forgets.popleft())
        now = time.monotonic()
        for req in list(self.scheduler.running) + self.scheduler.waiting():
            if req.deadline is not None and now > req.deadline and not req.done:  # type: ignore[attr-defined]
                self._finish(req, "error", DeadlineExceeded(  # type: ignore[arg-type]
                    f"request {req.request_id} exceeded its deadline"))
        self.classifier.reap(now)

    def _finish(self, req: GenRequest, reason: str, error: ServingError | None, delta: str = "",
                token_ids: list[int] | None = None, logprobs: list | None = None) -> None:
        """The one exit of a request: resources released (try/finally), then its last event."""
        if req.done:
            return
        req.done = True
        try:
            if not self.scheduler.remove_waiting(req):
                self.scheduler.finish(req)
        finally:
            m = self.metrics
            if m is not None:
                if reason == "abort" or isinstance(error, DeadlineExceeded):
                    m.cancelled.inc()
                m.request_prompt_tokens.observe(req.tokens.num_prompt)
                m.request_generation_tokens.observe(req.tokens.num_generated)
            req.handle.push(req.event(delta, token_ids, reason, error, logprobs))
            self._gauges()

    def _fail_everything(self, err: ServingError) -> None:
        for req in list(self.scheduler.running) + self.scheduler.waiting():
            try:
                self._finish(req, "error", err)  # type: ignore[arg-type]
            except Exception:  # a dead engine must still answer every caller
                pass
        self.classifier.fail_all(err)

    def _idle(self) -> bool:
        return self.scheduler.num_running == 0 and self.num_waiting == 0 and not self.classifier.busy

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.running.set(self.scheduler.num_running)
            self.metrics.waiting.set(self.num_waiting)
            self.residency.publish()
