"""One HTTP request through an in-process ASGI app, as a stream: first ``(status, headers)``, then the body's
chunks as the app sends them (so SSE streams through a Ray Serve replica chunk by chunk)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

_END = object()


@dataclass
class HttpRequest:
    """What the ingress forwards to a replica (plain data: it crosses processes)."""

    method: str
    path: str
    query: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


async def call(app, req: HttpRequest) -> AsyncIterator[tuple[int, list[tuple[str, str]]] | bytes]:
    queue: asyncio.Queue = asyncio.Queue()
    done = asyncio.Event()
    sent_body = False
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": req.method,
             "scheme": "http", "path": req.path, "raw_path": req.path.encode(), "root_path": "",
             "query_string": req.query.encode(), "client": ("127.0.0.1", 0), "server": ("replica", 80),
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in req.headers]}

    async def receive() -> dict:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await done.wait()  # the client stays connected until the response is complete
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
            await queue.put((message["status"], headers))
        elif message["type"] == "http.response.body":
            if message.get("body"):
                await queue.put(bytes(message["body"]))
            if not message.get("more_body", False):
                await queue.put(_END)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await queue.put(_END)

    task = asyncio.create_task(run())
    try:
        while (item := await queue.get()) is not _END:
            yield item
    finally:
        done.set()
        if not task.done():
            task.cancel()
