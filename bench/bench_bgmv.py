"""The fused CPU kernel (``server/lora/ops/cpu_kernel.py``) over one decode step's 28 module calls of the
hidden-256 fixture, rows in memory or in cache: 32 tokens on 32 distinct adapters (19 MB of rank rows per
step, evicted between steps as the base's GEMMs would) and on 5 adapters (3 MB, cached). Thread CPU per
step, median of --steps, the torch row gather (the plain formulation) beside it. Uses only the kernel's
op API, so it runs in older trees too (``PYTHONPATH=<worktree>``) for before/after figures:

    RANKSERVE_CACHE=.cache .venv/bin/python bench/bench_bgmv.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ab_engine import base_model  # noqa: E402

from adapters_store.synth import random_adapter  # noqa: E402
from server.lora.ops import cpu_kernel  # noqa: E402
from server.lora.ops.torch_cpu import TorchLowRank  # noqa: E402
from server.lora.pool import AdapterPool  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if cpu_kernel.get(wait=True) is None:
        raise SystemExit(f"the fused CPU kernel is unavailable: {cpu_kernel.error()}")
    base = base_model(256, 4)
    pool = AdapterPool(base, "cpu", torch.float32, max_slots=32, max_rank=64)
    pool.install()
    slots = [pool.acquire(f"a{i}", lambda i=i: random_adapter(base, "lora", 8, seed=i)) for i in range(32)]
    ops = {"kernel": TorchLowRank("bgmv"), "torch gather": TorchLowRank("gather")}
    evict = torch.empty(12 << 20)  # 48 MB: more than the L3 of this machine
    cases = {"32 distinct adapters (rows from memory)": slots, "5 adapters (rows cached)": [slots[i % 5] for i in range(32)]}
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.steps):
        for case, ts in cases.items():
            plan = pool.plan(torch.tensor(ts))
            for name, op in ops.items():
                xs = {p: torch.randn(len(ts), ms.d_in) for p, ms in pool.slots.items()}
                ys = {p: torch.zeros(len(ts), ms.d_out) for p, ms in pool.slots.items()}
                evict.add_(1.0)
                t = time.thread_time()
                for p, ms in pool.slots.items():
                    op(xs[p], ys[p], plan, ms)
                times.setdefault((case, name), []).append(time.thread_time() - t)
    print(f"torch {torch.__version__}, 1 thread; one decode step's {len(pool.slots)} module calls, 32 tokens, "
          f"LoRA r=8, thread CPU ms (median of {args.steps})")
    for case in cases:
        print(f"  {case:<42}" + "".join(f"{name} {statistics.median(times[(case, name)]) * 1e3:6.3f}   "
                                        for name in ops))


if __name__ == "__main__":
    main()
