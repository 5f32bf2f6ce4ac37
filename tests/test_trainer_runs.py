"""Runs that survive: a resumed run equals an uninterrupted one (for a plain method with dropout and for
the two methods with training state beyond their parameters), the JSONL run log is written as the run
goes (a crash keeps it), --eval-every keeps the best adapter, --lr-scheduler shapes the lr; and the
device options: bf16 keeps the adapter and optimizer in fp32 and gives the base back exactly, gradient
checkpointing changes nothing but memory."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch

from adapters_store.format import load_file
from trainer import checkpoint, tasks
from trainer.cli import main
from trainer.data import build_datasets, toy_records
from trainer.export import build_adapter, compile_modules
from trainer.loop import TrainConfig, train

RESUME_CASES = {
    "lora": {"rank": 2, "dropout": 0.1},
    "aroma": {"rank": 1, "check_every": 1, "max_inner_steps": 3, "first_warmup": 1, "restart_warmup": 1,
              "eps_out": 1e-6},
    "adalora": {"rank": 2, "init_r": 4, "tinit": 1, "tfinal": 2, "delta_t": 1},
}


def fresh(base):
    return dataclasses.replace(base, model=copy.deepcopy(base.model))


def classify_sets(base, n=16):
    records = toy_records("classify", n, seed=4)
    return build_datasets("classify", base.tokenizer, records, records[:8], 32)


def run(base, tmp, **overrides):
    train_set, eval_set, labels = classify_sets(base)
    cfg = TrainConfig(**{"method": "lora", "task": "classify", "lr": 1e-2, "max_steps": 8, "batch_size": 4,
                         "progress": False, **overrides})
    return train(fresh(base), train_set, eval_set, cfg, labels)


def tensors(result) -> dict[str, torch.Tensor]:
    out = {f"{p}.{k}": v for p, mw in compile_modules(result.layers).items() for k, v in mw.tensors().items()}
    return {**out, "head": result.head.weight.detach().clone()}


@pytest.mark.parametrize("method", sorted(RESUME_CASES))
def test_a_resumed_run_equals_an_uninterrupted_one(tiny_bert, tmp_path, method):
    common = {"method": method, "method_options": RESUME_CASES[method], "save_every": 4, "save_total_limit": 0,
              "eval_every": 4, "warmup_ratio": None if method == "aroma" else 0.25}
    whole = run(tiny_bert, tmp_path, checkpoint_dir=str(tmp_path / "a"), **common)
    ckpt = tmp_path / "a" / "step-000004.pt"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["step-000004.pt", "step-000008.pt"]
    resumed = run(tiny_bert, tmp_path, checkpoint_dir=str(tmp_path / "b"), resume_from=str(ckpt), **common)
    assert resumed.log["resumed_from_step"] == 4 and resumed.log["steps"] == 8
    want, got = tensors(whole), tensors(resumed)
    assert sorted(want) == sorted(got)
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert resumed.log["history"] == whole.log["history"] and resumed.log["evals"] == whole.log["evals"]
    assert resumed.log["method_summary"] == whole.log["method_summary"]
    if method == "aroma":  # the checkpoint sits between resets, so the grown state really crossed it
        resets = [r["step"] for r in whole.log["method_summary"]["resets"]]
        assert any(s < 4 for s in resets) and any(s >= 4 for s in resets)
    if method == "adalora":
        assert whole.controller.total_rank() == resumed.controller.total_rank() == 2 * len(whole.layers)


def test_resume_refuses_a_different_run(tiny_bert, tmp_path):
    run(tiny_bert, tmp_path, checkpoint_dir=str(tmp_path / "a"), save_every=4, max_steps=4)
    with pytest.raises(ValueError, match=r"differs from the checkpoint's in lr \(0.01 -> 0.02\)"):
        run(tiny_bert, tmp_path, lr=2e-2, max_steps=4, resume_from=str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match="no step-"):
        run(tiny_bert, tmp_path, resume_from=str(tmp_path))


def test_the_run_log_is_streamed_and_survives_a_crash(tiny_bert, tmp_path, monkeypatch):
    log = tmp_path / "run.log.jsonl"
    real, calls = tasks.loss_and_count, {"n": 0}

    def crash_on_third_step(out, batch):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("simulated crash")
        return real(out, batch)

    monkeypatch.setattr(tasks, "loss_and_count", crash_on_third_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tiny_bert, tmp_path, log_path=str(log))
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "eval", "step", "step"]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2] and events[0]["total_steps"] == 8


def test_eval_every_keeps_the_best_adapter(tiny_bert, tmp_path):
    result = run(tiny_bert, tmp_path, eval_every=2, save_every=2, save_total_limit=0,
                 checkpoint_dir=str(tmp_path / "c"), lr=5e-2)
    evals = [e for e in result.log["evals"] if e["step"] > 0]
    assert [e["step"] for e in evals] == [2, 4, 6, 8]
    best = result.log["best_eval"]
    assert best == max(evals, key=lambda e: (e["accuracy"], -e["loss"]))
    saved = checkpoint.load(tmp_path / "c" / f"step-{best['step']:06d}.pt")["adapter"]
    for path, state in result.best_state["layers"].items():
        for name, t in state["tensors"].items():
            assert torch.equal(t, saved["layers"][path]["tensors"][name]), (path, name)


def test_cli_writes_the_best_adapter_and_resumes(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in toy_records("classify", 24)))
    argv = ["--method", "lora", "--model", "tiny-bert", "--task", "classify", "--data", str(data),
            "--out", str(tmp_path / "t.safetensors"), "--max-steps", "6", "--batch-size", "4", "--eval-every", "3",
            "--save-every", "3", "--lr", "1e-2", "--no-progress", "--lr-scheduler", "cosine"]
    assert main(argv) == 0
    log = json.loads((tmp_path / "t.train.json").read_text())
    best = load_file(tmp_path / "t.best.safetensors")
    assert best.meta.training["picked_eval"] == log["best_eval"]
    lrs = [h["lr"] for h in log["history"]]
    assert lrs == pytest.approx([1e-2 * 0.5 * (1 + math.cos(math.pi * s / 6)) for s in range(6)])  # warmup round(0.36) = 0
    (tmp_path / "t.checkpoints" / "step-000006.pt").unlink()  # as if the run died between steps 3 and 6
    assert main(argv + ["--resume"]) == 0
    again = json.loads((tmp_path / "t.train.json").read_text())
    assert again["resumed_from_step"] == 3 and again["history"] == log["history"]
    events = [json.loads(line)["event"] for line in (tmp_path / "t.log.jsonl").read_text().splitlines()]
    assert events.count("start") == 1 and events.count("resume") == 1 and events.count("end") == 2


def test_bf16_keeps_the_adapter_in_fp32_and_gives_the_base_back(tiny_llama):
    base = fresh(tiny_llama)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    train_set, _, _ = build_datasets("generate", base.tokenizer, toy_records("generate", 16), [], 32)
    cfg = TrainConfig(method="dora", method_options={"rank": 4}, lr=1e-2, max_steps=4, batch_size=8,
                      dtype="bfloat16", progress=False)
    seen = {}
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        out = real_step(self, *a, **k)
        seen["dtypes"] = {s["exp_avg"].dtype for s in self.state.values()}
        seen["base"] = {p.dtype for n, p in base.model.named_parameters() if n.endswith("base.weight")}
        return out

    torch.optim.AdamW.step = spy
    try:
        result = train(base, train_set, train_set, cfg)
    finally:
        torch.optim.AdamW.step = real_step
    assert seen["dtypes"] == {torch.float32} and seen["base"] == {torch.bfloat16}
    assert result.log["dtype"] == "bfloat16" and result.log["final_eval"]["loss"] < result.log["initial_eval"]["loss"]
    assert all(p.dtype == torch.float32 for layer in result.layers.values() for p in layer.parameters())
    after = {k.replace(".base.", "."): v for k, v in base.model.state_dict().items()}
    for k, v in before.items():  # the exact fp32 base is back, so out_scale is computed against it
        assert torch.equal(after[k], v), k
    build_adapter(base, result, "dora", "generate")  # compiles and validates against the fingerprint


def test_gradient_checkpointing_changes_nothing_but_memory(tiny_llama, monkeypatch):
    train_set, _, _ = build_datasets("generate", tiny_llama.tokenizer, toy_records("generate", 16), [], 32)
    results, during = [], []
    real_step = torch.optim.AdamW.step
    for gc in (False, True):
        base = fresh(tiny_llama)
        layer = base.model.model.layers[0]

        def spy(self, *a, layer=layer, **k):
            during.append(bool(layer.gradient_checkpointing))
            return real_step(self, *a, **k)

        monkeypatch.setattr(torch.optim.AdamW, "step", spy)
        cfg = TrainConfig(method="lora", method_options={"rank": 4, "dropout": 0.1}, lr=1e-2, max_steps=3,
                          batch_size=8, gradient_checkpointing=gc, progress=False)
        results.append(train(base, train_set, train_set, cfg))
        assert not layer.gradient_checkpointing  # off again afterwards
    assert during == [False] * 3 + [True] * 3
    plain, checkpointed = (tensors_of(r) for r in results)
    for key in plain:
        assert torch.allclose(plain[key], checkpointed[key], atol=1e-6), key


def tensors_of(result) -> dict[str, torch.Tensor]:
    return {f"{p}.{k}": v for p, mw in compile_modules(result.layers).items() for k, v in mw.tensors().items()}


def test_device_flags_are_checked():
    from trainer.device import resolve_device, resolve_dtype

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: torch sees no CUDA device"):
            resolve_device("cuda")

    with pytest.raises(ValueError, match="float16 needs loss scaling"):
        resolve_dtype("float16", torch.device("cpu"))
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


@pytest.mark.gpu
def test_cuda_bf16_training_matches_its_served_form(tiny_llama):
    """On CUDA in bf16, the exported adapter (fp32, against the exact base) reproduces the trained one's
    logits up to bf16 rounding, and the adapter state stayed fp32."""
    from tests.util_apply import apply_adapter

    base = fresh(tiny_llama)
    train_set, _, _ = build_datasets("generate", base.tokenizer, toy_records("generate", 32), [], 32)
    cfg = TrainConfig(method="lora", method_options={"rank": 4}, lr=1e-2, max_steps=10, batch_size=8,
                      device="cuda", dtype="auto", gradient_checkpointing=True, progress=False)
    result = train(base, train_set, train_set, cfg)
    assert result.log["dtype"] == "bfloat16" and result.log["device"].startswith("cuda")
    adapter = build_adapter(base, result, "lora", "generate")
    ids = torch.tensor([train_set[0].input_ids])
    with torch.no_grad():
        trained = base.model(input_ids=ids).logits
        served = apply_adapter(tiny_llama.model, adapter)(input_ids=ids).logits
    assert torch.allclose(trained, served, atol=1e-4)
