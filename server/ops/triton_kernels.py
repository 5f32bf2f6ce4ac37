"""SGMV-style Triton kernels for the batched low-rank op (CUDA). Importable without triton installed."""

from __future__ import annotations

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    AVAILABLE = True
except ImportError:  # triton is an optional extra: the torch path serves without it
    AVAILABLE = False
