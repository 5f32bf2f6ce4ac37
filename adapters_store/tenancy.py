"""Per-tenant namespaces and quotas of the adapter store (RELIABILITY row 40).

Every adapter lives under a *storage key*. A public adapter's key is its plain id (so stores written
before namespaces keep their layout); a tenant's adapter's key is ``t<16 hex of sha256(tenant)>~<id>``.
``~`` is outside the id syntax (``ID_RE``), so no plain id can ever collide with a tenant's key, and the
tenant's name never appears on disk. Records, answers, logs and metrics carry the plain id plus
``owner``; only the store and the engine's residency see keys. Keys never come from users: every id a
caller sends is checked against ``ID_RE`` (``check_id``) before it is turned into a key.

A tenant's lookup of an id finds its own adapter first, then the public one (``resolve``); another
tenant's adapter is never even looked at, so it answers exactly as a missing one does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Protocol

from adapters_store.backend import Backend

log = logging.getLogger(__name__)

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TENANT_KEY_RE = re.compile(r"t[0-9a-f]{16}~(" + ID_RE.pattern + ")")


class StoreError(Exception):
    """Base of the store's errors; ``http_status`` lets the HTTP layer map them without a table."""

    http_status = 500


class InvalidAdapterId(StoreError, ValueError):
    http_status = 400


class AdapterNotFound(StoreError, LookupError):
    http_status = 404


class StoreUnavailable(StoreError, ConnectionError):
    """The storage service (an object store) cannot be reached or answers with a server error: 503 with
    Retry-After. An OSError, so the engine retries a load that hit it as a transient failure."""

    http_status = 503
    code = "store_unavailable"
    retry_after = 5.0


class QuotaExceeded(StoreError):
    """An upload that would take its tenant past a quota; ``kind`` is "count" or "bytes" (a metric label)."""

    code = "tenant_quota_exceeded"
    kind = ""


class CountQuotaExceeded(QuotaExceeded):
    http_status = 403
    kind = "count"
    param = "adapter_id"


class BytesQuotaExceeded(QuotaExceeded):
    http_status = 507  # insufficient storage: the tenant's share of it
    kind = "bytes"
    param = "files"


def check_id(adapter_id: object) -> str:
    """An allowlist, not a blocklist: no path separators, NUL, leading dot, or over-long names can pass."""
    if not isinstance(adapter_id, str) or not ID_RE.fullmatch(adapter_id):
        raise InvalidAdapterId(f"adapter id {str(adapter_id)[:64]!r} is invalid: use 1-128 characters from "
                               "A-Z a-z 0-9 . _ -, starting with a letter or digit")
    return adapter_id


def storage_key(adapter_id: str, owner: str | None) -> str:
    """Where ``owner``'s adapter ``adapter_id`` lives: the plain id when public, else in the tenant's namespace."""
    check_id(adapter_id)
    if owner is None:
        return adapter_id
    return f"t{hashlib.sha256(owner.encode()).hexdigest()[:16]}~{adapter_id}"


def owner_ok(owner: object) -> bool:
    """What a record may name as its owner: None (public) or a non-empty tenant name."""
    return owner is None or (isinstance(owner, str) and bool(owner))


def plain_id(key: str) -> str:
    """The adapter id inside a storage key (for messages: a key is never shown to a caller)."""
    return key.rpartition("~")[2]


def is_key(key: object) -> bool:
    return isinstance(key, str) and bool(ID_RE.fullmatch(key) or TENANT_KEY_RE.fullmatch(key))


def check_key(key: object) -> str:
    """A plain id or a tenant's storage key; InvalidAdapterId (naming the plain id) otherwise."""
    if not is_key(key):
        check_id(plain_id(key) if isinstance(key, str) else key)  # names the id when it is the bad part
        raise InvalidAdapterId(f"storage key {str(key)[:64]!r} is malformed")
    return key  # type: ignore[return-value]


class Records(Protocol):
    def get(self, adapter_id: str): ...  # a record by storage key; raises an error with http_status 404


def resolve(store: Records, adapter_id: str, tenant: str | None):
    """(storage key, record) of what ``adapter_id`` names for ``tenant``: its own adapter, else the public
    one. AdapterNotFound otherwise, the same answer whether the id is free or another tenant's."""
    check_id(adapter_id)
    keys = ([storage_key(adapter_id, tenant)] if tenant is not None else []) + [adapter_id]
    for key in keys:
        try:
            record = store.get(key)
        except Exception as e:
            if getattr(e, "http_status", None) == 404:
                continue
            raise
        if record.owner is None or record.owner == tenant:  # a record under a key is its owner's; belt and braces
            return key, record
    raise AdapterNotFound(f"adapter {adapter_id!r} does not exist")


def adopt_legacy(backend: Backend) -> None:
    """Tenant adapters written before namespaces sit under their plain id: move each into its tenant's
    namespace (one rename), so the public namespace holds only public adapters and no other tenant's id
    is taken. One that cannot move stays where it is, unlisted (its record names a tenant)."""
    for key in backend.ids():
        if not ID_RE.fullmatch(key):
            continue
        raw = backend.read_record(key)
        try:
            owner = json.loads(raw).get("owner") if raw else None
        except (ValueError, AttributeError, RecursionError):
            continue  # unreadable: indexed (or refused) as a public adapter, as before
        if owner is None or not owner_ok(owner):
            continue
        target = storage_key(key, owner)
        try:
            backend.move(key, target)
            log.info("moved tenant adapter %r into its tenant's namespace (%s)", key, target)
        except FileExistsError:
            log.warning("tenant adapter %r stays in the public namespace, unlisted: its tenant already has one", key)
        except FileNotFoundError:
            pass  # another process moved or removed it first


@dataclass(frozen=True)
class Usage:
    count: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class Quota:
    """A tenant's limits; 0 = unlimited. The messages name the server flags that set them."""

    max_adapters: int = 0
    max_bytes: int = 0

    def check_count(self, tenant: str, used: Usage) -> None:
        """403 when one more adapter would exceed --tenant-max-adapters (known before any file byte)."""
        if self.max_adapters and used.count + 1 > self.max_adapters:
            raise CountQuotaExceeded(f"tenant {tenant!r} has {used.count} adapters, the limit of "
                                     f"--tenant-max-adapters={self.max_adapters}; delete one first")

    def check_bytes(self, tenant: str, used: Usage, adding: int, so_far: bool = False) -> None:
        """507 when ``adding`` more bytes (``so_far``: received until now, while streaming) would exceed
        --tenant-max-bytes."""
        if self.max_bytes and used.bytes + adding > self.max_bytes:
            size = f"{adding} bytes received so far" if so_far else f"{adding} bytes"
            raise BytesQuotaExceeded(f"tenant {tenant!r} uses {used.bytes} bytes in {used.count} adapters; this "
                                     f"upload ({size}) would exceed the limit of --tenant-max-bytes={self.max_bytes}")

    def check(self, tenant: str, used: Usage, adding: int) -> None:
        self.check_count(tenant, used)
        self.check_bytes(tenant, used, adding)
