"""Adapter uploads: the multipart body is parsed as it streams in, never buffered whole by the framework.

The size cap is enforced per received chunk (413 at the first byte over it; a declared Content-Length
over the cap is refused before reading anything). File parts are spooled to private temp files (written
from a threadpool, so the event loop never waits on the disk) and removed whatever happens. Pickle/zip
payloads are refused with 415 from their file name or their first bytes, never opened. What comes out is
a list of spooled files plus the small text fields; the route hands them to the store.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from adapters_store.peft_import import CONFIG, WEIGHTS
from adapters_store.validate import REFUSED_SUFFIXES, sniff_refused
from server.common.errors import InvalidParameter, ServingError

MAX_FIELD_BYTES = 64 << 10
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


@dataclass
class SpooledFile:
    field: str
    filename: str
    path: Path
    size: int = 0
    head: bytes = b""

    def read(self) -> bytes:
        return self.path.read_bytes()


@dataclass
class Upload:
    fields: dict[str, str] = field(default_factory=dict)
    files: list[SpooledFile] = field(default_factory=list)

    def cleanup(self) -> None:
        for f in self.files:
            f.path.unlink(missing_ok=True)


class _Parts:
    """python-multipart callbacks -> fields and spooled files. Disk writes are queued as (file, bytes)
    and flushed from a threadpool after each network chunk."""

    def __init__(self, tmp_dir: Path, upload: Upload, check_field: Callable[[str, str], None] | None):
        self.tmp_dir = tmp_dir
        self.check_field = check_field
        self.upload = upload
        self.pending: list[tuple[SpooledFile, bytes]] = []
        self.ended = False
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._file: SpooledFile | None = None
        self._value = bytearray()

    def callbacks(self) -> dict:
        return dict(on_part_begin=self.part_begin, on_header_field=self.header_field,
                    on_header_value=self.header_value, on_header_end=self.header_end,
                    on_headers_finished=self.headers_finished, on_part_data=self.part_data,
                    on_part_end=self.part_end, on_end=self.end)

    def part_begin(self) -> None:
        self._headers, self._file, self._value = {}, None, bytearray()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = self._header_value = b""

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
        fd, path = tempfile.mkstemp(dir=self.tmp_dir, suffix=".part")
        os.close(fd)
        self._file = SpooledFile(self._name, name, Path(path))
        self.upload.files.append(self._file)

    def part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = bytes(data[start:end])
        f = self._file
        if f is None:
            self._value += chunk
            if len(self._value) > MAX_FIELD_BYTES:
                raise InvalidParameter(f"form field {self._name!r} exceeds {MAX_FIELD_BYTES} bytes", param=self._name)
            return
        if len(f.head) < 16:
            f.head += chunk[:16 - len(f.head)]
            if len(f.head) >= 9 or (f.head and not f.filename.endswith(".safetensors")):
                what = sniff_refused(f.head)
                if what is not None:
                    raise UnsupportedUpload(f"{f.filename} holds {what}; refused, never opened", param="files")
        f.size += len(chunk)
        self.pending.append((f, chunk))

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

    def flush(self) -> None:
        """Threadpool: append the queued chunks to their temp files."""
        pending, self.pending = self.pending, []
        by_file: dict[Path, list[bytes]] = {}
        for f, chunk in pending:
            by_file.setdefault(f.path, []).append(chunk)
        for path, chunks in by_file.items():
            with open(path, "ab") as out:
                out.writelines(chunks)


async def receive_upload(request: Request, cap: int, tmp_dir: Path,
                         check_field: Callable[[str, str], None] | None = None) -> Upload:
    """Stream the multipart body into temp files under ``cap`` bytes; on any failure nothing is left behind.
    ``check_field(name, value)`` runs as each text field completes, so a bad id stops the upload early."""
    ctype, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise UnsupportedUpload("adapter uploads are multipart/form-data with an adapter_id field and files parts")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise UploadTooLarge(f"upload of {int(declared)} bytes exceeds the limit of {cap} bytes (--max-upload-bytes)")
    upload = Upload()
    parts = _Parts(tmp_dir, upload, check_field)
    try:
        parser = MultipartParser(boundary, parts.callbacks())
    except (FormParserError, ValueError) as e:
        raise UnsupportedUpload(f"bad multipart boundary: {e}") from None
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > cap:
                raise UploadTooLarge(f"upload exceeds the limit of {cap} bytes (--max-upload-bytes)")
            try:
                parser.write(chunk)
            except FormParserError as e:
                raise InvalidParameter(f"malformed multipart body: {e}") from None
            if parts.pending:
                await run_in_threadpool(parts.flush)
        if not parts.ended:
            raise InvalidParameter("malformed multipart body: it ended before the closing boundary")
        return upload
    except ClientDisconnect:
        upload.cleanup()
        raise ClientGone() from None
    except BaseException:
        upload.cleanup()
        raise
