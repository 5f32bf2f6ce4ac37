"""Upload a compiled adapter to a running rankserve server (POST {url}/v1/adapters, multipart)."""

from __future__ import annotations

from pathlib import Path

import httpx


def push_adapter(path: str | Path, url: str, adapter_id: str, api_key: str | None = None,
                 client: httpx.Client | None = None, timeout: float = 60.0) -> dict:
    """Send field ``adapter_id`` and the file as part ``files``; returns the stored record (JSON).
    Raises ``RuntimeError`` with the server's error message on any non-2xx answer."""
    path = Path(path)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    own = client is None
    client = client or httpx.Client(timeout=timeout)
    try:
        with path.open("rb") as f:
            resp = client.post(url.rstrip("/") + "/v1/adapters", data={"adapter_id": adapter_id},
                               files=[("files", (path.name, f, "application/octet-stream"))], headers=headers)
    finally:
        if own:
            client.close()
    if resp.status_code // 100 != 2:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text[:500]
        raise RuntimeError(f"push of {path.name} as {adapter_id!r} to {url} failed: HTTP {resp.status_code}: {message}")
    return resp.json()
