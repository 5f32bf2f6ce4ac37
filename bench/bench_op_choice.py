"""Where each formulation of the torch low-rank op wins on this CPU: per-token row gather, dense over the
step's adapters (two GEMMs over every token, masked), segments (one bmm per adapter over its padded
tokens) and grouped GEMMs over adapter segments (``torch._grouped_mm``), for one module, side by side in one run (interleaved, best of --repeat), over
tokens per adapter segment, distinct adapters, rank and module shape. Times are the calling thread's CPU
time (torch runs on one thread here), so other processes on a shared machine barely move them. The last
columns say which formulation won and what ``auto`` picks (and its cost over the winner's).

    RANKSERVE_CACHE=.cache .venv/bin/python bench/bench_op_choice.py            # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from adapters_store.basemodels import BaseModel
from adapters_store.format import AdapterMeta, CompiledAdapter, ModuleWeights
from server.lora.ops.torch_cpu import HAS_GROUPED_MM, TorchLowRank
from server.lora.pool import AdapterPool


def pool_for(d_in: int, d_out: int, adapters: int, rank: int) -> tuple[AdapterPool, list[int]]:
    model = nn.Module()
    model.proj = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
    base = BaseModel("unit", "llama", model, None, "fp", ("generate",), {"proj": (d_in, d_out)})
    pool = AdapterPool(base, "cpu", torch.float32, buckets=[(rank, adapters)], mor_entries=0, backend="torch")
    pool.install()
    meta = AdapterMeta(method="lora", task="generate", base_model="unit", base_fingerprint="fp")
    slots = []
    for i in range(adapters):
        mw = ModuleWeights(torch.randn(rank, d_in) * 0.1, torch.randn(d_out, rank) * 0.1)
        slots.append(pool.acquire(f"a{i}", lambda mw=mw: CompiledAdapter(meta, {"proj": mw})))
    return pool, slots


def timed(fn, n: int) -> float:
    fn()
    start = time.thread_time()
    for _ in range(n):
        fn()
    return (time.thread_time() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--shapes", type=lambda v: [tuple(map(int, s.split("x"))) for s in v.split(",")],
                    default=[(256, 256), (256, 688), (576, 576), (576, 1536), (2048, 2048)],
                    help="module shapes d_inxd_out, comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not HAS_GROUPED_MM:
        raise SystemExit("torch._grouped_mm is not available on this build: only the gather path exists")
    print(f"torch {torch.__version__}, 1 thread; times per module call in us (best of {args.repeat})")
    names = ("gather", "dense", "segments", "grouped", "bgmv", "auto")
    print(f"{'d_in x d_out':>13} {'rank':>4} {'adapters':>8} {'tok/seg':>7} "
          + " ".join(f"{n:>8}" for n in names) + f" {'best':>8} {'auto/best':>9}")
    ops = {n: TorchLowRank(n) for n in names}
    for d_in, d_out in args.shapes:
        for rank in (8, 16):
            for adapters in (2, 5, 8, 16, 32):
                pool, slots = pool_for(d_in, d_out, max(adapters, 2), rank)
                for per_seg in (1, 2, 4, 8, 32, 128):
                    T = per_seg * adapters
                    token_slots = torch.tensor(slots[:adapters]).repeat_interleave(per_seg)
                    x = torch.randn(T, d_in)
                    y0 = x @ pool.layers["proj"].weight.T
                    best = {k: float("inf") for k in ops}
                    plan = pool.plan(token_slots)
                    if plan.single is not None:  # one adapter: the single path serves it either way
                        plan = type(plan)(**{**plan.__dict__, "single": None})
                    module = pool.slots["proj"]
                    for _ in range(args.repeat):  # interleaved: noise hits both alike
                        for name, op in ops.items():
                            def call(op=op, x=x, y0=y0, plan=plan, module=module):
                                return op(x, y0.clone(), plan, module)

                            best[name] = min(best[name], timed(call, args.iters))
                    won = min(names[:5], key=best.__getitem__)
                    print(f"{d_in:>6} x {d_out:<5} {rank:>4} {adapters:>8} {per_seg:>7} "
                          + " ".join(f"{best[n] * 1e6:>8.0f}" for n in names)
                          + f" {won:>8} {best['auto'] / best[won]:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
