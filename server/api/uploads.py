"""Adapter uploads: the multipart body is parsed as it streams in, never buffered whole by the framework.

The size cap is enforced per received chunk (413 at the first byte over it; a declared Content-Length
over the cap is refused before reading anything). Each received chunk is parsed and its file data written
in the threadpool, so the event loop never waits on the parser or the disk. File parts are spooled into
the store's own staging area (``AdapterStore.spool``: same file system as the store, so a full disk is 507
and publishing a compiled file is a rename, not a copy) and dropped whatever happens unless published.
Part headers are capped and collected in bytearrays (linear, whatever the chunking). Pickle/zip payloads
are refused with 415 from their file name or their first bytes, never opened. What comes out is a list
of spooled files plus the small text fields; the route hands them to the store.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from adapters_store.backend import Staged
from adapters_store.peft_import import CONFIG, WEIGHTS
from adapters_store.validate import REFUSED_SUFFIXES, sniff_refused
from server.common.errors import InvalidParameter, RequestTimeout, ServingError

MAX_FIELD_BYTES = 64 << 10
MAX_HEADER_BYTES = 16 << 10  # all header lines of one part
MAX_PARTS = 8


class UploadTooLarge(ServingError):
    http_status = 413
    type = "invalid_request_error"
    code = "upload_too_large"


class UnsupportedUpload(ServingError):
    http_status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class ClientGone(Exception):
    """The client disconnected mid-upload: nothing is registered, nothing is answered."""


class Spooler(Protocol):
    """Where file parts go (``AdapterStore``): private files, published by the store or discarded."""

    def spool(self) -> Staged: ...
    def write_spool(self, staged: Staged, chunks: Iterable[bytes]) -> None: ...
    def discard(self, staged: Staged) -> None: ...


@dataclass
class SpooledFile:
    field: str
    filename: str
    staged: Staged
    size: int = 0
    head: bytes = b""

    @property
    def path(self) -> Path:
        return self.staged.path


@dataclass
class Upload:
    spooler: Spooler
    fields: dict[str, str] = field(default_factory=dict)
    files: list[SpooledFile] = field(default_factory=list)

    def cleanup(self) -> None:
        """Drop every spool the store has not published."""
        for f in self.files:
            self.spooler.discard(f.staged)


class _Parts:
    """python-multipart callbacks -> fields and spooled files. Everything runs in ``feed``, in the
    threadpool: the parser and the writes of file data straight from the received chunk (no copies)."""

    def __init__(self, boundary: bytes, upload: Upload, check_field: Callable[[str, str], None] | None,
                 check_file: Callable[[SpooledFile, int], None] | None = None):
        self.check_field = check_field
        self.check_file = check_file
        self.upload = upload
        self.ended = False
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._header_bytes = 0
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._file: SpooledFile | None = None
        self._value = bytearray()
        self.parser = MultipartParser(boundary, dict(
            on_part_begin=self.part_begin, on_header_field=self.header_field, on_header_value=self.header_value,
            on_header_end=self.header_end, on_headers_finished=self.headers_finished, on_part_data=self.part_data,
            on_part_end=self.part_end, on_end=self.end))

    def part_begin(self) -> None:
        self._headers, self._file, self._value, self._header_bytes = {}, None, bytearray(), 0

    def _header_data(self, into: bytearray, data: bytes, start: int, end: int) -> None:
        self._header_bytes += end - start
        if self._header_bytes > MAX_HEADER_BYTES:
            raise InvalidParameter(f"multipart part headers exceed {MAX_HEADER_BYTES} bytes", param="files")
        into += data[start:end]  # in place: linear however finely the client splits a header

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_data(self._header_field, data, start, end)

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_data(self._header_value, data, start, end)

    def header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field, self._header_value = bytearray(), bytearray()

    def headers_finished(self) -> None:
        if len(self.upload.files) + len(self.upload.fields) >= MAX_PARTS:
            raise InvalidParameter(f"at most {MAX_PARTS} parts per upload", param="files")
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        if filename is None:
            return
        name = os.path.basename(filename.decode("utf-8", "replace").replace("\\", "/"))
        if name.lower().endswith(REFUSED_SUFFIXES):
            raise UnsupportedUpload(f"{name}: pickle/archive formats are refused, never opened; upload a compiled "
                                    f"*.safetensors or a PEFT {CONFIG} + {WEIGHTS}", param="files")
        if not (name.endswith(".safetensors") or name == CONFIG):
            raise UnsupportedUpload(f"{name}: expected a compiled *.safetensors or a PEFT {CONFIG} + {WEIGHTS}",
                                    param="files")
        self._file = SpooledFile(self._name, name, self.upload.spooler.spool())
        self.upload.files.append(self._file)

    def part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = memoryview(data)[start:end]
        f = self._file
        if f is None:
            self._value += chunk
            if len(self._value) > MAX_FIELD_BYTES:
                raise InvalidParameter(f"form field {self._name!r} exceeds {MAX_FIELD_BYTES} bytes", param=self._name)
            return
        if len(f.head) < 16:
            f.head += bytes(chunk[:16 - len(f.head)])
            if len(f.head) >= 9 or (f.head and not f.filename.endswith(".safetensors")):
                what = sniff_refused(f.head)
                if what is not None:
                    raise UnsupportedUpload(f"{f.filename} holds {what}; refused, never opened", param="files")
        if self.check_file is not None:  # before the chunk is written: bytes over a quota never reach the disk
            self.check_file(f, f.size + len(chunk))
        f.size += len(chunk)
        self.upload.spooler.write_spool(f.staged, [chunk])

    def part_end(self) -> None:
        if self._file is None:
            value = self._value.decode("utf-8", "replace")
            if self.check_field is not None:
                self.check_field(self._name, value)
            self.upload.fields[self._name] = value
        elif (what := sniff_refused(self._file.head)) is not None:  # files shorter than 9 bytes
            raise UnsupportedUpload(f"{self._file.filename} holds {what}; refused, never opened", param="files")

    def end(self) -> None:
        self.ended = True

    def feed(self, chunk: bytes) -> None:
        """Threadpool: parse one network chunk; file data is written to the spools as it is found."""
        try:
            self.parser.write(chunk)
        except FormParserError as e:
            raise InvalidParameter(f"malformed multipart body: {e}") from None


async def receive_upload(request: Request, cap: int, spooler: Spooler,
                         check_field: Callable[[str, str], None] | None = None, idle_timeout: float = 30.0,
                         check_file: Callable[[SpooledFile, int], None] | None = None) -> Upload:
    """Stream the multipart body into the spooler's files under ``cap`` bytes; on any failure nothing is left
    behind. ``check_field(name, value)`` runs as each text field completes, so a bad id stops the upload early;
    ``check_file(file, size)`` before each chunk of a file is written, with the file's size including it.
    A client that sends nothing for ``idle_timeout`` seconds gets 408 (it would hold a spool file forever)."""
    ctype, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise UnsupportedUpload("adapter uploads are multipart/form-data with an adapter_id field and files parts")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise UploadTooLarge(f"upload of {int(declared)} bytes exceeds the limit of {cap} bytes (--max-upload-bytes)")
    upload = Upload(spooler)
    try:
        parts = _Parts(boundary, upload, check_field, check_file)
    except (FormParserError, ValueError) as e:
        raise UnsupportedUpload(f"bad multipart boundary: {e}") from None
    received = 0
    stream = request.stream().__aiter__()
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), idle_timeout)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise RequestTimeout(f"the upload stalled: nothing arrived for {idle_timeout:g} s "
                                    "(--body-timeout)") from None
            received += len(chunk)
            if received > cap:
                raise UploadTooLarge(f"upload exceeds the limit of {cap} bytes (--max-upload-bytes)")
            await run_in_threadpool(parts.feed, chunk)
        if not parts.ended:
            raise InvalidParameter("malformed multipart body: it ended before the closing boundary")
        return upload
    except ClientDisconnect:
        upload.cleanup()
        raise ClientGone() from None
    except BaseException:
        upload.cleanup()
        raise
