"""Topic classification of Debian fortune cookies: all six methods, side by side, on real bases.

The texts are fetched at run time and never committed: /usr/share/games/fortunes when installed,
otherwise ``apt-get download fortunes fortunes-min`` + ``dpkg-deb -x`` into the cache directory.
Each category file is split on its ``%`` separator lines; a fixed split (seeded shuffle per category)
gives ``--train-per-class`` training and ``--test-per-class`` test texts per category.

    RANKSERVE_CACHE=.cache HF_HUB_OFFLINE=1 nohup .venv/bin/python experiments/fortunes_topics.py \
        --models minilm smollm2 --seeds 0 1 2 > experiments/results/fortunes/run.log 2>&1 &

Every finished run is appended to ``results.jsonl`` (re-running skips finished runs), then the table
``results.md`` and the AROMA rank pictures are rewritten. CPU budget: one thread, small subsets.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters_store.basemodels import cache_dir, load_base  # noqa: E402
from trainer.cli import parse_value  # noqa: E402
from trainer.data import build_datasets  # noqa: E402
from trainer.export import build_adapter, write_adapter  # noqa: E402
from trainer.loop import TrainConfig, train  # noqa: E402
from trainer.methods.base import get_method  # noqa: E402
from trainer.plots import plot_ranks  # noqa: E402

CATEGORIES = ("computers", "food", "law", "sports", "startrek")
METHODS = ("lora", "dora", "adalora", "aroma", "mor", "edora")
# Per-method settings. LoRA r=8 is the reference; the others follow their papers' shapes (AROMA: rank-1
# components, alpha 4; EDoRA: r=8 core on frozen SVD factors; AdaLoRA: 12 -> 8 per module on average;
# MoR: 8 experts over a shared r=8 pair). AROMA's loop lengths are scaled to a run of ~100 steps.
METHOD_OPTIONS = {
    "lora": {"rank": 8, "alpha": 16},
    "dora": {"rank": 8, "alpha": 16},
    "adalora": {"rank": 8, "init_r": 12, "alpha": 16, "delta_t": 2},
    "aroma": {"rank": 1, "alpha": 4, "eps_in": 0.1, "eps_out": 0.005, "check_every": 5, "max_inner_steps": 20,
              "first_warmup": 10, "restart_warmup": 5},
    "mor": {"rank": 8, "alpha": 16, "num_experts": 8},
    "edora": {"rank": 8, "alpha": 16},
}
LR = {"lora": 1e-3, "dora": 1e-3, "adalora": 1e-3, "aroma": 1e-3, "mor": 1e-3, "edora": 5e-3}


def override_options(methods, items: list[str]) -> None:
    for method in methods:
        hints = {f.name: str(f.type) for f in dataclasses.fields(get_method(method).Config)}
        for item in items:
            key, sep, raw = item.partition("=")
            if not sep or key not in hints:
                raise SystemExit(f"--set {item!r}: {method} options are {sorted(hints)}")
            METHOD_OPTIONS[method] = {**METHOD_OPTIONS[method], key: parse_value(raw, hints[key])}


def fortunes_dir(cache: Path) -> Path:
    system = Path("/usr/share/games/fortunes")
    if (system / CATEGORIES[0]).exists():
        return system
    target = cache / "fortunes"
    files = target / "usr" / "share" / "games" / "fortunes"
    if not (files / CATEGORIES[0]).exists():
        debs = target / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", "fortunes", "fortunes-min"], cwd=debs, check=True, capture_output=True)
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    return files


def read_category(path: Path) -> list[str]:
    """One fortune per ``%``-separated block, whitespace collapsed, duplicates dropped."""
    texts, block = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines() + ["%"]:
        if line.strip() == "%":
            text = " ".join(" ".join(block).split())
            if text:
                texts.append(text)
            block = []
        else:
            block.append(line)
    return list(dict.fromkeys(texts))


def make_split(root: Path, categories: list[str], n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    train_records, test_records = [], []
    for cat in categories:
        texts = read_category(root / cat)
        random.Random(f"fortunes-{cat}").shuffle(texts)
        if len(texts) < n_train + n_test:
            raise SystemExit(f"category {cat!r} has {len(texts)} fortunes, fewer than {n_train} + {n_test}")
        test_records += [{"text": t, "label": cat} for t in texts[:n_test]]
        train_records += [{"text": t, "label": cat} for t in texts[n_test : n_test + n_train]]
    return train_records, test_records


def run_one(base, method: str, seed: int, train_set, test_set, labels, args, out_dir: Path, lr: float) -> dict:
    fresh = dataclasses.replace(base, model=copy.deepcopy(base.model))
    cfg = TrainConfig(method=method, task="classify", method_options=METHOD_OPTIONS[method], lr=lr,
                      epochs=args.epochs, batch_size=args.batch_size, seed=seed, progress=False,
                      eval_batch_size=32)
    result = train(fresh, train_set, test_set, cfg, labels)
    adapter = build_adapter(fresh, result, method, "classify")
    path = out_dir / f"{base.name}-{method}-s{seed}.safetensors"
    size = write_adapter(adapter, path, fresh)
    log = result.log
    row = {"model": base.name, "method": method, "seed": seed, "accuracy": log["final_eval"]["accuracy"],
           "eval_loss": log["final_eval"]["loss"], "adapter_trainable_params": log["adapter_trainable_params"],
           "head_params": log["head_params"], "exported_adapter_params": adapter.meta.training["exported_adapter_params"],
           "file_bytes": size, "train_seconds": log["train_seconds"], "steps": log["steps"],
           "total_rank": sum(adapter.meta.ranks.values()), "ranks": adapter.meta.ranks,
           "rank_history": log["rank_history"], "targets": log["targets"], "options": METHOD_OPTIONS[method], "lr": lr,
           "setup": {k: getattr(args, k) for k in ("epochs", "batch_size", "max_length", "train_per_class",
                                                   "test_per_class")}}
    if method == "aroma":
        row["aroma"] = {k: log["method_summary"][k] for k in ("resets", "converged", "stopped_early", "outer_ratios")}
    return row


def tune(args, train_records: list[dict], adapters_dir: Path) -> None:
    """Pick each method's learning rate on a validation split carved from the TRAINING texts (80/20 per
    category, seed 0); the test texts are never looked at. Writes tune.jsonl and lr_choice.json."""
    fit, val = [], []
    for cat in args.categories:
        texts = [r for r in train_records if r["label"] == cat]
        cut = len(texts) * 4 // 5
        fit, val = fit + texts[:cut], val + texts[cut:]
    log_path, choice_path = args.out / "tune.jsonl", args.out / "lr_choice.json"
    rows = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    for model in args.models:
        base = load_base(model)
        fit_set, val_set, labels = build_datasets("classify", base.tokenizer, fit, val, args.max_length)
        for method in args.methods:
            for lr in args.tune_lrs:
                if any((r["model"], r["method"], r["lr"]) == (model, method, lr) for r in rows):
                    continue
                row = run_one(base, method, 0, fit_set, val_set, labels, args, adapters_dir, lr)
                row = {k: row[k] for k in ("model", "method", "lr", "accuracy", "eval_loss", "train_seconds")}
                rows.append(row)
                with log_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"tune {model} {method} lr {lr}: validation accuracy {row['accuracy']:.4f}", flush=True)
    choice: dict[str, dict[str, float]] = {}
    for r in sorted(rows, key=lambda r: (-r["accuracy"], r["eval_loss"])):  # best accuracy, then lower loss
        choice.setdefault(r["model"], {}).setdefault(r["method"], r["lr"])
    choice_path.write_text(json.dumps(choice, indent=1) + "\n")
    print(json.dumps(choice), flush=True)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def summarise(rows: list[dict], out_dir: Path, majority: float) -> str:
    lines = [f"Majority baseline (balanced test set): {100 * majority:.1f}%", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        lora = [r for r in rows if r["model"] == model and r["method"] == "lora"]
        ref = lora[0]["adapter_trainable_params"] if lora else None
        lines += [f"### {model}", "",
                  "| method | lr | trainable adapter params | % of LoRA r=8 | + head | exported adapter params "
                  "(serving form) | file size | test accuracy % (mean ± std) | seeds | train s (mean) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for method in METHODS:
            rs = [r for r in rows if r["model"] == model and r["method"] == method]
            if not rs:
                continue
            trainable = rs[0]["adapter_trainable_params"]
            share = f"{100 * trainable / ref:.1f}%" if ref else "-"
            exported = statistics.mean(r["exported_adapter_params"] for r in rs)
            lines.append(f"| {method} | {rs[0]['lr']:g} | {trainable:,} | {share} | {rs[0]['head_params']:,} | "
                         f"{exported:,.0f} | {statistics.mean(r['file_bytes'] for r in rs) / 1024:.0f} KiB | "
                         f"{mean_std([r['accuracy'] for r in rs])} | {len(rs)} | "
                         f"{statistics.mean(r['train_seconds'] for r in rs):.0f} |")
        lines.append("")
        aroma = sorted((r for r in rows if r["model"] == model and r["method"] == "aroma"), key=lambda r: r["seed"])
        if aroma:
            r = aroma[0]
            pngs = plot_ranks(r["ranks"], r["targets"], r["rank_history"], out_dir / f"aroma-{model}-s{r['seed']}",
                              f"AROMA on {model}, seed {r['seed']}")
            totals = ", ".join(f"seed {x['seed']}: {x['total_rank']}" for x in aroma)
            lines += [f"AROMA total rank ({totals}); pictures for seed {r['seed']}: " + ", ".join(p.name for p in pngs), ""]
    text = "\n".join(lines)
    (out_dir / "results.md").write_text(text + "\n")
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--test-per-class", type=int, default=40)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "fortunes")
    p.add_argument("--tune-lrs", nargs="+", type=float, help="only pick learning rates on a validation split")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method option for every selected method (e.g. eps_out=0.001); recorded per row")
    args = p.parse_args()
    override_options(args.methods, args.set)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    adapters_dir = cache_dir() / "experiments" / "fortunes"
    adapters_dir.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    done = {(r["model"], r["method"], r["seed"]) for r in rows}

    train_records, test_records = make_split(fortunes_dir(cache_dir()), args.categories, args.train_per_class,
                                             args.test_per_class)
    if args.tune_lrs:
        return tune(args, train_records, adapters_dir)
    choice_path = args.out / "lr_choice.json"
    chosen = json.loads(choice_path.read_text()) if choice_path.exists() else {}
    majority = max(sum(r["label"] == c for r in test_records) for c in args.categories) / len(test_records)
    print(f"{len(train_records)} train / {len(test_records)} test fortunes, categories {args.categories}", flush=True)
    for model in args.models:
        base = load_base(model)
        train_set, test_set, labels = build_datasets("classify", base.tokenizer, train_records, test_records,
                                                     args.max_length)
        for seed in args.seeds:
            for method in args.methods:
                if (model, method, seed) in done:
                    continue
                started = time.time()
                lr = chosen.get(model, {}).get(method, LR[method])
                row = run_one(base, method, seed, train_set, test_set, labels, args, adapters_dir, lr)
                rows.append(row)
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{model} {method} seed {seed}: accuracy {row['accuracy']:.4f}, "
                      f"{row['exported_adapter_params']} adapter params, {time.time() - started:.0f}s", flush=True)
                summarise(rows, args.out, majority)
    print(summarise(rows, args.out, majority), flush=True)


if __name__ == "__main__":
    main()
