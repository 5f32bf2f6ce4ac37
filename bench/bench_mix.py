"""Mixed-adapter serving against the base, in-process through the real engine, side by side in one run:
--streams concurrent greedy requests of --tokens new tokens each, (a) base only, (b) every request on one
adapter (merge mode off and on), (c) requests spread over --adapters adapters, each with the op's old
fixed threshold (grouped GEMMs from 4 tokens per segment) and with the measured cost rule. Random Llama
weights of the given shape (speed only). Rounds alternate; each figure keeps its best round.

    RANKSERVE_CACHE=.cache .venv/bin/python bench/bench_mix.py            # hidden 256, 4 layers, ~2 min
"""

from __future__ import annotations

import argparse

import torch
from bench_ab_engine import Store, base_model, run

from adapters_store.synth import random_adapter
from server.engine import Engine, EngineConfig
from server.lora.ops import torch_cpu


def _old_rows(self, plan, slots) -> bool:  # before the measured rule: gather below 4 tokens per segment
    return plan.rows is not None and len(plan.order) < 4 * plan.num_segments


def _old_grouped(self, bp, slots, itemsize) -> bool:
    return (torch_cpu.HAS_GROUPED_MM and torch_cpu.aligned(slots.d_in, slots.d_out, bp.rank, itemsize)
            and bp.num_tokens >= 4 * bp.num_segments)


OLD_RULE = (_old_rows, _old_grouped)


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
        f"{args.adapters} adapters, old threshold": (engines[False], mixed, "old"),
        f"{args.adapters} adapters, measured rule": (engines[False], mixed, "new"),
    }
    op = torch_cpu.TorchLowRank
    measured = (op._rows, op._grouped)
    best = dict.fromkeys(cases, 0.0)
    try:
        for _ in range(args.rounds):
            for name, (eng, ads, rule) in cases.items():
                op._rows, op._grouped = OLD_RULE if rule == "old" else measured
                best[name] = max(best[name], run(eng, ads, args.tokens))
    finally:
        op._rows, op._grouped = measured
        for e in engines.values():
            e.shutdown()
    print(f"hidden {args.hidden}, {args.layers} layers, {args.streams} streams x {args.tokens} tokens, "
          f"LoRA r=8 on every projection, torch {torch.__version__}, 1 thread, best of {args.rounds}")
    for name, tps in best.items():
        print(f"  {name:<34} {tps:8.0f} tok/s   {tps / best['base only']:.2f} x base")


if __name__ == "__main__":
    main()
