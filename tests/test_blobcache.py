"""The object store's local blob cache: only bytes matching their sha256 are admitted or returned, and the
total stays under its bound, least recently used evicted first."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from adapters_store.blobcache import BlobCache


def blob(n: int, seed: int) -> tuple[str, bytes]:
    data = bytes([seed % 256]) * n
    return hashlib.sha256(data).hexdigest(), data


def test_admits_and_returns_only_matching_bytes(tmp_path):
    cache = BlobCache(tmp_path, 1 << 20)
    sha, data = blob(1000, 1)
    assert cache.get(sha) is None
    assert not cache.put(sha, data + b"x")  # wrong bytes for that name: refused
    assert cache.get(sha) is None
    assert cache.put(sha, data)
    assert cache.get(sha) == data and cache.total_bytes == 1000
    (tmp_path / sha).write_bytes(b"\0" + data[1:])  # damaged on disk
    assert cache.get(sha) is None and not (tmp_path / sha).exists() and cache.total_bytes == 0
    with pytest.raises(ValueError):
        cache.get("../etc/passwd")


def test_bounded_in_bytes_least_recently_used_first(tmp_path):
    cache = BlobCache(tmp_path, 2500)
    blobs = [blob(1000, i) for i in range(3)]
    for i, (sha, data) in enumerate(blobs[:2]):
        assert cache.put(sha, data)
        os.utime(tmp_path / sha, ns=(time.time_ns() - (10 - i) * 10**9,) * 2)
    assert cache.get(blobs[0][0]) == blobs[0][1]  # 0 is now the most recently used
    assert cache.put(*blobs[2])
    assert cache.get(blobs[1][0]) is None  # 1 was the least recently used
    assert cache.get(blobs[0][0]) is not None and cache.get(blobs[2][0]) is not None
    assert cache.total_bytes <= 2500 and cache.evictions == 1
    assert not cache.put(*blob(3000, 9))  # larger than the whole cache: never admitted
    assert BlobCache(tmp_path, 2500).total_bytes == 2000  # a new process counts what is there


def test_adopt_moves_a_sealed_upload_in(tmp_path):
    cache = BlobCache(tmp_path / "c", 1 << 20)
    sha, data = blob(500, 3)
    src = tmp_path / "c" / "upload"
    src.write_bytes(data)
    assert cache.adopt(src, sha) and not src.exists() and cache.get(sha) == data
