"""Model level: one padded batch with a different adapter per row through the HF forward under pool.step
gives, row by row, what that row gets alone with its adapter merged into a copy of the base (MoR, which
has no merge: alone through a copy whose target linears run ``semantics.module_forward``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adapters_store.format import METHODS, CompiledAdapter, ModuleWeights
from adapters_store.semantics import merged_weight, module_forward
from adapters_store.synth import random_adapter
from server.lora.pool import AdapterPool

# (method, rank, variable_rank): 8 adapters, every serving form, ranks from 2 to 16
ADAPTERS = [("lora", 8, False), ("dora", 16, False), ("adalora", 12, True), ("aroma", 8, True),
            ("mor", 4, False), ("edora", 6, False), ("lora", 2, False), ("dora", 4, False)]


class ReferenceLinear(nn.Module):
    def __init__(self, linear: nn.Linear, mw: ModuleWeights):
        super().__init__()
        self.linear, self.mw = linear, mw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y = module_forward(flat, self.linear.weight, self.linear.bias, self.mw)
        return y.reshape(*x.shape[:-1], -1)


def alone(base, adapter: CompiledAdapter | None) -> nn.Module:
    """A copy of the base carrying one adapter the plain way: merged, or reference linears for MoR."""
    model = copy.deepcopy(base.model)
    for path, mw in (adapter.modules.items() if adapter is not None else ()):
        linear = model.get_submodule(path)
        if mw.gate is None:
            with torch.no_grad():
                linear.weight.copy_(merged_weight(linear.weight, mw))
        else:
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, ReferenceLinear(linear, mw))
    return model


def run_mixed(base, task: str, out, backend: str | None = None) -> None:
    assert {m for m, _, _ in ADAPTERS} == set(METHODS)
    base = copy.copy(base)
    base.model = copy.deepcopy(base.model)
    adapters = [random_adapter(base, m, rank=r, seed=10 + i, variable_rank=v, task=task, std=0.08)
                for i, (m, r, v) in enumerate(ADAPTERS)]
    pool = AdapterPool(base, "cpu", torch.float32, buckets=[(8, 4), (16, 2), (32, 3)], backend=backend)
    pool.install()
    slots = [pool.acquire(f"k{i}", lambda a=a: a) for i, a in enumerate(adapters)]
    rows = [*zip(slots, adapters, strict=True), (-1, None)]  # the last row runs the base alone
    gen = torch.Generator().manual_seed(1)
    lengths = [int(n) for n in torch.randint(3, 12, (len(rows),), generator=gen)]
    L = max(lengths)
    ids = torch.randint(10, 500, (len(rows), L), generator=gen)
    mask = (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]).long()  # right padding
    token_slots = torch.tensor([s for s, _ in rows])[:, None].expand(-1, L).reshape(-1)  # [B*L]
    with torch.no_grad(), pool.step(token_slots):
        batched = out(base.model(input_ids=ids, attention_mask=mask))  # [B, L, ...]
    assert batched.shape[:2] == (len(rows), L)
    for b, ((_, adapter), n) in enumerate(zip(rows, lengths, strict=True)):
        with torch.no_grad():
            want = out(alone(base, adapter)(input_ids=ids[b:b + 1, :n], attention_mask=mask[b:b + 1, :n]))[0]
        torch.testing.assert_close(batched[b, :n], want, atol=2e-4, rtol=2e-4,
                                   msg=lambda m, b=b: f"row {b} ({ADAPTERS[b][0] if b < 8 else 'base'}): {m}")
    base_only = out(alone(base, None)(input_ids=ids[:1, :lengths[0]]))[0]
    assert not torch.allclose(batched[0, :lengths[0]], base_only, atol=1e-3)  # the adapters really act


def test_tiny_llama_mixed_batch_rows_match_alone(tiny_llama):
    run_mixed(tiny_llama, "generate", lambda o: o.logits)


def test_tiny_bert_mixed_batch_rows_match_alone(tiny_bert):
    run_mixed(tiny_bert, "classify", lambda o: o.last_hidden_state)


@pytest.mark.parametrize("form", ["dense", "segments"])
def test_kept_rows_share_the_shrink_and_are_never_stale(tiny_llama, form):
    """The dense and segments formulations over the whole model (q/k/v and gate/up each sharing one
    shrink GEMM) give every row what its adapter gives alone, with segments of unequal length (the
    segments' padding), and after an adapter leaves and another takes its slot (the same slot set) the
    next step reads the new adapter's rows, not the kept ones."""
    base = copy.copy(tiny_llama)
    base.model = copy.deepcopy(tiny_llama.model)
    pool = AdapterPool(base, "cpu", torch.float32, buckets=[(8, 1), (16, 1)], backend=f"torch-{form}")  # one slot each
    pool.install()
    groups = {m.group for m in pool.slots.values()}
    assert any(len(g.members) == 3 for g in groups) and any(len(g.members) == 2 for g in groups)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 500, (4, 7), generator=gen)

    def check(adapters: list[CompiledAdapter]) -> None:
        slots = [pool.acquire(f"k{i}-{id(a)}", lambda a=a: a) for i, a in enumerate(adapters)]
        rows = [0, 1, 0, None]  # adapter 0 on two rows: 14 tokens against 7, and a base row
        token_slots = torch.tensor([-1 if r is None else slots[r] for r in rows])[:, None].expand(-1, 7).reshape(-1)
        with torch.no_grad(), pool.step(token_slots) as plan:
            batched = base.model(input_ids=ids).logits
        assert plan.kept_rows is not None and set(plan.choices.values()) == {form}
        assert form == "dense" or plan.seg_valid is not None  # the shorter segment is padded
        for b, r in enumerate(rows):
            with torch.no_grad():
                want = alone(base, None if r is None else adapters[r])(input_ids=ids[b:b + 1]).logits[0]
            torch.testing.assert_close(batched[b], want, atol=2e-4, rtol=2e-4)
        for i, a in enumerate(adapters):
            pool.release(f"k{i}-{id(a)}")

    first = [random_adapter(base, m, rank=r, seed=20 + i, std=0.08)
             for i, (m, r) in enumerate([("lora", 8), ("dora", 16)])]
    check(first)
    for i, a in enumerate(first):  # free the slots: the next adapters land in the same ones
        pool.forget(f"k{i}-{id(a)}")
    check([random_adapter(base, m, rank=r, seed=40 + i, std=0.08) for i, (m, r) in enumerate([("lora", 8), ("dora", 16)])])
