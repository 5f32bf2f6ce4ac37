"""What requests without grammar or logprobs pay per step for those features: the sampler and the logprob
scan (both inside ``sampler.sample``) of this tree against the sampler of another tree (``--old DIR``, e.g. an exported older commit), in
one process, alternating, best of --rounds. A batch of --rows free rows (half greedy, half sampled) over a
--vocab vocabulary.

    git archive 8115647 server | tar -x -C /tmp/old
    .venv/bin/python bench/bench_free_rows.py --old /tmp/old
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engine import sampler  # noqa: E402


def load_old(root: str):
    spec = importlib.util.spec_from_file_location("old_sampler", Path(root) / "server/engine/sampler.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_sampler"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)  # its imports (server.engine.tokens) resolve to this tree: unchanged
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--rounds", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    old = load_old(args.old)
    logits = torch.randn(args.rows, args.vocab)
    eos = torch.tensor([0])

    def rows(mod):
        return [mod.RowSampling(mod.SamplingParams(temperature=0.0 if i % 2 else 0.8, top_p=0.9),
                                torch.Generator().manual_seed(i)) for i in range(args.rows)]

    new_rows, old_rows = rows(sampler), rows(old)
    best = {"old": float("inf"), "new": float("inf")}
    for _ in range(args.rounds):
        t = time.perf_counter()
        old.sample(logits, old_rows, eos)
        best["old"] = min(best["old"], time.perf_counter() - t)
        t = time.perf_counter()
        sampler.sample(logits, new_rows, eos)  # the processors' and guides' checks and the logprob scan inside
        best["new"] = min(best["new"], time.perf_counter() - t)
    print(f"{args.rows} free rows, vocab {args.vocab}: old sample {best['old'] * 1e3:.3f} ms, "
          f"new sample + logprob scan {best['new'] * 1e3:.3f} ms, new/old {best['new'] / best['old']:.3f}")


if __name__ == "__main__":
    main()
