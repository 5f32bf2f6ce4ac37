"""Random but valid compiled adapters of every method form, for tests, benchmarks and load tests.

The values are random (never claim quality from them); the shapes, metadata and out_scale are exactly
what a trained adapter of that method would carry, so every serving path is exercised.
"""

from __future__ import annotations

import torch

from adapters_store.basemodels import BaseModel
from adapters_store.format import AdapterMeta, CompiledAdapter, ModuleWeights


def random_module(
    weight: torch.Tensor, method: str, rank: int, gen: torch.Generator, num_experts: int = 4, std: float = 0.02,
    compact: bool = False,
) -> ModuleWeights:
    """One module in serving form for base weight W0 [d_out, d_in]; ``compact``: MoR's compact file form
    (shared B [d_out, r] and expert_out_scale [N, d_out], as the trainer writes it) instead of a free B'."""
    d_out, d_in = weight.shape
    a = torch.randn(rank, d_in, generator=gen) * std
    if method == "mor":
        b = torch.randn(d_out, (1 if compact else num_experts) * rank, generator=gen) * std
        gate = torch.randn(num_experts, d_in, generator=gen) * std * 10
        lam = 1.0 + 0.1 * torch.randn(num_experts, rank, generator=gen)
        scale = 1.0 + 0.1 * torch.randn(num_experts, d_out, generator=gen) if compact else None
        return ModuleWeights(a, b, gate=gate, rank_scale=lam, expert_out_scale=scale)
    b = torch.randn(d_out, rank, generator=gen) * std
    out_scale = None
    if method in ("dora", "edora"):
        # g = m / ||W0 + BA||_row with m a slightly perturbed ||W0||_row, computed in fp32.
        w = weight.float() + b @ a
        m = weight.float().norm(dim=1) * (1.0 + 0.05 * torch.randn(d_out, generator=gen))
        out_scale = m / w.norm(dim=1)
    return ModuleWeights(a, b, out_scale=out_scale)


def random_adapter(
    base: BaseModel,
    method: str = "lora",
    rank: int = 8,
    seed: int = 0,
    task: str = "generate",
    labels: list[str] | None = None,
    modules: list[str] | None = None,
    variable_rank: bool = False,
    num_experts: int = 4,
    std: float = 0.02,
    compact: bool = False,
) -> CompiledAdapter:
    """A valid adapter for ``base``. ``variable_rank`` draws a rank in [0, rank] per module (AdaLoRA/AROMA
    style; rank-0 modules are omitted). ``modules`` defaults to every target of the base. ``compact``: MoR
    in its compact file form (write it, or call ``.expanded()``, before handing it to a server)."""
    gen = torch.Generator().manual_seed(seed)
    paths = modules if modules is not None else sorted(base.targets)
    built: dict[str, ModuleWeights] = {}
    for path in paths:
        r = int(torch.randint(0, rank + 1, (1,), generator=gen)) if variable_rank else rank
        if r == 0:
            continue
        built[path] = random_module(base.base_weight(path), method, r, gen, num_experts, std, compact)
    head_w = head_b = None
    if task == "classify":
        labels = labels or ["negative", "positive"]
        head_w = torch.randn(len(labels), base.hidden_size, generator=gen) * 0.1
        head_b = torch.zeros(len(labels))
    meta = AdapterMeta(
        method=method, task=task, base_model=base.name, base_fingerprint=base.fingerprint,
        labels=labels if task == "classify" else None,
        pooling=("last" if base.is_decoder else "mean") if task == "classify" else None,
        ranks={p: m.rank for p, m in built.items()},
        trainable_params=sum(t.numel() for m in built.values() for t in m.tensors().values()),
        training={"synthetic": True, "seed": seed},
    )
    return CompiledAdapter(meta=meta, modules=built, head_weight=head_w, head_bias=head_b)
