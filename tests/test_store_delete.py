"""Delete (RELIABILITY row 43): the removal is fsynced, and the ownership check and the removal are one atomic
step, so a delete never removes a version other than the one whose owner it checked."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from adapters_store import backend as backend_mod
from adapters_store.store import AdapterNotFound, AdapterStore
from adapters_store.synth import random_adapter
from tests.util_server import app_client, multipart

Q = "model.layers.0.self_attn.q_proj"
ADMIN_A, ADMIN_B = "admin-a-key", "admin-b-key"


@pytest.fixture(scope="module")
def blobs(tiny_llama):
    return [random_adapter(tiny_llama, "lora", rank=2, seed=s, modules=[Q]).to_bytes() for s in (1, 2)]


def test_delete_fsyncs_the_adapters_directory_after_the_rename(tmp_path, blobs, monkeypatch):
    store = AdapterStore(tmp_path)
    store.put("a", blobs[0])
    adapters = (tmp_path / "adapters").resolve()
    synced = []  # (path of the synced fd, whether the id was already gone)
    real_fsync = os.fsync

    def fsync(fd):
        synced.append((Path(os.readlink(f"/proc/self/fd/{fd}")), not (adapters / "a").exists()))
        return real_fsync(fd)

    monkeypatch.setattr(backend_mod.os, "fsync", fsync)
    store.delete("a")
    assert (adapters, True) in synced


def test_delete_with_an_expected_record_refuses_another_version(tmp_path, blobs):
    store = AdapterStore(tmp_path)
    checked = store.put("x", blobs[0], owner="alice")
    store.delete("x", owner="alice")
    now = store.put("x", blobs[0])  # same bytes, another owner (public)
    with pytest.raises(AdapterNotFound, match="does not exist"):
        store.delete("x", expect=checked)
    assert store.get("x") == now and store.read_bytes("x") == blobs[0]
    other = store.put("y", blobs[1], owner="alice")
    store.delete("y", owner="alice")
    store.put("y", blobs[0], owner="alice")  # same owner, another digest
    with pytest.raises(AdapterNotFound):
        store.delete("y", expect=other, owner="alice")
    store.delete("x", expect=now)
    assert "x" not in store and [r.id for r in store.list()] == ["y"]


def test_a_check_in_progress_holds_off_every_other_removal(tmp_path, blobs):
    """While one delete sits between its check and its removal, a second delete of the id waits for it (and
    then finds nothing), so no re-upload can slip in between the first delete's check and its removal."""
    store = AdapterStore(tmp_path)
    rec = store.put("z", blobs[0])
    in_check, go_on = threading.Event(), threading.Event()
    real_cached = store._cached

    def slow_cached(adapter_id):
        if threading.current_thread().name == "first":
            in_check.set()
            go_on.wait(10)
        return real_cached(adapter_id)

    store._cached = slow_cached
    first = threading.Thread(target=store.delete, args=("z",), kwargs={"expect": rec}, name="first")
    first.start()
    assert in_check.wait(10)
    errors = []

    def second():
        try:
            store.delete("z")
        except AdapterNotFound as e:
            errors.append(e)

    t = threading.Thread(target=second)
    t.start()
    t.join(0.5)
    assert t.is_alive() and "z" in store  # blocked on the first removal's lock, nothing removed yet
    go_on.set()
    first.join(10)
    t.join(10)
    assert "z" not in store and len(errors) == 1


def test_http_delete_never_removes_a_version_uploaded_after_its_check(tmp_path, tiny_llama, blobs):
    """Tenant A deletes its adapter; between the route's permission check and the removal, the id is deleted
    and re-uploaded (another version). A's delete must answer 404 and leave the new version in place; tenant
    B's adapter of the same id, in B's own namespace, is untouched throughout."""
    with app_client("tiny-llama", tmp_path / "store", admin_keys=(f"{ADMIN_A}:tenantA", f"{ADMIN_B}:tenantB")) as (
            client, state):
        store = state.runtime.store
        r = client.post("/v1/adapters", headers={"Authorization": f"Bearer {ADMIN_A}"},
                        **multipart("shared", {"a.safetensors": blobs[0]}))
        assert r.status_code == 201 and r.json()["owner"] == "tenantA"
        theirs = store.put("shared", blobs[0], owner="tenantB", base=tiny_llama)
        real_get = store.get
        swapped = []

        def get_then_swap(key):
            record = real_get(key)
            if not swapped:  # the route has its record: now the id gets another version
                swapped.append(True)
                store.delete(key)
                store.put("shared", blobs[1], owner="tenantA", base=tiny_llama)
            return record

        store.get = get_then_swap
        r = client.delete("/v1/adapters/shared", headers={"Authorization": f"Bearer {ADMIN_A}"})
        store.get = real_get
        assert swapped and r.status_code == 404, r.text
        assert store.read_bytes("shared", owner="tenantA") == blobs[1]
        assert store.get("shared", owner="tenantB") == theirs
