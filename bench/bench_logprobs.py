"""The per-token cost of logprobs and of the logits processors, side by side in one run.

1. The sampler alone (``sample_step`` on a decode step's logits, 32 rows, SmolLM2's vocabulary of 49152 and
   the bench model's 8000): median time per step of each option, the cases interleaved, and the extra
   time per generated token (per row) over plain greedy. This is all the work logprobs add to a step.
2. End to end on the engine of bench_ab_engine.py (random Llama, hidden 256, 4 layers, vocab 8000, 32
   streams x 24 tokens, base only, greedy): tokens/s of the same workload plain and with each option,
   the cases alternating round by round; the median over rounds of each case's ratio to the plain run of
   its round (the machine is shared: a ratio within a round is steadier than absolute rates).

    PYTHONPATH=. .venv/bin/python bench/bench_logprobs.py [--before DIR]

``--before DIR`` (a checkout of the tree before this change, e.g. ``git archive 8115647 | tar -x -C DIR``)
runs instead the hot path's A/B: the sampler of DIR and of this tree on the same plain greedy rows, interleaved
(the only per-step code a request without options runs that this change touched).
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time

import torch
from bench_ab_engine import Store, base_model

from server.engine import Engine, EngineConfig, GenerateParams, sampler
from server.engine.sampler import RowSampling, sample_step
from server.engine.tokens import TokenState

CASES = {
    "plain": {},
    "logprobs=0": {"logprobs": 0},
    "logprobs=5": {"logprobs": 5},
    "logprobs=20": {"logprobs": 20},
    "penalties": {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.2},
    "logit_bias (8 ids)": {"logit_bias": {i: 1.0 for i in range(100, 108)}},
    "echo prompt logprobs=1": {"prompt_logprobs": 1, "logprobs": 1},
}


def run(eng: Engine, extra: dict, streams: int = 32, tokens: int = 24) -> float:
    g = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    handles = [eng.submit_generate(GenerateParams(prompt_ids=torch.randint(5, 8000, (16,), generator=g).tolist(),
                                                  max_tokens=tokens, temperature=0.0, ignore_eos=True, **extra))
               for _ in range(streams)]
    n = sum(len(ev.token_ids) for h in handles for ev in h.events_sync(timeout=600))
    return n / (time.perf_counter() - start)


def sampler_table(vocab: int, rows: int = 32, reps: int = 300) -> None:
    """Median microseconds per sample_step of each case, interleaved."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=g)
    cases = {name: [RowSampling(GenerateParams([1, 2, 3], max_tokens=64, temperature=0.0,
                                               **{k: v for k, v in extra.items() if k != "prompt_logprobs"}).sampling(),
                                torch.Generator().manual_seed(i), TokenState(list(range(1, 17)) + [5, 9, 5]))
                    for i in range(rows)]
             for name, extra in CASES.items() if name != "echo prompt logprobs=1"}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, rs in cases.items():
            start = time.perf_counter()
            sample_step(logits, rs, torch.tensor([0]))
            times[name].append(time.perf_counter() - start)
    plain = statistics.median(times["plain"])
    print(f"\nsampler alone, {rows} rows x vocab {vocab} (median of {reps} steps):\n")
    print("| case | µs per step | extra µs per generated token |")
    print("|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {1e6 * med:.0f} | {1e6 * (med - plain) / rows:+.1f} |")


def engine_table(rounds: int = 5) -> None:
    eng = Engine(base_model(), Store({}), EngineConfig(max_running=32, max_batch_tokens=512, max_model_len=256,
                                                       kv_cache_bytes=64 << 20, merge_single_adapter=False))
    eng.start()
    ratios: dict[str, list[float]] = {name: [] for name in CASES}
    plains = []
    try:
        run(eng, {})  # warm-up
        for _ in range(rounds):
            plain = run(eng, {})
            plains.append(plain)
            for name, extra in CASES.items():
                ratios[name].append(run(eng, extra) / plain)
    finally:
        eng.shutdown()
    plain = statistics.median(plains)
    print(f"\nend to end, 32 streams x 24 tokens (median of {rounds} rounds; plain {plain:.0f} tokens/s):\n")
    print("| case | tokens/s vs plain (median ratio) | extra µs per generated token |")
    print("|---|---|---|")
    for name, rs in ratios.items():
        r = statistics.median(rs)
        print(f"| {name} | {r:.2f} | {1e6 * (1 / (r * plain) - 1 / plain):+.0f} |")


def hot_path_ab(before: str, vocab: int = 49152, rows: int = 32, reps: int = 300) -> None:
    """Plain greedy rows through the sampler before and after, interleaved: median µs per step."""
    spec = importlib.util.spec_from_file_location("sampler_before", f"{before}/server/engine/sampler.py")
    old = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["sampler_before"] = old  # its dataclasses look their module up
    spec.loader.exec_module(old)  # type: ignore[union-attr]
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))
    eos = torch.tensor([0])

    def make(mod):
        return [mod.RowSampling(mod.SamplingParams(max_tokens=64, temperature=0.0), torch.Generator(),
                                TokenState(list(range(1, 17)))) for _ in range(rows)]

    cases = {"before": (old.sample, make(old)), "after": (sample_step, make(sampler))}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for i in range(reps):
        for name in (("before", "after") if i % 2 else ("after", "before")):  # the first of a pair pays more
            fn, rs = cases[name]
            start = time.perf_counter()
            fn(logits, rs, eos)
            times[name].append(time.perf_counter() - start)
    b, a = statistics.median(times["before"]), statistics.median(times["after"])
    print(f"\nhot path, plain greedy, {rows} rows x vocab {vocab} (median of {reps} steps): before {1e6 * b:.0f} µs, "
          f"after {1e6 * a:.0f} µs per step (after / before {a / b:.3f})")


def main() -> None:
    torch.set_num_threads(1)
    if "--before" in sys.argv:
        hot_path_ab(sys.argv[sys.argv.index("--before") + 1])
        return
    sampler_table(49152)
    sampler_table(8000)
    engine_table()


if __name__ == "__main__":
    main()
