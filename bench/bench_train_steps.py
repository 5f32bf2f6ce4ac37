"""Trainer throughput on CPU: optimizer steps per second for each method, side by side in one run.

    RANKSERVE_CACHE=.cache HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_train_steps.py --model minilm
    RANKSERVE_CACHE=.cache HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_train_steps.py --model smollm2 \\
        --task generate --steps 4

Every method trains --steps optimizer steps (batch --batch-size, every example --length tokens, every
target linear adapted, the method's default options with rank 8) on a fresh copy of the base. The
methods alternate over --repeat rounds and each keeps its best round, so other tenants of the machine
hit all of them alike. Steps/s counts the training steps only (no evaluation). Bounded: at most
methods x repeat x steps steps in all.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters_store.basemodels import load_base  # noqa: E402
from trainer.data import Example  # noqa: E402
from trainer.loop import TrainConfig, train  # noqa: E402

METHODS = ("lora", "dora", "adalora", "aroma", "mor", "edora")


def examples(task: str, n: int, length: int, vocab: int) -> list[Example]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab - 10, (n, length), generator=gen).tolist()
    if task == "classify":
        return [Example(input_ids=row, label=i % 2) for i, row in enumerate(ids)]
    return [Example(input_ids=row, labels=list(row)) for row in ids]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--task", default="classify", choices=("classify", "generate"))
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = load_base(args.model)
    data = examples(args.task, args.batch_size * args.steps, args.length, len(base.tokenizer))
    labels = ["a", "b"] if args.task == "classify" else None
    best: dict[str, dict] = {}
    for _ in range(args.repeat):
        for method in args.methods:
            fresh = dataclasses.replace(base, model=copy.deepcopy(base.model))
            cfg = TrainConfig(method=method, task=args.task, method_options={"rank": 8}, lr=1e-4,
                              max_steps=args.steps, batch_size=args.batch_size, progress=False,
                              gradient_checkpointing=args.gradient_checkpointing)
            log = train(fresh, data, data[:1], cfg, labels).log
            row = {"steps_per_second": log["steps_per_second"], "adapter_trainable_params": log["adapter_trainable_params"]}
            print(f"  {method}: {row['steps_per_second']:.3f} steps/s", flush=True)
            if method not in best or row["steps_per_second"] > best[method]["steps_per_second"]:
                best[method] = row
    lora = best.get("lora", {}).get("steps_per_second")
    print(f"{args.model} {args.task}: batch {args.batch_size} x {args.length} tokens, {args.steps} steps, "
          f"{args.threads} threads, best of {args.repeat}")
    print(f"{'method':8} {'steps/s':>8} {'vs lora':>8} {'trainable':>11}")
    for method, row in best.items():
        ratio = f"{row['steps_per_second'] / lora:.2f}" if lora else "-"
        print(f"{method:8} {row['steps_per_second']:8.3f} {ratio:>8} {row['adapter_trainable_params']:11,}")
    print(json.dumps({"config": vars(args), "results": best}))


if __name__ == "__main__":
    main()
