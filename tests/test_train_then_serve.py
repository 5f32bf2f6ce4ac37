"""A trainer-made adapter, served: the server's classify answers equal the trainer's own evaluation.

The trainer scores with its training-time modules (unbatched semantics, right padding); the server with
the compiled file, the slot pool and its own batching. Labels must be identical and scores equal to fp32
precision, on a decoder (last-token pooling) and an encoder (mean pooling) base. MoR's file (the compact
form) and its expanded twin give identical answers.
"""

from __future__ import annotations

import pytest
import torch

from adapters_store.basemodels import load_base
from adapters_store.format import loads
from tests.util_server import app_client
from trainer import tasks
from trainer.data import build_datasets, collate, toy_records
from trainer.export import build_adapter
from trainer.loop import TrainConfig, train


@pytest.mark.parametrize("model,method", [("tiny-llama", "dora"), ("tiny-bert", "mor"), ("tiny-llama", "adalora")])
def test_served_predictions_equal_the_trainers(model, method, tmp_path):
    base = load_base(model)  # a fresh copy: training wraps its linears
    records = toy_records("classify", 32, seed=1)
    held = toy_records("classify", 10, seed=2)
    train_set, eval_set, labels = build_datasets("classify", base.tokenizer, records, held, max_length=64)
    options = {"rank": 4} if method != "adalora" else {"init_r": 6, "rank": 3, "tinit": 2, "tfinal": 2, "delta_t": 2}
    result = train(base, train_set, eval_set,
                   TrainConfig(method=method, task="classify", lr=5e-3, max_steps=12, batch_size=8,
                               method_options=options, progress=False),
                   labels=labels)
    base.model.eval()
    with torch.no_grad():
        batch = collate(eval_set, base.tokenizer.pad_token_id)
        trainer_probs = torch.softmax(tasks.logits(base, batch, result.head, result.pooling), dim=-1)
    adapter = build_adapter(base, result, method, "classify")

    files = {"trained": adapter.to_bytes()}
    if method == "mor":  # the trainer writes MoR's compact form; the expanded file it reads as serves the same
        files["trained-wide"] = loads(files["trained"]).to_bytes()
        assert adapter.modules and all(mw.expert_out_scale is not None for mw in adapter.modules.values())
    with app_client(model, tmp_path / "store") as (client, _):
        answers = {}
        for adapter_id, blob in files.items():
            up = client.post("/v1/adapters", data={"adapter_id": adapter_id}, files=[("files", ("a.safetensors", blob))])
            assert up.status_code == 201, up.text
            r = client.post("/v1/classify", json={"model": adapter_id, "input": [h["text"] for h in held]})
            assert r.status_code == 200, r.text
            answers[adapter_id] = r.json()["data"]
    served = answers["trained"]
    assert all(a == served for a in answers.values())  # compact and expanded: identical scores
    assert [d["label"] for d in served] == [labels[i] for i in trainer_probs.argmax(-1).tolist()]
    served_probs = torch.tensor([[d["scores"][lab] for lab in labels] for d in served])
    assert torch.allclose(served_probs, trainer_probs.float(), atol=1e-4), (served_probs - trainer_probs).abs().max()
