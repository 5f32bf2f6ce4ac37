"""The flat-batch runner reproduces the HF model's own forward, whatever the mix of chunks in a step."""

import pytest
import torch

from server.engine.classify import pooled_hidden
from server.model.kvcache import KVCacheFull, PagedKVCache
from server.model.runner import Chunk, ModelRunner


def make_runner(base, num_blocks=64, block_size=4, max_seqs=8, max_len=64, attention="auto"):
    cfg = base.model.config
    cache = PagedKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                         num_blocks=num_blocks, block_size=block_size, max_seqs=max_seqs, max_len=max_len)
    return ModelRunner(base.model, cache, attention=attention), cache


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]  # [L, V]


def prompts(n, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 500, (n_,), generator=g).tolist() for n_ in lengths[:n]]


@pytest.mark.parametrize("attention", ["dense", "paged"])
def test_mixed_prefill_and_decode_match_hf(tiny_llama, attention):
    runner, cache = make_runner(tiny_llama, attention=attention)
    seqs = prompts(4, [5, 9, 13, 3])
    full = [s + [7, 11, 13] for s in seqs]  # the "generated" continuation fed back as decodes
    slots = [cache.allocate(len(f)) for f in full]
    ref = [hf_logits(tiny_llama.model, f) for f in full]
    done = [0] * 4
    # step 1: sequences 0 and 1 prefill whole, sequence 2 only its first 6 tokens (chunked prefill)
    steps = [
        {0: len(seqs[0]), 1: len(seqs[1]), 2: 6},
        # step 2: decodes of 0 and 1, the rest of 2's prompt, all of 3's prompt
        {0: 1, 1: 1, 2: len(seqs[2]) - 6, 3: len(seqs[3])},
        {0: 1, 1: 1, 2: 1, 3: 1},
        {0: 1, 1: 1, 2: 2, 3: 1},  # a 2-token chunk that is not a prompt (speculative-style) also works
    ]
    for plan in steps:
        chunks = [Chunk(slots[i], full[i][done[i]:done[i] + n], done[i]) for i, n in plan.items()]
        outs = runner.forward(chunks, all_positions=True)
        for (i, n), out in zip(plan.items(), outs, strict=True):
            assert out.shape == (n, tiny_llama.model.config.vocab_size)
            torch.testing.assert_close(out, ref[i][done[i]:done[i] + n], atol=1e-4, rtol=1e-4)
            done[i] += n
    last = runner.forward([Chunk(slots[3], full[3][done[3]:done[3] + 1], done[3])])
    torch.testing.assert_close(last[0], ref[3][done[3]], atol=1e-4, rtol=1e-4)


def test_last_token_logits_and_order(tiny_llama):
    runner, cache = make_runner(tiny_llama)
    seqs = prompts(3, [7, 1, 4], seed=1)
    slots = [cache.allocate(len(s)) for s in seqs]
    outs = runner.forward([Chunk(slots[i], s, 0) for i, s in enumerate(seqs)])
    for s, out in zip(seqs, outs, strict=True):
        torch.testing.assert_close(out, hf_logits(tiny_llama.model, s)[-1], atol=1e-4, rtol=1e-4)


def test_freed_blocks_are_reused_without_leaking_old_keys(tiny_llama):
    runner, cache = make_runner(tiny_llama, num_blocks=4, block_size=4, max_seqs=2)
    a = prompts(1, [12], seed=2)[0]
    b = prompts(1, [9], seed=3)[0]
    sa = cache.allocate(16)
    runner.forward([Chunk(sa, a, 0)])
    cache.free(sa)
    cache.free(sa)  # double free is a no-op
    assert cache.num_free_blocks == 4 and cache.num_free_seqs == 2
    sb = cache.allocate(len(b))
    out = runner.forward([Chunk(sb, b, 0)])[0]
    torch.testing.assert_close(out, hf_logits(tiny_llama.model, b)[-1], atol=1e-4, rtol=1e-4)


def test_cache_refuses_over_capacity():
    cache = PagedKVCache(1, 1, 4, num_blocks=3, block_size=4, max_seqs=2, max_len=16)
    assert cache.can_allocate(12) and not cache.can_allocate(13)
    cache.allocate(12)
    assert not cache.can_allocate(1)
    with pytest.raises(KVCacheFull, match="blocks"):
        cache.allocate(1)
    with pytest.raises(KVCacheFull, match="max_len of 16"):
        cache.allocate(17)


def test_step_context_receives_token_slots_in_flat_order(tiny_llama):
    seen = []

    class Spy:
        def __init__(self, slots):
            seen.append(slots.tolist())

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    runner, cache = make_runner(tiny_llama)
    runner.step_context = Spy
    s0, s1 = cache.allocate(8), cache.allocate(8)
    runner.forward([Chunk(s0, [5, 6, 7], 0, adapter_slot=3), Chunk(s1, [9], 0, adapter_slot=-1)])
    assert seen == [[-1, 3, 3, 3]]  # the decode-like 1-token chunk is first in flat order


@pytest.mark.parametrize("pooling", ["last", "mean", "first"])
def test_pooled_hidden_matches_unpadded_rows(tiny_llama, pooling):
    seqs = prompts(2, [6, 3], seed=4)
    L = 6
    ids = torch.tensor([s + [0] * (L - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs])
    got = pooled_hidden(tiny_llama.model, True, ids, mask, [pooling, pooling])
    for b, s in enumerate(seqs):
        with torch.no_grad():
            h = tiny_llama.model.model(torch.tensor([s])).last_hidden_state[0]
        want = {"last": h[-1], "first": h[0], "mean": h.mean(0)}[pooling]
        torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-5)


def test_cache_grows_on_demand_and_refuses_without_taking_anything():
    cache = PagedKVCache(1, 1, 4, num_blocks=4, block_size=4, max_seqs=2, max_len=16)
    s = cache.allocate(3)
    assert cache.num_free_blocks == 3
    assert cache.grow(s, 4) and cache.num_free_blocks == 3  # still inside the first block
    assert cache.grow(s, 9) and cache.num_free_blocks == 1
    rows = cache.row_table[s, :9].tolist()
    assert len(set(rows)) == 9  # every position has its own row
    other = cache.allocate(2)
    assert not cache.grow(other, 8) and cache.num_free_blocks == 0  # needs 1 more block: none left
    cache.free(s)
    assert cache.grow(other, 8) and cache.num_free_blocks == 2
