"""``S3Backend``: the store's ``Backend`` on any S3-compatible object store (``--store s3://BUCKET/PREFIX``).

Layout under ``PREFIX/`` (the same protocol as the local directory, DESIGN.md section 8)::

    blobs/<sha256 hex>        an adapter file, content-addressed, never rewritten
    adapters/<key>.json       the store's record of one adapter id (tenancy.py keys), written LAST, with
                              user metadata ``blob-sha256`` naming its blob

Publishing uploads the blob (skipped when the store already has it), then writes the record with a
conditional put (``If-None-Match: *``): the record is the one visibility point, so no reader ever sees
half an adapter, and of two concurrent publishes of one id, on any replicas, exactly one wins (409 for
the other). SeaweedFS, AWS S3 and MinIO honour the condition; a service that answers 501 to it falls
back to check-then-put (logged once), which is not atomic against a concurrent writer. A removal deletes
the record with ``If-Match`` on the ETag it checked, then the blob unless another record still names it.

Uploads are staged in a local directory (a ``LocalDirBackend`` beside the cache) so validation reads a
local file in place; a published upload's file moves into the blob cache (``blobcache.py``), so the
replica that took an upload never downloads it again, and every other one downloads it once.

Records are re-read from the store when older than ``ttl_s`` (a replica that does not know an id always
asks the store before answering 404; one that knows it sees a delete or a replacement elsewhere within
``ttl_s``). When the store cannot be reached (a connection error, a timeout, a 5xx), every call raises
``StoreUnavailable`` (503 with Retry-After) except the ones it can answer from what it already knows: the
last record read for an id and the cached blobs, so resident and locally cached adapters keep serving.
After a failure the store is not asked again for ``down_s``: only the request that finds a hung store
out waits for the client's timeouts (make_client), not the ones after it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from adapters_store.backend import LocalDirBackend, Staged
from adapters_store.blobcache import SHA_RE, BlobCache
from adapters_store.tenancy import StoreUnavailable

log = logging.getLogger(__name__)
BLOB_META = "blob-sha256"
DEFAULT_CACHE_BYTES = 4 << 30


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix") (prefix without slashes at either end)."""
    parts = urlparse(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"--store {url!r}: expected s3://BUCKET/PREFIX")
    return parts.netloc, parts.path.strip("/")


def make_client(timeout_s: float = 3.0):
    """A boto3 S3 client configured from the standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_REGION, profiles) with short timeouts and few retries: a dead store must
    answer 503 quickly, not hang a request."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=min(timeout_s, 1.0), read_timeout=timeout_s,
                    retries={"max_attempts": 2, "mode": "standard"})
    return boto3.session.Session().client("s3", config=config)


@dataclass
class _Known:
    """The last record read for one key: its ETag, body and blob, and when the store last confirmed it."""

    etag: str
    body: bytes
    blob: str
    checked: float

    @property
    def version(self) -> str:
        return f"{self.blob}:{self.etag}"


class S3Backend:
    def __init__(self, url: str, cache_dir: str | Path, cache_bytes: int = DEFAULT_CACHE_BYTES, client=None,
                 ttl_s: float = 2.0, down_s: float = 2.0):
        self.url = url
        self.bucket, prefix = parse_url(url)
        self.prefix = f"{prefix}/" if prefix else ""
        self.client = client if client is not None else make_client()
        self.cache_dir = Path(cache_dir)
        self.local = LocalDirBackend(self.cache_dir / "staging")  # uploads being written; never published here
        self.blobs = BlobCache(self.cache_dir / "staging" / "blobs", cache_bytes)  # same fs: adopt() renames
        self.ttl_s, self.down_s = ttl_s, down_s
        self._known: dict[str, _Known] = {}
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._conditional = True  # the service honours If-None-Match / If-Match (until it says 501)
        self.reads = 0  # blobs fetched from the store (what the cache saves)

    # ---- talking to the store ---------------------------------------------------------------------
    def _record_key(self, key: str) -> str:
        return f"{self.prefix}adapters/{key}.json"

    def _blob_key(self, sha: str) -> str:
        return f"{self.prefix}blobs/{sha}"

    @contextlib.contextmanager
    def _call(self, what: str) -> Iterator[None]:
        """Translate the client's transport failures and 5xx answers into StoreUnavailable (and remember
        the store is down for ``down_s``); other client errors pass through for the caller to read."""
        from botocore.exceptions import BotoCoreError, ClientError

        if time.monotonic() < self._down_until:
            raise StoreUnavailable(f"the adapter store {self.url} is unreachable; retry later")
        try:
            yield
        except ClientError as e:
            if _status(e) >= 500 and _status(e) != 501:
                self._mark_down(what, e)
            raise
        except BotoCoreError as e:
            self._mark_down(what, e)

    def _mark_down(self, what: str, e: Exception) -> None:
        if time.monotonic() >= self._down_until:
            log.warning("adapter store %s unreachable (%s): %s", self.url, what, e)
        self._down_until = time.monotonic() + self.down_s
        raise StoreUnavailable(f"the adapter store {self.url} is unreachable ({what}): {e}; retry later") from None

    def _fetch(self, key: str) -> _Known | None:
        """Read the record from the store now (None when absent), and remember it."""
        from botocore.exceptions import ClientError

        try:
            with self._call(f"reading the record of {key}"):
                obj = self.client.get_object(Bucket=self.bucket, Key=self._record_key(key))
                body = obj["Body"].read()
        except ClientError as e:
            if _status(e) == 404:
                with self._lock:
                    self._known.pop(key, None)
                return None
            raise
        blob = obj.get("Metadata", {}).get(BLOB_META, "")
        known = _Known(obj.get("ETag", ""), body, blob if SHA_RE.fullmatch(blob) else "", time.monotonic())
        with self._lock:
            self._known[key] = known
        return known

    def _record(self, key: str) -> _Known | None:
        """The record as of at most ``ttl_s`` ago; while the store is unreachable, the last one read."""
        with self._lock:
            known = self._known.get(key)
        if known is not None and (time.monotonic() - known.checked < self.ttl_s
                                  or time.monotonic() < self._down_until):
            return known
        try:
            return self._fetch(key)
        except StoreUnavailable:
            if known is not None:
                return known
            raise

    # ---- the Backend protocol ---------------------------------------------------------------------
    def open_stage(self) -> Staged:
        return self.local.open_stage()

    def append(self, staged: Staged, chunks: Iterable[bytes]) -> None:
        self.local.append(staged, chunks)

    def seal(self, staged: Staged) -> None:
        self.local.seal(staged)

    def stage(self, chunks: Iterable[bytes]) -> Staged:
        return self.local.stage(chunks)

    def discard(self, staged: Staged) -> None:
        self.local.discard(staged)

    def publish(self, staged: Staged, adapter_id: str, record: bytes) -> str | None:
        from botocore.exceptions import ClientError

        sha = staged.digest
        uploaded = self._upload_blob(staged.path, sha)
        if not self._conditional and self._fetch(adapter_id) is not None:
            raise FileExistsError(adapter_id)
        args = dict(Bucket=self.bucket, Key=self._record_key(adapter_id), Body=record, Metadata={BLOB_META: sha})
        try:
            with self._call(f"publishing {adapter_id}"):
                answer = self.client.put_object(**args, **({"IfNoneMatch": "*"} if self._conditional else {}))
        except ClientError as e:
            if _status(e) in (409, 412):  # taken (409: a concurrent conditional write in flight)
                if uploaded:  # the loser's blob would be garbage
                    self._collect(sha)
                raise FileExistsError(adapter_id) from None
            if _status(e) != 501 or not self._conditional:
                raise
            log.warning("%s does not support conditional writes: publishing by check-then-put", self.url)
            self._conditional = False
            return self.publish(staged, adapter_id, record)
        known = _Known(answer.get("ETag", ""), record, sha, time.monotonic())
        with self._lock:
            self._known[adapter_id] = known
        self.local._close(staged)
        self.blobs.adopt(staged.path, sha)  # this replica never downloads its own upload
        staged.published = True
        self.local.discard(staged)  # the now empty staging directory (published: discard only closes)
        with contextlib.suppress(OSError):
            os.rmdir(staged.work)
        return known.version

    def _upload_blob(self, path: Path, sha: str) -> bool:
        """Upload unless the store already has these bytes; True when this call wrote the blob."""
        from botocore.exceptions import ClientError

        with self._call("uploading a blob"):
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._blob_key(sha))
                return False  # content-addressed: the same bytes are already there
            except ClientError as e:
                if _status(e) != 404:
                    raise
            self.client.upload_file(str(path), self.bucket, self._blob_key(sha))
        return True

    def version(self, adapter_id: str) -> str | None:
        known = self._record(adapter_id)
        return known.version if known is not None else None

    def read(self, adapter_id: str) -> bytes:
        known = self._record(adapter_id)
        if known is None or not known.blob:
            raise FileNotFoundError(adapter_id)
        data = self.blobs.get(known.blob)
        if data is not None:
            return data
        return self._download(known.blob, adapter_id)

    def _download(self, sha: str, adapter_id: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            with self._call(f"reading {adapter_id}"):
                data = self.client.get_object(Bucket=self.bucket, Key=self._blob_key(sha))["Body"].read()
        except ClientError as e:
            if _status(e) == 404:
                raise FileNotFoundError(f"{adapter_id}: blob {sha[:12]} is missing from the store") from None
            raise
        self.reads += 1
        if not self.blobs.put(sha, data):  # damaged in the store or in transit: not cached; load() says so
            log.warning("blob %s of %r read from %s does not match its sha256", sha[:12], adapter_id, self.url)
        return data

    def read_record(self, adapter_id: str) -> bytes | None:
        known = self._record(adapter_id)
        return known.body if known is not None else None

    def write_record(self, adapter_id: str, record: bytes) -> None:
        known = self._record(adapter_id)
        if known is None:
            raise FileNotFoundError(adapter_id)
        with self._call(f"rewriting the record of {adapter_id}"):
            self.client.put_object(Bucket=self.bucket, Key=self._record_key(adapter_id), Body=record,
                                   Metadata={BLOB_META: known.blob})
        with self._lock:
            self._known.pop(adapter_id, None)

    def remove(self, adapter_id: str, check: Callable[[], None] | None = None) -> None:
        from botocore.exceptions import ClientError

        known = self._fetch(adapter_id)
        if known is None:
            raise FileNotFoundError(adapter_id)
        if check is not None:
            check()
        try:
            with self._call(f"deleting {adapter_id}"):
                cond = {"IfMatch": known.etag} if self._conditional and known.etag else {}
                self.client.delete_object(Bucket=self.bucket, Key=self._record_key(adapter_id), **cond)
        except ClientError as e:
            if _status(e) in (404, 412):  # removed or replaced since the check: not the version checked
                raise FileNotFoundError(adapter_id) from None
            raise
        finally:
            with self._lock:
                self._known.pop(adapter_id, None)
        self._collect(known.blob)

    def _collect(self, sha: str) -> None:
        """Delete a blob no record names any more. A publish of the same bytes racing this can lose its
        blob (its HEAD saw it just before the delete); its reads then fail with a 404-class error and a
        re-upload repairs it. Best effort: a failure leaves garbage, never a broken adapter."""
        if not sha:
            return
        try:
            for key in self.ids():
                known = self._record(key)
                if known is not None and known.blob == sha:
                    return
            with self._call("deleting a blob"):
                self.client.delete_object(Bucket=self.bucket, Key=self._blob_key(sha))
        except Exception as e:  # noqa: BLE001 - garbage is harmless; the delete itself succeeded
            log.warning("blob %s left in %s: %s", sha[:12], self.url, e)

    def move(self, src: str, dst: str) -> None:
        from botocore.exceptions import ClientError

        known = self._fetch(src)
        if known is None:
            raise FileNotFoundError(src)
        try:
            with self._call(f"moving {src}"):
                self.client.put_object(Bucket=self.bucket, Key=self._record_key(dst), Body=known.body,
                                       Metadata={BLOB_META: known.blob}, IfNoneMatch="*")
        except ClientError as e:
            if _status(e) in (409, 412):
                raise FileExistsError(dst) from None
            raise
        with self._call(f"moving {src}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._record_key(src))
        with self._lock:
            self._known.pop(src, None)

    def ids(self) -> list[str]:
        """Every key, from one listing; records whose ETag the listing shows unchanged count as re-checked."""
        base = self._record_key("")[: -len(".json")]
        keys, now = [], time.monotonic()
        with self._call("listing adapters"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(base):]
                    if name.endswith(".json") and "/" not in name:
                        keys.append(name[: -len(".json")])
                        with self._lock:
                            known = self._known.get(keys[-1])
                            if known is not None and known.etag == obj.get("ETag"):
                                known.checked = now
        return sorted(keys)

    def listing_token(self) -> str | None:
        return None  # a listing is one request; ids() refreshes what it can

    def recover(self) -> list[str]:
        return self.local.recover()


def _status(e: Exception) -> int:
    response = getattr(e, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if status is None:
        code = response.get("Error", {}).get("Code", "")
        status = {"NoSuchKey": 404, "NotFound": 404, "PreconditionFailed": 412}.get(code, 0)
    return int(status)

