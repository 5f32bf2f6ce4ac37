"""The store on a real S3 server (SeaweedFS, tests/seaweed.py): the local store's semantics on an object store,
seen by two replicas (two stores with their own caches on one bucket)."""

from __future__ import annotations

import threading
import time

import pytest

from adapters_store.locations import open_store
from adapters_store.store import AdapterExists, AdapterNotFound, InvalidAdapter, StoreUnavailable
from tests.util_server import compiled_bytes

pytestmark = pytest.mark.slow


@pytest.fixture
def url(seaweed):
    return f"s3://{seaweed.bucket()}/team/adapters"


def replica(url, tmp_path, name, **kw):
    return open_store(url, cache_dir=tmp_path / name, **kw)


def test_two_replicas_share_adapters_with_the_local_semantics(seaweed, url, tmp_path, tiny_llama):
    a, b = replica(url, tmp_path, "a"), replica(url, tmp_path, "b")
    data = compiled_bytes(tiny_llama, "dora", 4, seed=1)
    rec = a.put("shared", data, base=tiny_llama)
    assert b.get("shared") == rec  # b never saw it: it asks the store before saying 404
    assert b.load("shared", base=tiny_llama).meta.method == "dora"
    assert b.backend.reads == 1 and a.backend.reads == 0  # the uploader cached its own upload
    b.load("shared", base=tiny_llama)
    assert b.backend.reads == 1  # the second load came from b's verified cache
    with pytest.raises(AdapterExists):
        b.put("shared", compiled_bytes(tiny_llama, seed=2), base=tiny_llama)
    with pytest.raises(InvalidAdapter):  # validated before anything is published
        a.put("bad", data[:-10], base=tiny_llama)
    keys = {o["Key"] for o in seaweed.client().list_objects_v2(Bucket=url.split("/")[2]).get("Contents", [])}
    assert keys == {"team/adapters/adapters/shared.json", f"team/adapters/blobs/{rec.digest}"}
    # tenants: the same id in a tenant's namespace is another adapter; other tenants do not see it
    mine = b.put("shared", compiled_bytes(tiny_llama, seed=3), owner="acme", base=tiny_llama)
    assert a.resolve("shared", "acme") == mine and a.resolve("shared", "other") == rec
    assert [(r.id, r.owner) for r in a.list(owner="acme")] == [("shared", None), ("shared", "acme")]
    b.delete("shared")
    with pytest.raises(AdapterNotFound):
        b.get("shared")
    a.backend._known.clear()  # past the record TTL
    with pytest.raises(AdapterNotFound):
        a.get("shared")
    assert a.resolve("shared", "acme") == mine
    a.delete("shared", owner="acme")
    assert seaweed.client().list_objects_v2(Bucket=url.split("/")[2]).get("KeyCount") == 0  # blobs collected


def test_concurrent_publishes_of_one_id_leave_one_winner(seaweed, url, tmp_path, tiny_llama):
    stores = [replica(url, tmp_path, f"r{i}") for i in range(4)]
    blobs = [compiled_bytes(tiny_llama, seed=10 + i) for i in range(4)]
    start, won, lost = threading.Barrier(4), [], []

    def put(i):
        start.wait()
        try:
            won.append(stores[i].put("race", blobs[i], base=tiny_llama).digest)
        except AdapterExists:
            lost.append(i)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(won) == 1 and len(lost) == 3
    keys = [o["Key"] for o in seaweed.client().list_objects_v2(Bucket=url.split("/")[2]).get("Contents", [])]
    assert sorted(k.split("/")[-2] for k in keys) == ["adapters", "blobs"]  # the losers' blobs were removed
    fresh = replica(url, tmp_path, "fresh")
    assert fresh.get("race").digest == won[0] and fresh.load("race", base=tiny_llama) is not None


def test_an_unreachable_store_answers_503_and_the_cache_keeps_serving(seaweed, tmp_path, tiny_llama):
    url = f"s3://{seaweed.bucket()}/outage"
    a = replica(url, tmp_path, "a")
    a.put("cached", compiled_bytes(tiny_llama, seed=1), base=tiny_llama)
    a.put("never-read", compiled_bytes(tiny_llama, seed=2), base=tiny_llama)
    b = replica(url, tmp_path, "b")
    b.load("cached", base=tiny_llama)
    b.get("never-read")  # b knows the record, not the bytes
    seaweed.stop()
    try:
        assert b.load("cached", base=tiny_llama).meta.method == "lora"  # record + verified cache: no store needed
        for call in (lambda: b.load("never-read", base=tiny_llama), lambda: b.get("unknown"),
                     lambda: a.put("new", compiled_bytes(tiny_llama, seed=3), base=tiny_llama),
                     lambda: b.delete("cached"), lambda: b.list()):
            with pytest.raises(StoreUnavailable) as e:
                call()
            assert e.value.http_status == 503 and e.value.retry_after
        assert not list((a.backend.local.tmp).iterdir())  # the failed upload left nothing staged
    finally:
        seaweed.start()
    # it recovers by itself (a restarted SeaweedFS answers 500 for a few seconds while its volumes come back)
    assert eventually(lambda: b.load("never-read", base=tiny_llama)).meta.method == "lora"
    assert eventually(lambda: a.put("new", compiled_bytes(tiny_llama, seed=3), base=tiny_llama)).id == "new"


def eventually(call, timeout: float = 60.0):
    end = time.monotonic() + timeout
    while True:
        try:
            return call()
        except StoreUnavailable:
            if time.monotonic() > end:
                raise
            time.sleep(0.5)
