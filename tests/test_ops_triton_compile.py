"""The Triton kernels compile for a Hopper GPU (sm_90, the H200's) without one: Triton's own compiler and
ptxas, target given explicitly, no driver. The interpreter runs Python, so only this finds what the GPU
compiler refuses (layouts, pointer casts, dot shapes); and the PTX shows which multiply each variant got
(``triton_kernels.dot_precision``): no TF32 with fp32 activations, tensor-core MMA for the 16-bit 16-row
tiles, no MMA in the small decode tiles.

Each compile runs in a fresh process: interpreted launches earlier in a session leave triton.language
patched for the interpreter, and the compiler then fails."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

ROOT = Path(__file__).resolve().parents[1]


def compile_both(dtype: str, rows: int) -> dict[str, str]:
    """PTX of the shrink and the expand (with out_scale) for activations of ``dtype`` and ``rows``-row tiles."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from server.lora.ops import triton_kernels as k

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    pointers = {"x_ptr": dtype, "bt_ptr": dtype, "y_ptr": dtype, "g_ptr": dtype, "h_ptr": "fp32", "order_ptr": "i64",
                "a_ptrs": "i64", "rank_ptrs": "i64", "rank_ptr": "i32", "seg_start_ptr": "i32", "seg_slot_ptr": "i32"}
    dot = rows == k.BLOCK_M
    constexprs = {
        "shrink": {"BLOCK_M": rows, "BLOCK_K": 64 if dot else 16, "BLOCK_R": 16 if dot else 8, "DOT": dot,
                   "PRECISION": k.dot_precision(torch_dtype, expand=False)},
        "expand": {"BLOCK_M": rows, "BLOCK_N": 64, "BLOCK_R": 16, "DOT": dot,
                   "PRECISION": k.dot_precision(torch_dtype, expand=True), "SCALED": True}}
    out = {}
    for name, kernel in (("shrink", k._shrink_kernel), ("expand", k._expand_kernel)):
        constants = {p.name for p in kernel.params if p.is_constexpr}
        assert constants == set(constexprs[name]), f"{name} takes {sorted(constants)}"
        signature = {a: "constexpr" if a in constants else f"*{pointers[a]}" if a in pointers else "i32"
                     for a in kernel.arg_names}
        src = ASTSource(kernel, signature, constexprs=constexprs[name])
        out[name] = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    return out


@pytest.mark.parametrize(("dtype", "rows"), [
    ("bf16", 1), ("bf16", 16), ("fp32", 16),
    *[pytest.param(d, r, marks=pytest.mark.slow) for d, r in
      [("bf16", 4), ("fp16", 1), ("fp16", 16), ("fp32", 1)]]])
def test_kernels_compile_for_hopper(tmp_path, dtype, rows):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a fresh compile, not a cached one
    p = subprocess.run([sys.executable, "-m", "tests.test_ops_triton_compile", dtype, str(rows)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ptx = json.loads(p.stdout)
    shrink, expand = ptx["shrink"], ptx["expand"]
    if dtype == "fp32":  # every product in IEEE fp32: no TF32, no tensor cores
        assert "tf32" not in shrink + expand and "mma" not in shrink + expand
    elif rows == 16:  # 16-bit operands on the tensor cores; h (fp32) times B (16-bit, exact in TF32) as tf32x3
        assert "mma" in shrink and "mma" in expand and "tf32" in expand
    else:  # the small decode tiles: fp32 FMAs, no tl.dot
        assert "mma" not in shrink + expand


if __name__ == "__main__":
    print(json.dumps(compile_both(sys.argv[1], int(sys.argv[2]))))
