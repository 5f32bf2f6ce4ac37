"""The adapter store: put/get/list/delete of compiled adapters by id, atomic on disk, indexed by sidecars.

Request flow of an upload (DESIGN.md section 5): id allowlist -> stream to private storage with the size
cap enforced per chunk (``put_stream``; or the caller spools into the store's staging area itself:
``spool``/``write_spool``/``put_staged``) -> fsync and hash -> validate the staged file in place (format,
base fit, finite; the tensors map the file, so an N-byte upload costs about N of memory) -> publish file
and record together by one rename -> index. Storage sits behind ``backend.Backend`` (a local directory now; see backend.py for the on-disk
protocol and why concurrent puts of one id leave exactly one winner).

Start-up reads each adapter's small record.json, never a tensor; only an adapter without a readable
record (placed by hand) is indexed from its safetensors header plus a hash of the file. Errors carry
``http_status`` so the HTTP layer maps them without a table.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import re
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from adapters_store.backend import Backend, LocalDirBackend, Staged
from adapters_store.basemodels import BaseModel
from adapters_store.format import AdapterFormatError, AdapterMeta, CompiledAdapter, read_header
from adapters_store.validate import Limits, validate_bytes

log = logging.getLogger(__name__)
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class StoreError(Exception):
    """Base of the store's errors; ``http_status`` lets the HTTP layer map them without a table."""

    http_status = 500


class InvalidAdapterId(StoreError, ValueError):
    http_status = 400


class AdapterNotFound(StoreError, LookupError):
    http_status = 404


class AdapterExists(StoreError):
    http_status = 409


class AdapterTooLarge(StoreError):
    http_status = 413


class InvalidAdapter(AdapterFormatError, StoreError):
    """The bytes are not a valid adapter (for this base); ``problems`` lists every reason."""

    http_status = 422


class StoreFull(StoreError):
    http_status = 507


@dataclass(frozen=True)
class AdapterRecord:
    id: str
    digest: str  # sha256 hex of the file: the adapter's version
    size: int
    method: str
    task: str
    ranks: dict[str, int]
    labels: list[str] | None
    created_at: float
    owner: str | None
    base_fingerprint: str
    base_model: str

    @classmethod
    def build(cls, adapter_id: str, digest: str, size: int, meta: AdapterMeta, ranks: dict[str, int],
              owner: str | None) -> AdapterRecord:
        """``ranks`` come from the tensors (the metadata's copy is only checked against them)."""
        return cls(id=adapter_id, digest=digest, size=size, method=meta.method, task=meta.task,
                   ranks=dict(sorted(ranks.items())), labels=meta.labels, created_at=meta.created_at, owner=owner,
                   base_fingerprint=meta.base_fingerprint, base_model=meta.base_model)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AdapterRecord:
        return cls(**{f.name: d[f.name] for f in fields(cls)})


def _invalid(e: AdapterFormatError) -> AdapterFormatError:
    """A format error as a store error: 422, unless it already has its own status (a pickle: 415)."""
    return e if hasattr(e, "http_status") else InvalidAdapter(e.problems)


def check_id(adapter_id: object) -> str:
    """An allowlist, not a blocklist: no path separators, NUL, leading dot, or over-long names can pass."""
    if not isinstance(adapter_id, str) or not ID_RE.fullmatch(adapter_id):
        raise InvalidAdapterId(f"adapter id {str(adapter_id)[:64]!r} is invalid: use 1-128 characters from "
                               "A-Z a-z 0-9 . _ -, starting with a letter or digit")
    return adapter_id


class AdapterStore:
    """Compiled adapters by id. Thread-safe; several processes may share one directory."""

    def __init__(self, root: str | Path, limits: Limits | None = None, backend: Backend | None = None):
        self.root = Path(root)
        self.limits = limits or Limits()
        self.backend: Backend = backend or LocalDirBackend(self.root)
        self._lock = threading.Lock()
        self._index: dict[str, tuple[AdapterRecord, str]] = {}  # id -> (record, backend version)
        self.broken: dict[str, str] = {}  # id -> why it cannot be indexed (kept on disk, not listed)
        self._listed: tuple[str, list[AdapterRecord]] | None = None  # (listing token, records) of the last scan
        for path in self.backend.recover():
            log.info("removed partial write %s", path)
        self.list()  # index every adapter from its record.json (and remember the listing token)

    # ---- writes -----------------------------------------------------------------------------------
    def put(self, adapter_id: str, data: bytes, owner: str | None = None,
            base: BaseModel | None = None) -> AdapterRecord:
        return self.put_stream(adapter_id, [data], owner=owner, base=base)

    def put_stream(self, adapter_id: str, chunks: Iterable[bytes], owner: str | None = None,
                   base: BaseModel | None = None) -> AdapterRecord:
        """Stream to private storage (cap per chunk), validate (against ``base`` when given), publish.
        On any failure, the iterator's own included (a client disconnect), nothing is left behind."""
        self._check_new(adapter_id)
        try:
            staged = self.backend.stage(self._capped(chunks))
        except OSError as e:
            raise self._disk_error(e) from None
        return self.put_staged(adapter_id, staged, owner=owner, base=base)

    def spool(self) -> Staged:
        """A private file on the store's file system for an upload in progress (the HTTP server's multipart
        parts): fill it with write_spool, then put_staged publishes it by rename, or discard drops it."""
        try:
            return self.backend.open_stage()
        except OSError as e:
            raise self._disk_error(e) from None

    def write_spool(self, staged: Staged, chunks: Iterable[bytes]) -> None:
        try:
            self.backend.append(staged, chunks)
        except OSError as e:
            raise self._disk_error(e) from None

    def discard(self, staged: Staged) -> None:
        """Drop a spool; a no-op once it was published or discarded."""
        self.backend.discard(staged)

    def put_staged(self, adapter_id: str, staged: Staged, owner: str | None = None,
                   base: BaseModel | None = None) -> AdapterRecord:
        """Seal (fsync, hash), validate in place (the file is mapped, never copied) and publish a spooled
        upload by renaming it into place. The spool is consumed: published, or discarded on any failure."""
        try:
            self._check_new(adapter_id)
            self.backend.seal(staged)
            if staged.size > self.limits.max_file_bytes:
                raise AdapterTooLarge(f"adapter of {staged.size} bytes exceeds the cap of {self.limits.max_file_bytes}")
            try:
                adapter = validate_bytes(staged.path, base, self.limits)
            except AdapterFormatError as e:
                raise _invalid(e) from None
            ranks = {p: mw.rank for p, mw in adapter.modules.items()}
            record = AdapterRecord.build(adapter_id, staged.digest, staged.size, adapter.meta, ranks, owner)
            del adapter  # its tensors map the staged file: let that memory go before publishing
            version = self.backend.publish(staged, adapter_id, json.dumps(record.to_dict()).encode())
        except FileExistsError:
            self.backend.discard(staged)
            raise AdapterExists(f"adapter {adapter_id!r} already exists; delete it first") from None
        except OSError as e:
            self.backend.discard(staged)
            raise self._disk_error(e) from None
        except BaseException:
            self.backend.discard(staged)
            raise
        with self._lock:
            self._index[adapter_id] = (record, version or "")
            self.broken.pop(adapter_id, None)
        return record

    def _check_new(self, adapter_id: str) -> None:
        check_id(adapter_id)
        if self.backend.version(adapter_id) is not None:  # early 409; publish is the real check
            raise AdapterExists(f"adapter {adapter_id!r} already exists; delete it first")

    def _capped(self, chunks: Iterable[bytes]) -> Iterable[bytes]:
        cap, size = self.limits.max_file_bytes, 0
        for chunk in chunks:
            size += len(chunk)
            if size > cap:
                raise AdapterTooLarge(f"adapter exceeds the cap of {cap} bytes (refused while streaming)")
            yield chunk

    @staticmethod
    def _disk_error(e: OSError) -> Exception:
        if e.errno in DISK_FULL:
            return StoreFull(f"the adapter store is full ({e.strerror}); nothing was stored")
        return e

    def put_peft(self, adapter_id: str, source: str | Path | dict[str, bytes | Path], base: BaseModel,
                 owner: str | None = None, labels: list[str] | None = None) -> AdapterRecord:
        """Convert a PEFT directory or upload ({filename: bytes, or a spooled file's path}) for ``base`` and
        store the result: serialised once into a spool, then validated in place and published like any upload."""
        from adapters_store.peft_import import import_peft

        self._check_new(adapter_id)
        try:
            adapter = import_peft(source, base, self.limits, labels=labels)
        except AdapterFormatError as e:
            raise _invalid(e) from None
        staged = self.spool()
        try:
            self.write_spool(staged, adapter.chunks())  # tensor by tensor, never the whole file in memory
        except BaseException:
            self.discard(staged)
            raise
        del adapter  # the converted tensors are on disk now; validation re-reads them from there
        return self.put_staged(adapter_id, staged, owner=owner, base=base)

    def delete(self, adapter_id: str, expect: AdapterRecord | None = None) -> None:
        """Later gets raise AdapterNotFound; a reader already holding the bytes or object is unaffected.

        With ``expect`` (the record a caller checked permissions on), only that version is removed: when
        the adapter now under the id has another digest or owner (deleted and re-uploaded meanwhile), the
        answer is AdapterNotFound, as if absent. The comparison and the removal are one atomic step."""
        check_id(adapter_id)
        missing = AdapterNotFound(f"adapter {adapter_id!r} does not exist")

        def same_version() -> None:
            now = self._cached(adapter_id)
            if expect is not None and (now is None or (now.digest, now.owner) != (expect.digest, expect.owner)):
                raise missing

        try:
            self.backend.remove(adapter_id, same_version)
        except FileNotFoundError:
            raise missing from None
        finally:
            if adapter_id not in self:  # removed now or earlier; a refused delete keeps the index entry
                with self._lock:
                    self._index.pop(adapter_id, None)
                    self.broken.pop(adapter_id, None)

    # ---- reads ------------------------------------------------------------------------------------
    def get(self, adapter_id: str) -> AdapterRecord:
        check_id(adapter_id)
        record = self._cached(adapter_id)
        if record is None:
            if adapter_id in self.broken:
                raise InvalidAdapter(f"adapter {adapter_id!r} is stored but unreadable: {self.broken[adapter_id]}")
            raise AdapterNotFound(f"adapter {adapter_id!r} does not exist")
        return record

    def read_bytes(self, adapter_id: str) -> bytes:
        check_id(adapter_id)
        try:
            return self.backend.read(adapter_id)
        except FileNotFoundError:
            raise AdapterNotFound(f"adapter {adapter_id!r} does not exist") from None

    def load(self, adapter_id: str, base: BaseModel | None = None, digest: str | None = None) -> CompiledAdapter:
        """Read, check the bytes are the indexed version (or exactly ``digest``), validate, parse."""
        for attempt in range(2):  # a second look only if the id was replaced between the read and the record
            data = self.read_bytes(adapter_id)
            actual = hashlib.sha256(data).hexdigest()
            if digest is not None:
                if actual != digest:
                    raise AdapterNotFound(f"adapter {adapter_id!r} version {digest[:12]} is gone (now {actual[:12]})")
                break
            indexed = self.get(adapter_id).digest
            if actual == indexed:
                break
            if attempt:
                raise InvalidAdapter(f"adapter {adapter_id!r}: the file's sha256 {actual[:12]} differs from the "
                                     f"indexed {indexed[:12]}: it changed on disk")
        try:
            return validate_bytes(data, base, self.limits)
        except AdapterFormatError as e:
            raise _invalid(e) from None

    def list(self, owner: str | None = None) -> list[AdapterRecord]:
        """Every adapter (owner None), or those visible to ``owner``: its own and the public ones. Sees
        other processes' puts and deletes; rescans only when the backend's listing token moved."""
        token = self.backend.listing_token()
        listed = self._listed
        if token is not None and listed is not None and listed[0] == token:
            records = listed[1]
        else:
            ids = [i for i in self.backend.ids() if ID_RE.fullmatch(i)]
            with self._lock:
                for gone in set(self._index) - set(ids):
                    del self._index[gone]
            records = [r for r in (self._cached(i) for i in ids) if r is not None]
            self._listed = (token, records) if token is not None else None
        return [r for r in records if owner is None or r.owner in (None, owner)]

    def __contains__(self, adapter_id: object) -> bool:
        return isinstance(adapter_id, str) and bool(ID_RE.fullmatch(adapter_id)) and \
            self.backend.version(adapter_id) is not None

    # ---- the index --------------------------------------------------------------------------------
    def _cached(self, adapter_id: str) -> AdapterRecord | None:
        """The record for the file now on disk: from memory while its version is unchanged, else from
        record.json, else (hand-placed file) rebuilt from the header and a hash."""
        version = self.backend.version(adapter_id)
        with self._lock:
            hit = self._index.get(adapter_id)
            if version is None:
                self._index.pop(adapter_id, None)
                return None
            if hit is not None and hit[1] == version:
                return hit[0]
        try:
            record = self._read_record(adapter_id)
        except (AdapterFormatError, OSError, ValueError) as e:
            why = "; ".join(e.problems) if isinstance(e, AdapterFormatError) else f"{type(e).__name__}: {e}"
            log.warning("adapter %r is not indexed: %s", adapter_id, why)
            with self._lock:
                self.broken[adapter_id] = why
            return None
        with self._lock:
            self._index[adapter_id] = (record, version)
            self.broken.pop(adapter_id, None)
        return record

    def _read_record(self, adapter_id: str) -> AdapterRecord:
        raw = self.backend.read_record(adapter_id)
        old: dict = {}
        if raw is not None:
            try:
                old = json.loads(raw)
                record = AdapterRecord.from_dict(old)
                if record.id == adapter_id:
                    return record
            except (ValueError, KeyError, TypeError):
                pass
        data = self.backend.read(adapter_id)  # sidecar miss: header parse only, plus the digest
        entries, header_meta = read_header(data, self.limits.max_header_bytes)
        meta = AdapterMeta.from_header(header_meta)
        ranks = {name.removesuffix(".lora_a"): int(e["shape"][0]) for name, e in entries.items()
                 if name.endswith(".lora_a") and isinstance(e, dict) and e.get("shape")}
        owner = old.get("owner") if isinstance(old, dict) else None
        record = AdapterRecord.build(adapter_id, hashlib.sha256(data).hexdigest(), len(data), meta, ranks, owner)
        self.backend.write_record(adapter_id, json.dumps(record.to_dict()).encode())
        return record
