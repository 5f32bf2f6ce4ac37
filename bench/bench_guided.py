"""Constrained decoding: the per-token cost of xgrammar, llguidance and outlines-core side by side in one run.

A decode step of a batch of --batch rows (as the engine runs it: one logits row per request, requests on
different adapters; the adapters change the logits, not the grammar work, so random logits stand in for
them): --constrained rows carry a grammar (JSON schemas, regexes and a choice list, mixed), the rest are
unconstrained. Each step fills the constrained rows' token masks, applies them to the logits, samples
(Gumbel-max over the masked logits) and advances every matcher by its row's token; a matcher that
completes starts over. Timed: mask + apply + advance, per constrained token; and the cold compile of
each grammar. Both of the server's tokenizers: the tiny test tokenizer and SmolLM2's (49,152 tokens).

Then the chosen library (llguidance) inside the real engine: --streams greedy requests over 4 adapters on
tiny-llama and on SmolLM2 (its real weights and tokenizer), with 0, half or all of them constrained (regexes
and JSON schemas that cannot complete within --tokens, so every request runs the same number of steps);
tokens/s, best of --rounds, cases alternating, and the time spent inside the sampler's grammar hook per
constrained token (measured directly: on a shared machine differences of throughputs are noise).

outlines-core is not a dependency: install it apart to include it, e.g.
    pip install --no-deps --target /tmp/oc outlines-core==0.2.14

    RANKSERVE_CACHE=.cache PYTHONPATH=.:/tmp/oc .venv/bin/python bench/bench_guided.py      # ~1 min
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch

from server.engine.guided import bitmask_bias

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    "ok": {"type": "boolean"}}, "required": ["name", "age", "ok"], "additionalProperties": False}
SCHEMA2 = {"type": "object", "properties": {"label": {"enum": ["spam", "ham"]}, "score": {"type": "number"}},
           "required": ["label", "score"], "additionalProperties": False}
# a large schema (a hostile client's, or a big tool spec): 120 string fields with patterns, all required
BIG_SCHEMA = {"type": "object", "properties": {f"field_{i}": {"type": "string", "pattern": f"[a-z]{{1,{8 + i % 20}}}@[a-z]{{2,12}}\\.(com|org|net)"}
                                               for i in range(120)}, "required": [f"field_{i}" for i in range(120)]}
REGEXES = [r"\d{3}-\d{3}-\d{4}", r"[a-z]{1,12}@[a-z]{1,12}\.(com|org)"]
CHOICES = ["positive", "negative", "neutral"]
GRAMMARS = [("json", SCHEMA), ("json", SCHEMA2), ("regex", REGEXES[0]), ("regex", REGEXES[1]),
            ("regex", "(" + "|".join(re.escape(c) for c in CHOICES) + ")")]


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab: int):
        import xgrammar as xgr
        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.vocab = vocab

    def compile(self, kind, src):
        if kind == "json":
            return self.compiler.compile_json_schema(json.dumps(src), any_whitespace=False)
        return self.compiler.compile_regex(src)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def bitmask(self, batch):
        return self.xgr.allocate_token_bitmask(batch, self.vocab)

    def fill(self, m, mask, i):
        m.fill_next_token_bitmask(mask, i)

    def accept(self, m, t):
        assert m.accept_token(t)
        return m.is_terminated()


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, vocab: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch
        self.ll, self.llt = llguidance, llguidance.torch
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
        self.vocab = vocab

    def compile(self, kind, src):
        M = self.ll.LLMatcher
        g = M.grammar_from_json_schema(src, defaults={"whitespace_flexible": False}) if kind == "json" \
            else M.grammar_from_regex(src)
        m = M(self.tok, g, log_level=0)  # the grammar is built here; later matchers copy this one
        assert not m.is_error(), m.get_error()
        return m

    def matcher(self, compiled):
        return compiled.deep_copy()

    def bitmask(self, batch):
        return self.llt.allocate_token_bitmask(batch, self.vocab)

    def fill(self, m, mask, i):
        self.llt.fill_next_token_bitmask(m, mask, i)

    def accept(self, m, t):
        assert m.consume_token(t), m.get_error()
        return m.is_stopped()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok, vocab: int):
        import outlines_core as oc
        from outlines_core.json_schema import build_regex_from_schema
        from outlines_core.kernels.torch import fill_next_token_bitmask
        self.oc, self.to_regex, self._fill = oc, build_regex_from_schema, fill_next_token_bitmask
        eos = tok.eos_token_id
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        table: dict[bytes, list[int]] = {}
        for i in range(len(tok)):
            if i == eos:
                continue
            piece = tok.convert_ids_to_tokens(i)
            raw = bytes(byte_of[c] for c in piece) if all(c in byte_of for c in piece) else piece.encode()
            table.setdefault(raw, []).append(i)
        self.vocabulary = oc.Vocabulary(eos, table)
        self.vocab = vocab

    def compile(self, kind, src):
        rx = self.to_regex(json.dumps(src)) if kind == "json" else src
        return self.oc.Index(rx, self.vocabulary)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def bitmask(self, batch):
        return torch.full((batch, (self.vocab + 31) // 32), -1, dtype=torch.int32)

    def fill(self, m, mask, i):
        self._fill(m, mask[i:i + 1])

    def accept(self, m, t):
        m.advance(t, return_tokens=False)
        return m.is_finished()


def apply_torch(logits: torch.Tensor, mask: torch.Tensor, rows: list[int]) -> None:
    """The server's apply (engine.guided.bitmask_bias: a byte-table lookup to 0/-inf, then one index_add),
    the same for every library; llguidance's own is a torch.compile kernel that recompiles per batch shape,
    and xgrammar's C++ CPU apply is timed beside it."""
    idx = torch.tensor(rows)
    logits.index_add_(0, idx, bitmask_bias(mask[idx], logits.shape[1]))


def apply_xgrammar(logits: torch.Tensor, mask: torch.Tensor, rows: list[int]) -> None:
    import xgrammar as xgr
    xgr.apply_token_bitmask_inplace(logits, mask, indices=rows)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: byte -> the printable character a token string uses for it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def run(lib, batch: int, constrained: int, steps: int, seed: int, apply=apply_torch) -> dict:
    t0 = time.perf_counter()
    compiled = [lib.compile(k, s) for k, s in GRAMMARS]
    compile_s = time.perf_counter() - t0
    rows = list(range(constrained))
    grammar_of = [compiled[i % len(compiled)] for i in rows]
    matchers = [lib.matcher(c) for c in grammar_of]
    mask = lib.bitmask(batch)
    g = torch.Generator().manual_seed(seed)
    fill = app = adv = 0.0
    for _ in range(steps):
        logits = torch.randn(batch, lib.vocab, generator=g)
        t0 = time.perf_counter()
        for i, m in enumerate(matchers):
            lib.fill(m, mask, i)
        t1 = time.perf_counter()
        apply(logits, mask, rows)
        t2 = time.perf_counter()
        gumbel = -torch.log(-torch.log(torch.rand(batch, lib.vocab, generator=g)))
        toks = (logits + gumbel).argmax(-1).tolist()
        t3 = time.perf_counter()
        for i in rows:
            if lib.accept(matchers[i], toks[i]):
                matchers[i] = lib.matcher(grammar_of[i])
        adv += time.perf_counter() - t3
        fill += t1 - t0
        app += t2 - t1
    per = 1e6 / (steps * constrained)
    return {"compile_ms": compile_s * 1e3, "fill": fill * per, "apply": app * per, "advance": adv * per}


ENGINE_GRAMMARS = [{"guided_regex": r"[a-z ,.]{400}"}, {"guided_json": {
    "type": "object", "properties": {"text": {"type": "string", "minLength": 400}}, "required": ["text"]}},
    {"guided_regex": r"(\d{3}-){200}"}, {"guided_json": {"type": "array", "items": {"type": "integer"}, "minItems": 200}}]


class HookClock:
    """Wall time inside the sampler's grammar hook (mask_rows + advance_rows), measured in the real engine."""

    def __init__(self):
        import server.engine.logits as logits
        import server.engine.sampler as sampler

        self.logits, self.sampler, self.seconds, self.rows = logits, sampler, 0.0, 0
        self.mask, self.advance = logits.mask_rows, sampler.advance_rows
        logits.mask_rows, sampler.advance_rows = self._mask, self._advance

    def _mask(self, logits, guides):
        t = time.perf_counter()
        try:
            return self.mask(logits, guides)
        finally:
            self.seconds += time.perf_counter() - t
            self.rows += sum(g is not None for g in guides)

    def _advance(self, *a):
        t = time.perf_counter()
        try:
            return self.advance(*a)
        finally:
            self.seconds += time.perf_counter() - t


def engine_run(eng, base, specs, tokens: int, streams: int, guided: int) -> float:
    """Generated tokens/s of ``streams`` greedy requests over 4 adapters, the first ``guided`` constrained."""
    from server.engine import GenerateParams

    prompt = base.tokenizer("Write something:")["input_ids"]
    start = time.perf_counter()
    handles = [eng.submit_generate(GenerateParams(prompt_ids=prompt, adapter_id=f"a{i % 4}", max_tokens=tokens,
                                                  temperature=0.0, ignore_eos=i >= guided,
                                                  guide=specs[i % len(specs)] if i < guided else None))
               for i in range(streams)]
    n = 0
    for h in handles:
        for ev in h.events_sync(timeout=600):
            assert ev.error is None, ev.error
            n += len(ev.token_ids)
    assert n == streams * tokens, n
    return n / (time.perf_counter() - start)


def engine_table(tokens: int, streams: int, rounds: int) -> None:
    from bench_ab_engine import Store

    from adapters_store.basemodels import load_base
    from adapters_store.synth import random_adapter
    from server.engine import Engine, EngineConfig
    from server.engine.guided import GuideSpec

    specs = [GuideSpec.regex(g["guided_regex"], "guided_regex") if "guided_regex" in g
             else GuideSpec.json_schema(g["guided_json"], "guided_json") for g in ENGINE_GRAMMARS]
    clock = HookClock()
    print(f"\nengine (llguidance): {streams} greedy streams x {tokens} tokens over 4 LoRA r=8 adapters; tokens/s "
          f"best of {rounds} rounds, cases alternating; hook = time inside mask_rows + advance_rows")
    print(f"{'model':10} {'free tok/s':>11} {'half tok/s':>11} {'all tok/s':>10} {'hook us/constrained token':>26}")
    for name in ("tiny-llama", "smollm2"):
        base = load_base(name)
        ads = {f"a{i}": random_adapter(base, "lora", 8, seed=i, std=0.05) for i in range(4)}
        eng = Engine(base, Store(ads), EngineConfig(max_running=streams, max_batch_tokens=512, max_model_len=256,
                                                     kv_cache_bytes=256 << 20, merge_single_adapter=False))
        eng.start()
        try:
            for sp in specs:
                eng.guides.compile(sp)
            cases = {0: 0.0, streams // 2: 0.0, streams: 0.0}
            hook = float("inf")
            for _ in range(rounds):
                for g in cases:
                    clock.seconds, clock.rows = 0.0, 0
                    cases[g] = max(cases[g], engine_run(eng, base, specs, tokens, streams, g))
                    if clock.rows:
                        hook = min(hook, clock.seconds / clock.rows * 1e6)
        finally:
            eng.shutdown()
        free, half, full = cases.values()
        print(f"{name:10} {free:11.0f} {half:11.0f} {full:10.0f} {hook:26.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--constrained", type=int, default=10)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engine-only", action="store_true")
    ap.add_argument("--no-engine", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from adapters_store.basemodels import load_base, smollm2_dir
    tiny = load_base("tiny-llama")
    toks = {"tiny": (tiny.tokenizer, int(tiny.model.config.vocab_size)),
            "smollm2": (AutoTokenizer.from_pretrained(smollm2_dir()), 49152)}
    libs = [] if args.engine_only else [XGrammar, LLGuidance, OutlinesCore]
    print(f"batch {args.batch}, constrained rows {args.constrained}, steps {args.steps}, best of {args.rounds} "
          "rounds; torch threads 1")
    print("us per constrained token: mask = fill the row's bitmask, apply = -inf outside it (torch; xgrammar's\n"
          "C++ apply on its second line), advance = feed the sampled token; compile 5 = the 5 grammars, cold;\n"
          "big = one 120-field schema with a pattern per field, cold")
    print(f"{'tokenizer':10} {'library':14} {'compile 5 (ms)':>14} {'mask':>8} {'apply':>8} {'advance':>8} {'total':>8} "
          f"{'big (ms)':>10}")
    for tname, (tok, vocab) in toks.items():
        for cls in libs:
            try:
                lib = cls(tok, vocab)
            except ImportError:
                print(f"{tname:10} {cls.name:14} not installed")
                continue
            variants = [(cls.name, apply_torch)] + ([("xgrammar+C++", apply_xgrammar)] if cls is XGrammar else [])
            runs = []
            for name, apply in variants:  # best of --rounds per figure: the machine is shared
                rs = [run(lib, args.batch, args.constrained, args.steps, 0, apply) for _ in range(args.rounds)]
                best = {k: min(r[k] for r in rs) for k in rs[0]}
                best["compile_ms"] = rs[0]["compile_ms"]  # cold: later rounds may hit the library's own cache
                runs.append((name, best))
            big = "-"
            if cls is not OutlinesCore:  # regex-only: a 120-field schema becomes one huge DFA (minutes)
                t = time.perf_counter()
                lib.compile("json", BIG_SCHEMA)
                big = f"{(time.perf_counter() - t) * 1e3:.0f}"
            for name, r in runs:
                total = r["fill"] + r["apply"] + r["advance"]
                print(f"{tname:10} {name:14} {r['compile_ms']:14.1f} {r['fill']:8.1f} {r['apply']:8.1f} "
                      f"{r['advance']:8.1f} {total:8.1f} {big:>10}")
    if not args.no_engine:
        engine_table(args.tokens, args.streams, args.rounds)


if __name__ == "__main__":
    main()
