"""MoR's compact file form (docs/FORMAT.md): lora_b [d_out, r] + expert_out_scale [N, d_out] expand, once at
load, to exactly the B' [d_out, N*r] an expanded file holds; every malformed compact tensor is refused by
name, and a hostile one is refused before its expansion allocates anything."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from adapters_store import format as fmt
from adapters_store import mor_form
from adapters_store.format import AdapterFormatError, AdapterMeta, CompiledAdapter, loads
from adapters_store.semantics import lowrank_delta
from adapters_store.synth import random_adapter
from adapters_store.validate import Limits, validate_bytes
from trainer.methods.base import get_method, make_config

Q = "model.layers.0.self_attn.q_proj"  # 64 -> 64
UP = "model.layers.0.mlp.up_proj"  # 64 -> 128
DOWN = "model.layers.0.mlp.down_proj"  # 128 -> 64


def compact(base, seed: int = 0, **kw) -> CompiledAdapter:
    """MoR r=3, N=4 in its compact form, as the trainer writes it."""
    return random_adapter(base, "mor", rank=3, num_experts=4, seed=seed, compact=True, std=0.1, **kw)


def problems_of(data: bytes, base, limits: Limits | None = None) -> list[str]:
    with pytest.raises(AdapterFormatError) as e:
        validate_bytes(data, base, limits or Limits())
    return e.value.problems


def test_compact_expands_to_expert_major_columns(tiny_llama):
    a = compact(tiny_llama)
    back = loads(a.to_bytes())
    assert set(back.modules) == set(a.modules) and not back.mergeable
    for path, mw in a.modules.items():
        got = back.modules[path]
        d_in, d_out = tiny_llama.targets[path]
        assert got.expert_out_scale is None and got.lora_b.shape == (d_out, 4 * 3) and got.effective_rank == 12
        # column i*r + j is expert i's row scale times column j of the shared B: one product, so bitwise
        want = torch.cat([mw.expert_out_scale[i, :, None] * mw.lora_b for i in range(4)], dim=1)
        assert torch.equal(got.lora_b, want)
        for key in ("lora_a", "gate", "rank_scale"):
            assert torch.equal(getattr(got, key), getattr(mw, key))
    assert back.meta.ranks == a.meta.ranks == {p: 3 for p in a.modules}


def test_compact_and_expanded_files_are_the_same_adapter(tiny_llama):
    data = compact(tiny_llama).to_bytes()
    one = validate_bytes(data, tiny_llama)
    wide = one.to_bytes()  # a loaded adapter writes the expanded form: the twin an older trainer wrote
    assert len(data) < len(wide)
    two = validate_bytes(wide, tiny_llama)
    digest = hashlib.sha256(data).hexdigest()
    validate_bytes(data, tiny_llama, digest=digest)
    again = validate_bytes(data, tiny_llama, digest=digest)  # known to pass: the fast path expands too
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    for path in one.modules:
        for other in (two, again):
            assert one.modules[path].tensors().keys() == other.modules[path].tensors().keys()
            assert all(torch.equal(t, other.modules[path].tensors()[k]) for k, t in one.modules[path].tensors().items())
        d_in = tiny_llama.targets[path][0]
        assert torch.equal(lowrank_delta(x[:, :d_in], one.modules[path]), lowrank_delta(x[:, :d_in], two.modules[path]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_16bit_compact_file_expands_with_one_rounding(tiny_llama, dtype):
    a = compact(tiny_llama, modules=[UP])
    mw = a.modules[UP]
    for key, t in mw.tensors().items():
        setattr(mw, key, t.to(dtype))
    got = validate_bytes(a.to_bytes(), tiny_llama).modules[UP].lora_b
    # the products of two 16-bit values are exact in fp32: rounding them once is the 16-bit product
    want = (mw.expert_out_scale.float().T[:, :, None] * mw.lora_b.float()[:, None, :]).reshape(128, -1).to(dtype)
    assert got.dtype == dtype and torch.equal(got, want)


def test_a_trained_mor_file_serves_bitwise_the_trained_up_projection():
    torch.manual_seed(0)
    layer = get_method("mor")(nn.Linear(16, 24), make_config("mor", rank=3, num_experts=4, alpha=7))
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lam_b.normal_(1.0, 0.3)
    meta = AdapterMeta(method="mor", task="generate", base_model="x", base_fingerprint="x")
    back = loads(CompiledAdapter(meta=meta, modules={"m": layer.compile()}).to_bytes()).modules["m"]
    trained = layer.expert_up().detach()  # what the forward multiplies h' by
    assert back.lora_b.shape == (24, 12) and torch.equal(back.lora_b, trained)
    # the B' an expanded file of the previous trainer held, s(lamB_i B) per block: equal up to rounding
    before = layer.scale * (layer.lam_b[:, :, None] * layer.lora_B[None]).permute(1, 0, 2).reshape(24, -1)
    torch.testing.assert_close(back.lora_b, before.detach(), atol=0, rtol=3e-7)


def damage(base, **edits) -> bytes:
    """A compact adapter over [Q, UP, DOWN] with some of its tensors replaced: {module: {key: tensor or None}}."""
    a = compact(base, modules=[Q, UP, DOWN])
    for path, change in edits.items():
        for key, value in change.items():
            setattr(a.modules[path], key, value)
    return a.to_bytes()


def test_malformed_compact_tensors_are_refused_by_name(tiny_llama):
    e = f"{Q}.{mor_form.KEY}"
    cases = {  # one damage per file -> what the one error says
        "wrong N": ({Q: {mor_form.KEY: torch.ones(5, 64)}}, f"{e}: shape [5, 64], expected [4, 64] (experts=4 from {Q}.gate"),
        "wrong d_out": ({Q: {mor_form.KEY: torch.ones(4, 65)}}, f"{e}: shape [4, 65], expected [4, 64]"),
        "one dimension": ({Q: {mor_form.KEY: torch.ones(256)}}, f"{e}: expected 2 dimensions, got shape [256]"),
        "without gate": ({Q: {"gate": None, "rank_scale": None}}, f"{e}: MoR's compact form, allowed only beside {Q}.gate"),
        "B' width": ({Q: {"lora_b": torch.ones(64, 12)}}, f"{Q}.lora_b: shape [64, 12], expected [64, 3]"),
        "dtype": ({Q: {mor_form.KEY: torch.ones(4, 64, dtype=torch.float16)}}, f"{e}: dtype float16, expected {Q}.lora_b's float32"),
        "float64": ({Q: {mor_form.KEY: torch.ones(4, 64, dtype=torch.float64),
                            "lora_b": torch.ones(64, 3, dtype=torch.float64)}}, f"{e}: dtype float64 is not allowed"),
        "NaN": ({Q: {mor_form.KEY: torch.ones(4, 64).index_fill_(1, torch.tensor([5]), float("nan"))}},
                f"{e}: 4 of 256 values are NaN or Inf"),
        "inf B": ({Q: {"lora_b": torch.ones(64, 3).index_fill_(0, torch.tensor([1]), float("inf"))}},
                  f"{Q}.lora_b: 3 of 192 values are NaN or Inf"),
    }
    for name, (edits, message) in cases.items():
        problems = problems_of(damage(tiny_llama, **edits), tiny_llama)
        assert any(p.startswith(message) for p in problems), (name, problems)
    # consistent with each other but not with the base: both tensors named against the base's d_out
    problems = problems_of(damage(tiny_llama, **{Q: {"lora_b": torch.ones(65, 3), mor_form.KEY: torch.ones(4, 65)}}),
                           tiny_llama)
    assert any(p.startswith(f"{Q}.lora_b: shape [65, 3], expected [64, 3]") for p in problems), problems
    assert any(p.startswith(f"{e}: shape [4, 65], expected [4, 64]") for p in problems), problems
    # several damaged modules: one error lists each
    problems = problems_of(damage(tiny_llama, **{Q: {mor_form.KEY: torch.ones(5, 64)}, UP: {"lora_b": torch.ones(128, 12)},
                                               DOWN: {mor_form.KEY: torch.ones(4, 64, dtype=torch.bfloat16)}}), tiny_llama)
    assert [p.split(":")[0] for p in problems] == [f"{DOWN}.{mor_form.KEY}", f"{UP}.lora_b", e], problems


def test_a_hostile_compact_file_is_refused_before_it_expands(tiny_llama, monkeypatch):
    expansions = []
    real = mor_form.expert_up
    monkeypatch.setattr(mor_form, "expert_up", lambda b, e: expansions.append(e.shape) or real(b, e))
    # 17 experts agree with each other (they would expand) but exceed the cap on experts
    many = random_adapter(tiny_llama, "mor", rank=3, num_experts=17, modules=[Q], compact=True).to_bytes()
    assert any("17 experts exceed the maximum of 16" in p for p in problems_of(many, tiny_llama))
    assert expansions == []
    # the file cap bounds the serving form: a compact file may not expand past what an expanded file may be
    data = compact(tiny_llama).to_bytes()
    wide = loads(data).to_bytes()
    expansions.clear()
    limits = Limits(max_file_bytes=(len(data) + len(wide)) // 2)
    problems = problems_of(data, tiny_llama, limits)
    assert len(problems) == 1 and "MoR's compact form expands to" in problems[0] and "over the cap" in problems[0]
    assert "over the cap" in problems_of(wide, tiny_llama, limits)[0]  # the expanded twin: refused alike
    assert expansions == []
    validate_bytes(data, tiny_llama, Limits(max_file_bytes=len(wide)))
    assert len(expansions) == len(tiny_llama.targets)  # expanded once per module, after every check


def test_a_reader_without_the_extension_refuses_it_by_name(tiny_llama, monkeypatch):
    """Before the compact form, MODULE_KEYS lacked expert_out_scale: such a reader refuses, never misreads."""
    data = compact(tiny_llama, modules=[Q]).to_bytes()
    monkeypatch.setattr(fmt, "MODULE_KEYS", ("lora_a", "lora_b", "out_scale", "gate", "rank_scale"))
    with pytest.raises(AdapterFormatError, match=f"tensor '{Q}.{mor_form.KEY}' is not part of the compiled adapter"):
        loads(data)
