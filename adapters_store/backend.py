"""Where the store keeps its bytes: the ``Backend`` protocol and ``LocalDirBackend`` (a directory).

Layout of ``LocalDirBackend``::

    root/adapters/<key>/adapter.safetensors  the uploaded bytes, never rewritten
    root/adapters/<key>/record.json          the store's record (owner included), published with the file
    root/tmp/<random>.d/                     uploads being streamed, and deletions being cleaned up

``<key>`` is the storage key (tenancy.py): a public adapter's plain id, or ``t<hex>~<id>`` for a tenant's.

An upload streams into ``tmp/<random>.d/`` (the HTTP server spools multipart file parts there directly,
so they are on the store's file system and never copied), is fsynced and hashed, is validated from that
file, gets its record.json beside it, and is published by ONE ``rename`` of that directory to
``adapters/<id>``: file and record appear together or
not at all, and rename refuses a non-empty target, so of two concurrent publishes of one id (threads or
processes) exactly one wins. Removal renames the directory out of ``adapters/`` first, so the id is
free at once and open readers keep their bytes, then fsyncs ``adapters/`` so a deleted adapter never
comes back after a crash. Removals hold an flock on ``adapters/`` itself: while one holds it no other
removal can free the id, and no publish can take an occupied id, so what a removal checks is what it
removes. A writer holds an flock on its staging file, so ``recover`` (at start-up, possibly while another
process writes) removes only what dead writers left. Staged files are local files (``Staged.path``), so
validation reads them in place; an object store would implement the same protocol with a local staging
directory (publish = upload, then a conditional put).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)
FILE, RECORD = "adapter.safetensors", "record.json"


@dataclass
class Staged:
    """An upload being written to private storage, not yet visible."""

    work: Path  # the staging directory
    fd: int = field(repr=False)  # write end, held open with an flock until published or discarded (-1 after)
    size: int = 0
    digest: str = ""  # sha256 hex of the file, set by seal()
    published: bool = False

    @property
    def path(self) -> Path:
        return self.work / FILE


class Backend(Protocol):
    def open_stage(self) -> Staged:
        """An empty private file to write an upload into (append, then seal)."""
    def append(self, staged: Staged, chunks: Iterable[bytes]) -> None: ...
    def seal(self, staged: Staged) -> None:
        """Make the staged bytes durable and set ``digest`` (of what is on disk, however it was written)."""
    def stage(self, chunks: Iterable[bytes]) -> Staged:
        """open_stage + append + seal; on any error (the iterator's included) leave nothing and re-raise."""
    def discard(self, staged: Staged) -> None: ...  # idempotent; a no-op once published
    def publish(self, staged: Staged, adapter_id: str, record: bytes) -> str | None:
        """Make file + record visible at once; FileExistsError if the id is taken. Returns the version."""
    def version(self, adapter_id: str) -> str | None:
        """A token that changes whenever the id's file changes; None when absent."""
    def read(self, adapter_id: str) -> bytes: ...  # FileNotFoundError when absent
    def read_record(self, adapter_id: str) -> bytes | None: ...
    def write_record(self, adapter_id: str, record: bytes) -> None: ...
    def remove(self, adapter_id: str, check: Callable[[], None] | None = None) -> None:
        """FileNotFoundError when absent. ``check`` runs after the id is found and before it is removed, in
        one atomic step with the removal; it may raise to refuse, and then nothing is removed."""
    def move(self, src: str, dst: str) -> None:
        """Rename an adapter to another key (FileNotFoundError: src absent; FileExistsError: dst taken)."""
    def ids(self) -> list[str]: ...  # every key
    def listing_token(self) -> str | None:
        """Equal tokens guarantee ids() is unchanged (None: unknown, rescan)."""
    def recover(self) -> list[str]: ...  # drop what dead writers left; returns what was removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(1 << 20)
        while n := f.readinto(buf):
            digest.update(memoryview(buf)[:n])
    return digest.hexdigest()


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalDirBackend:
    def __init__(self, root: str | Path):
        self.adapters = Path(root) / "adapters"
        self.tmp = Path(root) / "tmp"
        self.adapters.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def open_stage(self) -> Staged:
        work = self.tmp / f"{uuid.uuid4().hex}.d"
        work.mkdir()
        try:
            fd = os.open(work / FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        fcntl.flock(fd, fcntl.LOCK_EX)  # tells recover() in any process that this writer is alive
        return Staged(work, fd)

    def append(self, staged: Staged, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            _write_all(staged.fd, chunk)
            staged.size += len(chunk)

    def seal(self, staged: Staged) -> None:
        os.fsync(staged.fd)
        staged.size = os.fstat(staged.fd).st_size
        staged.digest = _sha256_file(staged.path)  # streamed, from the page cache the writes just filled

    def stage(self, chunks: Iterable[bytes]) -> Staged:
        staged = self.open_stage()
        try:
            self.append(staged, chunks)
            self.seal(staged)
        except BaseException:
            self.discard(staged)
            raise
        return staged

    def discard(self, staged: Staged) -> None:
        self._close(staged)
        if not staged.published:
            shutil.rmtree(staged.work, ignore_errors=True)

    @staticmethod
    def _close(staged: Staged) -> None:
        fd, staged.fd = staged.fd, -1  # never closed twice: the number may belong to another file by then
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def publish(self, staged: Staged, adapter_id: str, record: bytes) -> str | None:
        _write_new(staged.work / RECORD, record)
        _fsync_dir(staged.work)
        try:
            os.rename(staged.work, self.adapters / adapter_id)  # the one visibility point
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise FileExistsError(adapter_id) from None
            raise
        staged.published = True
        self._close(staged)
        try:
            _fsync_dir(self.adapters)  # durability of the rename; the adapter is already visible
        except OSError as e:
            log.warning("fsync of %s failed after publishing %r: %s", self.adapters, adapter_id, e)
        return self.version(adapter_id)

    def version(self, adapter_id: str) -> str | None:
        try:  # lstat: a symlink planted under adapters/ is never followed
            if not stat.S_ISDIR(os.lstat(self.adapters / adapter_id).st_mode):
                return None
            st = os.lstat(self.adapters / adapter_id / FILE)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"

    def read(self, adapter_id: str) -> bytes:
        if self.version(adapter_id) is None:
            raise FileNotFoundError(adapter_id)
        fd = os.open(self.adapters / adapter_id / FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def read_record(self, adapter_id: str) -> bytes | None:
        try:
            return (self.adapters / adapter_id / RECORD).read_bytes()
        except OSError:
            return None

    def write_record(self, adapter_id: str, record: bytes) -> None:
        tmp = self.adapters / adapter_id / f".{RECORD}.{uuid.uuid4().hex}"
        _write_new(tmp, record)
        os.replace(tmp, self.adapters / adapter_id / RECORD)

    def remove(self, adapter_id: str, check: Callable[[], None] | None = None) -> None:
        gone = self.tmp / f"{uuid.uuid4().hex}.deleted"
        fd = os.open(self.adapters, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # removals one at a time, across threads and processes
            if self.version(adapter_id) is None:
                raise FileNotFoundError(adapter_id)
            if check is not None:
                check()
            os.rename(self.adapters / adapter_id, gone)  # the id is free from here on
            try:
                os.fsync(fd)  # ...and stays free after a crash
            except OSError as e:  # the removal stands either way; say that it may not survive a crash
                log.warning("fsync of %s failed after removing %r: %s", self.adapters, adapter_id, e)
        finally:
            os.close(fd)  # releases the flock
        shutil.rmtree(gone, ignore_errors=True)

    def move(self, src: str, dst: str) -> None:
        """Under the removal lock, so no removal checks one key while the adapter changes keys."""
        fd = os.open(self.adapters, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self.version(src) is None:
                raise FileNotFoundError(src)
            if os.path.lexists(self.adapters / dst):
                raise FileExistsError(dst)
            try:
                os.rename(self.adapters / src, self.adapters / dst)
            except OSError as e:  # a publish took dst after the check above
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise FileExistsError(dst) from None
                raise
            os.fsync(fd)
        finally:
            os.close(fd)

    def ids(self) -> list[str]:
        return sorted(os.listdir(self.adapters))

    def listing_token(self) -> str | None:
        """The adapters/ directory's mtime, which every publish and remove (renames in or out) moves. It
        is only trusted once over a second old: file-system clocks are coarse (a few ms), so two changes
        in one tick could share a stamp, but no change can be stamped earlier than the scan it follows."""
        st = os.stat(self.adapters)
        if time.time_ns() - st.st_mtime_ns < 1_000_000_000:
            return None
        return f"{st.st_ino}:{st.st_mtime_ns}"

    def recover(self) -> list[str]:
        removed = []
        for entry in os.listdir(self.tmp):
            path = self.tmp / entry
            if self._writer_alive(path / FILE):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(str(path))
        for entry in os.listdir(self.adapters):  # directories without an adapter file hold nothing servable
            path = self.adapters / entry
            if path.is_dir() and not path.is_symlink() and not (path / FILE).exists():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(str(path))
        return removed

    @staticmethod
    def _writer_alive(path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
