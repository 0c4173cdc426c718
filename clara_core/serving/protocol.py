"""uvicorn's HTTP/1.1 protocol (h11) with deadlines for what a client sends between requests.

uvicorn closes idle keep-alive connections, but a client that opens a connection and sends its request head
a byte at a time (or never finishes it) keeps the connection, its buffers and a file descriptor forever: every
byte cancels the keep-alive timer and nothing else limits the wait. Here a connection must deliver a complete
request head within ``timeout`` seconds of opening (or of its previous response plus the keep-alive time);
otherwise it is closed. A body the server answered without reading (413) may go on arriving for ``timeout``
seconds, so that a client still sending it gets to read the answer, and is then cut off. The body of a
request being served has its own deadline in the app's limits middleware.
"""

from __future__ import annotations

import asyncio
from typing import Any


def protocol_with_head_timeout(timeout: float) -> type:
    """A uvicorn ``http`` protocol class (pass it as ``uvicorn.Config(http=...)``)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutProtocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _armed_for: Any = None  # the request cycle current when the deadline was set

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm(timeout)

        def handle_events(self) -> None:
            super().handle_events()
            if self._deadline is not None and self.cycle is not self._armed_for:  # a new request's head
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return  # closing, or a pipelined request is already being served
            idle = self.conn.their_state is h11.IDLE  # else: the rest of a body answered without reading it
            self._arm(self.timeout_keep_alive + timeout if idle else timeout)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._armed_for = self.cycle
            self._deadline = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.cycle is self._armed_for and not self.transport.is_closing():
                self.logger.info("closing a connection that sent no complete request head in time")
                self.transport.close()

    return HeadTimeoutProtocol
