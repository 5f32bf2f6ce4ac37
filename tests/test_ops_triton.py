"""The Triton kernels against the reference: on CPU under TRITON_INTERPRET=1, and on CUDA when one is at hand.
Same tolerances and random batches as tests/test_ops.py.

The interpreter's ``tl.dot`` is a numpy matmul: it reads bf16 operands as their raw 16 bits (wrong numbers)
and multiplies fp32 operands exactly whatever the input precision, so it could not see a kernel that
forgot ``input_precision="ieee"``. The ``interpreted`` fixture makes its dot do what a GPU does: bf16
operands widened to fp32 (their products are exact in fp32, as on tensor cores), fp32 operands of a TF32
dot rounded to TF32's 10 mantissa bits first (round to nearest, ties away, as ``cvt.rna.tf32.f32``), and a
TF32x3 dot as the three TF32 dots Triton lowers it to.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from adapters_store.basemodels import BaseModel
from adapters_store.format import AdapterMeta, CompiledAdapter, ModuleWeights
from server.lora.ops.reference import reference_forward
from server.lora.pool import AdapterPool
from tests.test_ops import adapter_of, check, module_of, one_linear_base, spec

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def interpreted():
    """Re-import the kernels with the interpreter on (they may have been jit-decorated for a GPU before),
    its dot made GPU-like (see the module's docstring)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime import interpreter

    import server.lora.ops.triton_kernels as kernels

    importlib.reload(kernels)
    plain_dot = interpreter.InterpreterBuilder.create_dot
    interpreter.InterpreterBuilder.create_dot = _gpu_like_dot(plain_dot)
    yield kernels
    interpreter.InterpreterBuilder.create_dot = plain_dot
    if old is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = old
    importlib.reload(kernels)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """Where the kernels run: on CPU tensors under the GPU-like interpreter, or on a GPU (``-m gpu``, as
    bench/gpu_check runs them)."""
    if request.param == "cpu":
        request.getfixturevalue("interpreted")
    elif os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the kernels are interpreted in this run: run the GPU tests alone (-m gpu)")
    return request.param


def _gpu_like_dot(plain_dot):
    import numpy as np
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import TensorHandle

    def widen(t):
        if t.dtype.scalar == tl.bfloat16:  # stored as uint16: the high half of an fp32
            return TensorHandle((t.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return t

    def tf32(data):  # keep 10 mantissa bits, round to nearest, ties away
        return ((data.view(np.uint32) + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)

    def create_dot(self, a, b, d, precision, max_num_imprecise_acc):
        a, b = widen(a), widen(b)
        if a.dtype.scalar != tl.float32 or precision == ir.INPUT_PRECISION.IEEE:
            return plain_dot(self, a, b, d, precision, max_num_imprecise_acc)
        big_a, big_b = tf32(a.data), tf32(b.data)
        parts = [(big_a, big_b)]
        if precision == ir.INPUT_PRECISION.TF32x3:  # as Triton's F32DotTC: small*big + big*small + big*big
            parts = [(tf32(a.data - big_a), big_b), (big_a, tf32(b.data - big_b))] + parts
        else:
            assert precision == ir.INPUT_PRECISION.TF32, precision
        for x, y in parts:
            d = plain_dot(self, TensorHandle(x, tl.float32), TensorHandle(y, tl.float32), d, precision,
                          max_num_imprecise_acc)
        return d

    return create_dot


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("counts", [[1, 1, 1, 1], [2, 1, 2, 1], [3, 1, 2, 3], [17, 1, 3, 2]])
def test_decode_segments_match_reference(device, dtype, counts):
    """Segments of 1, 2, 3 tokens (the small-tile kernels: 1-, 2-, 4-row tiles) and 17 (16-row tl.dot
    tiles, the second tile one token), over ranks in three buckets, MoR and base tokens in the same step.
    The fp32 cases hold the kernels to fp32's tolerance: a TF32 dot would miss it."""
    specs = [("plain", 5), ("mor", 4), ("out_scale", 12), ("plain", 40)]
    check("triton", dtype, 24, 40, specs, sum(counts) + 3, seed=len(counts) + counts[0], counts=counts,
          device=device)


def test_tile_rows_follow_the_longest_segment(interpreted):
    assert [interpreted.tile_rows(n) for n in (1, 2, 3, 4, 5, 17, 200)] == [1, 2, 4, 4, 16, 16, 16]


def _zero_base_op(dtype: torch.dtype, mw: ModuleWeights, x: torch.Tensor, tokens: int, device: str):
    """y = B A x for ``tokens`` tokens of one adapter (and one base token after them) over W0 = 0, bias 0:
    the op's correction alone. Returns (y, the reference's y computed in the activation dtype)."""
    d_out, d_in = mw.lora_b.shape[0], mw.lora_a.shape[1]
    base = one_linear_base(d_in, d_out, dtype, 0)
    with torch.no_grad():
        base.model.proj.weight.zero_()
        base.model.proj.bias.zero_()
    base.model.to(device)
    pool = AdapterPool(base, device, dtype, buckets=[(8, 2)], backend="triton")
    pool.install()
    slot = pool.acquire("a", lambda: adapter_of(mw, "plain"))
    xs = torch.cat([x.expand(tokens, d_in), torch.zeros(1, d_in)]).to(device, dtype)  # [tokens + 1, d_in]
    token_slots = torch.tensor([slot] * tokens + [-1])  # a base token too: the op takes its batched path
    layer = pool.layers["proj"]
    with pool.step(token_slots):
        y = layer(xs).cpu()
    assert torch.equal(y[tokens:], torch.zeros(1, d_out, dtype=dtype))
    want = reference_forward(xs.cpu(), layer.weight.cpu(), layer.bias.cpu(), token_slots, {slot: mw})
    return y[:tokens], want[:tokens]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 17])
def test_h_stays_fp32_between_shrink_and_expand(device, dtype, tokens):
    """h = A x = (1 + 2^-12, 1) and B h = h_0 - h_1 = 2^-12 (exact in every dtype). Rounded to fp16 or bf16
    between the two GEMMs, 1 + 2^-12 becomes 1 and the correction vanishes: the reference, which computes
    in the activation dtype, shows that the construction bites."""
    eps = 2.0 ** -12
    a = torch.zeros(2, 8)
    a[0, :2] = 1
    a[1, 0] = 1
    x = torch.zeros(8)
    x[0], x[1] = 1, eps
    y, rounded = _zero_base_op(dtype, ModuleWeights(a, torch.tensor([[1.0, -1.0]]).repeat(4, 1)), x, tokens,
                                 device)
    assert torch.equal(y, torch.full((tokens, 4), eps, dtype=dtype))
    assert torch.equal(rounded, torch.zeros(tokens, 4, dtype=dtype))


@pytest.mark.parametrize("tokens", [1, 17])
def test_fp32_operands_multiply_in_ieee_fp32(device, tokens):
    """x_0 = 1 + 2^-14, A = e_0, B = 1 + 2^-13: y = (1 + 2^-14)(1 + 2^-13) rounded once to fp32. A TF32 dot
    (10 mantissa bits) rounds x_0 or h in the shrink and B in the expand to 1, and y to 1 or 1 + 2^-13."""
    x = torch.zeros(8)
    x[0] = 1 + 2.0 ** -14
    a = torch.zeros(1, 8)
    a[0, 0] = 1
    b = torch.full((4, 1), 1 + 2.0 ** -13)
    y, _ = _zero_base_op(torch.float32, ModuleWeights(a, b), x, tokens, device)
    want = torch.tensor((1 + 2.0 ** -14) * (1 + 2.0 ** -13), dtype=torch.float64).float()
    assert torch.equal(y, want.expand(tokens, 4))


GROUP_SHAPES = {"attn.q_proj": (24, 24), "attn.k_proj": (24, 8), "attn.v_proj": (24, 8), "attn.o_proj": (24, 24),
                "mlp.gate_proj": (24, 40), "mlp.up_proj": (24, 40)}


@pytest.mark.parametrize("counts", [[1, 1, 2, 1], [17, 1, 3, 2]])
def test_projections_sharing_an_input_share_one_shrink_launch(device, monkeypatch, counts):
    """q/k/v and gate/up: one shrink launch per used bucket for the whole group (o_proj alone: its own),
    each member with its own ranks (one absent), MoR and out_scale, every output equal to the reference's;
    a second forward through the same input tensor, refilled in place, recomputes instead of reading the
    first forward's h; the shared h leaves the plan once every member has read it."""
    gen = torch.Generator().manual_seed(sum(counts))
    model = nn.Module()
    model.attn, model.mlp = nn.Module(), nn.Module()
    for path, (d_in, d_out) in GROUP_SHAPES.items():
        parent, name = path.split(".")
        setattr(getattr(model, parent), name, nn.Linear(d_in, d_out))
    model.requires_grad_(False).to(device)
    base = BaseModel("unit", "llama", model, None, "fp", ("generate",), GROUP_SHAPES)
    pool = AdapterPool(base, device, torch.float32, buckets=[(8, 4), (16, 4), (64, 6)], mor_entries=6, backend="triton")
    pool.install()
    modules = {}  # slot -> {path: ModuleWeights or None}
    for i, (form, rank) in enumerate([("plain", 5), ("mor", 4), ("out_scale", 12), ("plain", 40)]):
        mws = {path: module_of("absent" if (i, k) == (0, 1) else form, max(rank - k, 1), *shape, gen)
               for k, (path, shape) in enumerate(GROUP_SHAPES.items())}
        meta = AdapterMeta(method="mor" if form == "mor" else "lora", task="generate", base_model="unit",
                           base_fingerprint="fp")
        adapter = CompiledAdapter(meta, {p: mw for p, mw in mws.items() if mw is not None})
        modules[pool.acquire(f"a{i}", lambda a=adapter: a)] = mws
    slots = list(modules)
    token_slots = torch.cat([torch.full((c,), s) for s, c in zip(slots, counts, strict=True)] + [torch.full((2,), -1)])
    token_slots = token_slots[torch.randperm(token_slots.numel(), generator=gen)]  # [T]
    x = torch.randn(token_slots.numel(), 24, generator=gen).to(device)
    launches = []
    kernels = importlib.import_module("server.lora.ops.triton_kernels")
    monkeypatch.setattr(kernels, "_shrink_kernel", _Recorder(kernels._shrink_kernel, launches))
    with pool.step(token_slots) as plan:
        for forward in range(2):
            if forward:
                x.copy_(torch.randn(x.shape, generator=gen))  # same storage, new values
            for path in GROUP_SHAPES:
                layer = pool.layers[path]
                y = layer(x).cpu()
                want = reference_forward(x.cpu(), layer.weight.cpu(), layer.bias.cpu(), token_slots,
                                         {s: mws[path] for s, mws in modules.items()})
                torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-4, msg=lambda m, p=path: f"{p}: {m}")
    assert not [k for k in plan.shared if isinstance(k, tuple) and k[0] == "triton-h"]  # freed once all read
    members = sorted(grid[2] for grid in launches)
    per_forward = len(plan.buckets)
    assert members == [1] * 2 * per_forward + [2] * 2 * per_forward + [3] * 2 * per_forward


@pytest.mark.slow
def test_tiny_llama_mixed_batch_through_the_kernels(interpreted, tiny_llama):
    """The whole model under the interpreter: q/k/v and gate/up of every layer share their shrink launch,
    8 adapters of every serving form in one batch, each row as its adapter gives alone."""
    from tests.test_mixed_batch_model import run_mixed

    run_mixed(tiny_llama, "generate", lambda o: o.logits, backend="triton")


class _Recorder:
    """Stands in for a jit kernel: records each launch's grid, then launches."""

    def __init__(self, kernel, grids: list):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_kernels_match_reference(dtype):
    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(specs=st.lists(spec, min_size=1, max_size=6), T=st.integers(1, 512), d_in=st.integers(1, 300),
           d_out=st.integers(1, 300), seed=st.integers(0, 2**16))
    def run(specs, T, d_in, d_out, seed):
        check("triton", dtype, d_in, d_out, specs, T, seed, device="cuda")

    run()
