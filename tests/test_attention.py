"""The attention backends against the dense reference over the same paged cache: decodes of ragged
lengths (block boundaries included), prefill and chunked prefill chunks, GQA, mixed steps; and FlashInfer's
page description (built on CPU) against an emulation of the semantics FlashInfer documents."""

import pytest
import torch
import torch.nn.functional as F

from server.model.attention import DenseAttention, StepShape, make_attention, resolve_backend
from server.model.attention_flashinfer import paged_csr
from server.model.attention_paged import PagedAttention, length_groups
from server.model.kvcache import PagedKVCache

BS = 4


def filled_cache(lengths, heads=(4, 2), head_dim=8, block_size=BS, dtype=torch.float32, seed=0):
    """A one-layer cache whose sequences own shuffled blocks (every K/V row random, unused rows too)."""
    g = torch.Generator().manual_seed(seed)
    max_len = max(lengths) + 8
    total = sum(-(-n // block_size) for n in lengths)
    cache = PagedKVCache(1, heads[1], head_dim, num_blocks=total + 5, block_size=block_size,
                         max_seqs=len(lengths) + 1, max_len=max_len, dtype=dtype)
    perm = torch.randperm(total + 5, generator=g).tolist()
    cache._free_blocks = perm  # any physical order: pages of a sequence are not contiguous
    slots = [cache.allocate(n) for n in lengths]
    cache.data.copy_(torch.randn(cache.data.shape, generator=g).to(dtype))
    return cache, slots


def run_both(cache, shape, num_heads, dtype=torch.float32, seed=1):
    T = len(shape.decodes) + sum(n for _, _, n in shape.prefills)
    k_rows, v_rows = cache.layer(0)
    q = torch.randn(T, num_heads, k_rows.shape[2], generator=torch.Generator().manual_seed(seed)).to(dtype)
    scaling = k_rows.shape[2] ** -0.5
    ref = DenseAttention(cache.row_table, scaling, shape).run(q, k_rows, v_rows)
    fast = PagedAttention(cache.row_table, cache.block_size, scaling, shape).run(q, k_rows, v_rows)
    return fast, ref


@pytest.mark.parametrize("lengths", [[1], [4], [5], [1, 2, 3, 4, 5, 8, 9], [33, 1, 16, 17, 2, 40, 3, 4]])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (6, 1)])  # GQA 2:1, MHA, MQA
def test_decodes_match_dense(lengths, heads):
    cache, slots = filled_cache(lengths, heads)
    shape = StepShape(decodes=list(zip(slots, lengths, strict=True)), prefills=[])
    fast, ref = run_both(cache, shape, heads[0])
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunks", [[(0, 7)], [(0, 4), (0, 1)], [(3, 5), (8, 1), (4, 4)], [(16, 3)]])
def test_prefill_chunks_match_dense(chunks):
    lengths = [start + n for start, n in chunks]
    cache, slots = filled_cache(lengths)
    shape = StepShape(decodes=[], prefills=[(s, start, n) for s, (start, n) in zip(slots, chunks, strict=True)])
    fast, ref = run_both(cache, shape, 4)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_mixed_step_and_bf16_match_dense():
    lengths = [9, 1, 12, 30, 5]
    cache, slots = filled_cache(lengths, dtype=torch.bfloat16)
    shape = StepShape(decodes=[(slots[0], 9), (slots[1], 1), (slots[2], 12)],
                      prefills=[(slots[3], 20, 10), (slots[4], 0, 5)])
    fast, ref = run_both(cache, shape, 4, dtype=torch.bfloat16)
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_length_groups_bound_the_padding():
    nb = [64, 1, 1, 1, 30, 31, 32, 2, 2, 64, 60]
    groups = length_groups(nb, max_waste=0.25)
    assert sorted(i for g in groups for i in g) == list(range(len(nb)))
    for g in groups:
        assert len(g) * nb[g[0]] <= 1.25 * sum(nb[i] for i in g)
        assert nb[g[0]] == max(nb[i] for i in g)
    padded = sum(len(g) * nb[g[0]] for g in groups)
    assert padded < len(nb) * max(nb) / 2  # the dense path pays all 11 at 64 blocks
    assert length_groups([3, 3, 3]) == [[0, 1, 2]]  # equal lengths: one call, in the given order


def emulate_flashinfer(q, k_pages, v_pages, qo_indptr, kv_indptr, kv_indices, last_page_len, scaling):
    """FlashInfer's documented semantics, as a loop: request b's keys are its pages in order, the last one
    cut to last_page_len; its queries (rows qo_indptr[b]..) are aligned to the end of its keys, causally."""
    out = torch.empty_like(q)
    bs = k_pages.shape[1]
    for b in range(len(kv_indptr) - 1):
        pages = kv_indices[kv_indptr[b]:kv_indptr[b + 1]]
        length = (len(pages) - 1) * bs + last_page_len[b]
        k = k_pages[pages].reshape(-1, *k_pages.shape[2:])[:length].transpose(0, 1)  # [kvH, L, hd]
        v = v_pages[pages].reshape(-1, *v_pages.shape[2:])[:length].transpose(0, 1)
        q0, q1 = qo_indptr[b], qo_indptr[b + 1]
        n = q1 - q0
        mask = torch.arange(length)[None, :] <= torch.arange(length - n, length)[:, None]
        o = F.scaled_dot_product_attention(q[q0:q1].transpose(0, 1), k, v, attn_mask=mask, scale=scaling,
                                           enable_gqa=True)
        out[q0:q1] = o.transpose(0, 1)
    return out


def test_flashinfer_page_description_matches_dense():
    """The CSR FlashInfer is planned with, run by the emulation, gives the reference's output."""
    lengths = [4, 5, 1, 17, 12]
    cache, slots = filled_cache(lengths)
    decodes = [(slots[0], 4), (slots[1], 5), (slots[2], 1)]
    prefills = [(slots[3], 10, 7), (slots[4], 0, 12)]
    k_rows, v_rows = cache.layer(0)
    T = 3 + 7 + 12
    q = torch.randn(T, 4, 8, generator=torch.Generator().manual_seed(3))
    ref = DenseAttention(cache.row_table, 8 ** -0.5, StepShape(decodes, prefills)).run(q, k_rows, v_rows)
    k_pages, v_pages = k_rows.view(-1, BS, 2, 8), v_rows.view(-1, BS, 2, 8)
    indptr, indices, last = paged_csr(cache.blocks_of, BS, decodes)
    assert last == [4, 1, 1] and indptr == [0, 1, 3, 4]
    dec = emulate_flashinfer(q[:3], k_pages, v_pages, list(range(4)), indptr, indices, last, 8 ** -0.5)
    indptr, indices, last = paged_csr(cache.blocks_of, BS, [(s, start + n) for s, start, n in prefills])
    pre = emulate_flashinfer(q[3:], k_pages, v_pages, [0, 7, 19], indptr, indices, last, 8 ** -0.5)
    torch.testing.assert_close(torch.cat([dec, pre]), ref, atol=1e-5, rtol=1e-5)


def test_backend_choice():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "paged"
    assert resolve_backend("dense", cpu) == "dense"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_backend("flashinfer", cpu)
    with pytest.raises(ValueError, match="not one of"):
        resolve_backend("sdpa", cpu)
    cache, _ = filled_cache([3])
    name, planner = make_attention("auto", cache, 0.1, 4)
    assert name == "paged" and isinstance(planner(StepShape([(0, 3)], [])), PagedAttention)


def test_attention_flag_reaches_the_engine_config():
    from server.cli import build_parser
    from server.common.config import settings_from

    s = settings_from(build_parser().parse_args(["serve", "--attention", "dense"]), env={})
    assert s.engine_config().attention == "dense"
    s = settings_from(build_parser().parse_args(["serve"]), env={"RANKSERVE_ATTENTION": "paged"})
    assert s.engine_config().attention == "paged"


def test_a_failing_flashinfer_falls_back_under_auto_and_raises_when_asked_for(monkeypatch):
    import server.model.attention_flashinfer as fi

    cache, _ = filled_cache([3])

    class Broken:
        def __init__(self, *a, **k):
            raise ImportError("flashinfer's JIT could not build")

    monkeypatch.setattr(fi, "FlashInferAttention", Broken)
    assert fi.checked_flashinfer(cache, 0.1, 4, strict=False) is None
    with pytest.raises(ImportError, match="JIT"):
        fi.checked_flashinfer(cache, 0.1, 4, strict=True)


def test_the_flashinfer_start_up_check_compares_with_dense(monkeypatch):
    """With a 'FlashInfer' that is really the paged path, the check passes; with a wrong one it fails."""
    import server.model.attention_flashinfer as fi
    from server.model.attention_paged import PagedAttention as Paged

    class Emulated:
        def __init__(self, cache, scaling, num_heads):
            self.cache, self.scaling = cache, scaling

        def plan(self, shape):
            return Paged(self.cache.row_table, self.cache.block_size, self.scaling, shape)

    class Wrong(Emulated):
        def plan(self, shape):
            return Paged(self.cache.row_table, self.cache.block_size, 2 * self.scaling, shape)

    cache, _ = filled_cache([3])
    monkeypatch.setattr(fi, "FlashInferAttention", Emulated)
    assert isinstance(fi.checked_flashinfer(cache, 0.3, 4, strict=True), Emulated)
    monkeypatch.setattr(fi, "FlashInferAttention", Wrong)
    assert fi.checked_flashinfer(cache, 0.3, 4, strict=False) is None
