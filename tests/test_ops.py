"""The batched low-rank op (torch backends) against the reference loop, over random mixed batches.

Tolerances (elementwise |op - ref| <= atol + rtol * (|W0 x| + |ref - W0 x|), values of order 1): fp32 1e-5 + 1e-4,
fp16 1e-2 + 1e-2, bf16 3e-2 + 3e-2 (sums of up to ~100 products of order 1, so a few units of the
dtype's epsilon times sqrt(100)). Both sides compute in the test dtype; they differ only in summation
order, and for MoR in where lambda is rounded (folded into A in fp32, then cast).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from adapters_store.basemodels import BaseModel
from adapters_store.format import AdapterMeta, CompiledAdapter, ModuleWeights
from server.lora.buffers import serving_rows
from server.lora.ops.reference import reference_forward
from server.lora.ops.torch_cpu import HAS_GROUPED_MM
from server.lora.plan import MergedBatchError
from server.lora.pool import AdapterPool

TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)}
FORMS = ("plain", "out_scale", "mor", "absent")
# the fused CPU kernel needs a C++ toolchain; where there is one, a failed build fails its tests
HAS_TOOLCHAIN = shutil.which("g++") is not None and shutil.which("ninja") is not None
BACKENDS = ["torch", "torch-gather", "torch-dense", "torch-segments"] + (["torch-bgmv"] if HAS_TOOLCHAIN else []) + (["torch-grouped"] if HAS_GROUPED_MM else [])


def one_linear_base(d_in: int, d_out: int, dtype: torch.dtype, seed: int) -> BaseModel:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Module()
    model.proj = nn.Linear(d_in, d_out)
    with torch.no_grad():
        model.proj.weight.copy_(torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5)
        model.proj.bias.copy_(torch.randn(d_out, generator=gen))
    model.to(dtype).requires_grad_(False)
    return BaseModel("unit", "llama", model, None, "fp", ("generate",), {"proj": (d_in, d_out)})


def module_of(form: str, rank: int, d_in: int, d_out: int, gen: torch.Generator) -> ModuleWeights | None:
    if form == "absent" or rank == 0:
        return None
    if form == "mor":
        n = int(torch.randint(1, 5, (1,), generator=gen))
        rank = max(1, min(rank, 64 // n))
        return ModuleWeights(torch.randn(rank, d_in, generator=gen) * 0.2,
                             torch.randn(d_out, n * rank, generator=gen) * 0.2,
                             gate=torch.randn(n, d_in, generator=gen),
                             rank_scale=1 + 0.3 * torch.randn(n, rank, generator=gen))
    scale = 1 + 0.2 * torch.randn(d_out, generator=gen) if form == "out_scale" else None
    return ModuleWeights(torch.randn(rank, d_in, generator=gen) * 0.2, torch.randn(d_out, rank, generator=gen) * 0.2,
                         out_scale=scale)


def magnitudes(mw: ModuleWeights | None) -> ModuleWeights | None:
    """|A|, |B|, |g| of a module, MoR as the plain rank-N*r module its router weights (each <= 1) scale
    down: the forward of these over |x| bounds the magnitude of every term the real forward sums."""
    if mw is None:
        return None
    rows = serving_rows(mw).float().abs()  # [N*r, d_in], lambda folded in for MoR
    scale = None if mw.out_scale is None else mw.out_scale.float().abs()
    return ModuleWeights(rows, mw.lora_b.float().abs(), out_scale=scale)


def adapter_of(mw: ModuleWeights | None, form: str) -> CompiledAdapter:
    meta = AdapterMeta(method="mor" if form == "mor" else "lora", task="generate", base_model="unit",
                       base_fingerprint="fp")
    return CompiledAdapter(meta, {} if mw is None else {"proj": mw})


def check(backend: str, dtype: torch.dtype, d_in: int, d_out: int, specs: list[tuple[str, int]], T: int,
          seed: int, shape3d: bool = False, device: str = "cpu", with_base: bool = True,
          counts: list[int] | None = None) -> None:
    """``counts``: tokens of each adapter of ``specs`` (the rest of the T tokens base-only, the order
    shuffled); by default each token draws its adapter (or the base) at random."""
    gen = torch.Generator().manual_seed(seed)
    base = one_linear_base(d_in, d_out, dtype, seed)
    base.model.to(device)
    pool = AdapterPool(base, device, dtype, buckets=[(8, 4), (16, 4), (64, 6)], mor_entries=6,
                         backend=backend)
    pool.install()
    mws = [module_of(form, rank, d_in, d_out, gen) for form, rank in specs]
    slots = [pool.acquire(f"a{i}", lambda mw=mw, f=f: adapter_of(mw, f[0]))
             for i, (mw, f) in enumerate(zip(mws, specs, strict=True))]
    if counts is None:
        choice = torch.randint(-1 if with_base else 0, len(slots), (T,), generator=gen)
    else:
        choice = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)] + [torch.full((T - sum(counts),), -1)])
        choice = choice[torch.randperm(T, generator=gen)]
    token_slots = torch.tensor([-1] + slots)[choice + 1]  # [T], -1 = base
    x = torch.randn(T, d_in, generator=gen).to(device, dtype)
    layer = pool.layers["proj"]
    with pool.step(token_slots):
        y = layer(x.reshape(1, T, d_in)).reshape(T, d_out) if shape3d else layer(x)
    want = reference_forward(x.cpu(), layer.weight.cpu(), layer.bias.cpu(), token_slots,
                             dict(zip(slots, mws, strict=True)))
    atol, rtol = TOL[dtype]
    err = (y.cpu().float() - want.float()).abs()
    # Relative to the size of the terms summed, not of the sum: W0 x and the correction may cancel, and so
    # may the rank terms inside B h'. The same forward over absolute values bounds every partial sum.
    terms = reference_forward(x.cpu().float().abs(), layer.weight.cpu().float().abs(), None, token_slots,
                              {s: magnitudes(mw) for s, mw in zip(slots, mws, strict=True)})
    bound = atol + rtol * terms
    assert bool((err <= bound).all()), f"max excess {(err - bound).max():.3g} ({dtype}, specs={specs}, T={T})"


spec = st.tuples(st.sampled_from(FORMS), st.integers(0, 64))
# Multiples of 8 keep the grouped-GEMM path's 16-byte stride rule; other sizes take its gather fallback.
dim = st.one_of(st.sampled_from([8, 16, 40, 64]), st.integers(1, 48))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(spec, min_size=1, max_size=6), T=st.integers(1, 512), d_in=dim, d_out=dim,
       seed=st.integers(0, 2**16), shape3d=st.booleans())
def test_op_matches_reference(backend, dtype, specs, T, d_in, d_out, seed, shape3d):
    check(backend, dtype, d_in, d_out, specs, T, seed, shape3d)


def test_bf16_mor_with_cancelling_rank_terms():
    """Hypothesis found it: MoR's rank terms cancel inside B h', so the error must be judged against the
    terms' magnitude, not the sum's (0.002 over the old bound, well inside the new one)."""
    check("torch", torch.bfloat16, 25, 30, [("mor", 32), ("out_scale", 33)], 249, seed=4225)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_form_in_one_batch(backend):
    specs = [("plain", 3), ("plain", 16), ("out_scale", 8), ("mor", 4), ("absent", 0), ("plain", 64), ("mor", 16)]
    check(backend, torch.float32, 40, 24, specs, 300, seed=7)


def test_no_plan_or_base_only_plan_is_exactly_the_linear():
    base = one_linear_base(12, 10, torch.float32, 0)
    reference = nn.Linear(12, 10)
    reference.load_state_dict(base.model.proj.state_dict())
    pool = AdapterPool(base, "cpu", torch.float32, buckets=[(8, 2)])
    pool.install()
    slot = pool.acquire("a", lambda: adapter_of(module_of("plain", 4, 12, 10, torch.Generator()), "plain"))
    x = torch.randn(5, 12)
    assert torch.equal(pool.layers["proj"](x), reference(x))
    with pool.step(torch.full((5,), -1)) as plan:
        assert not plan.has_adapters
        assert torch.equal(pool.layers["proj"](x), reference(x))
    with pool.step(torch.tensor([slot, -1, -1, -1, -1])):
        y = pool.layers["proj"](x)
    assert torch.equal(y[1:], reference(x[1:]))
    assert not torch.allclose(y[0], reference(x[:1])[0])


def test_token_count_mismatch_and_bad_slots_are_named():
    base = one_linear_base(6, 6, torch.float32, 0)
    pool = AdapterPool(base, "cpu", torch.float32, buckets=[(8, 2)])
    pool.install()
    slot = pool.acquire("a", lambda: adapter_of(module_of("plain", 4, 6, 6, torch.Generator()), "plain"))
    with pool.step(torch.tensor([slot, slot])), pytest.raises(ValueError, match="plan has 2"):
        pool.layers["proj"](torch.randn(3, 6))
    with pytest.raises(ValueError, match="hold no resident adapter"):
        pool.plan(torch.tensor([1 - slot]))
    with pytest.raises(ValueError, match="must be -1 or a slot"):
        pool.plan(torch.tensor([5]))
    pool.merge("a")
    with pytest.raises(MergedBatchError, match="unmerge"):
        pool.plan(torch.tensor([slot, -1]))


@pytest.mark.parametrize("backend", ["torch-gather", "torch"])
def test_without_row_table_the_buckets_serve(backend, monkeypatch):
    import server.lora.plan

    monkeypatch.setattr(server.lora.plan, "ROWS_CAP", 0)  # no [T_a, R] row table: per-bucket paths only
    specs = [("plain", 3), ("out_scale", 8), ("mor", 4), ("plain", 64), ("mor", 16)]
    check(backend, torch.float32, 40, 24, specs, 7, seed=3)


@pytest.mark.parametrize("form", ["plain", "out_scale", "mor"])
@pytest.mark.parametrize("T", [1, 9, 200])
def test_one_adapter_alone_or_with_base_tokens(form, T):
    check("torch", torch.float32, 40, 24, [(form, 12)], T, seed=T)  # the single-adapter path, some -1 tokens
    check("torch", torch.float32, 40, 24, [(form, 12)], T, seed=T, with_base=False)  # every token
    check("torch", torch.float32, 40, 24, [(form, 12), (form, 12)], T, seed=T + 1)


def test_auto_picks_the_cheapest_formulation_of_the_cost_model(monkeypatch):
    """``auto``: one adapter -> single; a few adapters decoding -> dense; more -> segments; past the kept
    rows' bound (K*R > KEPT_MAX_ROWS) the rows gather, or grouped GEMMs for long segments (where torch has
    them); with the fused CPU kernel built, bgmv for short segments. Each is checked against the
    reference above."""
    from server.lora.ops import cpu_kernel
    from server.lora.ops.torch_cpu import TorchLowRank, costs

    base = one_linear_base(256, 256, torch.float32, 0)
    pool = AdapterPool(base, "cpu", torch.float32, buckets=[(8, 40)], mor_entries=0, backend="torch")
    pool.install()
    gen = torch.Generator().manual_seed(0)
    slots = [pool.acquire(f"a{i}", lambda: adapter_of(module_of("plain", 8, 256, 256, gen), "plain"))
             for i in range(40)]
    op, module = TorchLowRank("auto"), pool.slots["proj"]

    def pick(adapters: int, per_adapter: int) -> str:
        plan = pool.plan(torch.tensor(slots[:adapters]).repeat_interleave(per_adapter))
        return op.choose(plan, module, 4)

    if HAS_TOOLCHAIN:
        assert cpu_kernel.get(wait=True) is not None, cpu_kernel.error()
        assert pick(16, 1) == "bgmv" and pick(40, 1) == "bgmv"
        assert pick(5, 256) == "segments"  # long segments: one GEMM per adapter beats per-token products
    with monkeypatch.context() as m:
        m.setattr(cpu_kernel, "get", lambda wait=False: None)  # the torch formulations alone
        assert pick(1, 4) == "single"
        assert pick(2, 1) == "dense"
        assert pick(16, 1) == "segments"
        assert pick(5, 64) == "segments"
        assert pick(40, 1) == "gather"  # 40 * 8 rows > KEPT_MAX_ROWS: no kept rows
        if HAS_GROUPED_MM:
            assert pick(40, 64) == "grouped"
    plan = pool.plan(torch.tensor(slots[:3]))
    est = costs(plan, [(256, 256)], HAS_GROUPED_MM, cpu_kernel.get() is not None)
    assert op.choose(plan, module, 4) == min(est, key=est.__getitem__)
    assert plan.choices  # decided once per step and module shape
