"""On a CUDA device: every attention backend against the dense reference on the same cache, in bf16 and
fp32 (run by bench/gpu_check; skipped without CUDA)."""

import pytest
import torch

from server.model.attention import DenseAttention, StepShape, make_attention
from server.model.attention_flashinfer import flashinfer_available
from server.model.kvcache import PagedKVCache

pytestmark = pytest.mark.gpu

SHAPES = [  # (kv heads, query heads, head dim): SmolLM2-135M, a Llama-3-1B-like, MHA
    (3, 9, 64), (8, 32, 64), (4, 4, 128)]


def _cache(lengths, kv_heads, head_dim, dtype, block_size=16):
    total = sum(-(-n // block_size) for n in lengths) + 4
    cache = PagedKVCache(1, kv_heads, head_dim, num_blocks=total, block_size=block_size, max_seqs=len(lengths),
                         max_len=max(lengths) + block_size, dtype=dtype, device="cuda")
    cache._free_blocks = torch.randperm(total).tolist()
    slots = [cache.allocate(n) for n in lengths]
    cache.data.normal_()
    return cache, slots


@pytest.mark.parametrize("backend", ["paged", "flashinfer"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("heads", SHAPES)
def test_backend_matches_dense_on_cuda(backend, dtype, heads):
    if backend == "flashinfer" and not flashinfer_available():
        pytest.skip("flashinfer is not installed")
    if backend == "flashinfer" and dtype == torch.float32:
        pytest.skip("FlashInfer's kernels take fp16/bf16")
    kv_heads, num_heads, hd = heads
    lengths = [1, 15, 16, 17, 300, 1000, 33, 64]
    cache, slots = _cache(lengths, kv_heads, hd, dtype)
    decodes = [(s, n) for s, n in zip(slots[:6], lengths[:6], strict=True)]
    prefills = [(slots[6], 0, 33), (slots[7], 40, 24)]  # a whole prompt, and a chunk after a cached prefix
    shape = StepShape(decodes, prefills)
    T = len(decodes) + 33 + 24
    q = torch.randn(T, num_heads, hd, device="cuda", dtype=dtype)
    k_rows, v_rows = cache.layer(0)
    ref = DenseAttention(cache.row_table, hd ** -0.5, shape).run(q.float(), k_rows.float(), v_rows.float())
    _, planner = make_attention(backend, cache, hd ** -0.5, num_heads)
    out = planner(shape).run(q, k_rows, v_rows)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
