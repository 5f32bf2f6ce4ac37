"""A bounded local disk cache of content-addressed blobs (``<dir>/<sha256 hex>``), verified by sha256.

A replica reading adapters from an object store keeps the bytes of each version it read here, so it
fetches each version from the store once, and adapters it already holds keep loading while the store is
unreachable. A blob is admitted only when its bytes hash to its name, and is hashed again on every read:
a file damaged on disk is dropped and answers as a miss, never as wrong bytes. Entries are evicted least
recently used first (by mtime, refreshed on each hit) once the total passes ``max_bytes``.

Several processes may share one directory: a blob appears by one rename of a complete file, and eviction
only unlinks, so a reader sees a whole blob or none. Each process counts the total from its own scan plus
its own writes, so the bound holds per process, and every process evicts from the common pool.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import uuid
from pathlib import Path

log = logging.getLogger(__name__)
SHA_RE = re.compile(r"[0-9a-f]{64}")


class BlobCache:
    def __init__(self, root: str | Path, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"blob cache size must be positive, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0
        for entry in os.listdir(self.root):  # partial writes of dead processes
            if entry.startswith(".tmp-"):
                (self.root / entry).unlink(missing_ok=True)
        self._total = sum(e.stat().st_size for e in os.scandir(self.root) if SHA_RE.fullmatch(e.name))

    @property
    def total_bytes(self) -> int:
        return self._total

    def path(self, sha: str) -> Path:
        if not SHA_RE.fullmatch(sha):
            raise ValueError(f"not a sha256 hex digest: {sha[:80]!r}")
        return self.root / sha

    def get(self, sha: str) -> bytes | None:
        """The blob's bytes if cached and intact, else None (a damaged entry is dropped)."""
        path = self.path(sha)
        try:
            data = path.read_bytes()
        except OSError:
            self.misses += 1
            return None
        if hashlib.sha256(data).hexdigest() != sha:
            log.warning("cached blob %s is damaged (sha256 differs); dropped", sha[:12])
            self._drop(path)
            self.misses += 1
            return None
        try:
            os.utime(path)  # most recently used
        except OSError:
            pass
        self.hits += 1
        return data

    def put(self, sha: str, data: bytes) -> bool:
        """Admit ``data`` under ``sha`` if it hashes to it (False otherwise, nothing cached)."""
        if hashlib.sha256(data).hexdigest() != sha:
            return False
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        try:
            tmp.write_bytes(data)
        except OSError as e:  # a full cache disk costs a re-read later, never the request
            tmp.unlink(missing_ok=True)
            log.warning("could not cache blob %s: %s", sha[:12], e)
            return False
        return self._admit(tmp, sha, len(data))

    def adopt(self, path: Path, sha: str) -> bool:
        """Move a local file already known to hash to ``sha`` (an upload just sealed) into the cache."""
        self.path(sha)
        try:
            size = path.stat().st_size
            tmp = self.root / f".tmp-{uuid.uuid4().hex}"
            os.rename(path, tmp)  # same file system: the staging area sits beside the cache
        except OSError as e:
            log.warning("could not cache blob %s: %s", sha[:12], e)
            return False
        return self._admit(tmp, sha, size)

    def _admit(self, tmp: Path, sha: str, size: int) -> bool:
        if size > self.max_bytes:
            tmp.unlink(missing_ok=True)
            return False
        target = self.path(sha)
        with self._lock:
            existed = target.exists()
            os.replace(tmp, target)
            if not existed:
                self._total += size
            self._evict(keep=sha)
        return True

    def _evict(self, keep: str) -> None:
        if self._total <= self.max_bytes:
            return
        entries = []
        for e in os.scandir(self.root):
            if SHA_RE.fullmatch(e.name) and e.name != keep:
                try:
                    st = e.stat()
                except OSError:
                    continue
                entries.append((st.st_mtime_ns, e.name, st.st_size))
        self._total = sum(size for _, _, size in entries) + self._size(keep)
        for _, name, size in sorted(entries):
            if self._total <= self.max_bytes:
                break
            (self.root / name).unlink(missing_ok=True)
            self._total -= size
            self.evictions += 1

    def _size(self, sha: str) -> int:
        try:
            return (self.root / sha).stat().st_size
        except OSError:
            return 0

    def _drop(self, path: Path) -> None:
        with self._lock:
            try:
                size = path.stat().st_size
                path.unlink()
                self._total -= size
            except OSError:
                pass
