"""The per-token cost of logprobs and of the logits processors, side by side in one run on the engine of
bench_ab_engine.py (random Llama, hidden 256, 4 layers, vocab 8000, 32 streams x 24 tokens, base only,
greedy): the same workload plain, with each option, alternating, best of 5 rounds per case. The cost per
generated token is 1/tokens_per_s(option) - 1/tokens_per_s(plain), the whole step's wall time shared by its
tokens (the batch runs all 32 streams together).

    PYTHONPATH=. .venv/bin/python bench/bench_logprobs.py
"""

from __future__ import annotations

import time

import torch
from bench_ab_engine import Store, base_model

from server.engine import Engine, EngineConfig, GenerateParams

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


def main() -> None:
    torch.set_num_threads(1)
    eng = Engine(base_model(), Store({}), EngineConfig(max_running=32, max_batch_tokens=512, max_model_len=256,
                                                       kv_cache_bytes=64 << 20, merge_single_adapter=False))
    eng.start()
    best = dict.fromkeys(CASES, 0.0)
    try:
        for _ in range(5):
            for name, extra in CASES.items():
                best[name] = max(best[name], run(eng, extra))
    finally:
        eng.shutdown()
    plain = best["plain"]
    print("| case | tokens/s | vs plain | extra µs per generated token |")
    print("|---|---|---|---|")
    for name, tps in best.items():
        print(f"| {name} | {tps:.0f} | {tps / plain:.2f} | {1e6 * (1 / tps - 1 / plain):+.0f} |")


if __name__ == "__main__":
    main()
