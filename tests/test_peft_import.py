"""PEFT import: parity with PEFT's own forward (fp32, 1e-5) for every supported method, and refusals.

Adapters are made by peft itself on deep copies of the session-scoped tiny bases (never mutated), with
random non-zero weights (B is zero at PEFT's init, which would hide every scaling bug).
"""

from __future__ import annotations

import copy
import json
import math
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters_store.format import AdapterFormatError
from adapters_store.peft_import import PickleRefused, _base_path, convert_peft, import_peft, pattern_value
from adapters_store.validate import Limits
from tests.util_apply import apply_adapter

peft = pytest.importorskip("peft")
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = 1e-5


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random non-zero adapter weights; magnitudes perturbed around ||W0|| so DoRA's g is not 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def make_peft(base_model, config, tmp_path, seed=0):
    pm = peft.get_peft_model(copy.deepcopy(base_model), config)
    randomize(pm, seed)
    pm.eval()
    pm.save_pretrained(tmp_path)
    return pm


def ids(vocab=512, seed=1, shape=(2, 9)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def llama_parity(tiny_llama, pm, compiled):
    x = ids()
    with torch.no_grad():
        want = pm(input_ids=x).logits
        got = apply_adapter(tiny_llama.model, compiled)(input_ids=x).logits
        base = tiny_llama.model(input_ids=x).logits
    assert max_diff(want, base) > 1e-3  # the adapter really changes the output
    assert max_diff(want, got) < TOL


def test_lora_parity(tiny_llama, tmp_path):
    pm = make_peft(tiny_llama.model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_ALL), tmp_path)
    compiled = import_peft(tmp_path, tiny_llama)
    assert compiled.meta.method == "lora" and compiled.meta.task == "generate"
    assert compiled.meta.base_fingerprint == tiny_llama.fingerprint
    assert compiled.meta.training["source"] == "peft" and compiled.meta.training["peft_version"] == peft.__version__
    assert set(compiled.modules) == set(tiny_llama.targets)
    llama_parity(tiny_llama, pm, compiled)
    # A dict upload of the same two files converts to the same tensors.
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "README.md"}
    again = import_peft(files, tiny_llama)
    for path, mw in compiled.modules.items():
        assert torch.equal(mw.lora_b, again.modules[path].lora_b)


def test_rslora_rank_and_alpha_patterns(tiny_llama, tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                          rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6}, alpha_pattern={"v_proj": 3})
    pm = make_peft(tiny_llama.model, cfg, tmp_path, seed=3)
    compiled = import_peft(tmp_path, tiny_llama)
    ranks = compiled.meta.ranks
    assert ranks["model.layers.0.self_attn.q_proj"] == 2 and ranks["model.layers.1.mlp.down_proj"] == 6
    assert ranks["model.layers.0.mlp.down_proj"] == 4 and ranks["model.layers.1.self_attn.v_proj"] == 4
    # The folded scale is alpha/sqrt(r) per module: v_proj uses alpha 3, the rest 16.
    sd = load_file(tmp_path / "adapter_model.safetensors")
    b = sd["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    assert torch.allclose(compiled.modules["model.layers.0.self_attn.v_proj"].lora_b, b * 3 / math.sqrt(4))
    llama_parity(tiny_llama, pm, compiled)


def test_pattern_matching_is_peft_suffix_regex():
    assert pattern_value({"q_proj": 2}, "model.layers.0.self_attn.q_proj", 8) == 2
    assert pattern_value({"proj": 2}, "model.layers.0.self_attn.q_proj", 8) == 8  # not a dotted suffix
    assert pattern_value({r"layers\.1\..*q_proj": 5, "q_proj": 2}, "model.layers.1.self_attn.q_proj", 8) == 5
    assert pattern_value({"q_proj": 2, r"layers\.1\..*q_proj": 5}, "model.layers.1.self_attn.q_proj", 8) == 2


def test_dora_parity(tiny_llama, tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    pm = make_peft(tiny_llama.model, cfg, tmp_path, seed=5)
    compiled = import_peft(tmp_path, tiny_llama)
    assert compiled.meta.method == "dora"
    assert all(mw.out_scale is not None for mw in compiled.modules.values())
    llama_parity(tiny_llama, pm, compiled)


def test_dora_parity_on_encoder_with_bias_and_bert_prefix(tiny_bert, tmp_path):
    """BERT linears have a bias (outside g); *ForSequenceClassification adds a ``bert.`` key prefix."""
    from transformers import BertForSequenceClassification

    cls = BertForSequenceClassification(tiny_bert.model.config)
    cls.bert.load_state_dict(tiny_bert.model.state_dict(), strict=False)  # the base's exact W0
    cfg = peft.LoraConfig(r=3, lora_alpha=6, use_dora=True, target_modules=["query", "value", "output.dense"])
    pm = make_peft(cls, cfg, tmp_path, seed=7)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.startswith("base_model.model.bert.encoder.") for k in keys)
    compiled = convert_peft(tmp_path, tiny_bert, Limits())  # generate task: tiny-bert only serves classify
    assert "encoder.layer.0.attention.self.query" in compiled.modules
    x = ids(seed=2)
    with torch.no_grad():
        want = pm.base_model.model.bert(input_ids=x).last_hidden_state
        got = apply_adapter(tiny_bert.model, compiled)(input_ids=x).last_hidden_state
    assert max_diff(want, got) < TOL
    with pytest.raises(AdapterFormatError, match="supports only"):
        import_peft(tmp_path, tiny_bert)  # no head to classify with, and an encoder cannot generate


def test_fan_in_fan_out_flag_does_not_transpose_linear_factors(tiny_llama, tmp_path):
    make_peft(tiny_llama.model, peft.LoraConfig(r=2, target_modules=["q_proj"]), tmp_path)
    plain = import_peft(tmp_path, tiny_llama)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["fan_in_fan_out"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    flagged = import_peft(tmp_path, tiny_llama)
    for path, mw in plain.modules.items():
        assert torch.equal(mw.lora_a, flagged.modules[path].lora_a)


def adalora_model(tiny_llama, tmp_path):
    """A few AdaLoRA steps with random gradients: ranks get masked, some modules lose every rank."""
    torch.manual_seed(0)
    cfg = peft.AdaLoraConfig(init_r=4, target_r=1, lora_alpha=8, total_step=8, tinit=1, tfinal=3, deltaT=1,
                             target_modules=LLAMA_ALL)
    pm = peft.get_peft_model(copy.deepcopy(tiny_llama.model), cfg)
    randomize(pm, 11)
    params = [p for n, p in pm.named_parameters() if "lora_" in n]
    gen = torch.Generator().manual_seed(12)
    for step in range(cfg.total_step):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        with torch.no_grad():
            for p in params:
                p -= 0.01 * p.grad
        pm.base_model.update_and_allocate(step)
        for p in params:
            p.grad = None
    pm.eval()
    pm.save_pretrained(tmp_path)
    return pm


def test_adalora_parity_with_masked_ranks_and_pruned_modules(tiny_llama, tmp_path):
    pm = adalora_model(tiny_llama, tmp_path)
    sd = load_file(tmp_path / "adapter_model.safetensors")
    saved_ranks = {k: v.shape[0] for k, v in sd.items() if k.endswith(".lora_E")}
    compiled = import_peft(tmp_path, tiny_llama)
    assert compiled.meta.method == "adalora"
    ranks = compiled.meta.ranks
    assert 0 in saved_ranks.values() and len(ranks) < len(tiny_llama.targets)  # a module was pruned to rank 0
    assert any(0 < r < 4 for r in ranks.values())  # and another keeps some of its ranks
    assert sum(ranks.values()) == sum((v != 0).sum().item() for k, v in sd.items() if k.endswith(".lora_E"))
    llama_parity(tiny_llama, pm, compiled)
    # PEFT's own reload of the saved (sliced) file agrees too: ranknum stays init_r.
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama.model), tmp_path).eval()
    llama_parity(tiny_llama, reloaded, compiled)


def edora_reference(tiny_llama, sd, scale):
    """The EDoRA forward by hand from the PEFT tensors: y = g*(W0x + s B R A x) + b, g = m/||W0 + sBRA||."""
    model = copy.deepcopy(tiny_llama.model)
    prefix = "base_model.model."
    for key in [k for k in sd if k.endswith(".lora_A.weight")]:
        path = key[len(prefix):-len(".lora_A.weight")]
        a, b = sd[f"{prefix}{path}.lora_A.weight"], sd[f"{prefix}{path}.lora_B.weight"]
        m, rot = sd[f"{prefix}{path}.lora_magnitude_vector"], sd[f"{prefix}{path}_lora_latent_mapping.weight"]
        lin = model.get_submodule(path)
        w0 = lin.weight.detach()
        g = m / torch.linalg.norm(w0 + scale * b @ rot @ a, dim=1)

        def forward(x, w0=w0, a=a, b=b, rot=rot, g=g, bias=lin.bias):
            y = g * (x @ w0.T + scale * ((x @ a.T) @ rot.T) @ b.T)
            return y if bias is None else y + bias

        lin.forward = forward
    return model


def test_edora_latent_mapping_is_folded_not_dropped(tiny_llama, tmp_path):
    cfg = peft.LoraConfig(r=3, lora_alpha=6, use_dora=True, target_modules=["q_proj", "up_proj"])
    make_peft(tiny_llama.model, cfg, tmp_path, seed=13)
    path = tmp_path / "adapter_model.safetensors"
    sd = load_file(path)
    dora_only = import_peft(tmp_path, tiny_llama)
    gen = torch.Generator().manual_seed(14)
    for key in [k for k in sd if k.endswith(".lora_A.weight")]:
        sd[key.removesuffix(".lora_A.weight") + "_lora_latent_mapping.weight"] = torch.randn(3, 3, generator=gen)
    save_file(sd, path)
    compiled = import_peft(tmp_path, tiny_llama)
    assert compiled.meta.method == "edora"
    x = ids(seed=4)
    with torch.no_grad():
        want = edora_reference(tiny_llama, sd, 6 / 3)(input_ids=x).logits
        got = apply_adapter(tiny_llama.model, compiled)(input_ids=x).logits
        without_r = apply_adapter(tiny_llama.model, dora_only)(input_ids=x).logits
    assert max_diff(want, got) < TOL
    assert max_diff(want, without_r) > 1e-3  # dropping R would be visibly wrong


def test_decoder_score_head_maps_to_classify(tiny_llama, tmp_path):
    from transformers import LlamaForSequenceClassification

    cls = LlamaForSequenceClassification(copy.deepcopy(tiny_llama.model.config))
    cls.config.num_labels = 3
    cls = LlamaForSequenceClassification(cls.config)
    cls.model.load_state_dict(tiny_llama.model.model.state_dict())
    pm = make_peft(cls, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"), tmp_path)
    compiled = import_peft(tmp_path, tiny_llama, labels=["a", "b", "c"])
    assert compiled.meta.task == "classify" and compiled.meta.labels == ["a", "b", "c"]
    assert compiled.meta.pooling == "last"
    x = ids(seed=5, shape=(1, 8))
    with torch.no_grad():
        want = pm(input_ids=x).logits  # [1, 3]
        hidden = apply_adapter(tiny_llama.model, compiled).model(input_ids=x).last_hidden_state[:, -1]
        got = hidden @ compiled.head_weight.T + compiled.head_bias
    assert max_diff(want, got) < TOL


# ---- refusals: each names the field or tensor, nothing is half-imported -------------------------------

@pytest.fixture
def lora_files(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    make_peft(tiny_llama.model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), d)
    return {"adapter_config.json": (d / "adapter_config.json").read_bytes(),
            "adapter_model.safetensors": (d / "adapter_model.safetensors").read_bytes()}


def with_config(files, **changes):
    cfg = json.loads(files["adapter_config.json"])
    cfg.update(changes)
    return {**files, "adapter_config.json": json.dumps(cfg).encode()}


def with_tensors(files, edit):
    from safetensors.torch import load, save

    sd = load(files["adapter_model.safetensors"])
    edit(sd)
    return {**files, "adapter_model.safetensors": save(sd)}


@pytest.mark.parametrize("changes,field", [
    ({"r": 1000}, "'r'"),
    ({"target_modules": ["q_proj", "lm_head"]}, "'target_modules' entry 'lm_head'"),
    ({"target_modules": ["q_proj", "nonsense"]}, "'target_modules' entry 'nonsense'"),
    ({"target_modules": ["q_proj", 7]}, "'target_modules' entry 7"),
    ({"lora_alpha": "eight"}, "'lora_alpha'"),
    ({"rank_pattern": {"q_proj": 9999}}, "'rank_pattern'['q_proj'] is 9999"),
    ({"bias": "all"}, "'bias'"),
    ({"lora_bias": True}, "'lora_bias'"),
    ({"modules_to_save": ["embed_tokens"]}, "'modules_to_save'"),
    ({"init_lora_weights": "pissa"}, "'init_lora_weights'"),
    ({"peft_type": "IA3"}, "'peft_type'"),
    ({"layer_replication": [[0, 2]]}, "'layer_replication'"),
    ({"some_future_field": {"on": True}}, "'some_future_field'"),
    ({"use_dora": True}, "use_dora"),
    ({"rank_pattern": {"q_proj": 3}}, "config gives r=3"),
])
def test_config_problems_name_the_field(tiny_llama, lora_files, changes, field):
    with pytest.raises(AdapterFormatError) as e:
        import_peft(with_config(lora_files, **changes), tiny_llama)
    assert field in str(e.value)


def test_missing_or_invalid_config(tiny_llama, lora_files):
    with pytest.raises(AdapterFormatError, match="adapter_config.json"):
        import_peft({"adapter_model.safetensors": lora_files["adapter_model.safetensors"]}, tiny_llama)
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        import_peft({**lora_files, "adapter_config.json": b"{r: 4"}, tiny_llama)


def test_tensor_problems_name_the_tensor(tiny_llama, lora_files):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

    def nan(sd):
        sd[key][0, 0] = float("nan")

    with pytest.raises(AdapterFormatError, match="q_proj.lora_B.weight': holds NaN"):
        import_peft(with_tensors(lora_files, nan), tiny_llama)

    def wrong_shape(sd):
        sd[key] = torch.zeros(63, 2)

    with pytest.raises(AdapterFormatError, match=r"shape \[63, 2\], expected \[64, 2\]"):
        import_peft(with_tensors(lora_files, wrong_shape), tiny_llama)

    def unknown_module(sd):
        sd["base_model.model.lm_head.lora_A.weight"] = torch.zeros(2, 64)
        sd["base_model.model.lm_head.lora_B.weight"] = torch.zeros(512, 2)

    with pytest.raises(AdapterFormatError, match="'lm_head'.*not a target module"):
        import_peft(with_tensors(lora_files, unknown_module), tiny_llama)

    def lora_bias(sd):
        sd[key.replace(".weight", ".bias")] = torch.zeros(64)

    with pytest.raises(AdapterFormatError, match="LoRA biases"):
        import_peft(with_tensors(lora_files, lora_bias), tiny_llama)

    def f64(sd):
        sd[key] = sd[key].double()

    with pytest.raises(AdapterFormatError, match="dtype float64"):
        import_peft(with_tensors(lora_files, f64), tiny_llama)


class Boom:
    """Unpickling this would create a file: proof that a refused pickle was never opened."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickles_are_refused_unopened(tiny_llama, lora_files, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Boom(str(marker)), protocol=2)
    with pytest.raises(PickleRefused, match="adapter_model.bin"):
        import_peft({**lora_files, "adapter_model.bin": payload}, tiny_llama)
    with pytest.raises(PickleRefused, match="pickle"):
        import_peft({**lora_files, "adapter_model.safetensors": payload}, tiny_llama)
    with pytest.raises(PickleRefused):
        import_peft({**lora_files, "adapter_model.safetensors": b"PK\x03\x04" + b"\0" * 64}, tiny_llama)
    d = tmp_path / "legacy"
    d.mkdir()
    (d / "adapter_config.json").write_bytes(lora_files["adapter_config.json"])
    (d / "adapter_model.bin").write_bytes(payload)
    with pytest.raises(PickleRefused, match="adapter_model.bin"):
        import_peft(d, tiny_llama)
    assert not marker.exists()
    assert PickleRefused.http_status == 415


def test_caps_checked_before_reading(tiny_llama, lora_files):
    small = Limits(max_file_bytes=100)
    with pytest.raises(AdapterFormatError, match="over the cap of 100 bytes"):
        import_peft(lora_files, tiny_llama, small)


def test_base_path_mapping(tiny_llama, tiny_bert):
    assert _base_path("model.layers.0.self_attn.q_proj", tiny_llama) == "model.layers.0.self_attn.q_proj"
    assert _base_path("layers.0.self_attn.q_proj", tiny_llama) == "model.layers.0.self_attn.q_proj"
    assert _base_path("bert.encoder.layer.1.attention.self.query", tiny_bert) == "encoder.layer.1.attention.self.query"
    assert _base_path("q_proj", tiny_llama) is None  # ambiguous: never guess
    assert _base_path("lm_head", tiny_llama) is None


@pytest.mark.parametrize("field, value", [("r", "DEEP"), ("modules_to_save", [["score"]]),
                                          ("modules_to_save", [{"a": 1}])])
def test_hostile_config_values_are_format_errors_not_crashes(tiny_llama, field, value):
    """Found by the HTTP fuzzer: JSON nested past Python's recursion limit, and unhashable
    modules_to_save entries, raised RecursionError/TypeError (500s) instead of a format error."""
    from tests.util_server import peft_files

    files = peft_files(tiny_llama.model, target_modules=["q_proj"])
    cfg = json.loads(files["adapter_config.json"])
    raw = json.dumps({**cfg, field: value})
    if value == "DEEP":
        raw = raw.replace('"DEEP"', "[" * 50_000 + "]" * 50_000)
    files["adapter_config.json"] = raw.encode()
    with pytest.raises(AdapterFormatError) as e:
        import_peft(files, tiny_llama)
    assert "adapter_config.json" in str(e.value)


def test_deeply_nested_header_json_is_a_format_error():
    import struct

    from adapters_store.format import loads

    header = b'{"deep": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    with pytest.raises(AdapterFormatError, match="nested too deeply"):
        loads(struct.pack("<Q", len(header)) + header)
