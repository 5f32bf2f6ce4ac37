"""The Triton kernels against the reference: on CPU under TRITON_INTERPRET=1 (fp32, fp16; the interpreter
gets bf16 wrong, so bf16 runs only on a GPU), and on CUDA when one is at hand. Same tolerances and
random batches as tests/test_ops.py."""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_ops import check, spec

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def interpreted():
    """Re-import the kernels with the interpreter on (they may have been jit-decorated for a GPU before)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import server.lora.ops.triton_kernels as kernels

    importlib.reload(kernels)
    yield kernels
    if old is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = old
    importlib.reload(kernels)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreted_kernels_match_reference(interpreted, dtype):
    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(specs=st.lists(spec, min_size=1, max_size=5), T=st.integers(1, 96), d_in=st.integers(1, 80),
           d_out=st.integers(1, 80), seed=st.integers(0, 2**16))
    def run(specs, T, d_in, d_out, seed):
        check("triton", dtype, d_in, d_out, specs, T, seed)

    run()


@pytest.mark.slow
def test_interpreted_kernels_every_form_and_long_segments(interpreted):
    specs = [("plain", 3), ("plain", 16), ("out_scale", 8), ("mor", 4), ("absent", 0), ("plain", 64), ("mor", 16)]
    check("triton", torch.float32, 40, 72, specs, 200, seed=7)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_kernels_match_reference(dtype):
    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(specs=st.lists(spec, min_size=1, max_size=6), T=st.integers(1, 512), d_in=st.integers(1, 300),
           d_out=st.integers(1, 300), seed=st.integers(0, 2**16))
    def run(specs, T, d_in, d_out, seed):
        check("triton", dtype, d_in, d_out, specs, T, seed, device="cuda")

    run()
