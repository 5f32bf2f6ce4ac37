"""Every Prometheus metric of the server, in one place (RELIABILITY.md, "Metrics").

One prefix (``rankserve_``), base units as suffixes, counters end in ``_total``, and NEVER an adapter-id
label: uploads make its cardinality unbounded. Latency buckets follow vLLM's (about 1 ms to 60 s), not
the client default. One registry per process (one uvicorn worker per device, as vLLM does); a
``Metrics`` object owns its registry so tests can build several servers in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
               0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TIERS = ("gpu", "cpu")  # adapter residency tiers (the pool), as metric labels; "gpu" even on CPU


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, version: str = "0.1.0", model: str = ""):
        r = self.registry = registry or CollectorRegistry()
        p = "rankserve_"
        self.requests = Counter(p + "requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.rejected = Counter(p + "requests_rejected_total", "Requests refused before running, by reason", ["reason"], registry=r)
        self.cancelled = Counter(p + "requests_cancelled_total", "Requests aborted (client gone, deadline, drain)", registry=r)
        self.request_duration = Histogram(p + "request_duration_seconds", "End-to-end request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to first generated token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between generated tokens", buckets=ITL_BUCKETS, registry=r)
        self.queue_time = Histogram(p + "request_queue_time_seconds", "Time from arrival to first scheduled step", buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens_total", "Tokens generated", registry=r)
        self.request_prompt_tokens = Histogram(p + "request_prompt_tokens", "Prompt length per request", buckets=TOKEN_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram(p + "request_generation_tokens", "Generated length per request", buckets=TOKEN_BUCKETS, registry=r)
        self.running = Gauge(p + "num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Requests waiting in the queue", registry=r)
        self.batch_size = Histogram(p + "batch_size", "Sequences per engine step", buckets=BATCH_BUCKETS, registry=r)
        self.batch_distinct_adapters = Histogram(p + "batch_distinct_adapters", "Distinct adapters per engine step", buckets=BATCH_BUCKETS, registry=r)
        self.cache_hits = Counter(p + "adapter_cache_hits_total", "Adapter residency hits by tier", ["tier"], registry=r)
        self.cache_misses = Counter(p + "adapter_cache_misses_total", "Adapter residency misses by tier", ["tier"], registry=r)
        self.evictions = Counter(p + "adapter_evictions_total", "Adapters evicted by tier", ["tier"], registry=r)
        self.adapter_loads = Counter(p + "adapter_loads_total", "Adapter loads by result", ["result"], registry=r)
        self.adapter_load_duration = Histogram(p + "adapter_load_duration_seconds", "Adapter load time: disk = read and validate from the store, cpu = copy from the CPU tier into a device slot", ["source"], buckets=LATENCY_BUCKETS, registry=r)
        self.adapters_resident = Gauge(p + "adapters_resident", "Resident adapters by tier", ["tier"], registry=r)
        self.adapter_resident_bytes = Gauge(p + "adapter_resident_bytes", "Bytes of resident adapters by tier", ["tier"], registry=r)
        self.adapter_capacity_bytes = Gauge(p + "adapter_capacity_bytes", "Adapter capacity in bytes by tier", ["tier"], registry=r)
        self.adapter_merges = Counter(p + "adapter_merges_total", "Single-adapter runs folded into the base weights (merge mode)", registry=r)
        self.adapter_uploads = Counter(p + "adapter_uploads_total", "Adapter uploads by result", ["result"], registry=r)
        # by kind only: a tenant label would make its cardinality grow with the tenants
        self.adapter_quota_rejections = Counter(p + "adapter_quota_rejections_total", "Tenant uploads refused by a quota (count or bytes)", ["kind"], registry=r)
        self.build_info = Gauge(p + "build_info", "Build information (always 1)", ["version", "model"], registry=r)
        self.build_info.labels(version=version, model=model).set(1)
        for tier in TIERS:  # expose zero-valued series from the start so dashboards and rate() work at once
            for m in (self.cache_hits, self.cache_misses, self.evictions):
                m.labels(tier=tier)
        for kind in ("count", "bytes"):
            self.adapter_quota_rejections.labels(kind=kind)

    def pool_gauges(self, resident: dict[str, int], resident_bytes: dict[str, int], capacity_bytes: dict[str, int]) -> None:
        for tier in TIERS:
            self.adapters_resident.labels(tier=tier).set(resident.get(tier, 0))
            self.adapter_resident_bytes.labels(tier=tier).set(resident_bytes.get(tier, 0))
            self.adapter_capacity_bytes.labels(tier=tier).set(capacity_bytes.get(tier, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
