"""`rankserve adapters export-peft`: PEFT loads every exported directory unchanged and reproduces the
logits of the compiled adapter (applied through adapters_store.semantics, the reference every serving
path is tested against); MoR is refused with the reason; our own PEFT import reads the export back."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file as load_tensors

from adapters_store.cli import main
from adapters_store.format import AdapterFormatError
from adapters_store.peft_export import MOR_REFUSAL, export_peft
from adapters_store.peft_import import import_peft
from adapters_store.synth import random_adapter
from tests.util_apply import apply_adapter

IDS = torch.tensor([[5, 17, 101, 7, 250, 3, 9, 400], [11, 2, 8, 300, 45, 6, 77, 1]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits  # [2, 8, V]


def peft_logits(base, directory) -> torch.Tensor:
    model = PeftModel.from_pretrained(copy.deepcopy(base.model), str(directory))
    model.eval()
    return logits(model)


@pytest.mark.parametrize("method,variable", [("lora", False), ("adalora", True), ("aroma", True), ("dora", False),
                                             ("edora", False)])
def test_peft_reproduces_the_compiled_adapter(tiny_llama, tmp_path, method, variable):
    adapter = random_adapter(tiny_llama, method, rank=6, seed=3, variable_rank=variable, std=0.1)
    config = export_peft(adapter, tiny_llama, tmp_path / "peft")
    assert config["use_dora"] == (method in ("dora", "edora"))
    if variable:  # per-module ranks travel as rank_pattern (alpha_pattern keeps scaling at 1)
        assert config["rank_pattern"] and config["alpha_pattern"] == config["rank_pattern"]
        assert len(config["target_modules"]) == len(adapter.modules) < len(tiny_llama.targets)
    served = logits(apply_adapter(tiny_llama.model, adapter))
    base_only = logits(tiny_llama.model)
    assert (served - base_only).abs().max() > 1e-2  # the adapter matters, so equality below means something
    theirs = peft_logits(tiny_llama, tmp_path / "peft")
    assert torch.allclose(theirs, served, atol=2e-5, rtol=0), (theirs - served).abs().max()
    back = import_peft(tmp_path / "peft", tiny_llama)  # and our own import reads it back
    assert back.meta.ranks == adapter.meta.ranks
    assert torch.allclose(logits(apply_adapter(tiny_llama.model, back)), served, atol=2e-5, rtol=0)


def test_dora_magnitude_is_recomputed_from_the_base(tiny_llama, tmp_path):
    adapter = random_adapter(tiny_llama, "dora", rank=4, seed=1, std=0.1)
    export_peft(adapter, tiny_llama, tmp_path / "peft")
    saved = load_tensors(str(tmp_path / "peft" / "adapter_model.safetensors"))
    path, mw = sorted(adapter.modules.items())[0]
    m = saved[f"base_model.model.{path}.lora_magnitude_vector"]
    w0 = tiny_llama.model.get_submodule(path).weight.detach()
    g = m / (w0 + mw.lora_b @ mw.lora_a).norm(dim=1)  # what PEFT's forward computes
    assert torch.allclose(g, mw.out_scale, rtol=1e-6, atol=0)


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "expanded"])
def test_mor_is_refused_with_the_reason(tiny_llama, tmp_path, capsys, compact):
    adapter = random_adapter(tiny_llama, "mor", rank=2, seed=0, compact=compact)
    with pytest.raises(AdapterFormatError, match="MoR has no PEFT form"):
        export_peft(adapter, tiny_llama, tmp_path / "peft")
    adapter.save(tmp_path / "mor.safetensors")
    assert main(["export-peft", str(tmp_path / "mor.safetensors"), str(tmp_path / "out"), "--model", "tiny-llama"]) == 1
    assert MOR_REFUSAL in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_cli_exports_a_classify_adapter_with_its_head(tiny_bert, tmp_path, capsys):
    adapter = random_adapter(tiny_bert, "lora", rank=4, seed=2, task="classify", labels=["a", "b", "c"], std=0.1)
    adapter.save(tmp_path / "c.safetensors")
    assert main(["export-peft", str(tmp_path / "c.safetensors"), str(tmp_path / "out"), "--model", "tiny-bert"]) == 0
    assert json.loads(capsys.readouterr().out)["modules"] == len(adapter.modules)
    head = json.loads((tmp_path / "out" / "classifier_head.json").read_text())
    assert head["labels"] == ["a", "b", "c"] and head["pooling"] == "mean"
    model = PeftModel.from_pretrained(copy.deepcopy(tiny_bert.model), str(tmp_path / "out"))
    with torch.no_grad():
        theirs = model(input_ids=IDS).last_hidden_state
        ours = apply_adapter(tiny_bert.model, adapter)(input_ids=IDS).last_hidden_state
    assert torch.allclose(theirs, ours, atol=2e-5, rtol=0)
    assert main(["export-peft", str(tmp_path / "c.safetensors"), str(tmp_path / "x"), "--model", "tiny-llama"]) == 1
    assert "fingerprint" in capsys.readouterr().err


def test_a_trained_rslora_adapter_exports_exactly(tiny_llama, tmp_path):
    from tests.test_conformance import fresh
    from trainer.data import build_datasets, toy_records
    from trainer.export import build_adapter
    from trainer.loop import TrainConfig, train

    base = fresh(tiny_llama)
    train_set, _, _ = build_datasets("generate", base.tokenizer, toy_records("generate", 16), [], 32)
    cfg = TrainConfig(method="lora", method_options={"rank": 4, "alpha": 8.0, "rslora": True}, lr=2e-2, max_steps=4,
                      batch_size=8, progress=False)
    adapter = build_adapter(base, train(base, train_set, train_set, cfg), "lora", "generate")
    export_peft(adapter, tiny_llama, tmp_path / "peft")
    served = logits(apply_adapter(tiny_llama.model, adapter))
    assert (served - logits(tiny_llama.model)).abs().max() > 1e-3
    assert torch.allclose(peft_logits(tiny_llama, tmp_path / "peft"), served, atol=2e-5, rtol=0)
