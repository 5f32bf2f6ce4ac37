"""Datasets from JSONL or CSV files, tokenised with the base's tokenizer and right-padded.

generate: each record has ``prompt`` and ``completion`` (loss on the completion tokens only; the EOS
token is appended to the completion), plain ``text`` (loss on every token), or ``messages`` (a chat,
rendered with the base's chat template exactly as the server's /v1/chat/completions renders it, via
``adapters_store.chat``; loss on the assistant turns only).
classify: each record has ``text`` and ``label`` (any JSON scalar; labels are kept as strings, in
sorted order unless given, and that order is the head's output order).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters_store.chat import NoChatTemplate, chat_ids

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int] | None = None  # generate: per-token targets (IGNORE where not scored)
    label: int | None = None  # classify: index into the label list


class Record(dict):
    """One data record, and where it came from (``where``: ``file:line``) for error messages."""

    where: str = "a record"


def located(rec: dict, where: str) -> Record:
    out = Record(rec)
    out.where = where
    return out


def where(rec: dict, index: int) -> str:
    """``file:line`` of a record read from a file; otherwise its index in the list it came in."""
    return rec.where if isinstance(rec, Record) else f"record {index}"


def read_records(path: str | Path) -> list[dict]:
    """JSONL (one object per line) or CSV/TSV with a header row, by file extension. Every record keeps
    its ``file:line``, so later errors (a missing field, an unknown label) name the line to fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    records: list[dict] = []
    if path.suffix.lower() in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            for row in reader:
                records.append(located(row, f"{path}:{reader.line_num}"))
    else:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: each line must be a JSON object, got {type(rec).__name__}")
            records.append(located(rec, f"{path}:{n}"))
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def split_records(records: list[dict], fraction: float, seed: int,
                  stratify: str | None = None) -> tuple[list[dict], list[dict]]:
    """A fixed shuffled split: (train, eval) with round(fraction * n) eval records. With ``stratify``
    (classify: ``"label"``) each class gives its share of the eval records (largest remainder), so a
    class is never missing from the eval split by chance."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--eval-split must be in [0, 1), got {fraction}")
    rng = random.Random(seed)
    n_eval = round(fraction * len(records))
    if stratify is None:
        groups = {"": list(range(len(records)))}
    else:
        groups = {}
        for i, rec in enumerate(records):
            groups.setdefault(field(rec, stratify, i), []).append(i)
    quota = {k: fraction * len(v) for k, v in sorted(groups.items())}
    take = {k: int(q) for k, q in quota.items()}
    for k in sorted(quota, key=lambda k: (take[k] - quota[k], k))[: n_eval - sum(take.values())]:
        take[k] += 1
    eval_ids: set[int] = set()
    for k, ids in sorted(groups.items()):
        ids = list(ids)
        rng.shuffle(ids)
        eval_ids.update(ids[: take[k]])
    return ([r for i, r in enumerate(records) if i not in eval_ids], [r for i, r in enumerate(records) if i in eval_ids])


def field(rec: dict, key: str, index: int) -> str:
    value = rec.get(key)
    if value is None:
        raise ValueError(f"{where(rec, index)}: field {key!r} is missing (has {sorted(rec)})")
    return str(value)


def chat_example(rec: dict, index: int, tokenizer, max_length: int) -> Example:
    """Token ids of the whole rendered chat; labels on the assistant turns only. Assistant turn k covers
    the tokens between the render of messages[:k] with the generation prompt (the server's prompt for
    that turn) and the render of messages[:k+1]; each render must be a token prefix of the next."""
    messages = rec["messages"]
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in messages)):
        raise ValueError(f"{where(rec, index)}: 'messages' must be a non-empty list of "
                         "{'role': str, 'content': str} objects")
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ValueError(f"{where(rec, index)}: no assistant message, so nothing would be trained")
    try:
        ids = chat_ids(tokenizer, messages, add_generation_prompt=False)
        labels = [IGNORE] * len(ids)
        for k in turns:
            prompt = chat_ids(tokenizer, messages[:k], add_generation_prompt=True)
            upto = chat_ids(tokenizer, messages[: k + 1], add_generation_prompt=False)
            if upto[: len(prompt)] != prompt or ids[: len(upto)] != upto:
                raise ValueError(f"the chat template does not render message {k} as a continuation of the ones "
                                 "before it, so the assistant tokens cannot be told apart")
            labels[len(prompt) : len(upto)] = ids[len(prompt) : len(upto)]
    except NoChatTemplate as e:
        raise ValueError(f"{where(rec, index)}: {e}: chat records need one") from None
    except ValueError as e:
        raise ValueError(f"{where(rec, index)}: {e}") from None
    return Example(input_ids=ids[:max_length], labels=labels[:max_length])


def generate_examples(records: list[dict], tokenizer, max_length: int) -> list[Example]:
    out = []
    for i, rec in enumerate(records):
        if "messages" in rec:
            out.append(chat_example(rec, i, tokenizer, max_length))
            continue
        if "prompt" in rec or "completion" in rec:
            prompt = tokenizer(field(rec, "prompt", i))["input_ids"]
            completion = tokenizer(field(rec, "completion", i), add_special_tokens=False)["input_ids"]
            completion = completion + [tokenizer.eos_token_id]
            ids = (prompt + completion)[:max_length]
            labels = ([IGNORE] * len(prompt) + completion)[:max_length]
        else:
            ids = tokenizer(field(rec, "text", i))["input_ids"][:max_length]
            labels = list(ids)
        out.append(Example(input_ids=ids, labels=labels))
    return out


def label_set(records: list[dict]) -> list[str]:
    return sorted({field(r, "label", i) for i, r in enumerate(records)})


def classify_examples(records: list[dict], tokenizer, max_length: int, labels: list[str]) -> list[Example]:
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for i, rec in enumerate(records):
        name = field(rec, "label", i)
        if name not in index:
            raise ValueError(f"{where(rec, i)}: label {name!r} is not among the training labels {labels}")
        ids = tokenizer(field(rec, "text", i), truncation=True, max_length=max_length)["input_ids"]
        out.append(Example(input_ids=ids, label=index[name]))
    return out


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask [B, L], and labels [B, L] or label [B]."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[row, : len(e.input_ids)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if examples[0].label is not None:
        batch["label"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    else:
        labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
        for row, e in enumerate(examples):
            labels[row, : len(e.labels)] = torch.tensor(e.labels)
        batch["labels"] = labels
    return batch


def build_datasets(task: str, tokenizer, train_records: list[dict], eval_records: list[dict], max_length: int,
                   labels: list[str] | None = None) -> tuple[list[Example], list[Example], list[str] | None]:
    """Tokenise both splits; for classify, the label list comes from the training records unless given."""
    if task == "generate":
        return (generate_examples(train_records, tokenizer, max_length),
                generate_examples(eval_records, tokenizer, max_length), None)
    if task != "classify":
        raise ValueError(f"task must be generate or classify, got {task!r}")
    labels = labels or label_set(train_records)
    if len(labels) < 2:
        raise ValueError(f"classify needs at least 2 labels in the training data, found {labels}")
    return (classify_examples(train_records, tokenizer, max_length, labels),
            classify_examples(eval_records, tokenizer, max_length, labels), labels)


TOY_TOPICS = {"cats": "the cat sat purring on a warm mat", "ships": "the ship sailed across a grey sea",
              "stars": "a star burned bright in the night sky", "bread": "fresh bread baked in a hot oven"}


def toy_records(task: str, n: int, seed: int = 0) -> list[dict]:
    """A small learnable dataset for tests and smoke runs: topic sentences with shuffled words."""
    rng = random.Random(seed)
    names = sorted(TOY_TOPICS)
    out = []
    for i in range(n):
        topic = names[i % len(names)]
        words = TOY_TOPICS[topic].split()
        rng.shuffle(words)
        text = " ".join(words[: rng.randint(4, len(words))])
        if task == "classify":
            out.append({"text": text, "label": topic})
        else:
            out.append({"prompt": f"{text} ->", "completion": f" {topic}"})
    return out
