"""The boundary between the transport-neutral core and a WebSocket layer.

:class:`~flask_docsync.connection.ServerConnection` serves a session over
any object with the :class:`Transport` interface. The production layer is
:class:`flask_docsync.websocket.WebSocket` (RFC 6455 on the WSGI server's
socket under gevent); :class:`flask_docsync.testing.InMemoryWebSocket`
is the test client's. A Flask view hands one to the core; tests inject
theirs at the same place production makes its own, the WSGI environ key
:data:`ENVIRON_KEY`, so everything above the socket runs as it does in
production.

This module imports neither Flask nor any WebSocket code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = ["ENVIRON_KEY", "Transport"]

#: A WSGI environ key holding a ready :class:`Transport` for the request.
#: :meth:`flask_docsync.websocket.WebSocket.accept` returns it instead of
#: taking over the client socket, once the upgrade request has passed the
#: same checks as any other.
ENVIRON_KEY = "flask_docsync.transport"


@runtime_checkable
class Transport(Protocol):
    """What the core needs of an accepted WebSocket.

    Every method raises :exc:`~flask_docsync.errors.ConnectionClosed` once
    the connection is closed (except :meth:`close` and :meth:`abort`, which
    then do nothing). One message is one WebSocket message; a Bokeh message
    is several (header, metadata, content, buffers).
    """

    #: Whether the connection is closed, by either side or by :meth:`abort`.
    closed: bool
    #: ``time.monotonic()`` of the last pong received; ``None`` before the first.
    last_pong: float | None

    @property
    def buffered(self) -> bool:
        """Whether data already received waits to be read.

        The reader yields to other greenlets after each Bokeh message while
        this is true: parsing what has arrived never waits for the network,
        so a client that sends faster than it is served would otherwise
        keep the whole worker busy.
        """
        ...

    @property
    def unread(self) -> bool:
        """Whether the peer has sent data this side has not read yet, in
        the kernel's receive buffer or in :attr:`buffered`.

        Keep-alive takes it as an answer to a ping: a worker busy with other
        greenlets may not have read a pong that arrived in time, and closing
        a live peer for the server's own delay would be wrong.
        """
        ...

    def receive(self, timeout: float | None = None) -> str | bytes | None:
        """The next whole message; ``None`` after ``timeout`` seconds (``None`` waits for ever)."""
        ...

    def send_many(self, messages: Sequence[str | bytes]) -> None:
        """Send whole messages, in order, in one write that nothing else interleaves."""
        ...

    def ping(self, payload: bytes = b"") -> None:
        """Send a ping; the pong updates :attr:`last_pong`."""
        ...

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close with ``code`` (a :class:`~flask_docsync.errors.CloseCode`) and wait briefly for the peer."""
        ...

    def abort(self) -> None:
        """Drop the connection at once, without a close handshake."""
        ...
