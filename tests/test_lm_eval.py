"""EleutherAI's lm-evaluation-harness evaluates an adapter through the server exactly as it evaluates the same
PEFT adapter in-process: `local-completions` (loglikelihood of a multiple-choice task, greedy generate_until)
and `local-chat-completions` (generate_until through the chat template) against the real server, and the
harness's own `hf` model with `peft=` on the same adapter directory. Per-sample loglikelihoods agree within
1e-4 and greedy generations are equal.

The base is tiny-llama saved as a Hugging Face directory (the server is started with `--model DIR`); the tasks
are YAML files over JSONL written at test time (`dataset_path: json`, `dataset_kwargs.data_files`)."""

from __future__ import annotations

import json
import math

import pytest

lm_eval = pytest.importorskip("lm_eval")

from tests.util_server import LiveServer, multipart, peft_files  # noqa: E402

pytestmark = pytest.mark.slow
ADAPTER = "lm-peft"
QUESTIONS = [("The cat sat on the", ["mat", "moon", "roof"], 0), ("Once upon a", ["time", "hill"], 0),
             ("Two plus two is", ["four", "five", "six", "ten"], 0), ("Water is", ["wet", "dry"], 0),
             ("The sky is", ["blue", "green", "loud"], 0)]
PROMPTS = ["Hello, my name is", "The weather today", "In the beginning", "A short story:"]


def write_tasks(root) -> None:
    mc, gen = root / "mc.jsonl", root / "gen.jsonl"
    mc.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    gen.write_text("".join(json.dumps({"prompt": p, "target": "x"}) + "\n" for p in PROMPTS))
    (root / "rs_mc.yaml").write_text(f"""task: rs_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    (root / "rs_gen.yaml").write_text(f"""task: rs_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 8
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
""")


def evaluate(model: str, model_args: str, tasks: list[str], root, chat: bool = False) -> dict:
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True,
                                  task_manager=TaskManager(include_path=str(root)), apply_chat_template=chat,
                                  batch_size=1, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                  fewshot_random_seed=0)
    return {task: sorted(samples, key=lambda s: s["doc_id"]) for task, samples in out["samples"].items()}


def test_the_harness_scores_an_adapter_through_the_server_as_it_does_in_process(tmp_path, tiny_llama):
    base_dir, adapter_dir, tasks = tmp_path / "base", tmp_path / "adapter", tmp_path / "tasks"
    tiny_llama.model.save_pretrained(base_dir)
    tiny_llama.tokenizer.save_pretrained(base_dir)
    adapter_dir.mkdir()
    tasks.mkdir()
    files = peft_files(tiny_llama.model, seed=21)
    for name, blob in files.items():
        (adapter_dir / name).write_bytes(blob)
    write_tasks(tasks)
    with LiveServer(tmp_path, str(base_dir), "--max-model-len", "256") as srv:
        r = srv.client().post("/v1/adapters", **multipart(ADAPTER, files))
        assert r.status_code == 201, r.text
        common = f"model={ADAPTER},tokenizer_backend=huggingface,tokenizer={base_dir},max_retries=1,num_concurrent=1"
        served = evaluate("local-completions", f"base_url={srv.url}/v1/completions,{common},tokenized_requests=True",
                          ["rs_mc", "rs_gen"], tasks)
        chat = evaluate("local-chat-completions", f"base_url={srv.url}/v1/chat/completions,{common}",
                        ["rs_gen"], tasks, chat=True)
        base = evaluate("local-completions", f"base_url={srv.url}/v1/completions,"
                        f"{common.replace(f'model={ADAPTER}', f'model={base_dir}')},tokenized_requests=True",
                        ["rs_mc"], tasks)
    hf_args = f"pretrained={base_dir},peft={adapter_dir},dtype=float32,device=cpu"
    local = evaluate("hf", hf_args, ["rs_mc", "rs_gen"], tasks)
    local_chat = evaluate("hf", hf_args, ["rs_gen"], tasks, chat=True)

    assert len(served["rs_mc"]) == len(local["rs_mc"]) == len(QUESTIONS)
    for got, want in zip(served["rs_mc"], local["rs_mc"], strict=True):
        lls = [ll for (ll, _), in got["resps"]]
        ref = [ll for (ll, _), in want["resps"]]
        assert len(lls) == len(ref) and all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(lls, ref, strict=True)), (
            got["doc_id"], lls, ref)
        assert [g for (_, g), in got["resps"]] == [g for (_, g), in want["resps"]]  # is_greedy alike
    # the adapter matters: its loglikelihoods are not the base's
    assert all(abs(a["resps"][0][0][0] - b["resps"][0][0][0]) > 1e-3 for a, b in zip(served["rs_mc"], base["rs_mc"],
                                                                                     strict=True))
    generations = [s["resps"][0][0] for s in served["rs_gen"]]
    assert generations == [s["resps"][0][0] for s in local["rs_gen"]] and any(generations)
    chats = [s["resps"][0][0] for s in chat["rs_gen"]]
    assert chats == [s["resps"][0][0] for s in local_chat["rs_gen"]] and any(chats)
