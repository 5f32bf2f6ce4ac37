"""The Triton kernels compile for a Hopper GPU (sm_90, the H200's) without one: Triton's own compiler and
ptxas, target given explicitly, no driver. The interpreter runs Python, so only this finds what the GPU
compiler refuses (layouts, pointer casts, dot shapes); and the PTX shows which multiply each variant got:
tensor-core MMA for fp16/bf16 16-row tiles, no TF32 anywhere, no MMA in the small decode tiles."""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def compiled():
    """The kernels jit-decorated for a GPU (the slow suite runs with TRITON_INTERPRET=1)."""
    old = os.environ.pop("TRITON_INTERPRET", None)
    import server.lora.ops.triton_kernels as kernels

    importlib.reload(kernels)
    yield kernels
    if old is not None:
        os.environ["TRITON_INTERPRET"] = old
    importlib.reload(kernels)


def _ptx(kernel, dtype: str, constexprs: dict) -> str:
    """Compile ``kernel`` for sm_90 with activations of ``dtype`` and return its PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointers = {"x_ptr": dtype, "bt_ptr": dtype, "y_ptr": dtype, "g_ptr": dtype, "h_ptr": "fp32", "order_ptr": "i64",
                "a_ptrs": "i64", "rank_ptrs": "i64", "rank_ptr": "i32", "seg_start_ptr": "i32", "seg_slot_ptr": "i32"}
    constants = {p.name for p in kernel.params if p.is_constexpr}
    signature = {name: "constexpr" if name in constants else f"*{pointers[name]}" if name in pointers else "i32"
                 for name in kernel.arg_names}
    return triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32)).asm["ptx"]


@pytest.mark.parametrize(("dtype", "rows"), [
    ("bf16", 1), ("bf16", 16), ("fp32", 16),
    *[pytest.param(d, r, marks=pytest.mark.slow) for d, r in
      [("bf16", 2), ("bf16", 4), ("fp16", 1), ("fp16", 4), ("fp16", 16), ("fp32", 1), ("fp32", 4)]]])
def test_kernels_compile_for_hopper(compiled, tmp_path, monkeypatch, dtype, rows):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # a fresh compile, not a cached one
    dot = rows == compiled.BLOCK_M
    shrink = _ptx(compiled._shrink_kernel, dtype, {"BLOCK_M": rows, "BLOCK_K": 64 if dot else 16,
                                                   "BLOCK_R": 16 if dot else 8, "DOT": dot})
    expand = _ptx(compiled._expand_kernel, dtype, {"BLOCK_M": rows, "BLOCK_N": 64, "BLOCK_R": 16, "DOT": dot,
                                                   "SCALED": True})
    assert "tf32" not in shrink + expand  # fp32 operands multiply in IEEE fp32
    assert ("mma" in shrink) == (dot and dtype != "fp32")  # tensor cores exactly where the operands are 16-bit
    assert "mma" not in expand  # fp32 h times B upcast to fp32: IEEE fp32, no tensor cores
