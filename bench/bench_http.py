"""What the HTTP layer costs: the same greedy requests through the engine directly (in-process, asyncio)
and through the real server (`python -m server.cli serve`, uvicorn, httpx keep-alive), one run.

    RANKSERVE_CACHE=.cache HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_http.py --model tiny-llama
    RANKSERVE_CACHE=.cache HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_http.py --model smollm2

Reported, each both ways: sequential latency p50 of a 1-token request (the fixed per-request cost), of
a 32-token request, the p50 gap between streamed tokens (SSE chunks vs engine events), and generated
tokens/s for --concurrency simultaneous 32-token requests. One adapter (synthetic LoRA r=8) is used. The
two sides alternate for --rounds rounds and each figure's best round is kept (the machine is shared).
The HTTP figures include the client (httpx, same machine).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does (server/cli.py says why)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from adapters_store.basemodels import load_base  # noqa: E402
from adapters_store.store import AdapterStore  # noqa: E402
from adapters_store.synth import random_adapter  # noqa: E402
from server.engine import Engine, EngineConfig, GenerateParams  # noqa: E402
from tests.util_server import LiveServer  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog. " * 4


def p50(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


async def engine_side(engine: Engine, ids: list[int], n_seq: int, conc: int) -> dict:
    async def one(n: int, gaps: list[float] | None = None) -> int:
        h = engine.submit_generate(GenerateParams(ids, "bench", max_tokens=n, temperature=0, ignore_eos=True))
        last, count = time.perf_counter(), 0
        async for ev in h.events():
            now = time.perf_counter()
            if gaps is not None and count:
                gaps.append(now - last)
            last, count = now, count + len(ev.token_ids)
        return count

    out: dict = {}
    for n, key in ((1, "lat1"), (32, "lat32")):
        xs = []
        for _ in range(n_seq):
            t = time.perf_counter()
            await one(n)
            xs.append(time.perf_counter() - t)
        out[key] = p50(xs)
    gaps: list[float] = []
    for _ in range(5):
        await one(32, gaps)
    out["gap"] = p50(gaps)
    t = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(32) for _ in range(conc))))
    out["tok_s"] = tokens / (time.perf_counter() - t)
    return out


def http_side(url: str, n_seq: int, conc: int) -> dict:
    body = {"model": "bench", "prompt": PROMPT, "temperature": 0, "ignore_eos": True}
    out: dict = {}
    with httpx.Client(base_url=url, timeout=120) as c:
        for n, key in ((1, "lat1"), (32, "lat32")):
            xs = []
            for _ in range(n_seq):
                t = time.perf_counter()
                assert c.post("/v1/completions", json=body | {"max_tokens": n}).status_code == 200
                xs.append(time.perf_counter() - t)
            out[key] = p50(xs)
        gaps: list[float] = []
        for _ in range(5):
            with c.stream("POST", "/v1/completions", json=body | {"max_tokens": 32, "stream": True}) as r:
                last = None
                for line in r.iter_lines():
                    now = time.perf_counter()
                    if line.startswith("data: {") and last is not None:
                        gaps.append(now - last)
                    if line.startswith("data: {"):
                        last = now
        out["gap"] = p50(gaps)

    async def concurrent() -> int:
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=conc)) as ac:
            rs = await asyncio.gather(*(ac.post("/v1/completions", json=body | {"max_tokens": 32}) for _ in range(conc)))
        return sum(r.json()["usage"]["completion_tokens"] for r in rs)

    t = time.perf_counter()
    tokens = asyncio.run(concurrent())
    out["tok_s"] = tokens / (time.perf_counter() - t)
    return out


def best(runs: list[dict]) -> dict:
    """The machine is shared: keep each figure's best round (lowest latency, highest throughput)."""
    return {k: (max if k == "tok_s" else min)(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--requests", type=int, default=30, help="sequential requests per latency figure")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="engine and HTTP alternate this many times")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    base = load_base(args.model)
    AdapterStore(tmp / "store").put("bench", random_adapter(base, "lora", 8, seed=0).to_bytes(), base=base)
    ids = list(base.tokenizer(PROMPT)["input_ids"])
    engine = Engine(base, AdapterStore(tmp / "store"), EngineConfig(max_running=args.concurrency))
    engine.start()
    direct, http = [], []
    with LiveServer(tmp, args.model, "--max-running", str(args.concurrency), store=tmp / "store") as srv:
        for _ in range(args.rounds):  # alternate, so a busy spell of the shared machine hits both sides
            direct.append(asyncio.run(engine_side(engine, ids, args.requests, args.concurrency)))
            http.append(http_side(srv.url, args.requests, args.concurrency))
    engine.shutdown()
    d, h = best(direct), best(http)
    print(f"model {args.model}, prompt {len(ids)} tokens, {args.requests} sequential requests per latency, "
          f"concurrency {args.concurrency}, best of {args.rounds} alternating rounds")
    print(f"{'figure':<44}{'engine':>10}{'HTTP':>10}{'HTTP - engine':>15}")
    for key, label in (("lat1", "1-token request latency p50, ms"), ("lat32", "32-token request latency p50, ms"),
                       ("gap", "gap between streamed tokens p50, ms"), ("tok_s", f"tokens/s, {args.concurrency} concurrent")):
        print(f"{label:<44}{d[key]:>10.2f}{h[key]:>10.2f}{h[key] - d[key]:>15.2f}")


if __name__ == "__main__":
    main()
