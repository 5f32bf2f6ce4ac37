"""The CUDA attention: FlashInfer's batch decode and batch prefill kernels, reading the pages in place.

The cache's flat rows of a layer, viewed as ``[num_blocks, block_size, kv_heads, head_dim]``, are exactly
FlashInfer's "NHD" paged layout, so nothing is copied: each step describes its sequences in FlashInfer's
CSR form (``paged_csr``) and both wrappers are planned once per step, then run by every layer.

    kv_indptr[b] .. kv_indptr[b+1]   the slice of kv_indices holding request b's pages, in order
    kv_last_page_len[b]              rows used in its last page (1 .. block_size)
    qo_indptr (prefill only)         request b's queries are rows qo_indptr[b] .. qo_indptr[b+1] of q;
                                     causal=True aligns them to the END of its keys (chunked prefill)

``paged_csr`` runs on CPU and is tested there against an emulation of these semantics; the kernels
themselves only in the ``gpu`` tests (tests/test_attention_gpu.py, run by bench/gpu_check).
"""

from __future__ import annotations

import functools
import logging

import torch

from server.model.attention import DenseAttention, StepAttention, StepShape

log = logging.getLogger("rankserve.attention")

WORKSPACE_BYTES = 128 << 20  # FlashInfer's float workspace, as in its examples


@functools.cache
def flashinfer_available() -> bool:
    try:
        import flashinfer  # noqa: F401
    except Exception:  # ImportError, or a build that does not match this torch/CUDA
        return False
    return True


def paged_csr(blocks_of, block_size: int, seqs_and_lens: list[tuple[int, int]]) -> tuple[list[int], list[int], list[int]]:
    """(kv_indptr [B+1], kv_indices, kv_last_page_len [B]) as host lists for sequences given as
    (slot, length attended); ``blocks_of(slot)`` lists a sequence's blocks in position order."""
    indptr, indices, last = [0], [], []
    for seq, length in seqs_and_lens:
        n = -(-length // block_size)
        indices.extend(blocks_of(seq)[:n])
        indptr.append(len(indices))
        last.append(length - (n - 1) * block_size)
    return indptr, indices, last


class FlashInferAttention:
    """Holds the two wrappers (and their workspace) for the engine's life; ``plan`` is called per step."""

    def __init__(self, cache, scaling: float, num_heads: int):
        import flashinfer

        self.cache = cache
        self.scaling = scaling
        self.num_heads = num_heads
        k_rows, _ = cache.layer(0)
        self.kv_heads, self.head_dim = int(k_rows.shape[1]), int(k_rows.shape[2])
        self.device = k_rows.device
        self.dtype = k_rows.dtype
        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        # tensor cores pay off once several query heads share a KV head (FlashInfer's own advice)
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", use_tensor_cores=num_heads // self.kv_heads >= 4)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")

    @staticmethod
    def _tensors(lists: tuple[list[int], ...]) -> list[torch.Tensor]:
        # host tensors: plan() reads indptr/last_page_len on the host anyway and copies to its own device
        # buffers itself; handing it device tensors would cost a device->host sync per step
        return [torch.tensor(x, dtype=torch.int32) for x in lists]

    def plan(self, shape: StepShape) -> FlashInferStep:
        bs = self.cache.block_size
        common = dict(num_qo_heads=self.num_heads, num_kv_heads=self.kv_heads, page_size=bs)
        if shape.decodes:
            indptr, indices, last = self._tensors(paged_csr(self.cache.blocks_of, bs, shape.decodes))
            self.decode.plan(indptr, indices, last, head_dim=self.head_dim, pos_encoding_mode="NONE",
                             sm_scale=self.scaling, q_data_type=self.dtype, kv_data_type=self.dtype, **common)
        if shape.prefills:
            seqs = [(seq, start + n) for seq, start, n in shape.prefills]
            qo = [0]
            for _, _, n in shape.prefills:
                qo.append(qo[-1] + n)
            qo_t, indptr, indices, last = self._tensors((qo, *paged_csr(self.cache.blocks_of, bs, seqs)))
            self.prefill.plan(qo_t, indptr, indices, last, head_dim_qk=self.head_dim, causal=True,
                              sm_scale=self.scaling, q_data_type=self.dtype, kv_data_type=self.dtype, **common)
        return FlashInferStep(self, len(shape.decodes), bool(shape.prefills))


class FlashInferStep(StepAttention):
    def __init__(self, owner: FlashInferAttention, num_decode: int, has_prefill: bool):
        self.owner = owner
        self.num_decode = num_decode
        self.has_prefill = has_prefill

    def run(self, q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor) -> torch.Tensor:
        bs = self.owner.cache.block_size
        pages = (k_rows.view(-1, bs, *k_rows.shape[1:]), v_rows.view(-1, bs, *v_rows.shape[1:]))  # NHD, no copy
        B = self.num_decode
        parts = []
        if B:
            parts.append(self.owner.decode.run(q[:B].contiguous(), pages))  # [B, H, hd]
        if self.has_prefill:
            parts.append(self.owner.prefill.run(q[B:].contiguous(), pages))  # [T - B, H, hd]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def checked_flashinfer(cache, scaling: float, num_heads: int, strict: bool) -> FlashInferAttention | None:
    """FlashInfer for ``cache``, after one decode and one chunked prefill on a scratch cache of the same
    geometry agree with the dense reference (this also JIT-compiles its kernels at start-up, not inside the
    first request). A failure raises when ``strict`` (``--attention flashinfer``), else is logged and None
    is returned (``auto`` then runs the torch path)."""
    try:
        k_rows, _ = cache.layer(0)
        scratch = type(cache)(1, int(k_rows.shape[1]), int(k_rows.shape[2]), num_blocks=8, block_size=cache.block_size,
                              max_seqs=2, max_len=4 * cache.block_size, dtype=k_rows.dtype, device=k_rows.device)
        seqs = [scratch.allocate(cache.block_size + 3), scratch.allocate(2 * cache.block_size)]
        scratch.data.normal_()
        shape = StepShape(decodes=[(seqs[0], cache.block_size + 3)], prefills=[(seqs[1], 5, 2 * cache.block_size - 5)])
        q = torch.randn(1 + 2 * cache.block_size - 5, num_heads, int(k_rows.shape[2]), device=k_rows.device,
                        dtype=k_rows.dtype)
        ks, vs = scratch.layer(0)
        want = DenseAttention(scratch.row_table, scaling, shape).run(q.float(), ks.float(), vs.float())
        got = FlashInferAttention(scratch, scaling, num_heads).plan(shape).run(q, ks, vs).float()
        err = float((got - want).abs().max())
        if not err < 5e-2:
            raise RuntimeError(f"FlashInfer differs from the dense reference by {err:.3g}")
        return FlashInferAttention(cache, scaling, num_heads)
    except Exception as e:
        if strict:
            raise
        log.warning("FlashInfer attention failed its start-up check (%s: %s); using the paged torch path",
                    type(e).__name__, e)
        return None
