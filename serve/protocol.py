"""uvicorn's HTTP protocols with a deadline for a request's headers, which uvicorn lacks: a client that
connects and sends nothing, or drips half a request line, holds a connection only that long. httptools (C
parser) when installed: h11 (pure Python) parses a request several times slower, which a 2-core server at a
thousand requests per second feels."""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def protocol_with_header_timeout(seconds: float) -> type[asyncio.Protocol]:
    """The httptools protocol with the header deadline when httptools is installed, else h11's."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        return h11_with_header_timeout(seconds)
    return httptools_with_header_timeout(seconds)


class _HeaderDeadline:
    """The deadline both protocols share: armed when a request's head starts, disarmed when its headers
    are complete or the connection goes; when it fires, the connection is closed."""

    seconds: float
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        if self._in_headers() and not self.transport.is_closing():
            self.transport.close()

    def _in_headers(self) -> bool:
        return True


def httptools_with_header_timeout(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's HttpToolsProtocol, its connections closed when a request's headers are not complete `seconds`
    after the connection opened or after the request's first byte."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderTimeoutHttpTools(_HeaderDeadline, HttpToolsProtocol):
        def on_message_begin(self) -> None:  # the first byte of a request
            self._arm()
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

    HeaderTimeoutHttpTools.seconds = seconds
    return HeaderTimeoutHttpTools


def h11_with_header_timeout(seconds: float) -> type[H11Protocol]:
    """An H11Protocol class for uvicorn.Config(http=...) whose connections are closed when a request's
    headers are not complete `seconds` after the connection opened or after the request's first byte.
    Bodies are timed by the app (408); idle keep-alive by uvicorn's timeout_keep_alive."""

    class HeaderTimeoutH11(_HeaderDeadline, H11Protocol):
        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:  # bytes of a new request's head
                self._arm()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # its headers are complete
                self._disarm()

        def _in_headers(self) -> bool:
            return self.conn.their_state is h11.IDLE

    HeaderTimeoutH11.seconds = seconds
    return HeaderTimeoutH11
