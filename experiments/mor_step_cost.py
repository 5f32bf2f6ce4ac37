"""MoR's training step and serving cost against LoRA at equal parameter counts, measured side by side.

One training step (forward, backward, AdamW) of the whole adapted base on a fixed batch, for each
configuration in turn, repeated round-robin so that load on the machine hits every configuration
alike; the median of the repeats is reported. Configurations (every target linear adapted):

- ``lora r=8``: the reference;
- ``mor N=8 r=8``: the experiment's MoR (trains about 2x LoRA r=8's parameters);
- ``lora r=16``: LoRA with about MoR's *trainable* count;
- ``lora r=64``: LoRA with MoR's *served* width (the compiled B' is N*r = 64 wide).

Besides time it prints, per configuration, the trainable and exported adapter parameters (MoR's compact file
form: r*d_out + N*d_out for the up-projection, see docs/FORMAT.md) and the
serving multiply-adds per token (from the compiled shapes: r*d_in + r*d_out for LoRA,
r*d_in + N*d_in + N*r*d_out for MoR).

    RANKSERVE_CACHE=.cache HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python experiments/mor_step_cost.py --model minilm
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters_store.basemodels import load_base  # noqa: E402
from trainer.inject import inject, select_targets  # noqa: E402
from trainer.methods.base import get_method, make_config  # noqa: E402

CONFIGS = {
    "lora r=8": ("lora", {"rank": 8, "alpha": 16}),
    "mor N=8 r=8": ("mor", {"rank": 8, "alpha": 16, "num_experts": 8}),
    "lora r=16": ("lora", {"rank": 16, "alpha": 32}),
    "lora r=64": ("lora", {"rank": 64, "alpha": 128}),
}


def serving_macs(layers) -> int:
    """Multiply-adds per token of the adapter branch, from the compiled shapes."""
    total = 0
    for layer in layers.values():
        mw = layer.compile()
        total += mw.lora_a.numel() + mw.effective_rank * mw.lora_b.shape[0]  # h = A x (r*d_in), B' h' (N*r*d_out or r*d_out)
        if mw.gate is not None:
            total += mw.gate.numel() + mw.rank_scale.numel()  # router logits, then v(x) = g_i * lamA_i * h
    return total


def build(base, method: str, options: dict, seed: int):
    torch.manual_seed(seed)
    model = copy.deepcopy(base.model)
    layers = inject(model, get_method(method), make_config(method, **options), select_targets(base))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, layers, params, torch.optim.AdamW(params, lr=1e-3)


def step(model, params, opt, ids, mask) -> None:
    out = model(input_ids=ids, attention_mask=mask)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits
    hidden.float().square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def module_times(d_in: int, d_out: int, tokens: int, repeats: int) -> dict[str, float]:
    """Forward + backward of ONE adapted linear on ``tokens`` tokens (the adapter's own cost, no base model
    around it); median seconds per configuration, round-robin."""
    x = torch.randn(tokens, d_in, generator=torch.Generator().manual_seed(1))
    layers = {}
    for name, (method, opts) in CONFIGS.items():
        torch.manual_seed(0)
        layers[name] = get_method(method)(torch.nn.Linear(d_in, d_out), make_config(method, **opts))
        with torch.no_grad():
            layers[name].lora_B.normal_()  # B = 0 at init would let nothing special happen in backward
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for rep in range(repeats + 1):
        for name, layer in layers.items():
            t0 = time.perf_counter()
            layer(x).square().mean().backward()
            if rep:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
            layer.zero_grad(set_to_none=True)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=96)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = load_base(args.model)
    if base.is_decoder:
        base.model = base.model.model  # the decoder backbone: same adapted linears, no vocab projection
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, base.tokenizer.vocab_size, (args.batch_size, args.seq_len), generator=g)
    mask = torch.ones_like(ids)
    built = {name: build(base, method, opts, 0) for name, (method, opts) in CONFIGS.items()}
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for model, _layers, params, opt in built.values():  # warm-up (allocator, Adam state)
        step(model, params, opt, ids, mask)
    for _ in range(args.repeats):
        for name, (model, _layers, params, opt) in built.items():
            t0 = time.perf_counter()
            step(model, params, opt, ids, mask)
            times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["lora r=8"])
    rows = []
    for name, (_model, layers, _params, _opt) in built.items():
        trainable = sum(p.numel() for layer in layers.values() for p in layer.parameters() if p.requires_grad)
        exported = sum(t.numel() for layer in layers.values() for t in vars(layer.compile()).values()
                       if isinstance(t, torch.Tensor))
        med = statistics.median(times[name])
        rows.append({"config": name, "trainable": trainable, "exported": exported, "serving_macs_per_token": serving_macs(layers),
                     "step_s_median": round(med, 4), "step_vs_lora8": round(med / ref, 2),
                     "step_s_all": [round(t, 4) for t in times[name]]})
    print(f"{args.model}, batch {args.batch_size} x {args.seq_len} tokens, {args.threads} thread(s), "
          f"median of {args.repeats} round-robin repeats")
    print("| config | trainable adapter params | exported adapter params | adapter MACs/token (serving) "
          "| train step s (median) | step vs LoRA r=8 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['trainable']:,} | {r['exported']:,} | {r['serving_macs_per_token']:,} | "
              f"{r['step_s_median']:.3f} | {r['step_vs_lora8']:.2f}x |")
    d_in, d_out = next(iter(base.targets.values()))
    mod = module_times(d_in, d_out, args.batch_size * args.seq_len, 3 * args.repeats)
    print(f"\none adapted linear {d_in}->{d_out} alone, {args.batch_size * args.seq_len} tokens, forward + backward:")
    print("| config | adapter module fwd+bwd ms (median) | vs LoRA r=8 |")
    print("|---|---|---|")
    for name, t in mod.items():
        print(f"| {name} | {1000 * t:.2f} | {t / mod['lora r=8']:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                        "module": {"d_in": d_in, "d_out": d_out, "seconds": mod}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
