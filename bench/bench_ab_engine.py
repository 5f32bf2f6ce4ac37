"""The same mixed workload through whichever tree is on PYTHONPATH, for before/after comparisons across
commits (it uses only the engine API every tree since the server reorganisation shares: Engine, EngineConfig,
GenerateParams). Random Llama, hidden 256, 4 layers, 32 streams x 24 tokens, LoRA r=8, merge mode off:
base only, every request on one adapter, requests over 5 adapters; best of 3 rounds, tokens/s.

    git worktree add /tmp/old <commit>
    for i in 1 2 3 4 5; do PYTHONPATH=/tmp/old python bench/bench_ab_engine.py old; PYTHONPATH=. python bench/bench_ab_engine.py new; done
"""
import hashlib
import sys
import time
from types import SimpleNamespace

import torch
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from adapters_store.basemodels import BaseModel, target_modules
from adapters_store.synth import random_adapter
from server.engine import Engine, EngineConfig, GenerateParams


class Store:
    """The store interface the engine reads (get, load), in memory: every adapter public."""

    def __init__(self, adapters: dict):
        self.items = {k: (SimpleNamespace(id=k, digest=hashlib.sha256(k.encode()).hexdigest(), owner=None,
                                          task="generate"), a) for k, a in adapters.items()}

    def get(self, adapter_id, owner=None):
        return self.items[adapter_id][0]

    def load(self, adapter_id, base=None, digest=None):
        return self.items[adapter_id][1]


def base_model(hidden: int = 256, layers: int = 4) -> BaseModel:
    """Random Llama weights of this shape (speed only), with a one-word tokenizer."""
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                      head_dim=64, vocab_size=8000, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    tok.eos_token = "<unk>"
    return BaseModel(f"llama-{hidden}x{layers}", "llama", model, tok, "dummy", ("generate",),
                     target_modules(model, "llama"))


def run(eng: Engine, adapters: list[str | None], tokens: int = 24) -> float:
    """Generated tokens per second for one 16-token-prompt request per entry of ``adapters`` (None = base)."""
    g = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    handles = [eng.submit_generate(GenerateParams(prompt_ids=torch.randint(5, 8000, (16,), generator=g).tolist(),
                                                  adapter_id=a, max_tokens=tokens, temperature=0.0,
                                                  ignore_eos=True))
               for a in adapters]
    n = sum(len(ev.token_ids) for h in handles for ev in h.events_sync(timeout=600))
    return n / (time.perf_counter() - start)


def wait_for_cpu_kernel() -> None:
    """Measure the steady state: build (or load) the fused CPU kernel before the first round, so no
    round runs on the torch formulations while it compiles on a background thread (an older tree
    without the kernel measures as it is)."""
    try:
        from server.lora.ops import cpu_kernel
    except ImportError:
        print("(no fused CPU kernel in this tree)")
        return
    t = time.perf_counter()
    ready = cpu_kernel.get(wait=True) is not None
    print(f"(fused CPU kernel {'ready' if ready else 'unavailable: ' + str(cpu_kernel.error())}"
          f" after {time.perf_counter() - t:.1f} s)")


def main() -> None:
    torch.set_num_threads(1)
    wait_for_cpu_kernel()
    base = base_model()
    ads = {f"a{i}": random_adapter(base, "lora", 8, seed=i, std=0.05) for i in range(5)}
    eng = Engine(base_model(), Store(ads), EngineConfig(max_running=32, max_batch_tokens=512, max_model_len=256,
                                                         kv_cache_bytes=64 << 20, merge_single_adapter=False))
    eng.start()
    cases = {"base": [None] * 32, "one": ["a0"] * 32, "five": [f"a{i % 5}" for i in range(32)]}
    best = dict.fromkeys(cases, 0.0)
    try:
        for _ in range(3):
            for k, v in cases.items():
                best[k] = max(best[k], run(eng, v))
    finally:
        eng.shutdown()
    print(sys.argv[1] if len(sys.argv) > 1 else "", " ".join(f"{k}={v:.0f}" for k, v in best.items()))


if __name__ == "__main__":
    main()
