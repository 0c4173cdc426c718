"""uvicorn's HTTP/1.1 protocol (h11) with a deadline for each request's head.

uvicorn closes idle keep-alive connections, but a client that opens a connection and sends its request head
a byte at a time (or never finishes it) keeps the connection, its buffers and a file descriptor forever: every
byte cancels the keep-alive timer and nothing else limits the wait. Here a connection must deliver a complete
request head within ``head_timeout`` seconds of opening (or of its previous response plus the keep-alive
time); otherwise it is closed. The body has its own deadline in the app's limits middleware.
"""

from __future__ import annotations

import asyncio
from typing import Any


def protocol_with_head_timeout(head_timeout: float) -> type:
    """A uvicorn ``http`` protocol class (pass it as ``uvicorn.Config(http=...)``)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutProtocol(H11Protocol):
        _head_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm(head_timeout)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # a complete request head arrived
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm(self.timeout_keep_alive + head_timeout)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._head_deadline = self.loop.call_later(seconds, self._head_expired)

        def _disarm(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _head_expired(self) -> None:
            self._head_deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.logger.info("closing a connection that sent no complete request head in time")
                self.transport.close()

    return HeadTimeoutProtocol
