"""Uploads use bounded resources (RELIABILITY row 41): uploading an N-byte compiled adapter grows the server's
peak RSS by at most ~1.5 N; the multipart spool lives in the store's staging area (a full disk there is a
507) and is published by rename; part headers are capped and parsed in linear time, off the event loop.

The peak is read from a fresh `rankserve serve` subprocess: VmHWM after the upload against VmRSS before it,
with the high-water mark reset just before the upload (writing 5 to /proc/PID/clear_refs), so nothing the
server did earlier (loading the base, allocating slots) hides in the peak.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from python_multipart.multipart import MultipartParser
from safetensors.torch import save_file

from adapters_store import backend as backend_mod
from adapters_store.synth import random_adapter
from tests.util_server import LiveServer, app_client, compiled_bytes, multipart

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
BYTES_PER_RANK = 8192  # tiny-llama: sum of d_in + d_out over its 14 targets, float32


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def compiled_file(tmp_path: Path, tiny_llama, rank: int) -> dict[str, Path]:
    path = tmp_path / "big.safetensors"
    random_adapter(tiny_llama, "lora", rank, seed=0, std=0.01).save(path)
    return {path.name: path}


def peft_pair(tmp_path: Path, tiny_llama, rank: int) -> dict[str, Path]:
    """A PEFT LoRA on every target of tiny-llama, written directly (peft itself would hold it all twice)."""
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for path, (d_in, d_out) in tiny_llama.targets.items():
        sd[f"base_model.model.{path}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) * 0.01
        sd[f"base_model.model.{path}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * 0.01
    save_file(sd, tmp_path / "adapter_model.safetensors")
    leaves = sorted({p.rsplit(".", 1)[-1] for p in tiny_llama.targets})
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_modules": leaves}))
    return {n: tmp_path / n for n in ("adapter_config.json", "adapter_model.safetensors")}


def upload_growth(tmp_path: Path, tiny_llama, rank: int, files: dict[str, Path]) -> int:
    """Peak RSS growth, in bytes, of a fresh server while it takes ``files`` as one upload."""
    size = sum(p.stat().st_size for p in files.values())
    args = ("--max-rank", str(rank), "--max-slots", "1", "--max-upload-bytes", str(size + (1 << 20)),
            "--kv-cache-bytes", str(1 << 20), "--cpu-cache-bytes", str(1 << 20))
    with LiveServer(tmp_path, "tiny-llama", *args) as srv, srv.client(timeout=300) as client:
        warm = client.post("/v1/adapters", **multipart("warm", {"w.safetensors": compiled_bytes(tiny_llama, seed=1)}))
        assert warm.status_code == 201, warm.text  # first-use costs (imports, threadpool) are not the upload's
        time.sleep(0.2)
        pid = srv.proc.pid
        before = _kib(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        with ExitStack() as stack:
            parts = [("files", (name, stack.enter_context(open(path, "rb")), "application/octet-stream"))
                     for name, path in files.items()]
            r = client.post("/v1/adapters", data={"adapter_id": "big"}, files=parts)
        peak = _kib(pid, "VmHWM")
        assert r.status_code == 201, r.text
        assert r.json()["ranks"] == {p: rank for p in tiny_llama.targets}
    return (peak - before) * 1024


@pytest.mark.slow
def test_a_200mb_upload_grows_peak_rss_by_at_most_1_5x_its_size(tmp_path, tiny_llama):
    files = compiled_file(tmp_path, tiny_llama, rank=24 * 1024)
    size = files["big.safetensors"].stat().st_size
    assert size > 200_000_000
    growth = upload_growth(tmp_path, tiny_llama, 24 * 1024, files)
    print(f"200 MB upload: peak RSS growth {growth / 1e6:.1f} MB for {size / 1e6:.1f} MB = {growth / size:.2f}x")
    assert growth <= 1.5 * size, f"peak RSS grew {growth / size:.2f}x the upload's size"


@pytest.mark.parametrize("kind, bound", [("compiled", 1.5), ("peft", 2.0)])
def test_an_upload_grows_peak_rss_by_about_its_size(tmp_path, tiny_llama, kind, bound):
    """The same bound on 32 MB, loosely (a few MB of slack for the request's own allocations); a PEFT upload
    also holds its converted up-projections (B times the scale) besides the mapped file, so 2x for it."""
    files = (compiled_file if kind == "compiled" else peft_pair)(tmp_path, tiny_llama, 4096)
    size = files["big.safetensors" if kind == "compiled" else "adapter_model.safetensors"].stat().st_size
    growth = upload_growth(tmp_path, tiny_llama, 4096, files)
    print(f"32 MB {kind} upload: peak RSS growth {growth / size:.2f}x")
    assert growth <= bound * size + (4 << 20), f"peak RSS grew {growth / size:.2f}x the upload's size"


def test_the_spool_is_in_the_store_and_published_by_rename(tmp_path, tiny_llama):
    """The compiled file the server publishes is the very file it spooled the upload into (same inode,
    inside the store's tmp/), so no copy is made and a full disk there is a 507."""
    with app_client("tiny-llama", tmp_path / "store") as (client, state):
        store = state.runtime.store
        seen = []
        real = store.put_staged

        def put_staged(adapter_id, staged, **kw):
            seen.append((staged.path.parent.parent, os.stat(staged.path).st_ino))
            return real(adapter_id, staged, **kw)

        store.put_staged = put_staged
        blob = compiled_bytes(tiny_llama, seed=3)
        assert client.post("/v1/adapters", **multipart("spooled", {"s.safetensors": blob})).status_code == 201
        published = store.root / "adapters" / "spooled" / "adapter.safetensors"
        assert seen == [(store.root / "tmp", os.stat(published).st_ino)]
        assert published.read_bytes() == blob and list((store.root / "tmp").iterdir()) == []


def test_disk_full_while_spooling_is_507_and_leaves_nothing(tmp_path, tiny_llama, monkeypatch):
    with app_client("tiny-llama", tmp_path / "store") as (client, state):
        store = state.runtime.store
        published = []
        monkeypatch.setattr(store, "put_staged", lambda *a, **k: published.append(a))

        def full(fd, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(backend_mod, "_write_all", full)
        r = client.post("/v1/adapters", **multipart("full", {"f.safetensors": compiled_bytes(tiny_llama, seed=4)}))
        assert r.status_code == 507 and "full" in r.json()["error"]["message"], r.text
        assert published == [] and "full" not in store and list((store.root / "tmp").iterdir()) == []


def _body_with_headers(lines: int, line_bytes: int = 4000, piece: int = 512):
    """A multipart body whose file part carries ``lines`` header lines of ``line_bytes`` each (each under
    python-multipart's own per-line cap), sent in small pieces."""
    head = b"--b\r\nContent-Disposition: form-data; name=\"adapter_id\"\r\n\r\nhdr\r\n--b\r\n"
    headers = b"".join(b"X-Pad-%d: " % i + b"p" * line_bytes + b"\r\n" for i in range(lines))
    body = head + headers + b"Content-Disposition: form-data; name=\"files\"; filename=\"h.safetensors\"\r\n\r\n"
    body += b"xx\r\n--b--\r\n"
    for i in range(0, len(body), piece):
        yield body[i:i + piece]


def test_part_headers_are_capped_and_parsed_off_the_event_loop(tmp_path, monkeypatch):
    on_loop = []
    real_write = MultipartParser.write

    def write(self, data):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # a worker thread: no running loop there
            on_loop.append(False)
        return real_write(self, data)

    monkeypatch.setattr(MultipartParser, "write", write)
    with app_client("tiny-llama", tmp_path / "store") as (client, state):
        started = time.perf_counter()
        r = client.post("/v1/adapters", content=_body_with_headers(5),
                        headers={"content-type": "multipart/form-data; boundary=b"})
        assert time.perf_counter() - started < 5
        assert r.status_code in (400, 422) and "part headers exceed 16384 bytes" in r.json()["error"]["message"], r.text
        assert on_loop and not any(on_loop)
        assert "hdr" not in state.runtime.store and list((state.runtime.store.root / "tmp").iterdir()) == []
