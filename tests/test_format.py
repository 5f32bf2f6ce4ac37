import pytest
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


def _file(entries: dict, body: bytes) -> bytes:
    import json
    import struct

    raw = json.dumps(entries).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def test_bytes_are_read_as_views_equal_to_safetensors_load():
    """The one-copy reader (views of one buffer) gives exactly safetensors' tensors, for every dtype the
    format writes, empty tensors, and an unaligned offset (a hand-made file) which gets its own copy."""
    from safetensors.torch import load, save

    from adapters_store.format import read_header, safetensors_chunks, tensors_from_bytes

    g = torch.Generator().manual_seed(0)
    sd = {"m.lora_a": torch.randn(3, 5, generator=g), "m.lora_b": torch.randn(4, 3, generator=g).to(torch.bfloat16),
          "h": torch.randn(2, generator=g).half(), "i": torch.arange(7), "j": torch.arange(3, dtype=torch.int32),
          "k": torch.tensor([True, False]), "e": torch.zeros(0, 3), "d": torch.randn(2, 2, dtype=torch.float64)}
    bf = torch.tensor([1.5], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    f32 = torch.tensor([2.25, -1.0]).numpy().tobytes()
    unaligned = _file({"x": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]},
                       "y": {"dtype": "F32", "shape": [2], "data_offsets": [2, 10]}}, bf + f32)
    for data in (save(sd), b"".join(bytes(c) for c in safetensors_chunks(sd, {"k": "v"})), unaligned):
        views = tensors_from_bytes(data, read_header(data)[0])
        ref = load(data)
        assert views is not None and views.keys() == ref.keys()
        for name, t in ref.items():
            assert views[name].dtype == t.dtype and views[name].shape == t.shape and torch.equal(views[name], t), name
    views = tensors_from_bytes(unaligned, read_header(unaligned)[0])
    views["y"].add_(1)  # a private copy: the caller's bytes never change
    assert load(unaligned)["y"].tolist() == [2.25, -1.0]


def test_headers_the_view_reader_cannot_serve_go_to_safetensors():
    """A shape that does not match the byte length, a negative or non-integer dimension, an unknown dtype or
    a non-integer offset: the one-copy reader steps aside (None), and the loader's error is safetensors'."""
    from adapters_store.format import load_tensors, read_header, tensors_from_bytes

    body = torch.tensor([2.25, -1.0]).numpy().tobytes()
    for entry in ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]},
                  {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]},
                  {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]},
                  {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]},
                  {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]},
                  {"dtype": "F32", "shape": [2], "data_offsets": ["0", 8]},
                  {"dtype": "F32", "shape": [2], "data_offsets": [0, "8"]}):
        data = _file({"y": entry}, body)
        try:
            header = read_header(data)[0]
        except AdapterFormatError:
            continue  # refused before any reader runs
        assert tensors_from_bytes(data, header) is None, entry
        with pytest.raises(Exception):  # noqa: B017 (safetensors' own error types); never a wrong tensor
            load_tensors(data, header)
