"""The hot-path issue's table in one run: every figure side by side, in-process through the engine, each
beside its floor (DESIGN.md section 7), on random Llama weights (speed only, never quality).

    RANKSERVE_CACHE=.cache .venv/bin/python bench/bench_hotpath.py              # ~15 min on 2 cores
    RANKSERVE_CACHE=.cache .venv/bin/python bench/bench_hotpath.py --quick      # fewer rounds and adapters
    RANKSERVE_CACHE=.cache .venv/bin/python bench/bench_hotpath.py --only http  # the HTTP part alone (~5 min)

Workload of every row: --streams concurrent greedy requests, 16-token random prompts, --tokens new tokens
each (``ignore_eos``), submitted at once. Engine settings are the server's defaults that matter here
(merge mode on, the op's cost model), 512 batch tokens, one torch thread.

  fixture S (hidden 256, 4 layers)   base | one adapter | one adapter, merge off | 5 adapters |
                                      5 adapters with the rows gather forced (the op's choice before)
  fixture M (hidden 512, 8 layers)   base | one adapter | 16 adapters | HF ``generate`` base-only
  cold (fixture S, a real on-disk store of --cold adapters): every request on an adapter in no tier, read
                                      on loader threads | in a loader process | into the CPU tier before
                                      the round; vs the same requests over 5 and over 32 warm adapters
  http (fixture M saved as a model directory, and SmolLM2): base | one adapter | 5 adapters | 16 adapters,
                                      in-process and through `rankserve serve` (uvicorn, the server's own
                                      flags, one torch thread), tokens counted from the server's usage
  peft (SmolLM2): bench_serving.py's rankserve / PEFT ratios, run as its own process (~4 min)

Each case runs --rounds times, cases interleaved; each keeps its best round. Two figures per case:
wall-clock tokens/s and tokens per CPU-second of this process (the engine runs in-process with one
thread, so CPU time is the work really done even while other tenants hold the cores). Ratios are taken
within a fixture, base = 1. The floor of a case is max(FLOPs / peak FLOP/s, bytes / peak bandwidth) of
its useful work (``bench_serving.floor_seconds``), peaks measured in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_ab_engine import Store, base_model, wait_for_cpu_kernel  # noqa: E402
from bench_serving import floor_seconds, peaks  # noqa: E402

from adapters_store.store import AdapterStore  # noqa: E402
from adapters_store.synth import random_adapter  # noqa: E402
from server.engine import Engine, EngineConfig, GenerateParams  # noqa: E402

PROMPT_LEN = 16


def engine_for(base, store, merge: bool = True, streams: int = 32, loader_processes: int = 0) -> Engine:
    eng = Engine(base, store, EngineConfig(max_running=streams, max_batch_tokens=512, max_model_len=256,
                                           kv_cache_bytes=64 << 20, merge_single_adapter=merge,
                                           loader_processes=loader_processes))
    eng.start()
    return eng


def prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 8000, (PROMPT_LEN,), generator=g).tolist() for _ in range(n)]


def run(eng: Engine, adapters: list[str | None], tokens: int, seed: int = 1) -> dict:
    """All requests at once; tokens/s, tokens per CPU-second, TTFT p50/p99 (s)."""
    ids = prompts(len(adapters), seed)

    async def go() -> tuple[int, list[float]]:
        t0 = time.perf_counter()

        async def one(p: list[int], a: str | None) -> tuple[int, float]:
            h = eng.submit_generate(GenerateParams(prompt_ids=p, adapter_id=a, max_tokens=tokens, temperature=0.0,
                                                   ignore_eos=True))
            n, first = 0, None
            async for ev in h.events():
                if ev.error is not None:
                    raise RuntimeError(f"request failed: {ev.error}")
                if first is None and ev.token_ids:
                    first = time.perf_counter() - t0
                n += len(ev.token_ids)
            return n, first or 0.0

        res = await asyncio.gather(*(one(p, a) for p, a in zip(ids, adapters, strict=True)))
        return sum(n for n, _ in res), sorted(f for _, f in res)

    return timed_run(go, len(adapters) * tokens)


def timed_run(go, expected: int) -> dict:
    """Run the coroutine function ``go`` (-> (tokens, sorted TTFTs)); tokens/s, tokens per CPU-second, TTFT."""
    cpu, wall = time.process_time(), time.perf_counter()
    n, ttft = asyncio.run(go())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if n != expected:
        raise RuntimeError(f"{n} tokens generated, expected {expected}")
    return {"tok_s": n / wall, "tok_cpu": n / cpu, "cpu_s": cpu,
            "ttft_p50": statistics.median(ttft), "ttft_p99": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]}


def best(runs: list[dict]) -> dict:
    return {k: (min if k.startswith(("ttft", "cpu_s")) else max)(r[k] for r in runs) for k in runs[0]}


def hf_generate(base, n: int, tokens: int) -> dict:
    """The base alone through HF ``generate`` on the same batch (left-padding is moot: equal lengths)."""
    batch = torch.tensor(prompts(n, 1))
    model = base.model
    cpu, wall = time.process_time(), time.perf_counter()
    with torch.inference_mode():
        out = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    made = (out.shape[1] - batch.shape[1]) * n
    return {"tok_s": made / wall, "tok_cpu": made / cpu, "cpu_s": cpu, "ttft_p50": 0.0, "ttft_p99": 0.0}


def floor_of(base, adapters_by_id: dict, ids: list[str | None], tokens: int, pf: float, bw: float) -> float:
    """Seconds of the floor for one round of this case (per CPU second: one thread)."""
    names = sorted({a for a in ids if a is not None})
    ads = [adapters_by_id[a] for a in names]
    reqs = [([0] * PROMPT_LEN, names.index(a) if a is not None else None) for a in ids]
    if not ads:
        return floor_seconds(base, [(p, 0) for p, _ in reqs], None, tokens, pf, bw)
    return floor_seconds(base, reqs, ads, tokens, pf, bw)


def table(title: str, runs: dict[str, list[dict]], floors: dict[str, float], n_tokens: int) -> None:
    """Absolute figures: each case's best round. Ratios to the base: the median over rounds of the ratio
    within the round (cases of one round run back to back, so a slow spell of a shared machine hits both
    sides of a ratio; best/best would pair one case's lucky round with another's unlucky one)."""
    print(f"\n{title}")
    print(f"  {'case':<38}{'tok/s':>8}{'x base':>8}{'tok/CPU-s':>11}{'x base':>8}{'TTFT p99 s':>11}"
          f"{'CPU/floor':>10}{'floor x base':>13}")
    base = runs["base"]
    for name, rs in runs.items():
        if not rs:
            continue
        r = best(rs)
        pairs = list(zip(rs, base, strict=False))  # the cold case may stop early (store used up)
        x_wall = statistics.median(c["tok_s"] / b["tok_s"] for c, b in pairs)
        x_cpu = statistics.median(c["tok_cpu"] / b["tok_cpu"] for c, b in pairs)
        ratio = f"{r['cpu_s'] / floors[name]:.1f}" if name in floors else "-"
        # the best ratio to the base the physics allows: the base's floor over this case's
        best_ratio = f"{floors['base'] / floors[name]:.2f}" if name in floors and "base" in floors else "-"
        print(f"  {name:<38}{r['tok_s']:>8.0f}{x_wall:>8.2f}{r['tok_cpu']:>11.0f}"
              f"{x_cpu:>8.2f}{r['ttft_p99']:>11.3f}{ratio:>10}{best_ratio:>13}")
    print(f"  (x base: median over {len(base)} rounds of the ratio within each round)")


def fixture_s(args, pf: float, bw: float) -> None:
    base = base_model(256, 4)
    ads = {f"a{i}": random_adapter(base, "lora", 8, seed=i, std=0.05) for i in range(5)}
    merged, unmerged = engine_for(base_model(256, 4), Store(ads)), engine_for(base_model(256, 4), Store(ads), False)
    mixed = [f"a{i % 5}" for i in range(args.streams)]
    cases = {"base": (merged, [None] * args.streams, "auto"),
             "one adapter (merge on, default)": (merged, ["a0"] * args.streams, "auto"),
             "one adapter, merge off": (unmerged, ["a0"] * args.streams, "auto"),
             "5 adapters": (unmerged, mixed, "auto"),
             "5 adapters, rows gather forced": (unmerged, mixed, "gather")}
    runs: dict[str, list[dict]] = {k: [] for k in cases}
    try:
        for _ in range(args.rounds):
            for name, (eng, ids, strategy) in cases.items():
                eng.pool.op.strategy = strategy
                runs[name].append(run(eng, ids, args.tokens))
    finally:
        merged.shutdown()
        unmerged.shutdown()
    floors = {name: floor_of(base, ads, ids, args.tokens, pf, bw) for name, (_, ids, _) in cases.items()}
    table(f"fixture S: hidden 256, 4 layers, LoRA r=8 on all 7 projections, {args.streams} streams x "
          f"{args.tokens} tokens", runs, floors, args.tokens)


def fixture_m(args, pf: float, bw: float) -> None:
    base = base_model(512, 8)
    ads = {f"a{i}": random_adapter(base, "lora", 8, seed=i, std=0.05) for i in range(16)}
    eng = engine_for(base, Store(ads))
    cases = {"base": [None] * args.streams, "one adapter (merge on, default)": ["a0"] * args.streams,
             "16 adapters": [f"a{i % 16}" for i in range(args.streams)]}
    runs: dict[str, list[dict]] = {k: [] for k in [*cases, "HF generate, base only"]}
    try:
        for _ in range(args.rounds):
            for name, ids in cases.items():
                runs[name].append(run(eng, ids, args.tokens))
            eng.merging.unmerge()  # HF generate runs the same modules (F.linear without a plan): W0, unmerged
            runs["HF generate, base only"].append(hf_generate(base, args.streams, args.tokens))
    finally:
        eng.shutdown()
    floors = {name: floor_of(base, ads, ids, args.tokens, pf, bw) for name, ids in cases.items()}
    floors["HF generate, base only"] = floors["base"]
    table(f"fixture M: hidden 512, 8 layers, LoRA r=8 on all 7 projections, {args.streams} streams x "
          f"{args.tokens} tokens", runs, floors, args.tokens)


def http_side(url: str, adapters: list[str | None], served_name: str, tokens: int, seed: int = 1) -> dict:
    """``run``'s workload through the real server: the same prompts (token ids), all at once over keep-alive
    connections, tokens counted from the server's own usage; TTFT is the first streamed token's."""
    import httpx

    ids = prompts(len(adapters), seed)

    async def go() -> tuple[int, list[float]]:
        t0 = time.perf_counter()
        async with httpx.AsyncClient(base_url=url, timeout=600,
                                     limits=httpx.Limits(max_connections=len(adapters))) as client:
            async def one(p: list[int], a: str | None) -> tuple[int, float]:
                body = {"model": a or served_name, "prompt": p, "max_tokens": tokens, "temperature": 0,
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                n, first = 0, None
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        ev = json.loads(line[6:])
                        if first is None and ev.get("choices") and ev["choices"][0].get("text") is not None:
                            first = time.perf_counter() - t0
                        if ev.get("usage"):
                            n = ev["usage"]["completion_tokens"]
                return n, first or 0.0

            res = await asyncio.gather(*(one(p, a) for p, a in zip(ids, adapters, strict=True)))
        return sum(n for n, _ in res), sorted(f for _, f in res)

    return timed_run(go, len(adapters) * tokens)


def http_part(args, which: str) -> None:
    """The table's adapter rows in-process and through `rankserve serve` (uvicorn, one torch thread, the
    server's default flags otherwise), cases interleaved, on ``which``: "m512" (fixture M saved as a local
    model directory) or a model the server knows (smollm2). Each side's ratio to its own base, and each
    case's HTTP tokens/s over in-process tokens/s (the HTTP layer's cost, with the client on the same two
    cores)."""
    from server.common.config import Settings
    from tests.util_server import LiveServer

    tmp = Path(tempfile.mkdtemp(prefix="rankserve-hotpath-http-"))
    if which == "m512":
        fixture = base_model(512, 8)
        model = str(tmp / "m512")
        fixture.model.save_pretrained(model)
        fixture.tokenizer.save_pretrained(model)
    else:
        model = which
    from adapters_store.basemodels import load_base
    base = load_base(model)
    store = AdapterStore(tmp / "store")
    for i in range(16):
        store.put(f"a{i}", random_adapter(base, "lora", 8, seed=i, std=0.05).to_bytes(), base=base)
    served = "base-model"
    cfg = dataclasses.replace(Settings(model=model, store=str(tmp / "store"), max_running=args.streams).engine_config(),
                              kv_cache_bytes=256 << 20)
    eng = Engine(base, AdapterStore(tmp / "store"), cfg)
    eng.start()
    cases = {"base": [None] * args.streams, "one adapter (merge on, default)": ["a0"] * args.streams,
             "5 adapters": [f"a{i % 5}" for i in range(args.streams)],
             "16 adapters": [f"a{i % 16}" for i in range(args.streams)]}
    direct: dict[str, list[dict]] = {k: [] for k in cases}
    http: dict[str, list[dict]] = {k: [] for k in cases}
    env = {"OMP_NUM_THREADS": "1", "RANKSERVE_KV_CACHE_BYTES": str(256 << 20), "HF_HUB_OFFLINE": "1"}
    try:
        with LiveServer(tmp, model, "--max-running", str(args.streams), "--served-model-name", served,
                        store=tmp / "store", env=env) as srv:
            for ids in cases.values():  # warm both sides: adapters resident, kernels built
                run(eng, ids, args.tokens)
                http_side(srv.url, ids, served, args.tokens)
            for _ in range(args.rounds):
                for name, ids in cases.items():
                    direct[name].append(run(eng, ids, args.tokens))
                    http[name].append(http_side(srv.url, ids, served, args.tokens))
    finally:
        eng.shutdown()
    label = "fixture M (hidden 512, 8 layers, random)" if which == "m512" else which
    print(f"\n{label}: in-process and through HTTP, {args.streams} requests at once x {args.tokens} tokens, "
          "LoRA r=8 on all 7 projections")
    print(f"  {'case':<34}{'in-process tok/s':>17}{'x base':>8}{'HTTP tok/s':>12}{'x base':>8}{'HTTP / in-process':>19}"
          f"{'HTTP TTFT p99 s':>17}")
    for name in cases:
        d, h = best(direct[name]), best(http[name])
        xd = statistics.median(c["tok_s"] / b["tok_s"] for c, b in zip(direct[name], direct["base"], strict=True))
        xh = statistics.median(c["tok_s"] / b["tok_s"] for c, b in zip(http[name], http["base"], strict=True))
        ov = statistics.median(hh["tok_s"] / dd["tok_s"] for hh, dd in zip(http[name], direct[name], strict=True))
        print(f"  {name:<34}{d['tok_s']:>17.0f}{xd:>8.2f}{h['tok_s']:>12.0f}{xh:>8.2f}{ov:>19.2f}{h['ttft_p99']:>17.3f}")
    print(f"  (medians over {args.rounds} rounds of ratios within a round; the server runs torch on one thread, "
          "the client shares the machine)")


class StepWaits:
    """Per engine, the seconds its thread spent inside steps without running (step wall minus the thread's
    CPU): waiting for the GIL or for a core. Bench-only instrumentation of ``Engine._step``."""

    def __init__(self) -> None:
        self.waits: dict[int, float] = {}
        inner = Engine._step
        waits = self.waits

        def timed(eng, chunks):
            t, c = time.perf_counter(), time.thread_time()
            try:
                inner(eng, chunks)
            finally:
                waits[id(eng)] = waits.get(id(eng), 0.0) + (time.perf_counter() - t) - (time.thread_time() - c)

        Engine._step = timed  # type: ignore[method-assign]

    def take(self, eng: Engine) -> float:
        return self.waits.pop(id(eng), 0.0)


def cold(args, pf: float, bw: float) -> None:
    """Every request on a cold adapter (in no tier), three ways: read on the loader threads (the default), in
    a loader process (``--loader-processes 1``), and read into the CPU tier before the round starts (what a
    free load would give: the cost of 32 distinct adapters per step and of the slot writes only). Each cold
    round takes the next --cold-requests adapters of the store, cycling, after dropping the engine's CPU tier."""
    base = base_model(256, 4)
    tmp = Path(tempfile.mkdtemp(prefix="rankserve-hotpath-"))
    store = AdapterStore(tmp / "store")
    t = time.perf_counter()
    wave: dict[str, object] = {}  # the first --streams adapters: what one step reads at most (the floor)
    for i in range(args.cold):
        adapter = random_adapter(base, "lora", 8, seed=100 + i, std=0.05)
        store.put(f"c{i}", adapter.to_bytes(), base=base)
        if i < args.streams:
            wave[f"c{i}"] = adapter
    print(f"\n(cold store: {args.cold} adapters written in {time.perf_counter() - t:.0f} s)")
    waits = StepWaits()
    warm = engine_for(base_model(256, 4), store)
    cold_threads = engine_for(base_model(256, 4), AdapterStore(tmp / "store"))
    cold_process = engine_for(base_model(256, 4), AdapterStore(tmp / "store"), loader_processes=1)
    procs = cold_process.residency._processes()
    print(f"(loader process {'ready' if procs is not None and procs.wait_ready(120) else 'NOT available'})")
    n = min(args.cold, args.cold_requests)
    streams = min(args.streams, n)
    fresh = itertools.cycle(range(args.cold))
    spread = f"{streams} warm adapters"
    c_threads, c_process, c_before = ("cold, loader threads (default)", "cold, a loader process",
                                      "cold, read before the round")
    runs: dict[str, list[dict]] = {"base": [], "5 warm adapters": [], spread: [], c_threads: [], c_process: [],
                                   c_before: []}
    wait_s: dict[str, list[float]] = {k: [] for k in runs}

    def timed(case: str, eng: Engine, ids: list[str | None]) -> None:
        waits.take(eng)
        runs[case].append(run(eng, ids, args.tokens))
        wait_s[case].append(waits.take(eng))

    def cold_round(case: str, eng: Engine, before: bool = False) -> None:
        eng.pool.free_memory()
        ids = [f"c{next(fresh)}" for _ in range(n)]
        if before:
            for a in ids:
                eng.residency.prefetch(a, store.get(a).digest)
            while any(eng.residency.loading(store.get(a).digest) for a in ids):
                time.sleep(0.005)
        timed(case, eng, ids)

    try:
        run(warm, [f"c{i % streams}" for i in range(n)], args.tokens)  # warm up the first --streams
        for _ in range(args.rounds):
            timed("base", warm, [None] * n)
            timed("5 warm adapters", warm, [f"c{i % 5}" for i in range(n)])
            timed(spread, warm, [f"c{i % streams}" for i in range(n)])
            cold_round(c_threads, cold_threads)
            cold_round(c_process, cold_process)
            cold_round(c_before, cold_threads, before=True)
    finally:
        for eng in (warm, cold_threads, cold_process):
            eng.shutdown()
    # Floors per wave of --streams requests (the engine runs that many at once), times the waves: a step
    # reads the base and the adapters of the requests it runs, never all of the round's.
    waves = -(-n // args.streams)
    distinct = waves * floor_of(base, wave, list(wave)[:streams], args.tokens, pf, bw)
    floors = {"base": waves * floor_of(base, wave, [None] * streams, args.tokens, pf, bw),
              "5 warm adapters": waves * floor_of(base, wave, [f"c{i % 5}" for i in range(streams)], args.tokens, pf, bw),
              spread: distinct, c_threads: distinct, c_process: distinct, c_before: distinct}
    table(f"cold adapters: hidden 256, 4 layers, {n} requests at once x {args.tokens} tokens, a real store on disk",
          runs, floors, args.tokens)
    print("  engine thread waiting inside its steps (step wall - step CPU), s per round, median: "
          + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in wait_s.items() if v))
    # The floor is max(compute, bytes) (DESIGN.md section 7). On one core the base's GEMMs (compute-bound)
    # and the distinct adapters' reads (memory-bound, a separate op) run one after the other, so the
    # bound that core can reach is their sum: the 32-distinct case against the 5-adapter one.
    per_step = {k: sum(wave[a].num_bytes() for a in set(ids)) for k, ids in
                (("5", [f"c{i % 5}" for i in range(streams)]), ("spread", list(wave)[:streams]))}
    flops = waves * floor_of(base, wave, [None] * streams, args.tokens, pf, float("inf"))
    seq = {k: flops + waves * args.tokens * b / bw for k, b in per_step.items()}
    print(f"  sequential bound (base compute + distinct adapters' bytes, one after the other): {spread} / 5 warm "
          f"= {seq['5'] / seq['spread']:.2f} ({per_step['spread'] / 1e6:.1f} MB of adapters per step against "
          f"{per_step['5'] / 1e6:.1f} MB)")
    # the figures: each cold case against the 5 warm adapters, paired within each round
    for case in (c_threads, c_process, c_before):
        pairs = list(zip(runs[case], runs["5 warm adapters"], runs[spread], strict=False))
        if pairs:
            def med(f, pairs=pairs) -> float:
                return statistics.median(f(c, w5, w32) for c, w5, w32 in pairs)
            print(f"  {case} / 5 warm: tok/s {med(lambda c, w5, _: c['tok_s'] / w5['tok_s']):.2f}, "
                  f"tok/CPU-s {med(lambda c, w5, _: c['tok_cpu'] / w5['tok_cpu']):.2f}, "
                  f"TTFT p99 {med(lambda c, w5, _: c['ttft_p99'] / w5['ttft_p99']):.2f}; "
                  f"/ {spread}: tok/s {med(lambda c, _, w: c['tok_s'] / w['tok_s']):.2f} "
                  f"(medians over {len(pairs)} rounds)")
    if procs is not None:
        print(f"  (the loader process served {procs.served} loads)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold", type=int, default=1000, help="adapters in the cold-load store")
    ap.add_argument("--cold-requests", type=int, default=128, help="requests per cold round")
    ap.add_argument("--quick", action="store_true", help="--rounds 2 --cold 300")
    ap.add_argument("--only", choices=("S", "M", "cold", "http", "peft"), action="append")
    ap.add_argument("--http", action="append", metavar="MODEL",
                    help="the HTTP part on MODEL: m512 (fixture M as a model directory) or smollm2; repeatable "
                         "(default with the HTTP part: m512 and smollm2)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.cold = 2, 300
    torch.set_num_threads(1)
    wait_for_cpu_kernel()
    pf, bw = peaks()
    print(f"torch {torch.__version__}, 1 thread; peaks per CPU second: {pf / 1e9:.1f} GFLOP/s, {bw / 1e9:.1f} GB/s")
    for part, fn in (("S", fixture_s), ("M", fixture_m), ("cold", cold)):
        if not args.only or part in args.only:
            fn(args, pf, bw)
    if not args.only or "http" in args.only or args.http:
        for which in args.http or ["m512", "smollm2"]:
            http_part(args, which)
    if not args.only or "peft" in args.only:
        peft_part()


def peft_part() -> None:
    """The PEFT row: ``bench_serving.py`` (SmolLM2, 64 requests over 31 of 100 adapters, rankserve against
    PEFT's batched ``generate(adapter_names=)``) in its own process, its summary lines printed here."""
    import subprocess

    print("\nserver with adapters / PEFT batched generate (bench/bench_serving.py, SmolLM2):", flush=True)
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("bench_serving.py"))], capture_output=True,
                         text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith(("ratios:", "greedy outputs", "smollm2:")):
            print(f"  {line}")


if __name__ == "__main__":
    main()
