"""uvicorn's httptools protocol, writing each answer in one piece.

uvicorn writes an answer's status line and headers as soon as the app sends them and the body as a
second write. With TCP_NODELAY (which the gateway needs: see ``serve``) that is two segments: the
client wakes up for the headers, then again for the body, and on a busy machine the scheduler may
run it in between while the server waits. Here writes are gathered and handed to the socket once
the answer is complete (or, for an answer still streaming, at the end of the event loop's step):
headers and body leave together, in one system call, before any bookkeeping that follows the
answer (metrics, the live dashboard) runs. Closing or aborting the connection sends (close) or drops (abort)
what is gathered first, as the transport would.
"""
from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _GatheringTransport:
    """A transport whose writes of one loop step go out as one; everything else passes through."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport, self._loop = transport, loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))

    def writelines(self, lines) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(d) for d in self._pending)

    def __getattr__(self, name):
        return getattr(self._transport, name)


class GatheringHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` over a :class:`_GatheringTransport` (pass as ``uvicorn.Config(http=…)``)."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(_GatheringTransport(transport, self.loop))

    def on_response_complete(self) -> None:
        self.transport.flush()
        super().on_response_complete()
