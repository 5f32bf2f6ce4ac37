"""The per-token cost of logprobs and of the logits processors, side by side in one run.

1. The sampler alone (``sample_step`` on a decode step's logits, 32 rows, SmolLM2's vocabulary of 49152 and
   the bench model's 8000): median time per step of each option, the cases interleaved, and the extra
   time per generated token (per row) over plain greedy. This is all the work logprobs add to a step.
2. End to end on the engine of bench_ab_engine.py (random Llama, hidden 256, 4 layers, vocab 8000, 32
   streams x 24 tokens, base only, greedy): tokens/s of the same workload plain and with each option,
   the cases alternating round by round; the median over rounds of each case's ratio to the plain run of
   its round (the machine is shared: a ratio within a round is steadier than absolute rates).

    PYTHONPATH=. .venv/bin/python bench/bench_logprobs.py
"""

from __future__ import annotations

import statistics
import time

import torch
from bench_ab_engine import Store, base_model

from server.engine import Engine, EngineConfig, GenerateParams
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


def main() -> None:
    torch.set_num_threads(1)
    sampler_table(49152)
    sampler_table(8000)
    engine_table()


if __name__ == "__main__":
    main()
