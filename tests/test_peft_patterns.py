"""PEFT rank_pattern/alpha_pattern keys are regexes from an upload: ordinary keys match exactly as PEFT matches
them, hostile ones (catastrophic backtracking) are refused quickly with an error naming the key and the limit."""

from __future__ import annotations

import json
import time

import pytest
from safetensors.torch import load, save

from adapters_store.format import AdapterFormatError
from adapters_store.peft_import import import_peft, pattern_value
from adapters_store.peft_patterns import MAX_KEYS, WORK_BUDGET, key_problems
from tests.util_server import peft_files

NAMES = [f"model.layers.{i}.{m}" for i in (0, 1, 11) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
ORDINARY = ["q_proj", "v_proj", "layers.1.self_attn.q_proj", r"layers\.1\..*q_proj", r"model\.layers\.\d+\.mlp\..*",
            r"layers\.(0|1)\.self_attn\.(q_proj|v_proj)", "^model.layers.0.self_attn.q_proj", "layers.1[0-9].*", "proj"]


def test_ordinary_keys_match_as_peft_matches_them():
    from peft.utils.other import get_pattern_key

    for key in ORDINARY:
        assert key_problems("rank_pattern", {key: 1}) == []
        for name in NAMES:
            assert (pattern_value({key: 1}, name, 0) == 1) == (get_pattern_key([key], name) == key), (key, name)


@pytest.mark.parametrize("key, why", [
    ("(a+)+$", "nested quantifiers"),
    ("(a|aa)*b", "nested quantifiers"),
    ("(x*y?)+", "nested quantifiers"),
    (r"(q)_proj\1", "backreference"),
    (".*.*.*.*q_proj", "over the limit of 3"),
    ("q" * 300, "over the limit of 256"),
    ("q_proj)|(.*", "not a valid regex"),
])
def test_hostile_or_broken_keys_are_refused_naming_the_key(key, why):
    problems = key_problems("alpha_pattern", {key: 2})
    assert len(problems) == 1 and why in problems[0] and "'alpha_pattern' key" in problems[0]
    assert repr(key[:64])[:-1] in problems[0]
    with pytest.raises(AdapterFormatError, match="pattern key"):
        pattern_value({key: 2}, "model.layers.0.self_attn.q_proj", 8)


def test_too_many_keys_are_refused():
    problems = key_problems("rank_pattern", {f"layers.{i}.q_proj": 4 for i in range(MAX_KEYS + 1)})
    assert problems == [f"adapter_config.json field 'rank_pattern' has {MAX_KEYS + 1} keys, over the limit of {MAX_KEYS}"]


def _upload(tiny_llama, prefix: str, **config) -> dict[str, bytes]:
    """A PEFT upload whose module names carry ``prefix`` (still unique suffix matches of the base's targets)."""
    files = peft_files(tiny_llama.model, seed=3)
    sd = load(files["adapter_model.safetensors"])
    sd = {k.replace("base_model.model.", f"base_model.model.{prefix}", 1): v for k, v in sd.items()}
    cfg = json.loads(files["adapter_config.json"])
    cfg.update(config)
    return {"adapter_config.json": json.dumps(cfg).encode(), "adapter_model.safetensors": save(sd)}


def test_hostile_pattern_against_a_crafted_module_name_answers_fast(tiny_llama):
    """``(a+)+$`` against "aaa...a.model.layers.0.self_attn.q_proj" backtracks 2^25 times per module in re."""
    files = _upload(tiny_llama, "a" * 25 + ".", rank_pattern={"(a+)+$": 4})
    started = time.perf_counter()
    with pytest.raises(AdapterFormatError) as e:
        import_peft(files, tiny_llama)
    assert time.perf_counter() - started < 1.0
    assert any("'rank_pattern' key '(a+)+$'" in p and "nested quantifiers" in p for p in e.value.problems)


def test_allowed_keys_over_the_work_budget_are_refused_fast(tiny_llama):
    """Each key alone is allowed (3 quantifiers), but against long names their sum would take seconds."""
    files = _upload(tiny_llama, "a." * 60, rank_pattern={f".*.*.*x{i}": 4 for i in range(6)})
    started = time.perf_counter()
    with pytest.raises(AdapterFormatError) as e:
        import_peft(files, tiny_llama)
    assert time.perf_counter() - started < 1.0
    assert any("rank_pattern/alpha_pattern" in p and f"over the limit of {WORK_BUDGET:.0e}" in p
               for p in e.value.problems)


def test_ordinary_patterns_still_import(tiny_llama):
    files = _upload(tiny_llama, "", rank_pattern={r"layers\.\d+\.self_attn\.q_proj": 4}, alpha_pattern={"v_proj": 3})
    adapter = import_peft(files, tiny_llama)
    assert adapter.meta.ranks and set(adapter.meta.ranks.values()) == {4}
