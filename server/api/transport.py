"""The HTTP transport: uvicorn's h11 protocol with a deadline on every request head.

uvicorn bounds the idle time between requests on a kept-alive connection (``timeout_keep_alive``), but not
the time a client takes to send a request's head: a client that opens connections and sends its headers a
byte at a time (slowloris) holds each connection open forever. Here every connection must complete each
request head within ``header_timeout`` seconds of its first byte (or of the connection opening), or it is
closed. Bodies are bounded by the edge middleware (``--body-timeout``), uploads by the upload reader.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


def guarded_h11(header_timeout: float) -> type[H11Protocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``."""

    class GuardedH11(H11Protocol):
        _head_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_request():
                self._disarm()
            else:
                self._arm()  # between requests or inside a head: the head must complete in time

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._disarm()  # idle until the next request's first byte: timeout_keep_alive's job

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _arm(self) -> None:
            if self._head_deadline is None and not self.transport.is_closing():
                self._head_deadline = self.loop.call_later(header_timeout, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _head_timed_out(self) -> None:
            self._head_deadline = None
            if not self._in_request() and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11
