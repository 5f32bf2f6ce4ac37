"""bf16 serving checked on CPU against the fp32 reference: the whole step (flat runner, paged attention,
the batched low-rank op with LoRA and DoRA adapters mixed with base-only rows) and the engine's greedy
output. The CUDA half of the same claim is in the gpu tests run by bench/gpu_check."""

from __future__ import annotations

import copy

import pytest
import torch

from adapters_store.synth import random_adapter
from server.lora.pool import AdapterPool
from server.model.kvcache import PagedKVCache
from server.model.runner import Chunk, ModelRunner


def serving_copy(tiny_llama, dtype, device="cpu"):
    base = copy.copy(tiny_llama)
    base.model = copy.deepcopy(tiny_llama.model).to(device, dtype)
    base.pristine = None
    pool = AdapterPool(base, device, dtype, max_slots=4, max_rank=16)
    pool.install()
    slots = [pool.acquire(m, lambda m=m: random_adapter(tiny_llama, m, rank=8, seed=5, std=0.2))
             for m in ("lora", "dora")]
    cfg = base.model.config
    cache = PagedKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                         num_blocks=32, block_size=4, max_seqs=4, max_len=64, dtype=dtype, device=device)
    return ModelRunner(base.model, cache, pool.step), cache, slots


def run_steps(runner, cache, adapter_slots):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 500, (n,), generator=g).tolist() for n in (9, 6, 13)]
    seqs = [cache.allocate(len(p) + 2) for p in prompts]
    slot_of = [adapter_slots[0], adapter_slots[1], -1]  # LoRA, DoRA, base only
    first = runner.forward([Chunk(s, p, 0, a) for s, p, a in zip(seqs, prompts, slot_of, strict=True)],
                           all_positions=True)
    second = runner.forward([Chunk(s, [7], len(p), a) for s, p, a in zip(seqs, prompts, slot_of, strict=True)])
    return torch.cat([*first, torch.stack(second)])  # [T, V]


def test_bf16_step_matches_fp32_reference(tiny_llama):
    ref = run_steps(*serving_copy(tiny_llama, torch.float32))
    got = run_steps(*serving_copy(tiny_llama, torch.bfloat16))
    assert got.dtype == torch.float32  # logits always leave the runner in fp32
    scale = ref.abs().max()
    err = (got - ref).abs().max() / scale
    assert err < 3e-2, float(err)
    # the tolerance is far below what the adapters change: a wrong adapter path could not pass
    runner, cache, _ = serving_copy(tiny_llama, torch.float32)
    no_adapters = run_steps(runner, cache, [-1, -1])
    assert (no_adapters - ref).abs().max() / scale > 10 * err


def test_engine_serves_in_bf16_on_cpu():
    from adapters_store.basemodels import load_base
    from server.engine import Engine, EngineConfig, GenerateParams

    outs = {}
    for dtype in ("float32", "bfloat16"):
        eng = Engine(load_base("tiny-llama"), store=None,
                     config=EngineConfig(dtype=dtype, max_batch_tokens=64, max_running=4, max_model_len=128))
        assert eng.cache.data.dtype == getattr(torch, dtype)
        assert next(eng.base.model.parameters()).dtype == getattr(torch, dtype)
        eng.start()
        try:
            handle = eng.submit_generate(GenerateParams(prompt_ids=list(range(10, 30)), max_tokens=4,
                                                        temperature=0.0, ignore_eos=True))
            outs[dtype] = [t for e in handle.events_sync(timeout=60) for t in e.token_ids]
        finally:
            eng.shutdown()
    assert len(outs["bfloat16"]) == 4
    assert outs["bfloat16"][:2] == outs["float32"][:2]


@pytest.mark.gpu
def test_bf16_step_on_cuda_matches_fp32_cpu_reference(tiny_llama):
    ref = run_steps(*serving_copy(tiny_llama, torch.float32))
    got = run_steps(*serving_copy(tiny_llama, torch.bfloat16, "cuda")).cpu()
    err = (got - ref).abs().max() / ref.abs().max()
    assert err < 3e-2, float(err)
