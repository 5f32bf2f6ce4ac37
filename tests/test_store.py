"""The adapter store: atomic puts, ids, duplicates, caps, disk full, crashes, restarts, concurrency.

Every refused input leaves the store exactly as it was: the same list and byte-identical files.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from adapters_store import backend as backend_mod
from adapters_store.backend import LocalDirBackend
from adapters_store.format import AdapterFormatError
from adapters_store.store import (
    AdapterExists,
    AdapterNotFound,
    AdapterRecord,
    AdapterStore,
    AdapterTooLarge,
    InvalidAdapter,
    InvalidAdapterId,
    StoreFull,
    storage_key,
)
from adapters_store.synth import random_adapter
from adapters_store.validate import Limits

ROOT = Path(__file__).resolve().parents[1]
Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def blobs(tiny_llama):
    """Valid compiled adapters (bytes) of a few forms, made once."""
    return {
        "lora": random_adapter(tiny_llama, "lora", rank=2, seed=1, modules=[Q]).to_bytes(),
        "dora": random_adapter(tiny_llama, "dora", rank=3, seed=2).to_bytes(),
        "cls": random_adapter(tiny_llama, "lora", rank=1, seed=3, task="classify", labels=["a", "b"]).to_bytes(),
        "other": random_adapter(tiny_llama, "lora", rank=2, seed=4, modules=[Q]).to_bytes(),
    }


def snapshot(store: AdapterStore) -> tuple[list[AdapterRecord], dict[str, bytes]]:
    files = {str(p.relative_to(store.root)): p.read_bytes() for p in store.root.rglob("*") if p.is_file()}
    return store.list(), files


def test_put_get_load_list_delete(tmp_path, tiny_llama, blobs):
    store = AdapterStore(tmp_path)
    rec = store.put("ada-1", blobs["dora"], owner="alice", base=tiny_llama)
    assert rec.digest == hashlib.sha256(blobs["dora"]).hexdigest() and rec.size == len(blobs["dora"])
    assert (rec.method, rec.task, rec.owner, rec.base_model) == ("dora", "generate", "alice", "tiny-llama")
    assert rec.base_fingerprint == tiny_llama.fingerprint and rec.ranks == {p: 3 for p in tiny_llama.targets}
    c = store.put("cls.v2", blobs["cls"])
    assert c.task == "classify" and c.labels == ["a", "b"] and c.owner is None
    assert store.get("ada-1", owner="alice") == rec  # alice's adapter lives in alice's namespace
    assert store.read_bytes("ada-1", owner="alice") == blobs["dora"]
    loaded = store.load("ada-1", base=tiny_llama, owner="alice")
    assert set(loaded.modules) == set(tiny_llama.targets) and loaded.meta.method == "dora"
    assert [r.id for r in store.list()] == ["ada-1", "cls.v2"]
    assert [r.id for r in store.list(owner="bob")] == ["cls.v2"]  # public ones plus bob's own
    assert [r.id for r in store.list(owner="alice")] == ["ada-1", "cls.v2"]
    assert store.exists("ada-1", owner="alice") and "nope" not in store and "../x" not in store
    store.delete("ada-1", owner="alice")
    with pytest.raises(AdapterNotFound):
        store.get("ada-1", owner="alice")
    with pytest.raises(AdapterNotFound):
        store.load("ada-1", owner="alice")
    with pytest.raises(AdapterNotFound):
        store.delete("ada-1", owner="alice")
    assert [r.id for r in store.list()] == ["cls.v2"]


def test_error_statuses():
    statuses = {InvalidAdapterId: 400, AdapterNotFound: 404, AdapterExists: 409, AdapterTooLarge: 413,
                InvalidAdapter: 422, StoreFull: 507}
    assert {cls: cls.http_status for cls in statuses} == statuses
    assert issubclass(InvalidAdapter, AdapterFormatError)  # callers catching the format error still do


def bad_files(tiny_llama, good: bytes) -> dict[str, bytes]:
    """RELIABILITY.md rows 3-6 as compiled uploads."""
    import pickle

    nan = random_adapter(tiny_llama, rank=2, modules=[Q])
    nan.modules[Q].lora_b[0, 0] = float("inf")
    shape = random_adapter(tiny_llama, rank=2, modules=[Q])
    shape.modules[Q].lora_a = torch.zeros(2, 63)
    unknown = random_adapter(tiny_llama, rank=2, modules=[Q])
    unknown.modules["lm_head"] = unknown.modules.pop(Q)
    unknown.meta.ranks = {}
    big = random_adapter(tiny_llama, rank=300, modules=[Q])
    f64 = random_adapter(tiny_llama, rank=2, modules=[Q])
    f64.modules[Q].lora_a = f64.modules[Q].lora_a.double()
    wrong_base = random_adapter(tiny_llama, rank=2, modules=[Q])
    wrong_base.meta.base_fingerprint = "f" * 32
    n = int.from_bytes(good[:8], "little")
    return {
        "truncated": good[:-10],
        "header length lying": (len(good) * 4).to_bytes(8, "little") + good[8:],
        "overlapping offsets": good[:8] + good[8:8 + n].replace(b'"data_offsets":[0,', b'"data_offsets":[4,', 1)
        + good[8 + n:],
        "trailing bytes": good + b"\0\0\0\0",
        "nan/inf": nan.to_bytes(),
        "wrong shape": shape.to_bytes(),
        "unknown module": unknown.to_bytes(),
        "oversized rank": big.to_bytes(),
        "disallowed dtype": f64.to_bytes(),
        "fingerprint mismatch": wrong_base.to_bytes(),
        "pickle": pickle.dumps({"weights": [1, 2, 3]}, protocol=4),
        "zip": b"PK\x03\x04" + b"\0" * 100,
        "empty": b"",
    }


def test_bad_files_leave_the_store_unchanged(tmp_path, tiny_llama, blobs):
    store = AdapterStore(tmp_path)
    store.put("keep", blobs["lora"], base=tiny_llama)
    before = snapshot(store)
    for what, data in bad_files(tiny_llama, blobs["lora"]).items():
        with pytest.raises(AdapterFormatError) as e:
            store.put("new", data, base=tiny_llama)
        assert e.value.http_status == (415 if what in ("pickle", "zip") else 422) and e.value.problems, what
        assert snapshot(store) == before, what
    assert "new" not in store


@pytest.mark.parametrize("bad_id", ["../x", "/abs", "a/b", "a\0b", "x" * 200, "", ".hidden", "..", "a b",
                                    "-lead", "é", "a\\b", "x" * 129])
def test_path_like_ids_are_refused(tmp_path, blobs, bad_id):
    store = AdapterStore(tmp_path / "store")
    outside = sorted(tmp_path.iterdir())
    before = snapshot(store)
    for call in (lambda: store.put(bad_id, blobs["lora"]), lambda: store.get(bad_id),
                 lambda: store.delete(bad_id), lambda: store.load(bad_id)):
        with pytest.raises(InvalidAdapterId) as e:
            call()
        assert e.value.http_status == 400
    assert snapshot(store) == before and sorted(tmp_path.iterdir()) == outside


def test_longest_allowed_id(tmp_path, blobs):
    store = AdapterStore(tmp_path)
    assert store.put("x" * 128, blobs["lora"]).id == "x" * 128


def test_duplicate_id_keeps_the_old_version(tmp_path, blobs):
    store = AdapterStore(tmp_path)
    old = store.put("dup", blobs["lora"])
    before = snapshot(store)
    with pytest.raises(AdapterExists) as e:
        store.put("dup", blobs["other"])
    assert e.value.http_status == 409
    assert snapshot(store) == before and store.get("dup") == old and store.read_bytes("dup") == blobs["lora"]


def test_concurrent_puts_of_one_id_have_one_winner(tmp_path, tiny_llama):
    store = AdapterStore(tmp_path)
    datas = [random_adapter(tiny_llama, rank=2, seed=s, modules=[Q]).to_bytes() for s in range(8)]
    results: list = [None] * 8
    gate = threading.Barrier(8)

    def put(i):
        gate.wait()
        try:
            results[i] = store.put("same", datas[i])
        except AdapterExists as e:
            results[i] = e

    threads = [threading.Thread(target=put, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in enumerate(results) if isinstance(r, AdapterRecord)]
    assert len(winners) == 1 and sum(isinstance(r, AdapterExists) for r in results) == 7
    assert store.read_bytes("same") == datas[winners[0]] and len(store.list()) == 1
    assert os.listdir(tmp_path / "tmp") == []
    # A second process-level view of the same directory agrees.
    assert AdapterStore(tmp_path).get("same").digest == results[winners[0]].digest


def test_stream_over_the_cap_is_refused_while_streaming(tmp_path, blobs):
    store = AdapterStore(tmp_path, Limits(max_file_bytes=1000))
    before = snapshot(store)
    pulled = []

    def chunks():
        for i in range(100):
            pulled.append(i)
            yield b"\0" * 400

    with pytest.raises(AdapterTooLarge) as e:
        store.put_stream("big", chunks())
    assert e.value.http_status == 413 and "1000 bytes" in str(e.value)
    assert len(pulled) == 3  # stopped at the first chunk over the cap, not after reading everything
    assert snapshot(store) == before and os.listdir(tmp_path / "tmp") == []


def test_client_disconnect_mid_upload_leaves_nothing(tmp_path, blobs):
    store = AdapterStore(tmp_path)
    before = snapshot(store)

    def chunks():
        yield blobs["lora"][:100]
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        store.put_stream("gone", chunks())
    assert snapshot(store) == before and os.listdir(tmp_path / "tmp") == []


def test_disk_full_is_507_and_cleans_up(tmp_path, blobs, monkeypatch):
    store = AdapterStore(tmp_path)
    store.put("keep", blobs["lora"])
    before = snapshot(store)
    real_write = os.write

    def full(fd, data):
        if len(data) > 50:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(backend_mod.os, "write", full)
    with pytest.raises(StoreFull) as e:
        store.put("new", blobs["dora"])
    monkeypatch.undo()
    assert e.value.http_status == 507
    assert snapshot(store) == before and os.listdir(tmp_path / "tmp") == []


def test_delete_does_not_disturb_a_reader_and_reupload_is_a_new_version(tmp_path, blobs):
    store = AdapterStore(tmp_path)
    first = store.put("a", blobs["lora"])
    held_bytes, held = store.read_bytes("a"), store.load("a")
    with open(tmp_path / "adapters" / "a" / "adapter.safetensors", "rb") as f:
        store.delete("a")
        assert f.read() == blobs["lora"]  # an open reader keeps the bytes
    assert held_bytes == blobs["lora"] and held.modules[Q].lora_a.sum().isfinite()
    second = store.put("a", blobs["other"])
    assert second.digest != first.digest
    with pytest.raises(AdapterNotFound, match="is gone"):
        store.load("a", digest=first.digest)  # the old version is never served under the id
    assert store.load("a", digest=second.digest).modules[Q].lora_a.shape == (2, 64)


def test_restart_rebuilds_the_index_without_reading_tensors(tmp_path, blobs, monkeypatch):
    store = AdapterStore(tmp_path)
    for i, kind in enumerate(["lora", "dora", "cls"]):
        store.put(f"id{i}", blobs[kind], owner="o" if i else None)
    before = store.list()

    def no_reads(self, adapter_id):
        raise AssertionError("start-up read an adapter file")

    monkeypatch.setattr(LocalDirBackend, "read", no_reads)
    assert AdapterStore(tmp_path).list() == before


def test_sidecar_miss_is_rebuilt_from_the_header(tmp_path, blobs):
    store = AdapterStore(tmp_path)
    rec = store.put("x", blobs["dora"])
    (tmp_path / "adapters" / "x" / "record.json").unlink()
    again = AdapterStore(tmp_path).get("x")
    assert again.digest == rec.digest and again.ranks == rec.ranks and again.owner is None
    assert (tmp_path / "adapters" / "x" / "record.json").exists()
    # A corrupt record keeps its owner when it still parses as JSON (a tenant's adapter: in its namespace).
    key = storage_key("x", "alice")
    store.put("x", blobs["dora"], owner="alice")
    (tmp_path / "adapters" / key / "record.json").write_text('{"owner": "alice"}')
    assert AdapterStore(tmp_path).get("x", owner="alice").owner == "alice"


def test_half_written_state_is_cleaned_on_start(tmp_path, blobs):
    store = AdapterStore(tmp_path)
    store.put("ok", blobs["lora"])
    before = store.list()
    (tmp_path / "tmp" / "dead.d").mkdir()
    (tmp_path / "tmp" / "dead.d" / "adapter.safetensors").write_bytes(blobs["dora"][:1000])
    (tmp_path / "tmp" / "stray.partial").write_bytes(b"junk")
    (tmp_path / "adapters" / "empty").mkdir()
    (tmp_path / "adapters" / "recordonly").mkdir()
    (tmp_path / "adapters" / "recordonly" / "record.json").write_text("{}")
    restarted = AdapterStore(tmp_path)
    assert restarted.list() == before
    assert os.listdir(tmp_path / "tmp") == [] and sorted(os.listdir(tmp_path / "adapters")) == ["ok"]
    assert restarted.put("recordonly", blobs["other"]).id == "recordonly"


WRITER = """
import sys, time
from adapters_store.store import AdapterStore
data = open(sys.argv[2], "rb").read()
def chunks():
    yield data[:1000]
    print("streaming", flush=True)
    time.sleep(120)
    yield data[1000:]
AdapterStore(sys.argv[1]).put_stream("victim", chunks())
"""


def test_writer_killed_mid_write_leaves_no_adapter(tmp_path, blobs):
    store = AdapterStore(tmp_path / "s")
    store.put("ok", blobs["lora"])
    (tmp_path / "blob").write_bytes(blobs["dora"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "s"), str(tmp_path / "blob")],
                            stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "streaming"
        assert len(os.listdir(tmp_path / "s" / "tmp")) == 1
        AdapterStore(tmp_path / "s")  # a start-up while the writer lives must not pull its file away
        assert len(os.listdir(tmp_path / "s" / "tmp")) == 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    restarted = AdapterStore(tmp_path / "s")
    assert [r.id for r in restarted.list()] == ["ok"] and os.listdir(tmp_path / "s" / "tmp") == []
    with pytest.raises(AdapterNotFound):
        restarted.get("victim")


def test_two_stores_on_one_directory_see_each_others_changes(tmp_path, blobs):
    a, b = AdapterStore(tmp_path), AdapterStore(tmp_path)
    b.put("shared", blobs["lora"])
    assert a.get("shared").digest == hashlib.sha256(blobs["lora"]).hexdigest()
    b.delete("shared")
    with pytest.raises(AdapterNotFound):
        a.get("shared")
    b.put("shared", blobs["other"])
    assert a.get("shared").digest == hashlib.sha256(blobs["other"]).hexdigest()
    assert [r.id for r in a.list()] == ["shared"]


def test_file_changed_on_disk_is_caught_at_load(tmp_path, blobs):
    store = AdapterStore(tmp_path)
    store.put("x", blobs["lora"])
    (tmp_path / "adapters" / "x" / "adapter.safetensors").write_bytes(blobs["other"])
    with pytest.raises(InvalidAdapter, match="changed on disk"):
        store.load("x")


def test_unreadable_file_is_not_listed_but_can_be_deleted(tmp_path, blobs):
    store = AdapterStore(tmp_path)
    store.put("x", blobs["lora"])
    (tmp_path / "adapters" / "x" / "record.json").unlink()
    (tmp_path / "adapters" / "x" / "adapter.safetensors").write_bytes(b"\xff" * 64)
    restarted = AdapterStore(tmp_path)
    assert restarted.list() == [] and "x" in restarted.broken
    with pytest.raises(InvalidAdapter, match="unreadable"):
        restarted.get("x")
    restarted.delete("x")
    assert restarted.put("x", blobs["lora"]).id == "x"


def test_symlinked_target_is_never_followed(tmp_path, blobs):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter.safetensors").write_bytes(blobs["lora"])
    store = AdapterStore(tmp_path / "s")
    os.symlink(outside, tmp_path / "s" / "adapters" / "evil")
    with pytest.raises(AdapterNotFound):
        store.get("evil")
    with pytest.raises(AdapterExists):
        store.put("evil", blobs["other"])
    assert sorted(os.listdir(outside)) == ["adapter.safetensors"]
    assert (outside / "adapter.safetensors").read_bytes() == blobs["lora"] and store.list() == []


def test_put_peft_converts_and_stores(tmp_path, tiny_llama):
    peft = pytest.importorskip("peft")
    import copy

    pm = peft.get_peft_model(copy.deepcopy(tiny_llama.model), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "peft")
    store = AdapterStore(tmp_path / "s")
    rec = store.put_peft("imported", tmp_path / "peft", tiny_llama, owner="o")
    assert rec.method == "lora" and rec.ranks == {Q: 2, "model.layers.1.self_attn.q_proj": 2}
    (tmp_path / "peft" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 999}')
    with pytest.raises(InvalidAdapter, match="'r'") as e:
        store.put_peft("bad", tmp_path / "peft", tiny_llama)
    assert e.value.http_status == 422 and [r.id for r in store.list()] == ["imported"]
    with pytest.raises(AdapterFormatError) as e:
        store.put_peft("bad", {"adapter_model.bin": b"\x80\x04junk", "adapter_config.json": b"{}"}, tiny_llama)
    assert e.value.http_status == 415


def test_list_rescans_only_when_the_directory_changed(tmp_path, blobs, monkeypatch):
    a, b = AdapterStore(tmp_path), AdapterStore(tmp_path)
    a.put("one", blobs["lora"])
    old = 1_000_000_000 * 1_000_000_000  # 2001: long settled
    os.utime(tmp_path / "adapters", ns=(old, old))
    assert [r.id for r in a.list()] == ["one"]
    scans = []
    real_ids = LocalDirBackend.ids
    monkeypatch.setattr(LocalDirBackend, "ids", lambda self: scans.append(1) or real_ids(self))
    assert [r.id for r in a.list()] == ["one"] and scans == []  # unchanged directory: no scan
    b.put("two", blobs["other"])  # another process's put moves the directory's mtime
    assert [r.id for r in a.list()] == ["one", "two"] and scans == [1]
    b.delete("one")
    assert [r.id for r in a.list()] == ["two"]


def test_ids_either_refused_or_confined_to_the_store(tmp_path):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from adapters_store.store import check_id

    adapters = (tmp_path / "adapters").resolve()

    @settings(max_examples=500, deadline=None)
    @given(st.text(max_size=140) | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._/\\-]{0,130}", fullmatch=True))
    def check(adapter_id):
        try:
            check_id(adapter_id)
        except InvalidAdapterId:
            return
        assert (adapters / adapter_id).resolve().parent == adapters and len(adapter_id) <= 128

    check()
