"""One decode step of B tokens through the WHOLE HF Llama forward (KV cache of --ctx tokens per row),
side by side in one run, with random ("dummy") weights of two configs (speed only, never quality):

  (a) base            no adapters, the plain HF model
  (b) rankserve       B distinct LoRA adapters, ranks drawn from 4..16, rankserve's batched op
  (b') alternatives   the same through the op's other formulations (--alternatives)
  (c) peft            the same adapters through PEFT's mixed-batch forward (adapter_names=)
  (d) loop            the same through a per-adapter Python loop over rankserve's slot buffers
  (e) rank-1          B distinct rank-1 adapters through rankserve's op

Every time is printed beside its floor (DESIGN.md section 7): max(FLOPs / peak FLOP/s, bytes / peak
bandwidth), base plus the distinct adapters actually read, with both peaks measured in this run.

    RANKSERVE_CACHE=.cache .venv/bin/python bench/bench_lowrank.py            # default, ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adapters_store.basemodels import TARGETS, BaseModel, target_modules
from adapters_store.synth import random_adapter
from server.lora.buffers import ModuleSlots
from server.lora.ops import select_backend
from server.lora.plan import BatchPlan
from server.lora.pool import AdapterPool

CONFIGS = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True),
    "llama-2048x16": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=64, vocab_size=32000, tie_word_embeddings=False),
}


def peak_flops(n: int = 2048, reps: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(reps))
    return 2 * n ** 3 / best


def peak_bandwidth(mib: int = 512, reps: int = 3) -> float:
    src = torch.ones(mib << 18)  # float32: mib MiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(timed(lambda: dst.copy_(src)) for _ in range(reps))
    return 2 * src.numel() * 4 / best  # read + write


CLOCK = time.perf_counter  # main() switches to process CPU time for single-threaded runs


def timed(fn: Callable[[], object]) -> float:
    start = CLOCK()
    fn()
    return CLOCK() - start


class LoopLowRank:
    """(d): the op as a Python loop over the step's distinct adapters (host-side segments set per step)."""

    name = "python-loop"

    def __init__(self) -> None:
        self.segments: list[tuple[int, int, int, torch.Tensor]] = []  # (bucket, local slot, rank, token rows)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, plan: BatchPlan, slots: ModuleSlots) -> torch.Tensor:
        for bucket, local, rank, rows in self.segments:
            a = slots.a[bucket][local, :rank]  # [r, d_in]
            bt = slots.bt[bucket][local, :rank]  # [r, d_out]
            y.index_add_(0, rows, (x.index_select(0, rows) @ a.T) @ bt)
        return y


class Bench:
    def __init__(self, name: str, batches: list[int], reps: int, ctx: int, alternatives: bool, peft: int,
                 peaks: tuple[float, float]):
        self.name, self.batches, self.reps, self.ctx = name, batches, reps, ctx
        self.alternatives, self.peft, self.peft_max_batch = alternatives, peft > 0, peft
        self.flops_peak, self.bw_peak = peaks
        torch.manual_seed(0)
        cfg = LlamaConfig(**CONFIGS[name], max_position_embeddings=4096)
        self.cfg = cfg
        self.model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
        targets = target_modules(self.model, "llama")
        self.base = BaseModel(name, "llama", self.model, None, "dummy", ("generate",), targets)
        self.row_params = sum(d_in + d_out for d_in, d_out in targets.values())  # per unit of rank
        self.linear_params = sum(m.weight.numel() for m in self.model.modules() if isinstance(m, torch.nn.Linear))

    # ------------------------------------------------------------------ floor
    def floor(self, B: int, ranks: list[int]) -> float:
        c = self.cfg
        attn = 4 * B * self.ctx * c.num_attention_heads * c.head_dim * c.num_hidden_layers
        flops = 2 * B * self.linear_params + attn + 2 * sum(ranks) * self.row_params
        kv = 2 * c.num_hidden_layers * B * (self.ctx + 1) * c.num_key_value_heads * c.head_dim * 4
        nbytes = 4 * self.linear_params + kv + 4 * sum(ranks) * self.row_params  # every adapter is distinct
        return max(flops / self.flops_peak, nbytes / self.bw_peak)

    # ---------------------------------------------------------------- running
    def decode_fn(self, model, B: int, cache, **kwargs) -> tuple[Callable[[], torch.Tensor], Callable[[], object]]:
        """(step, prepare): prepare restores the prefilled cache (untimed), step runs one decode step."""
        nxt = torch.randint(0, self.cfg.vocab_size, (B, 1), generator=torch.Generator().manual_seed(B))
        state = {}

        def prepare():
            state["cache"] = copy.deepcopy(cache)

        def step():
            return model(input_ids=nxt, past_key_values=state["cache"], use_cache=True, **kwargs).logits

        return step, prepare

    def prefill(self, B: int):
        """The KV cache of --ctx random tokens per row, computed by the base alone (shared by every variant)."""
        prompt = torch.randint(0, self.cfg.vocab_size, (B, self.ctx), generator=torch.Generator().manual_seed(-B))
        with torch.inference_mode():
            return self.model(input_ids=prompt, use_cache=True).past_key_values

    def measure(self, step, prepare, context=None) -> tuple[float, torch.Tensor]:
        times, out = [], None
        for i in range(self.reps + 1):  # one warm-up
            prepare()
            with torch.inference_mode(), (context() if context else _null()):
                start = CLOCK()
                out = step()
                if i:
                    times.append(CLOCK() - start)
        return min(times), out  # the machine is shared: the fastest repetition is the least disturbed

    def run(self) -> list[dict]:
        rows = []
        gen = torch.Generator().manual_seed(42)
        for B in self.batches:
            ranks = [int(r) for r in torch.randint(4, 17, (B,), generator=gen)]
            rows += self.run_batch(B, ranks)
        return rows

    def run_batch(self, B: int, ranks: list[int]) -> list[dict]:
        out: list[dict] = []

        def record(variant: str, seconds: float, used_ranks: list[int]) -> None:
            fl = self.floor(B, used_ranks)
            out.append(dict(config=self.name, B=B, variant=variant, ms=seconds * 1e3, floor_ms=fl * 1e3))
            print(f"{self.name:14s} B={B:<4d} {variant:30s} {seconds * 1e3:9.1f} ms   floor {fl * 1e3:7.1f} ms   "
                  f"measured/floor {seconds / fl:5.2f}", flush=True)

        cache = self.prefill(B)
        step, prepare = self.decode_fn(self.model, B, cache)
        t, logits_base = self.measure(step, prepare)
        record("(a) base", t, [])

        adapters = [random_adapter(self.base, "lora", rank=r, seed=i) for i, r in enumerate(ranks)]
        rank1 = [random_adapter(self.base, "lora", rank=1, seed=10_000 + i) for i in range(B)]
        # Buckets every 4 rank rows (what these ranks need) plus rank 1 for (e).
        buckets = [(1, B)] + [(r, sum(1 for x in ranks if r - 4 < x <= r)) for r in (4, 8, 12, 16)]
        pool = AdapterPool(self.base, "cpu", torch.float32, buckets=buckets, cpu_bytes=0, mor_entries=0)
        pool.install()
        slots = torch.tensor([pool.acquire(f"a{i}", lambda a=a: a) for i, a in enumerate(adapters)])
        slots1 = torch.tensor([pool.acquire(f"r{i}", lambda a=a: a) for i, a in enumerate(rank1)])
        t, logits_b = self.measure(step, prepare, lambda: pool.step(slots))
        record(f"(b) rankserve {pool.op.name}", t, ranks)
        for name in ("torch-gather", "torch-grouped") if self.alternatives else ():
            self.set_op(pool, select_backend("cpu", name))
            t, _ = self.measure(step, prepare, lambda: pool.step(slots))
            record(f"(b') rankserve {name}", t, ranks)
        loop = LoopLowRank()
        loop.segments = [(pool._bucket_of(int(s)), int(s) - pool.bucket_base[pool._bucket_of(int(s))], r,
                          torch.tensor([i])) for i, (s, r) in enumerate(zip(slots, ranks, strict=True))]
        self.set_op(pool, loop)
        t, logits_d = self.measure(step, prepare, lambda: pool.step(slots))
        record("(d) python loop", t, ranks)
        self.set_op(pool, pool.op)
        t, _ = self.measure(step, prepare, lambda: pool.step(slots1))
        record("(e) rank-1 rankserve", t, [1] * B)
        torch.testing.assert_close(logits_b, logits_d, atol=1e-3, rtol=1e-3)  # loop and batched op agree
        assert not torch.allclose(logits_b, logits_base, atol=1e-3), "the adapters changed nothing"
        self.uninstall()
        del pool
        if self.alternatives:
            # One bucket padded to rank 16: padding bytes traded for one launch per module instead of four.
            pool = AdapterPool(self.base, "cpu", torch.float32, buckets=[(16, B)], cpu_bytes=0, mor_entries=0)
            pool.install()
            slots = torch.tensor([pool.acquire(f"a{i}", lambda a=a: a) for i, a in enumerate(adapters)])
            t, _ = self.measure(step, prepare, lambda: pool.step(slots))
            record(f"(b') one bucket r16 {pool.op.name}", t, [16] * B)
            self.uninstall()
            del pool
        if self.peft and B <= self.peft_max_batch:
            t, logits_c = self.peft_step(B, ranks, adapters, cache)
            record("(c) peft adapter_names", t, ranks)
            err = (logits_c - logits_b).abs().max().item()
            print(f"{'':14s} check: max |logits peft - rankserve| = {err:.2e}")
            out[-1]["peft_vs_rankserve_max_abs"] = err
        out_ratios(out)
        return out

    def peft_step(self, B: int, ranks: list[int], adapters, cache) -> tuple[float, torch.Tensor]:
        from peft import LoraConfig, get_peft_model

        names = list(TARGETS["llama"])
        peft_model = None
        for i, r in enumerate(ranks):
            conf = LoraConfig(r=r, lora_alpha=r, target_modules=names, lora_dropout=0.0, init_lora_weights=False)
            if peft_model is None:
                peft_model = get_peft_model(self.model, conf, adapter_name="a0")
            else:
                peft_model.add_adapter(f"a{i}", conf)
        assert peft_model is not None
        inner = peft_model.base_model.model
        with torch.no_grad():
            for i, adapter in enumerate(adapters):  # the same weights as (b): scaling alpha/r = 1
                for path, mw in adapter.modules.items():
                    layer = inner.get_submodule(path)
                    layer.lora_A[f"a{i}"].weight.copy_(mw.lora_a)
                    layer.lora_B[f"a{i}"].weight.copy_(mw.lora_b)
        peft_model.eval()
        step, prepare = self.decode_fn(peft_model, B, cache, adapter_names=[f"a{i}" for i in range(B)])
        result = self.measure(step, prepare)
        self.model = peft_model.unload()  # the plain base again, for the next batch size
        return result

    @staticmethod
    def set_op(pool: AdapterPool, op) -> None:
        for layer in pool.layers.values():
            layer.op = op

    def uninstall(self) -> None:
        """Put plain nn.Linear modules back (same Parameters), so the next pool wraps fresh."""
        for path, (d_in, d_out) in self.base.targets.items():
            layer = self.model.get_submodule(path)
            plain = torch.nn.Linear(d_in, d_out, bias=layer.bias is not None, device="meta")
            plain.weight, plain.bias = layer.weight, layer.bias
            parent, _, name = path.rpartition(".")
            setattr(self.model.get_submodule(parent), name, plain)


def out_ratios(rows: list[dict]) -> None:
    ms = {r["variant"].split(" ")[0]: r["ms"] for r in rows}
    parts = [f"(b)/(a) {ms['(b)'] / ms['(a)']:.2f}", f"(e)/(b) {ms['(e)'] / ms['(b)']:.2f}",
             f"(d)/(b) {ms['(d)'] / ms['(b)']:.2f}"]
    if "(c)" in ms:
        parts.insert(1, f"(c)/(b) {ms['(c)'] / ms['(b)']:.2f}")
    print(f"{'':14s} ratios: " + ", ".join(parts), flush=True)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="smollm2-135m,llama-2048x16")
    p.add_argument("--batches", default="1,8,32,128", help="B for smollm2-135m")
    p.add_argument("--big-batches", default="1,8,32", help="B for llama-2048x16")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--big-reps", type=int, default=2)
    p.add_argument("--ctx", type=int, default=16, help="cached tokens per row before the decode step")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core box, a second OpenMP thread waits on busy cores)")
    p.add_argument("--wall", action="store_true", help="wall-clock times even with --threads 1")
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--peft-max-batch", type=int, default=32,
                   help="largest B for (c): PEFT's add_adapter slows down with every adapter (B=128: >5 min)")
    p.add_argument("--alternatives", action="store_true", help="also time the op's other formulations")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    if args.threads == 1 and not args.wall:
        # The box is shared: CPU time of a single-threaded process does not count time spent descheduled.
        CLOCK = time.process_time
    load = os.getloadavg()
    peaks = (peak_flops(), peak_bandwidth())
    clock = "process CPU time" if CLOCK is time.process_time else "wall clock"
    print(f"machine: {_cpu_name()}, {os.cpu_count()} cpus, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, load avg {load[0]:.2f}; times: min over repetitions, {clock}")
    print(f"peaks measured: {peaks[0] / 1e9:.1f} GFLOP/s (fp32 GEMM 2048^3), {peaks[1] / 1e9:.1f} GB/s (copy)")
    for name in args.configs.split(","):
        big = name != "smollm2-135m"
        batches = [int(b) for b in (args.big_batches if big else args.batches).split(",")]
        bench = Bench(name, batches, args.big_reps if big else args.reps, args.ctx, args.alternatives,
                      0 if args.no_peft else args.peft_max_batch, peaks)
        bench.run()
        del bench
    print(f"load avg at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
