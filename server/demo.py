"""Demo adapters for `rankserve serve --demo-adapters`: random but valid (synthetic, no quality), so a fresh
server can be tried with curl before anything is trained. Their metadata says so."""

from __future__ import annotations

from adapters_store.basemodels import BaseModel
from adapters_store.synth import random_adapter
from server.common.logs import event

NOTE = "synthetic demo adapter: random weights, for trying the API; its outputs mean nothing"


def demo_specs(base: BaseModel) -> list[dict]:
    specs = [dict(adapter_id="demo-classify", method="dora", rank=8, task="classify",
                  labels=["negative", "positive"])]
    if base.is_decoder:
        specs.insert(0, dict(adapter_id="demo-lora", method="lora", rank=8, task="generate", labels=None))
    return specs


def ensure_demo_adapters(store, base: BaseModel) -> list[str]:
    """Put each demo adapter into the store unless an adapter of that id is already there."""
    added = []
    for i, spec in enumerate(demo_specs(base)):
        adapter_id = spec.pop("adapter_id")
        try:
            store.get(adapter_id)
            continue
        except Exception as e:
            if getattr(e, "http_status", None) != 404:
                raise
        adapter = random_adapter(base, seed=1000 + i, **spec)
        adapter.meta.training = {**(adapter.meta.training or {}), "synthetic": True, "note": NOTE}
        store.put(adapter_id, adapter.to_bytes(), owner=None)
        added.append(adapter_id)
    if added:
        event("demo adapters added", adapters=added)
    return added
