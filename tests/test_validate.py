"""The validator: every bad file of RELIABILITY.md rows 4-6 gives one clear error; valid adapters pass."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from adapters_store.format import METHODS, AdapterFormatError, CompiledAdapter
from adapters_store.synth import random_adapter
from adapters_store.validate import Limits, validate, validate_bytes

Q = "model.layers.0.self_attn.q_proj"


def raw(header: dict, body: bytes, declared: int | None = None) -> bytes:
    """A safetensors container written by hand, so that it can lie."""
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if declared is None else declared) + h + body


def problems_of(data_or_adapter, base, limits=None) -> list[str]:
    with pytest.raises(AdapterFormatError) as e:
        if isinstance(data_or_adapter, CompiledAdapter):
            validate(data_or_adapter, base, limits or Limits())
        else:
            validate_bytes(data_or_adapter, base, limits or Limits())
    return e.value.problems


@pytest.mark.parametrize("method", METHODS)
def test_valid_adapters_of_every_method_pass(tiny_llama, tiny_bert, method):
    a = random_adapter(tiny_llama, method, rank=4, seed=1, variable_rank=method in ("adalora", "aroma"))
    back = validate_bytes(a.to_bytes(), tiny_llama)
    assert set(back.modules) == set(a.modules)
    c = random_adapter(tiny_bert, method, rank=2, task="classify", labels=["x", "y", "z"])
    validate_bytes(c.to_bytes(), tiny_bert)
    validate(c, None)  # without a base only base-free checks run


def test_container_faults(tiny_llama):
    good = random_adapter(tiny_llama, rank=2, modules=[Q]).to_bytes()
    assert "too short" in problems_of(good[:5], tiny_llama)[0]
    assert "larger than the file" in problems_of(good[:100], tiny_llama)[0]  # truncated
    assert "exceeds the cap" in problems_of(struct.pack("<Q", 1 << 40) + good[8:], tiny_llama)[0]  # lying length
    assert "trailing" in problems_of(good + b"\0" * 8, tiny_llama)[0]
    f32 = struct.pack("<4f", 1, 2, 3, 4)
    overlap = {"a.lora_a": {"dtype": "F32", "shape": [1, 4], "data_offsets": [0, 16]},
               "a.lora_b": {"dtype": "F32", "shape": [1, 2], "data_offsets": [8, 16]}}
    assert any("overlap" in p for p in problems_of(raw(overlap, f32), tiny_llama))
    gap = {"a.lora_a": {"dtype": "F32", "shape": [1, 2], "data_offsets": [8, 16]}}
    assert any("gap" in p for p in problems_of(raw(gap, f32), tiny_llama))
    assert "not valid JSON" in problems_of(struct.pack("<Q", 4) + b"{{{{", tiny_llama)[0]


def test_size_caps_checked_before_parsing(tiny_llama):
    data = random_adapter(tiny_llama, rank=2, modules=[Q]).to_bytes()
    assert "over the cap of 100 bytes" in problems_of(data, tiny_llama, Limits(max_file_bytes=100))[0]
    assert "exceeds the cap of 16 bytes" in problems_of(data, tiny_llama, Limits(max_header_bytes=16))[0]
    # Garbage past a tiny file cap is refused by size alone: nothing is parsed.
    assert "over the cap" in problems_of(b"\xff" * 200, tiny_llama, Limits(max_file_bytes=100))[0]


def test_every_problem_reported_at_once(tiny_llama):
    a = random_adapter(tiny_llama, rank=4, seed=2)
    a.modules[Q].lora_b[0, 0] = float("nan")
    a.modules["model.layers.1.mlp.up_proj"].lora_a = torch.full((4, 64), float("inf"))
    a.modules["model.layers.0.self_attn.k_proj"].lora_b = torch.zeros(64, 4)  # k_proj's d_out is 32
    a.modules["model.layers.0.mlp.down_proj"].lora_a = a.modules["model.layers.0.mlp.down_proj"].lora_a.double()
    a.modules["model.layers.7.self_attn.q_proj"] = a.modules.pop("model.layers.1.self_attn.q_proj")
    a.meta.ranks = {}
    problems = problems_of(a.to_bytes(), tiny_llama)
    text = "\n".join(problems)
    assert f"{Q}.lora_b: 1 of 256 values are NaN or Inf" in text
    assert "model.layers.1.mlp.up_proj.lora_a: 256 of 256 values are NaN or Inf" in text
    assert "model.layers.0.self_attn.k_proj.lora_b: shape [64, 4], expected [32, 4]" in text
    assert "model.layers.0.mlp.down_proj.lora_a: dtype float64 is not allowed" in text
    assert "model.layers.7.self_attn.q_proj: not a target module" in text
    assert len(problems) == 5


def test_rank_experts_and_shape_limits(tiny_llama):
    big = random_adapter(tiny_llama, rank=9, modules=[Q])
    assert problems_of(big, tiny_llama, Limits(max_rank=8)) == [f"{Q}: rank 9 exceeds the maximum rank 8"]
    mor = random_adapter(tiny_llama, "mor", rank=2, modules=[Q], num_experts=5)
    assert "5 experts exceed the maximum of 4" in problems_of(mor, tiny_llama, Limits(max_experts=4))[0]
    mor.modules[Q].rank_scale = torch.ones(5, 3)
    assert "rank_scale: shape [5, 3], expected [5, 2]" in problems_of(mor, tiny_llama)[0]
    dora = random_adapter(tiny_llama, "dora", rank=2, modules=[Q])
    dora.modules[Q].out_scale = torch.ones(32)
    assert "out_scale: shape [32], expected [64]" in problems_of(dora, tiny_llama)[0]


def test_disallowed_dtype(tiny_llama):
    a = random_adapter(tiny_llama, rank=2, modules=[Q])
    a.modules[Q].lora_a = (a.modules[Q].lora_a * 100).to(torch.int8)
    assert "dtype int8 is not allowed" in problems_of(a.to_bytes(), tiny_llama)[0]
    a.modules[Q].lora_a = a.modules[Q].lora_a.half()
    validate(a, tiny_llama, Limits())
    assert "dtype float16" in problems_of(a, tiny_llama, Limits(allowed_dtypes=("float32",)))[0]


def test_metadata_consistency(tiny_llama, tiny_bert):
    a = random_adapter(tiny_llama, rank=2, modules=[Q])
    a.meta.base_fingerprint = "0" * 32
    assert "base_fingerprint '000" in problems_of(a, tiny_llama)[0]

    a = random_adapter(tiny_llama, rank=2, modules=[Q])
    a.meta.ranks = {Q: 3, "model.layers.1.self_attn.q_proj": 2}
    ps = problems_of(a, tiny_llama)
    assert f"metadata ranks['{Q}'] is 3, but the tensors have rank 2" in ps
    assert "metadata ranks['model.layers.1.self_attn.q_proj'] is 2, but the tensors have rank None" in ps

    gen = random_adapter(tiny_bert, rank=2)
    assert "metadata task 'generate': base 'tiny-bert' supports only ['classify']" in problems_of(gen, tiny_bert)

    c = random_adapter(tiny_llama, rank=2, modules=[Q], task="classify", labels=["a", "b"])
    c.meta.labels = None
    assert any("needs a non-empty list of labels" in p for p in problems_of(c, tiny_llama))
    c.meta.labels = ["a", "b", "c"]
    ps = problems_of(c, tiny_llama)
    assert "head.weight: shape [2, 64], expected [3, 64] (labels x hidden size)" in ps
    assert "head.bias: shape [2], expected [3] (labels)" in ps
    c.head_weight = None
    assert any("head.weight: missing" in p for p in problems_of(c, tiny_llama))

    g = random_adapter(tiny_llama, rank=2, modules=[Q])
    g.head_weight = torch.zeros(2, 64)
    assert any("present on a generate adapter" in p for p in problems_of(g, tiny_llama))

    m = random_adapter(tiny_llama, "mor", rank=2, modules=[Q])
    m.meta.method = "lora"
    assert any("MoR gate tensors are present" in p for p in problems_of(m, tiny_llama))


def test_broken_metadata_still_reports_tensor_problems(tiny_llama):
    a = random_adapter(tiny_llama, rank=2, modules=[Q])
    a.modules[Q].lora_a[0, 0] = float("inf")
    a.meta.method = "magic"
    ps = problems_of(a.to_bytes(), tiny_llama)
    assert any("'method' is 'magic'" in p for p in ps) and any("NaN or Inf" in p for p in ps)


def test_unknown_and_missing_tensor_keys(tiny_llama):
    from safetensors.torch import load, save

    a = random_adapter(tiny_llama, rank=2, modules=[Q])
    sd = load(a.to_bytes())
    sd[f"{Q}.lora_c"] = torch.zeros(1)
    del sd[f"{Q}.lora_b"]
    ps = problems_of(save(sd, a.meta.to_header()), tiny_llama)
    assert f"tensor '{Q}.lora_c' is not part of the compiled adapter format" in ps
    assert any(f"module '{Q}' lacks {Q}.lora_b" in p for p in ps)


def test_pickles_refused_without_mistaking_safetensors_for_one(tiny_llama):
    import pickle

    from adapters_store.validate import PickleRefused

    for payload in (pickle.dumps([1, 2], protocol=2), pickle.dumps([1], protocol=5), b"PK\x03\x04" + b"\0" * 40):
        with pytest.raises(PickleRefused):
            validate_bytes(payload, tiny_llama)
    # A real safetensors whose header is 0x280 bytes starts with the pickle opcode bytes 80 02.
    a = random_adapter(tiny_llama, rank=2, modules=[Q])
    sd = {k: v.contiguous() for k, v in a.state_dict().items()}
    from safetensors.torch import save

    blob = save(sd, a.meta.to_header())
    n = int.from_bytes(blob[:8], "little")
    header = blob[8:8 + n].rstrip(b" ")
    padded = header + b" " * (0x280 - len(header))
    data = struct.pack("<Q", 0x280) + padded + blob[8 + n:]
    assert data[:2] == b"\x80\x02"
    assert set(validate_bytes(data, tiny_llama).modules) == {Q}


def test_mutated_files_fail_only_with_format_errors(tiny_llama):
    """Random byte edits and cuts anywhere in a valid file: a clean AdapterFormatError or a valid adapter,
    never another exception (safetensors' own errors, IndexError, UnicodeError...)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    good = random_adapter(tiny_llama, "dora", rank=2, modules=[Q]).to_bytes()

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)), max_size=4),
           st.integers(0, len(good)))
    def check(edits, cut):
        data = bytearray(good[:cut] if cut else good)
        for pos, value in edits:
            if pos < len(data):
                data[pos] = value
        try:
            validate_bytes(bytes(data), tiny_llama)
        except AdapterFormatError as e:
            assert e.problems and all(isinstance(p, str) and p for p in e.problems)

    check()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_count_nonfinite_counts_exactly_even_when_the_sum_overflows(dtype):
    """The finite-sum shortcut never hides a NaN/Inf and never counts an overflowing sum of finite values."""
    from adapters_store.validate import FINITE_CHUNK, count_nonfinite

    big = torch.finfo(dtype).max
    assert count_nonfinite(torch.full((8,), big, dtype=dtype)) == 0  # the sum overflows; the values are finite
    t = torch.randn(FINITE_CHUNK * 2 + 5).to(dtype)
    assert count_nonfinite(t) == 0
    t[[3, FINITE_CHUNK + 1, FINITE_CHUNK * 2 + 4]] = torch.tensor([float("nan"), float("inf"), -float("inf")],
                                                                  dtype=dtype)
    t[7] = -float("inf")
    t[8] = float("inf")  # inf + -inf in one chunk: the sum is NaN, still counted
    assert count_nonfinite(t) == 5


def test_bytes_validated_once_skip_the_value_checks_on_reload_only_for_the_same_base_and_limits(
        tmp_path, tiny_llama, monkeypatch):
    """A reload of bytes (same sha256) that passed against this base and these limits skips the per-value
    checks; other limits, another base, or bytes never validated are checked in full."""
    import adapters_store.validate as validate
    from adapters_store.store import AdapterStore
    from adapters_store.synth import random_adapter

    store = AdapterStore(tmp_path)
    store.put("a", random_adapter(tiny_llama, "lora", rank=2, seed=11).to_bytes(), base=tiny_llama)
    store.put("b", random_adapter(tiny_llama, "lora", rank=2, seed=12).to_bytes())  # validated without a base
    calls: list[str] = []
    real = validate.check
    monkeypatch.setattr(validate, "check", lambda ad, base, limits: calls.append("check") or real(ad, base, limits))
    loaded = store.load("a", base=tiny_llama)
    assert calls == [] and set(loaded.modules) == set(tiny_llama.targets)  # the upload's validation stands
    store.load("b", base=tiny_llama)  # passed without a base only: checked against this one now
    assert calls == ["check"]
    store.load("b", base=tiny_llama)
    assert calls == ["check"]
    store.limits = validate.Limits(max_rank=1)
    with pytest.raises(Exception, match="rank"):  # stricter limits: checked again, and refused
        store.load("a", base=tiny_llama)
