"""A cold adapter load, step by step, on one core: each step's host time per adapter, and the old and new
form of the steps this pass replaced side by side in one run (safetensors' load against one-copy views;
the per-module slot write against the packed one).

    RANKSERVE_CACHE=.cache .venv/bin/python bench/bench_load_steps.py

Fixture S (hidden 256, 4 layers, LoRA r=8 on all seven projections, ~600 KB a file). Each figure is the
minimum over --passes passes over --adapters adapters of thread CPU time per adapter, so a noisy
neighbour inflates it less than a mean would.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_ab_engine import base_model  # noqa: E402

from adapters_store.format import load_tensors, read_header  # noqa: E402
from adapters_store.store import AdapterStore  # noqa: E402
from adapters_store.synth import random_adapter  # noqa: E402
from adapters_store.validate import validate_bytes  # noqa: E402
from server.lora.buffers import for_slots  # noqa: E402
from server.lora.image import prepare  # noqa: E402
from server.lora.pool import AdapterPool  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=64)
    ap.add_argument("--passes", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = base_model(256, 4)
    store = AdapterStore(Path(tempfile.mkdtemp(prefix="rankserve-load-steps-")) / "store")
    n = args.adapters
    for i in range(n):  # put validates: the reloads below take the known-digest path, as an evicted adapter does
        store.put(f"c{i}", random_adapter(base, "lora", 8, seed=100 + i, std=0.05).to_bytes(), base=base)
    data = [store.read_bytes(f"c{i}") for i in range(n)]
    digests = [hashlib.sha256(d).hexdigest() for d in data]
    headers = [read_header(d)[0] for d in data]
    pool = AdapterPool(base, "cpu", torch.float32, max_slots=32, max_rank=64)

    def per_adapter(name: str, step) -> list:
        best = float("inf")
        for _ in range(args.passes):
            t = time.thread_time()
            out = [step(i) for i in range(n)]
            best = min(best, time.thread_time() - t)
        print(f"  {name:<52}{best / n * 1e3:8.3f} ms")
        return out

    print(f"per adapter ({len(data[0])} bytes), min of {args.passes} passes over {n} adapters, thread CPU:")
    per_adapter("read the file", lambda i: store.read_bytes(f"c{i}"))
    per_adapter("sha256", lambda i: hashlib.sha256(data[i]).hexdigest())
    per_adapter("tensors: safetensors' load (before)", lambda i: load_tensors(data[i]))
    per_adapter("tensors: views of one copy (now)", lambda i: load_tensors(data[i], headers[i]))
    adapters = per_adapter("header + tensors + ModuleWeights (known digest)",
                           lambda i: validate_bytes(data[i], base, store.limits, digests[i]))
    laid = per_adapter("loader: serving layout (before)", lambda i: for_slots(adapters[i]))
    prepared = per_adapter("loader: fit check + pack (now)",
                           lambda i: prepare(adapters[i], pool.slots, pool.layout, pool.max_rank, pool.max_experts))
    per_adapter("engine: slot write, per module, batched (MoR, DoRA)", lambda i: pool._write(i % 32, -1, 8, laid[i]))
    per_adapter("engine: slot write, packed (now)",
                lambda i: pool._write(i % 32, -1, 8, prepared[i][0], prepared[i][1][1]))


if __name__ == "__main__":
    main()
