"""API keys, tenants and per-key rate limits.

Keys come as ``KEY`` or ``KEY:TENANT`` (split at the first ``:``). Inference keys may call the inference
and read routes; admin keys may also upload and delete. A key with a tenant sees the public adapters
(no owner) and its tenant's own; what it uploads is owned by its tenant. An admin key without a tenant is
a global admin: it sees and manages every adapter, and what it uploads is public. With no key configured
at all the server is open (one anonymous global admin), as `make serve` runs it on loopback.

Every key is compared in constant time (``secrets.compare_digest`` over sha256 digests, so length leaks
nothing either) against every configured key; the key itself is never logged: logs and rate-limit
buckets use ``key_id``, a short digest.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass

from server.common.errors import ServingError


class AuthenticationFailed(ServingError):
    http_status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(ServingError):
    http_status = 403
    type = "permission_error"
    code = "insufficient_permissions"


class RateLimited(ServingError):
    http_status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


@dataclass(frozen=True)
class Principal:
    key_id: str  # non-secret label for logs and rate limiting
    tenant: str | None
    admin: bool

    def can_see(self, owner: str | None) -> bool:
        return owner is None or owner == self.tenant or (self.admin and self.tenant is None)


ANONYMOUS = Principal("anonymous", None, True)


def key_id(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    principal: Principal


def parse_key(spec: str, admin: bool) -> tuple[str, Principal]:
    """``KEY`` (no tenant) or ``KEY:TENANT``. ``KEY:`` is refused: an empty tenant would silently make the
    key a global one (an admin key would then see and delete every tenant's adapters)."""
    key, sep, tenant = spec.partition(":")
    if not key:
        raise ValueError("an API key may not be empty")
    if sep and not tenant.strip():
        raise ValueError(f"API key {key_id(key)} is given as KEY: with an empty tenant; write KEY for a key "
                         "without a tenant, or KEY:TENANT")
    return key, Principal(key_id(key), tenant or None, admin)


class KeyRing:
    def __init__(self, api_keys: tuple[str, ...] | list[str] = (), admin_keys: tuple[str, ...] | list[str] = ()):
        self._entries: list[_Entry] = []
        for specs, admin in ((api_keys, False), (admin_keys, True)):
            for spec in specs:
                key, principal = parse_key(spec, admin)
                self._entries.append(_Entry(hashlib.sha256(key.encode()).digest(), principal))
        self.has_admin = any(e.principal.admin for e in self._entries)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def authenticate(self, authorization: str | None, x_api_key: str | None = None) -> Principal:
        """The caller's principal; AuthenticationFailed (401) for a missing or unknown key."""
        if not self.enabled:
            return ANONYMOUS
        given = None
        if authorization:
            scheme, _, token = authorization.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                given = token.strip()
        if given is None and x_api_key:
            given = x_api_key.strip()
        if not given:
            raise AuthenticationFailed("missing API key: send 'Authorization: Bearer <key>'")
        digest = hashlib.sha256(given.encode()).digest()
        found = None
        for e in self._entries:  # no early exit: every key is compared, in constant time
            if secrets.compare_digest(digest, e.digest) and found is None:
                found = e.principal
        if found is None:
            raise AuthenticationFailed("invalid API key")
        return found

    def require_admin(self, principal: Principal) -> None:
        if not principal.admin:
            why = "this key is an inference key" if self.has_admin else "no admin key is configured on this server"
            raise PermissionDenied(f"uploading and deleting adapters need an admin key; {why}")


class FailedKeyLimiter:
    """Bad keys cost the caller: after ``burst`` failed attempts from one client address, further requests
    from it get 429 at ``rate`` per second, before any key is compared (a brute force gains nothing)."""

    def __init__(self, rate: float = 1.0, burst: int = 20, clock=time.monotonic):
        self.bucket = RateLimiter(rate, burst, clock)  # rate 0: off

    def check(self, address: str) -> None:
        """429 while this address has no failed attempts left (nothing is taken)."""
        wait = self.bucket.peek(address)
        if wait is not None:
            raise RateLimited(f"too many requests with a bad API key from this address; retry in {wait:.1f} s",
                              retry_after=wait)

    def failed(self, address: str) -> None:
        self.bucket.take(address)


class RateLimiter:
    """Token bucket per key: ``rate`` requests per second, at most ``burst`` at once."""

    MAX_BUCKETS = 10_000

    def __init__(self, rate: float, burst: int = 0, clock=time.monotonic):
        self.rate = rate
        self.burst = float(burst or max(1.0, rate))
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill time)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def _tokens(self, key: str, now: float) -> float:
        """The bucket's tokens at ``now`` (refilled at the rate since its last use). Hold the lock."""
        tokens, last = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate)

    def take(self, key: str) -> float | None:
        """None if the request may go; else the seconds until a token is available (Retry-After)."""
        if not self.enabled:
            return None
        now = self.clock()
        with self._lock:
            tokens = self._tokens(key, now)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return None
            self._buckets[key] = (tokens, now)
            if len(self._buckets) > self.MAX_BUCKETS:  # anonymous callers are keyed by address: bound it
                self._prune(now)
            return (1.0 - tokens) / self.rate

    def peek(self, key: str) -> float | None:
        """Like ``take`` without taking: None if a token is there, else the seconds until one is."""
        if not self.enabled:
            return None
        with self._lock:
            tokens = self._tokens(key, self.clock())
        return None if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        full_after = self.burst / self.rate
        for k, (_, last) in list(self._buckets.items()):
            if now - last >= full_after:  # a full bucket is the same as no bucket
                del self._buckets[k]

    def check(self, key: str) -> None:
        wait = self.take(key)
        if wait is not None:
            raise RateLimited(f"rate limit of {self.rate:g} requests/s for this key exceeded; retry in {wait:.2f} s",
                              retry_after=wait)
