import torch

from adapters_store.format import AdapterFormatError, loads
from adapters_store.semantics import merged_weight, module_forward
from adapters_store.synth import random_adapter


def test_round_trip_every_tensor_kind(tiny_llama):
    for method, task in [("lora", "generate"), ("dora", "generate"), ("mor", "generate"), ("edora", "classify")]:
        ad = random_adapter(tiny_llama, method=method, rank=4, task=task, variable_rank=True, seed=3)
        back = loads(ad.to_bytes())
        assert back.meta.method == method and back.meta.task == task
        assert back.meta.ranks == {p: m.rank for p, m in ad.modules.items()}
        assert set(back.state_dict()) == set(ad.state_dict())
        for k, v in ad.state_dict().items():
            assert torch.equal(back.state_dict()[k], v), k


def test_truncated_file_is_refused(tiny_llama):
    data = random_adapter(tiny_llama, rank=2).to_bytes()
    for cut in (4, 20, len(data) - 1):
        try:
            loads(data[:cut])
        except AdapterFormatError as e:
            assert e.problems
        else:
            raise AssertionError(f"truncated at {cut} was accepted")


def test_merge_equals_unmerged_forward(tiny_llama):
    ad = random_adapter(tiny_llama, method="dora", rank=4, seed=1)
    path, mw = next(iter(ad.modules.items()))
    w = dict(tiny_llama.model.named_parameters())[path + ".weight"]
    x = torch.randn(5, w.shape[1])
    assert torch.allclose(module_forward(x, w, None, mw), x @ merged_weight(w, mw).T, atol=1e-5)
