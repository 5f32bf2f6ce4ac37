"""Scale-out on Ray Serve with adapters in S3 (SeaweedFS), in one run, side by side:

1. cold adapter loads per 1,000 requests (Zipf over --adapters adapters), routing by adapter id (Ray Serve
   model multiplexing) against no affinity (--routing round-robin: Ray's default router, which picks
   the less loaded of two random replicas, with no adapter key), both on 2 replicas;
2. generated tokens/s of 2 replicas against 1 (adapter routing), same workload.

Each configuration is a fresh `rankserve cluster` (its own Ray) on one bucket holding the adapters, fed by
--concurrency closed-loop clients. Counts come from the cluster's merged /metrics, summed over replicas:
store loads (`rankserve_adapter_loads_total`, an adapter read from the store into a replica's CPU tier)
and slot loads (`rankserve_adapter_cache_misses_total{tier="gpu"}`). Each replica's CPU tier is bounded to
--cpu-adapters adapters (and multiplexing's affinity to the same count), so an adapter that left a
replica's tier costs a new store read there.

    RANKSERVE_CACHE=.cache HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_cluster.py --requests 1000
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters_store.basemodels import load_base  # noqa: E402
from adapters_store.locations import open_store  # noqa: E402
from adapters_store.synth import random_adapter  # noqa: E402
from tests.seaweed import SeaweedFS  # noqa: E402  (the same real S3 server the tests start)
from tests.util_cluster import ClusterProcess  # noqa: E402


def metric_sum(text: str, name: str, label: str = "") -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}(\{{.*\}})? ([0-9.e+-]+)", line)
        if m and label in (m.group(1) or ""):
            total += float(m.group(2))
    return total


def wait_metrics(c: httpx.Client, replicas: int) -> str:
    """/metrics once every replica has pushed a copy that is at least as new as now."""
    time.sleep(2.5)  # replicas push every 2 s
    for _ in range(30):
        text = c.get("/metrics").text
        if len(set(re.findall(r'replica="([^"]+)"', text))) >= replicas:
            return text
        time.sleep(1)
    return text


def run(c: httpx.Client, order: list[int], concurrency: int, max_tokens: int) -> tuple[float, int, dict]:
    """Closed loop: each client takes the next request in ``order``; returns (seconds, tokens, status counts)."""
    lock, nxt, tokens, statuses = threading.Lock(), [0], [0], {}

    def client() -> None:
        while True:
            with lock:
                if nxt[0] >= len(order):
                    return
                i = order[nxt[0]]
                nxt[0] += 1
            r = c.post("/v1/completions", json={"model": f"z{i}", "prompt": [5, 6, 7, 8], "max_tokens": max_tokens,
                                                "temperature": 0, "ignore_eos": True})
            with lock:
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    tokens[0] += r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, tokens[0], statuses


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--adapters", type=int, default=200)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--zipf", type=float, default=1.0, help="exponent s: P(rank k) ~ 1/k^s")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--cpu-adapters", type=int, default=40, help="adapters one replica's CPU tier holds")
    p.add_argument("--out", default=None, help="write the results as JSON here too")
    args = p.parse_args()

    base = load_base("tiny-llama")
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    s3 = SeaweedFS(tmp / "weed")
    import os

    os.environ.update(s3.env)
    s3.start()
    try:
        url = f"s3://{s3.bucket()}/bench"
        store = open_store(url, cache_dir=tmp / "uploader")
        size = 0
        for i in range(args.adapters):
            size = store.put(f"z{i}", random_adapter(base, "lora", 8, seed=i).to_bytes(), base=base).size
        ranks = np.arange(1, args.adapters + 1, dtype=np.float64)
        probs = ranks ** -args.zipf / (ranks ** -args.zipf).sum()
        order = np.random.default_rng(0).choice(args.adapters, size=args.requests, p=probs).tolist()
        warm = list(range(4))  # the base's first steps, not counted
        flags = ["--max-slots", "8", "--cpu-cache-bytes", str(args.cpu_adapters * size),
                 "--adapters-per-replica", str(args.cpu_adapters), "--max-model-len", "128"]
        results = {}
        for name, replicas, routing in (("2 replicas, adapter routing", 2, "adapter"),
                                        ("2 replicas, no affinity", 2, "round-robin"),
                                        ("1 replica", 1, "adapter")):
            cluster = ClusterProcess(tmp, "tiny-llama", url, replicas, "--routing", routing, *flags)
            try:
                cluster.start()
                c = httpx.Client(base_url=cluster.url, timeout=120)
                run(c, warm, 1, 2)
                before = wait_metrics(c, replicas)
                seconds, tokens, statuses = run(c, order, args.concurrency, args.max_tokens)
                after = wait_metrics(c, replicas)
            finally:
                cluster.stop()
            loads = metric_sum(after, "rankserve_adapter_loads_total", 'result="ok"') - \
                metric_sum(before, "rankserve_adapter_loads_total", 'result="ok"')
            slots = metric_sum(after, "rankserve_adapter_cache_misses_total", 'tier="gpu"') - \
                metric_sum(before, "rankserve_adapter_cache_misses_total", 'tier="gpu"')
            results[name] = {"seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
                             "store_loads_per_1000": round(loads * 1000 / args.requests, 1),
                             "slot_loads_per_1000": round(slots * 1000 / args.requests, 1), "statuses": statuses}
            print(name, json.dumps(results[name]), flush=True)
        distinct = len(set(order))
        print(f"adapters: {args.adapters} ({size} bytes each), requests: {args.requests}, distinct adapters "
              f"requested: {distinct}, zipf s={args.zipf}, concurrency {args.concurrency}, "
              f"max_tokens {args.max_tokens}")
        if args.out:
            Path(args.out).write_text(json.dumps({"args": vars(args), "distinct": distinct, "results": results},
                                                 indent=1))
    finally:
        s3.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
