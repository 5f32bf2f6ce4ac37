"""Open a store by its location: a directory, or ``s3://BUCKET/PREFIX`` on an S3-compatible object store."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from adapters_store.store import AdapterStore
from adapters_store.validate import Limits


def is_s3(location: str) -> bool:
    return str(location).startswith("s3://")


def default_cache_dir(location: str) -> Path:
    """Where a replica caches an object store's blobs: under RANKSERVE_CACHE, one directory per location."""
    root = Path(os.environ.get("RANKSERVE_CACHE", Path.home() / ".cache" / "rankserve"))
    return root / "store-cache" / hashlib.sha256(location.encode()).hexdigest()[:16]


def open_store(location: str, limits: Limits | None = None, cache_dir: str | Path | None = None,
               cache_bytes: int = 0, client=None) -> AdapterStore:
    """``cache_dir``/``cache_bytes`` (0: the default size) only matter for an object store."""
    if not is_s3(location):
        return AdapterStore(location, limits)
    from adapters_store.s3 import DEFAULT_CACHE_BYTES, S3Backend

    cache = Path(cache_dir) if cache_dir else default_cache_dir(location)
    backend = S3Backend(location, cache, cache_bytes or DEFAULT_CACHE_BYTES, client=client)
    return AdapterStore(cache, limits, backend=backend)
