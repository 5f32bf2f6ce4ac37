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

Adapters are stored under storage keys (tenancy.py): a public adapter under its plain id, a tenant's
under a key in its tenant's namespace. Methods that read or remove take ``adapter_id`` plus ``owner`` (the
namespace), or a storage key with no owner (the engine's residency holds keys); puts take the plain id
and the owner. Records always carry the plain id and the owner.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import threading
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from adapters_store import tenancy
from adapters_store.backend import Backend, LocalDirBackend, Staged
from adapters_store.basemodels import BaseModel
from adapters_store.format import AdapterFormatError, AdapterMeta, CompiledAdapter, read_header
from adapters_store.tenancy import (
    ID_RE,
    AdapterNotFound,
    BytesQuotaExceeded,
    CountQuotaExceeded,
    InvalidAdapterId,
    Quota,
    QuotaExceeded,
    StoreError,
    StoreUnavailable,
    Usage,
    check_id,
    check_key,
    is_key,
    plain_id,
    storage_key,
)
from adapters_store.validate import Limits, validate_bytes

__all__ = ["ID_RE", "AdapterExists", "AdapterNotFound", "AdapterRecord", "AdapterStore", "AdapterTooLarge",
           "BytesQuotaExceeded", "CountQuotaExceeded", "InvalidAdapter", "InvalidAdapterId", "Quota",
           "QuotaExceeded", "StoreError", "StoreFull", "StoreUnavailable", "Usage", "check_id", "storage_key"]
log = logging.getLogger(__name__)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


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

    @property
    def key(self) -> str:
        """Its storage key (tenancy.storage_key)."""
        return storage_key(self.id, self.owner)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AdapterRecord:
        return cls(**{f.name: d[f.name] for f in fields(cls)})


def _invalid(e: AdapterFormatError) -> AdapterFormatError:
    """A format error as a store error: 422, unless it already has its own status (a pickle: 415)."""
    return e if hasattr(e, "http_status") else InvalidAdapter(e.problems)


def _key(adapter_id: str, owner: str | None) -> str:
    """A plain id in ``owner``'s namespace; with no owner, a plain id (public) or a storage key as given."""
    return storage_key(adapter_id, owner) if owner is not None else check_key(adapter_id)


def _missing(key: str) -> AdapterNotFound:
    return AdapterNotFound(f"adapter {plain_id(key)!r} does not exist")


class AdapterStore:
    """Compiled adapters by id. Thread-safe; several processes may share one directory."""

    def __init__(self, root: str | Path, limits: Limits | None = None, backend: Backend | None = None):
        self.root = Path(root)
        self.limits = limits or Limits()
        self.backend: Backend = backend or LocalDirBackend(self.root)
        self._lock = threading.Lock()
        self._index: dict[str, tuple[AdapterRecord, str]] = {}  # key -> (record, backend version)
        self.broken: dict[str, str] = {}  # key -> why it cannot be indexed (kept on disk, not listed)
        self._listed: tuple[str, list[AdapterRecord]] | None = None  # (listing token, records) of the last scan
        self._quota_lock = threading.Lock()  # a quota check and its publish are one step (in this process)
        for path in self.backend.recover():
            log.info("removed partial write %s", path)
        tenancy.adopt_legacy(self.backend)
        self.list()  # index every adapter from its record.json (and remember the listing token)

    # ---- writes -----------------------------------------------------------------------------------
    def put(self, adapter_id: str, data: bytes, owner: str | None = None,
            base: BaseModel | None = None) -> AdapterRecord:
        return self.put_stream(adapter_id, [data], owner=owner, base=base)

    def put_stream(self, adapter_id: str, chunks: Iterable[bytes], owner: str | None = None,
                   base: BaseModel | None = None) -> AdapterRecord:
        """Stream to private storage (cap per chunk), validate (against ``base`` when given), publish.
        On any failure, the iterator's own included (a client disconnect), nothing is left behind."""
        self._check_new(storage_key(adapter_id, owner))
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
                   base: BaseModel | None = None, quota: Quota | None = None) -> AdapterRecord:
        """Seal (fsync, hash), validate in place (the file is mapped, never copied) and publish a spooled
        upload by renaming it into place, in ``owner``'s namespace. With a ``quota`` (a tenant's upload),
        the owner's use plus this file is checked just before publishing. The spool is consumed: published,
        or discarded on any failure."""
        try:
            key = storage_key(adapter_id, owner)
            self._check_new(key)
            self.backend.seal(staged)
            if staged.size > self.limits.max_file_bytes:
                raise AdapterTooLarge(f"adapter of {staged.size} bytes exceeds the cap of {self.limits.max_file_bytes}")
            try:
                adapter = validate_bytes(staged.path, base, self.limits, staged.digest)
            except AdapterFormatError as e:
                raise _invalid(e) from None
            ranks = {p: mw.rank for p, mw in adapter.modules.items()}
            record = AdapterRecord.build(adapter_id, staged.digest, staged.size, adapter.meta, ranks, owner)
            del adapter  # its tensors map the staged file: let that memory go before publishing
            with self._quota_lock if quota is not None else nullcontext():
                if quota is not None and owner is not None:
                    quota.check(owner, self.usage(owner), staged.size)
                version = self.backend.publish(staged, key, json.dumps(record.to_dict()).encode())
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
            self._index[key] = (record, version or "")
            self.broken.pop(key, None)
        return record

    def _check_new(self, key: str) -> None:
        if self.backend.version(key) is not None:  # early 409; publish is the real check
            raise AdapterExists(f"adapter {plain_id(key)!r} already exists; delete it first")

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
                 owner: str | None = None, labels: list[str] | None = None,
                 quota: Quota | None = None) -> AdapterRecord:
        """Convert a PEFT directory or upload ({filename: bytes, or a spooled file's path}) for ``base`` and
        store the result: serialised once into a spool, then validated in place and published like any upload."""
        from adapters_store.peft_import import import_peft

        self._check_new(storage_key(adapter_id, owner))
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
        return self.put_staged(adapter_id, staged, owner=owner, base=base, quota=quota)

    def delete(self, adapter_id: str, expect: AdapterRecord | None = None, owner: str | None = None) -> None:
        """Later gets raise AdapterNotFound; a reader already holding the bytes or object is unaffected.

        With ``expect`` (the record a caller checked permissions on), only that version is removed: when
        the adapter now under the id has another digest or owner (deleted and re-uploaded meanwhile), the
        answer is AdapterNotFound, as if absent. The comparison and the removal are one atomic step."""
        key = _key(adapter_id, owner)
        missing = _missing(key)

        def same_version() -> None:
            now = self._cached(key)
            if expect is not None and (now is None or (now.digest, now.owner) != (expect.digest, expect.owner)):
                raise missing

        try:
            self.backend.remove(key, same_version)
        except FileNotFoundError:
            raise missing from None
        finally:
            if key not in self:  # removed now or earlier; a refused delete keeps the index entry
                with self._lock:
                    self._index.pop(key, None)
                    self.broken.pop(key, None)

    # ---- reads ------------------------------------------------------------------------------------
    def get(self, adapter_id: str, owner: str | None = None) -> AdapterRecord:
        key = _key(adapter_id, owner)
        record = self._cached(key)
        if record is None:
            if key in self.broken:
                raise InvalidAdapter(f"adapter {plain_id(key)!r} is stored but unreadable: {self.broken[key]}")
            raise _missing(key)
        return record

    def resolve(self, adapter_id: str, tenant: str | None) -> AdapterRecord:
        """What ``adapter_id`` names for ``tenant``: its own adapter, else the public one (tenancy.resolve)."""
        return tenancy.resolve(self, adapter_id, tenant)[1]

    def exists(self, adapter_id: str, owner: str | None = None) -> bool:
        return self.backend.version(_key(adapter_id, owner)) is not None

    def read_bytes(self, adapter_id: str, owner: str | None = None) -> bytes:
        key = _key(adapter_id, owner)
        try:
            return self.backend.read(key)
        except FileNotFoundError:
            raise _missing(key) from None

    def load(self, adapter_id: str, base: BaseModel | None = None, digest: str | None = None,
             owner: str | None = None) -> CompiledAdapter:
        """Read, check the bytes are the indexed version (or exactly ``digest``), validate, parse."""
        key = _key(adapter_id, owner)
        name = plain_id(key)
        for attempt in range(2):  # a second look only if the id was replaced between the read and the record
            data = self.read_bytes(key)
            actual = hashlib.sha256(data).hexdigest()
            if digest is not None:
                if actual != digest:
                    raise AdapterNotFound(f"adapter {name!r} version {digest[:12]} is gone (now {actual[:12]})")
                break
            indexed = self.get(key).digest
            if actual == indexed:
                break
            if attempt:
                raise InvalidAdapter(f"adapter {name!r}: the file's sha256 {actual[:12]} differs from the "
                                     f"indexed {indexed[:12]}: it changed on disk")
        try:
            return validate_bytes(data, base, self.limits, actual)
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
            keys = [k for k in self.backend.ids() if is_key(k)]
            with self._lock:
                for gone in set(self._index) - set(keys):
                    del self._index[gone]
            records = sorted((r for r in map(self._cached, keys) if r is not None), key=lambda r: (r.id, r.owner or ""))
            self._listed = (token, records) if token is not None else None
        return [r for r in records if owner is None or r.owner in (None, owner)]

    def usage(self, owner: str) -> Usage:
        """How many adapters ``owner`` has and their bytes (what its quota counts)."""
        mine = [r for r in self.list() if r.owner == owner]
        return Usage(len(mine), sum(r.size for r in mine))

    def __contains__(self, key: object) -> bool:
        """A plain id (public) or a storage key."""
        return is_key(key) and self.backend.version(key) is not None  # type: ignore[arg-type]

    # ---- the index --------------------------------------------------------------------------------
    def _cached(self, key: str) -> AdapterRecord | None:
        """The record for the file now under ``key``: from memory while its version is unchanged, else from
        record.json, else (hand-placed file) rebuilt from the header and a hash."""
        version = self.backend.version(key)
        with self._lock:
            hit = self._index.get(key)
            if version is None:
                self._index.pop(key, None)
                return None
            if hit is not None and hit[1] == version:
                return hit[0]
        try:
            record = self._read_record(key)
        except (AdapterFormatError, OSError, ValueError) as e:
            why = "; ".join(e.problems) if isinstance(e, AdapterFormatError) else f"{type(e).__name__}: {e}"
            log.warning("adapter %r is not indexed: %s", key, why)
            with self._lock:
                self.broken[key] = why
            return None
        with self._lock:
            self._index[key] = (record, version)
            self.broken.pop(key, None)
        return record

    def _read_record(self, key: str) -> AdapterRecord:
        """A record is only believed under the key its own id and owner give (tenancy.storage_key)."""
        raw = self.backend.read_record(key)
        old: dict = {}
        if raw is not None:
            try:
                old = json.loads(raw)
                record = AdapterRecord.from_dict(old)
                if tenancy.owner_ok(record.owner) and record.key == key:
                    return record
            except (ValueError, KeyError, TypeError, RecursionError):
                pass
        owner = old.get("owner") if isinstance(old, dict) and tenancy.owner_ok(old.get("owner")) else None
        if storage_key(plain_id(key), owner) != key:  # the tenant's name is on disk only in its record
            raise ValueError("the record naming its tenant is missing or names another tenant")
        data = self.backend.read(key)  # sidecar miss: header parse only, plus the digest
        entries, header_meta = read_header(data, self.limits.max_header_bytes)
        meta = AdapterMeta.from_header(header_meta)
        ranks = {name.removesuffix(".lora_a"): int(e["shape"][0]) for name, e in entries.items()
                 if name.endswith(".lora_a") and isinstance(e, dict) and e.get("shape")}
        record = AdapterRecord.build(plain_id(key), hashlib.sha256(data).hexdigest(), len(data), meta, ranks, owner)
        self.backend.write_record(key, json.dumps(record.to_dict()).encode())
        return record
