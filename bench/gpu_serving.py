"""One model's serving benchmark for bench/gpu_check (also runnable alone): batch 32 through the engine,

  base         32 requests, no adapter
  distinct     32 requests, 32 distinct LoRA adapters, ranks 4..64 (resident before the run)
  merged       32 requests on ONE adapter, merge mode on (folded into W0 after the policy's wait)

with tokens/s, TTFT p50, inter-token p50/p99 and adapter cold load p50 (store -> validated -> device
slot), each beside its floor (DESIGN.md section 7) and the ratio measured/floor (1.0 = at the floor).
Random ("dummy") weights of the named config: speed only, never quality.

    python3 bench/gpu_serving.py smollm2-135m --out r.json          # CUDA, bf16
    python3 bench/gpu_serving.py llama-1b --cpu --out r.json        # small shapes on CPU, fp32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_serving import cold_loads, prewarm  # noqa: E402

from adapters_store.basemodels import BaseModel, target_modules, tiny_tokenizer  # noqa: E402
from adapters_store.store import AdapterStore  # noqa: E402
from adapters_store.synth import random_adapter  # noqa: E402
from server.engine import Engine, EngineConfig, GenerateParams  # noqa: E402

CONFIGS = {  # real architectures' shapes (HF config fields)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
}
SMALL = {  # --cpu: the same kinds of shapes, scaled down so the whole check runs in seconds
    "smollm2-135m": dict(hidden_size=72, intermediate_size=192, num_hidden_layers=2, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=8, vocab_size=512, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True),
}
RANKS = [4, 8, 12, 16, 24, 32, 48, 64]  # the 32 distinct adapters cycle through these


def peaks(cuda: bool) -> dict:
    """Measured here: a large GEMM (bf16 on CUDA), a large device copy (read + write), host -> device."""
    dev, dt, n, mib = ("cuda", torch.bfloat16, 8192, 2048) if cuda else ("cpu", torch.float32, 1024, 128)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def best(fn, reps):
        fn()
        sync()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return min(times)

    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    flops = 2 * n ** 3 / best(lambda: a @ b, 5)
    src = torch.ones(mib << 18, device=dev)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 4 / best(lambda: dst.copy_(src), 5)
    host = torch.ones(256 << 18, pin_memory=cuda)
    h2d = host.numel() * 4 / best(lambda: host.to(dev, non_blocking=True), 3) if cuda else bw / 2
    return {"flops": flops, "bandwidth": bw, "h2d": h2d}


def dummy_base(name: str, small: bool) -> BaseModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**(SMALL if small else CONFIGS)[name], max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    targets = target_modules(model, "llama")
    base = BaseModel(name, "llama", model, tiny_tokenizer(), f"dummy-{name}", ("generate",), targets)
    # the dummy weights as built are W0 (no copy: the engine's cast to the device leaves these host tensors)
    base.pristine = {p: model.get_submodule(p).weight.detach() for p in targets}
    return base


def run_timed(engine: Engine, prompts: list[list[int]], adapter_ids: list[str | None], max_tokens: int) -> dict:
    """All requests at once; tokens/s over the whole run, TTFT and inter-token gaps per request."""
    async def one(prompt, adapter, t0):
        h = engine.submit_generate(GenerateParams(prompt_ids=prompt, adapter_id=adapter, max_tokens=max_tokens,
                                                  temperature=0.0, ignore_eos=True, min_tokens=max_tokens))
        stamps, n = [], 0
        async for ev in h.events():
            if ev.error is not None:
                raise ev.error
            if ev.token_ids:
                stamps.append(time.perf_counter() - t0)
                n += len(ev.token_ids)
        return stamps, n

    async def everything():
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(p, a, t0) for p, a in zip(prompts, adapter_ids, strict=True)))
        return time.perf_counter() - t0, res

    wall, res = asyncio.run(everything())
    tokens = sum(n for _, n in res)
    assert tokens == len(prompts) * max_tokens, f"{tokens} tokens, expected {len(prompts) * max_tokens}"
    ttft = [s[0] for s, _ in res]
    itl = sorted(b - a for s, _ in res for a, b in zip(s, s[1:], strict=False))
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "ttft_p50_s": statistics.median(ttft),
            "itl_p50_s": statistics.median(itl), "itl_p99_s": itl[min(len(itl) - 1, int(0.99 * len(itl)))]}


def floors(base: BaseModel, itemsize: int, batch: int, prompt: int, gen: int, ranks: list[int], pk: dict) -> dict:
    """Lower bounds (seconds) of this configuration: max(FLOPs / peak, bytes / bandwidth) per phase.
    ``ranks``: the distinct adapters in the batch (each read once per step); [] = base only or merged."""
    c = base.model.config
    hd = c.head_dim
    lin = sum(d_in * d_out for d_in, d_out in base.targets.values()) + c.vocab_size * c.hidden_size
    row = sum(d_in + d_out for d_in, d_out in base.targets.values())  # adapter params per unit of rank
    per_tok_ranks = sum(ranks) / len(ranks) if ranks else 0  # each token uses one adapter
    base_bytes = sum(p.numel() for p in base.model.parameters()) * itemsize
    ad_bytes = sum(ranks) * row * itemsize
    kv_per_tok = 2 * c.num_hidden_layers * c.num_key_value_heads * hd * itemsize
    attn = 4 * c.num_hidden_layers * c.num_attention_heads * hd  # FLOPs per (query, key) pair

    def bound(flops, nbytes):
        return max(flops / pk["flops"], nbytes / pk["bandwidth"])

    tokens = batch * prompt
    prefill = bound(2 * tokens * (lin + per_tok_ranks * row) + attn * batch * prompt * (prompt + 1) / 2,
                    base_bytes + ad_bytes + kv_per_tok * tokens)
    ctx = prompt + gen / 2
    decode = bound(2 * batch * (lin + per_tok_ranks * row) + attn * batch * ctx,
                   base_bytes + ad_bytes + kv_per_tok * batch * ctx)
    total = prefill + (gen - 1) * decode
    return {"tok_s": batch * gen / total, "ttft_p50_s": prefill, "itl_p50_s": decode, "itl_p99_s": decode,
            "wall_s": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=sorted(CONFIGS))
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128; 8 with --cpu)")
    ap.add_argument("--gen", type=int, default=None, help="generated tokens (default 64; 4 with --cpu)")
    ap.add_argument("--cold-loads", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2, help="rounds over the three configurations; best kept")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.cpu
    prompt_len, gen = args.prompt or (128 if cuda else 8), args.gen or (64 if cuda else 4)
    B = args.batch
    t0 = time.perf_counter()
    pk = peaks(cuda)
    base = dummy_base(args.model, small=not cuda)
    g = torch.Generator().manual_seed(0)
    vocab = base.model.config.vocab_size
    prompts = [torch.randint(10, min(vocab, 500), (prompt_len,), generator=g).tolist() for _ in range(B)]
    ranks = [RANKS[i % len(RANKS)] for i in range(B)]
    result: dict = {"model": args.model, "shapes": "small (--cpu)" if not cuda else "full", "batch": B,
                    "prompt": prompt_len, "gen": gen, "peaks": pk, "ranks": ranks}
    with tempfile.TemporaryDirectory(prefix="rankserve-gpu-check-") as root:
        store = AdapterStore(root)
        for i, r in enumerate(ranks):
            store.put(f"a{i}", random_adapter(base, "lora", rank=r, seed=i, std=0.01).to_bytes())
        result["setup_s"] = round(time.perf_counter() - t0, 1)
        engine = Engine(base, store, EngineConfig(
            device="cuda" if cuda else "cpu", dtype="bfloat16" if cuda else "float32",
            max_batch_tokens=max(512, B * prompt_len // 4), max_running=B, max_queue=4 * B,
            max_model_len=prompt_len + gen + 8, max_slots=B, max_rank=64, request_timeout_s=600.0,
            merge_single_adapter=True))  # merge mode on throughout: only the one-adapter run can merge
        itemsize = torch.finfo(engine.dtype).bits // 8
        result["dtype"], result["attention"] = str(engine.dtype), engine.runner.attention
        engine.start()
        try:
            ids = [f"a{i}" for i in range(B)]
            loads = cold_loads(engine, store, ids[:args.cold_loads])
            cold_bytes = statistics.median(ranks[:args.cold_loads]) * sum(
                d_in + d_out for d_in, d_out in base.targets.values()) * itemsize
            result["cold_load_p50_s"] = {"measured": statistics.median(loads), "floor": cold_bytes / pk["h2d"]}
            run_timed(engine, prompts[:4], [None] * 4, 2)  # warm-up (allocations, kernels' first launches)
            runs = {"base": ([None] * B, []), "distinct": (ids, ranks), "merged": (["a3"] * B, [])}
            for rnd in range(args.repeat):  # rounds in the same order; the best tokens/s of each is kept
                for name, (adapter_ids, distinct_ranks) in runs.items():
                    if name != "base":
                        prewarm(engine, {a: store.get(a).digest for a in set(adapter_ids)})
                    merges = engine.merging.merges
                    measured = run_timed(engine, prompts, adapter_ids, gen)
                    print(f"round {rnd + 1} {name}", json.dumps(measured), flush=True)
                    if name in result and result[name]["tok_s"]["measured"] >= measured["tok_s"]:
                        continue
                    floor = floors(base, itemsize, B, prompt_len, gen, distinct_ranks, pk)
                    result[name] = {k: {"measured": v, "floor": floor[k]} for k, v in measured.items() if k in floor}
                    result[name]["merged"] = engine.merging.merges > merges
        finally:
            engine.shutdown()
    base_tps = result["base"]["tok_s"]["measured"]
    result["distinct_over_base_step"] = base_tps / result["distinct"]["tok_s"]["measured"]  # target <= 1.15
    result["merged_over_base_tok_s"] = result["merged"]["tok_s"]["measured"] / base_tps  # target >= 0.98
    args.out.write_text(json.dumps(result, indent=1))
    print(markdown_table({args.model: result}))


def markdown_table(serving: dict) -> str:
    """One row per (model, configuration): measured (floor, measured/floor) for each metric."""
    lines = ["| model | config | tokens/s | TTFT p50 ms | inter-token p50 ms | inter-token p99 ms | cold load p50 ms |",
             "|---|---|---|---|---|---|---|"]
    for model, r in serving.items():
        if "base" not in r:
            lines.append(f"| {model} | {next(iter(r.values()))} | | | | | |")
            continue
        cold = r["cold_load_p50_s"]
        for name in ("base", "distinct", "merged"):
            cells = []
            for key, scale in (("tok_s", 1), ("ttft_p50_s", 1e3), ("itl_p50_s", 1e3), ("itl_p99_s", 1e3)):
                m, f = r[name][key]["measured"], r[name][key]["floor"]
                ratio = f / m if key == "tok_s" else m / f  # as time: measured / floor
                cells.append(f"{m * scale:.1f} ({f * scale:.1f}, x{ratio:.1f})")
            c = f"{cold['measured'] * 1e3:.1f} ({cold['floor'] * 1e3:.2f}, x{cold['measured'] / cold['floor']:.0f})"
            lines.append(f"| {model} | {name} | " + " | ".join(cells) + f" | {c if name == 'distinct' else ''} |")
        lines.append(f"| {model} | ratios | distinct/base step {r['distinct_over_base_step']:.2f} (target <= 1.15); "
                     f"merged/base tokens/s {r['merged_over_base_tok_s']:.2f} (target >= 0.98) | | | | | |")
    return "\n".join(lines) + "\n\nEach cell: measured (floor, measured/floor as time).\n"


if __name__ == "__main__":
    main()
