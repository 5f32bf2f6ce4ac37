"""Mixed-adapter serving against the base, in-process through the real engine, side by side in one run:
--streams concurrent greedy requests of --tokens new tokens each, (a) base only, (b) every request on one
adapter (merge mode off and on), (c) requests spread over --adapters adapters, with the op forced to the
per-token rows gather (the choice before the dense formulation) and with its cost model (``auto``).
Random Llama weights of the given shape (speed only). Rounds alternate; each figure keeps its best round.
Two figures per case: wall-clock tokens/s, and tokens per CPU-second of this process (robust when other
processes share the cores).

    RANKSERVE_CACHE=.cache .venv/bin/python bench/bench_mix.py            # hidden 256, 4 layers, ~2 min
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_ab_engine import Store, base_model, run

from adapters_store.synth import random_adapter
from server.engine import Engine, EngineConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--adapters", type=int, default=5)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = base_model(args.hidden, args.layers)
    adapters = {f"a{i}": random_adapter(base, "lora", 8, seed=i, std=0.05) for i in range(args.adapters)}
    engines = {merge: Engine(base_model(args.hidden, args.layers), Store(adapters),
                             EngineConfig(max_running=args.streams, max_batch_tokens=512, max_model_len=256,
                                          kv_cache_bytes=64 << 20, merge_single_adapter=merge))
               for merge in (False, True)}
    for e in engines.values():
        e.start()
    mixed = [f"a{i % args.adapters}" for i in range(args.streams)]
    cases = {
        "base only": (engines[False], [None] * args.streams, None),
        "one adapter, merge off": (engines[False], ["a0"] * args.streams, None),
        "one adapter, merge on (default)": (engines[True], ["a0"] * args.streams, None),
        f"{args.adapters} adapters, rows gather": (engines[False], mixed, "gather"),
        f"{args.adapters} adapters, cost model (auto)": (engines[False], mixed, "auto"),
    }
    best = dict.fromkeys(cases, 0.0)
    best_cpu = dict.fromkeys(cases, 0.0)
    try:
        for _ in range(args.rounds):
            for name, (eng, ads, strategy) in cases.items():
                eng.pool.op.strategy = strategy or "auto"
                cpu = time.process_time()
                tps = run(eng, ads, args.tokens)
                per_cpu = args.streams * args.tokens / (time.process_time() - cpu)
                best[name], best_cpu[name] = max(best[name], tps), max(best_cpu[name], per_cpu)
    finally:
        for e in engines.values():
            e.shutdown()
    print(f"hidden {args.hidden}, {args.layers} layers, {args.streams} streams x {args.tokens} tokens, "
          f"LoRA r=8 on every projection, torch {torch.__version__}, 1 thread, best of {args.rounds}")
    for name in cases:
        print(f"  {name:<36} {best[name]:8.0f} tok/s  {best[name] / best['base only']:.2f} x base   "
              f"{best_cpu[name]:8.0f} tok/CPU-s  {best_cpu[name] / best_cpu['base only']:.2f} x base")


if __name__ == "__main__":
    main()
