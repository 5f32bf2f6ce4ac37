"""MoR's compact file against the expanded file it reads as: size, exported parameters and load time, one run.

    RANKSERVE_CACHE=.cache HF_HUB_OFFLINE=1 nice -n 19 .venv/bin/python bench/bench_mor_file.py --models minilm smollm2

Per base: one MoR adapter (--experts N, --rank r on every target module, a classify head of --labels labels,
as the fortunes experiment trains it) with random values, written in the compact form the trainer writes
(lora_b [d_out, r] + expert_out_scale [N, d_out]) and as its expanded twin (lora_b [d_out, N*r]: the file
that form is read as, and what the trainer wrote before). Reported: the adapter parameters each file holds
(head excluded, as TRAINING.md counts them), the file sizes, and the time to load each file as the store
does (read the bytes, then ``validate_bytes``: container, parse, every check against the base, and for
the compact file the expansion), both the first load (every value checked) and a reload of a digest that
passed before (the residency tier's reload after eviction). The two files alternate over --repeats rounds
on one thread; medians are reported. Both load to equal tensors (checked).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters_store.basemodels import load_base  # noqa: E402
from adapters_store.format import CompiledAdapter, loads  # noqa: E402
from adapters_store.synth import random_adapter  # noqa: E402
from adapters_store.validate import validate_bytes  # noqa: E402


def adapter_params(adapter: CompiledAdapter) -> int:
    return sum(t.numel() for mw in adapter.modules.values() for t in mw.tensors().values())


def lora_params(base, rank: int) -> int:
    return sum(rank * (d_in + d_out) for d_in, d_out in base.targets.values())


def measure(name: str, args) -> dict:
    base = load_base(name)
    labels = [f"c{i}" for i in range(args.labels)]
    compact = random_adapter(base, "mor", args.rank, seed=0, task="classify", labels=labels,
                             num_experts=args.experts, compact=True)
    files = {"compact": compact.to_bytes()}
    files["expanded"] = loads(files["compact"]).to_bytes()
    held = {form: loads(data) for form, data in files.items()}
    for path, mw in held["compact"].modules.items():  # one adapter, two files
        assert torch.equal(mw.lora_b, held["expanded"].modules[path].lora_b)
    first: dict[str, list[float]] = {form: [] for form in files}
    reload: dict[str, list[float]] = {form: [] for form in files}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {form: Path(tmp) / f"{form}.safetensors" for form in files}
        for form, data in files.items():
            paths[form].write_bytes(data)
        digests = {form: hashlib.sha256(data).hexdigest() for form, data in files.items()}
        for form in files:  # warm-up; afterwards both digests are known to have passed
            validate_bytes(paths[form].read_bytes(), base, digest=digests[form])
        for _ in range(args.repeats):
            for form in files:
                t0 = time.perf_counter()
                validate_bytes(paths[form].read_bytes(), base)  # no digest: every check runs
                first[form].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                validate_bytes(paths[form].read_bytes(), base, digest=digests[form])
                reload[form].append(time.perf_counter() - t0)
    lora = lora_params(base, 8)
    rows = {}
    for form, data in files.items():
        n = adapter_params(compact if form == "compact" else held["expanded"])
        rows[form] = {"adapter_params": n, "x_lora_r8": round(n / lora, 3), "file_bytes": len(data),
                      "file_kib": round(len(data) / 1024), "load_ms": round(1000 * statistics.median(first[form]), 2),
                      "reload_ms": round(1000 * statistics.median(reload[form]), 2)}
    return {"model": name, "modules": len(base.targets), "lora_r8_params": lora, "forms": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--labels", type=int, default=5)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = [measure(name, args) for name in args.models]
    print(f"MoR N={args.experts} r={args.rank} on every target module, {args.labels}-label head, "
          f"{args.threads} thread(s), median of {args.repeats} alternating rounds")
    print("| base | file form | adapter params in the file | x LoRA r=8 | file size | load ms (first) | "
          "load ms (known digest) |")
    print("|---|---|---|---|---|---|---|")
    for res in results:
        for form, r in res["forms"].items():
            print(f"| {res['model']} | {form} | {r['adapter_params']:,} | {r['x_lora_r8']:.2f}x | {r['file_kib']} KiB | "
                  f"{r['load_ms']:.1f} | {r['reload_ms']:.1f} |")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
