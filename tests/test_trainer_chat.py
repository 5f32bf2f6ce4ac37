"""Chat data: ``{"messages": [...]}`` records are rendered with the base's chat template through the same
function the server's /v1/chat/completions uses, the loss covers the assistant turns only, and an adapter
trained on a chat answers that chat when served: the served prompt is exactly the trained one."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from adapters_store.chat import chat_ids
from tests.util_server import app_client
from trainer.data import IGNORE, build_datasets, read_records
from trainer.export import build_adapter
from trainer.loop import TrainConfig, train

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ping"},
        {"role": "assistant", "content": "pong"}, {"role": "user", "content": "again?"},
        {"role": "assistant", "content": "pong pong"}]


def scored_spans(example) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, lab in enumerate(example.labels + [IGNORE]):
        if lab != IGNORE and start is None:
            start = i
        elif lab == IGNORE and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_chat_records_score_only_the_assistant_turns(tiny_llama):
    tok = tiny_llama.tokenizer
    (example,), _, _ = build_datasets("generate", tok, [{"messages": CHAT}], [], 256)
    assert example.input_ids == chat_ids(tok, CHAT, add_generation_prompt=False)
    spans = scored_spans(example)
    assert [tok.decode(example.input_ids[a:b]) for a, b in spans] == ["pong<|im_end|>\n", "pong pong<|im_end|>\n"]
    for (a, _), k in zip(spans, (2, 4), strict=True):  # each turn's prompt is the server's prompt for that turn
        assert example.input_ids[:a] == chat_ids(tok, CHAT[:k], add_generation_prompt=True)


def test_chat_data_errors_name_the_line(tiny_llama, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"messages": CHAT[:2]}) + "\n")
    with pytest.raises(ValueError, match=r"chat\.jsonl:2: no assistant message"):
        build_datasets("generate", tiny_llama.tokenizer, read_records(data), [], 64)
    data.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(ValueError, match=r"chat\.jsonl:1: 'messages' must be"):
        build_datasets("generate", tiny_llama.tokenizer, read_records(data), [], 64)


def test_a_chat_adapter_answers_its_chat_when_served(tiny_llama, tmp_path):
    base = dataclasses.replace(tiny_llama, model=copy.deepcopy(tiny_llama.model))
    convo = CHAT[:3]  # system, user, assistant "pong"
    train_set, _, _ = build_datasets("generate", base.tokenizer, [{"messages": convo}] * 8, [], 128)
    cfg = TrainConfig(method="lora", method_options={"rank": 8, "alpha": 16.0}, lr=2e-2, max_steps=20,
                      batch_size=8, progress=False)
    result = train(base, train_set, train_set, cfg)
    # (a random tiny base's logits are too flat for a low loss, but greedy decoding follows the trained turn)
    adapter = build_adapter(base, result, "lora", "generate")
    reply = base.tokenizer("pong<|im_end|>", add_special_tokens=False)["input_ids"]
    prompt_ids = chat_ids(base.tokenizer, convo[:2], add_generation_prompt=True)
    with app_client("tiny-llama", tmp_path / "store") as (client, _):
        up = client.post("/v1/adapters", data={"adapter_id": "chat"},
                         files=[("files", ("chat.safetensors", adapter.to_bytes()))])
        assert up.status_code == 201, up.text
        r = client.post("/v1/chat/completions", json={"model": "chat", "messages": convo[:2], "temperature": 0,
                                                      "max_tokens": len(reply)})
        assert r.status_code == 200, r.text
        base_only = client.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": convo[:2],
                                                              "temperature": 0, "max_tokens": len(reply)})
    body = r.json()
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    assert body["choices"][0]["message"]["content"] == "pong"  # the end-of-turn token is special: not shown
    assert base_only.json()["choices"][0]["message"]["content"] != "pong"
