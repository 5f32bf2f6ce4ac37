"""Per-step attention cost over the paged KV cache on CPU: the dense reference against the paged backend
(and, with --flex, PyTorch FlexAttention through torch.compile), side by side in one run, trees of
calls alternating so that machine noise hits both alike. Random K/V in a cache whose blocks are shuffled.

Shapes are SmolLM2-135M's attention (9 query heads, 3 KV heads, head_dim 64, 30 layers); the cache holds
--layers layers and the per-step figure is the per-layer median times 30 (planning counted once).

    .venv/bin/python bench/bench_attention.py                 # ~2 min, one torch thread
    .venv/bin/python bench/bench_attention.py --flex          # + FlexAttention (compiles first, ~1 min)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.model.attention import DenseAttention, StepAttention, StepShape  # noqa: E402, StepShape
from server.model.attention_paged import PagedAttention  # noqa: E402
from server.model.kvcache import PagedKVCache  # noqa: E402

CLOCK = time.perf_counter
HEADS, KV_HEADS, HEAD_DIM, MODEL_LAYERS, BLOCK = 9, 3, 64, 30, 16


def scenarios(seed: int = 0) -> dict[str, tuple[list[int], list[tuple[int, int]]]]:
    """name -> (decode lengths, prefill chunks as (start, n))."""
    g = torch.Generator().manual_seed(seed)
    return {
        "32 decodes, all at 24 (planning overhead)": ([24] * 32, []),
        "32 decodes, all at 512": ([512] * 32, []),
        "32 decodes, ragged 1..1024": (torch.randint(1, 1025, (32,), generator=g).tolist(), []),
        "1 decode at 2048 + 31 at 64": ([2048] + [64] * 31, []),
        "8 decodes at 256 + a 256-token chunk after 768": ([256] * 8, [(768, 256)]),
    }


def build(lengths: list[int], layers: int) -> tuple[PagedKVCache, list[int]]:
    total = sum(-(-n // BLOCK) for n in lengths)
    cache = PagedKVCache(layers, KV_HEADS, HEAD_DIM, num_blocks=total + 8, block_size=BLOCK,
                         max_seqs=len(lengths), max_len=max(lengths) + BLOCK)
    cache._free_blocks = torch.randperm(total + 8, generator=torch.Generator().manual_seed(1)).tolist()
    slots = [cache.allocate(n) for n in lengths]
    cache.data.normal_()
    return cache, slots


class FlexStep(StepAttention):
    """FlexAttention over the whole cache as one KV sequence, a block mask built per step (decodes only)."""

    compiled = None

    def __init__(self, cache: PagedKVCache, shape: StepShape, scaling: float):
        self.run = flex_planner(cache, shape, scaling)


def flex_planner(cache: PagedKVCache, shape: StepShape, scaling: float):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    rows = cache.data.shape[2]
    owner = torch.full((rows,), -1, dtype=torch.long)
    pos = torch.zeros(rows, dtype=torch.long)
    for b, (seq, length) in enumerate(shape.decodes):
        r = cache.row_table[seq, :length]
        owner[r], pos[r] = b, torch.arange(length)
    last = torch.tensor([length - 1 for _, length in shape.decodes])

    def mask_mod(b, h, qi, ki):
        return (owner[ki] == qi) & (pos[ki] <= last[qi])

    block_mask = create_block_mask(mask_mod, None, None, len(shape.decodes), rows, device="cpu")
    fn = FlexStep.compiled = FlexStep.compiled or torch.compile(flex_attention)

    def run(q, k_rows, v_rows):  # q [B, H, hd]
        o = fn(q.transpose(0, 1)[None], k_rows.permute(1, 0, 2)[None], v_rows.permute(1, 0, 2)[None],
               block_mask=block_mask, scale=scaling, enable_gqa=True)
        return o[0].transpose(0, 1)
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4, help="layers in the cache (per-layer cost x 30 is reported)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--flex", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a 2-core machine shared with other jobs, every parallel "
                         "region waits for both threads to be scheduled, which measures the neighbours)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scaling = HEAD_DIM ** -0.5
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, wall time, "
          "medians of interleaved rounds; per-step ms = plan + 30 x median layer")
    print(f"{'scenario':48s} {'attended':>9s} {'dense pad':>9s} {'dense ms':>9s} {'paged ms':>9s} {'ratio':>6s}"
          + (f" {'flex ms':>9s}" if args.flex else ""))
    for name, (lengths, chunks) in scenarios().items():
        print(measure(name, lengths, chunks, args, scaling), flush=True)


def measure(name: str, lengths: list[int], chunks: list[tuple[int, int]], args, scaling: float) -> str:
    cache, slots = build(lengths + [s + n for s, n in chunks], args.layers)
    shape = StepShape(decodes=list(zip(slots, lengths, strict=False)),
                      prefills=[(slots[len(lengths) + i], s, n) for i, (s, n) in enumerate(chunks)])
    T = len(lengths) + sum(n for _, n in chunks)
    q = torch.randn(T, HEADS, HEAD_DIM)
    planners = {"dense": lambda: DenseAttention(cache.row_table, scaling, shape),
                "paged": lambda: PagedAttention(cache.row_table, BLOCK, scaling, shape)}
    if args.flex and not chunks:
        planners["flex"] = lambda: FlexStep(cache, shape, scaling)
    times: dict[str, list[float]] = {k: [] for k in planners}
    plan_s: dict[str, list[float]] = {k: [] for k in planners}
    outs = {}
    with torch.inference_mode():
        for rep in range(args.reps + 1):  # the first round warms up (and compiles flex)
            for k, make in planners.items():
                t0 = CLOCK()
                plan = make()
                t1 = CLOCK()
                for i in range(args.layers):
                    outs[k] = plan.run(q, *cache.layer(i))
                t2 = CLOCK()
                if rep:
                    plan_s[k].append(t1 - t0)
                    times[k].append((t2 - t1) / args.layers)
    for k in planners:
        if k != "dense":
            torch.testing.assert_close(outs[k], outs["dense"], atol=1e-4, rtol=1e-4)
    step = {k: (statistics.median(plan_s[k]) + MODEL_LAYERS * statistics.median(times[k])) * 1e3 for k in planners}
    attended = sum(lengths) + sum((s + n) for s, n in chunks)
    padded = len(lengths) * max(lengths) + sum((s + n) for s, n in chunks)
    line = (f"{name:48s} {attended:9d} {padded:9d} {step['dense']:9.1f} {step['paged']:9.1f} "
            f"{step['paged'] / step['dense']:6.2f}")
    if "flex" in step:
        line += f" {step['flex']:9.1f}"
    return line

if __name__ == "__main__":
    main()
