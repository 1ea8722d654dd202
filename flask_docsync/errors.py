"""Exceptions raised by flask-docsync.

The hierarchy::

    DocSyncError
     ├── ConfigurationError      a setting or registration is wrong; raised at start-up
     ├── UnknownApplication      no app is registered at the requested route
     ├── SessionError            a session cannot be created or joined (carries an HTTP status)
     │    └── TokenError         a session token is missing, malformed, forged or expired
     ├── ProtocolViolation       a client broke the Bokeh wire protocol (carries a close code)
     ├── HandshakeError          a request is not an acceptable WebSocket upgrade (HTTP status)
     └── ConnectionClosed        the WebSocket is closed (carries the close code)
          └── MessageTooBig      the client sent a message over the size limit (1009)

The WebSocket close codes used anywhere in the package are the members of
:class:`CloseCode`. Every message says what to change to make the problem
go away.
"""

from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    """WebSocket close codes (RFC 6455 section 7.4 and the IANA registry)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    #: Received only: the peer's close frame carried no code. Never sent.
    NO_STATUS = 1005
    #: Received only: the TCP connection ended without a close frame. Never sent.
    ABNORMAL = 1006
    #: A text message that is not UTF-8.
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    #: The server restarts; the client should reconnect (to a live worker).
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013


class DocSyncError(Exception):
    """Base class of every error raised by flask-docsync."""


class ConfigurationError(DocSyncError):
    """A setting, flag or app registration is invalid."""


class BroadcastError(DocSyncError):
    """A broadcast cannot be made: a bad topic or payload, or no way to Redis."""


class UnknownApplication(DocSyncError, LookupError):
    """No Bokeh application is registered at a route.

    :param route: The route that was asked for.
    :param known: The routes that are registered, listed in the message.
    """

    def __init__(self, route: str, known: list[str]) -> None:
        self.route = route
        self.known = sorted(known)
        listing = ", ".join(self.known) or "none"
        super().__init__(
            f"No Bokeh application is registered at {route!r}. Registered"
            f" routes: {listing}. Register one with docsync.add_app(route, target)."
        )


class SessionError(DocSyncError):
    """A session could not be created or joined.

    :param status: The HTTP status a request handler should answer with.
    :param reason: Why, in words a user can act on.
    """

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(reason)


class TokenError(SessionError):
    """A session token or session id was refused."""

    def __init__(self, reason: str, status: int = 403) -> None:
        super().__init__(status, reason)


class ProtocolViolation(DocSyncError):
    """A client sent something the Bokeh protocol does not allow.

    :param code: The WebSocket close code to end the connection with.
    :param reason: Why, sent as the close reason and logged.
    """

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(reason)


class HandshakeError(DocSyncError):
    """A request is not an acceptable WebSocket upgrade, or the connection
    cannot be taken over.

    Answer the request with :attr:`status`, :attr:`headers` and
    :attr:`reason` as a plain HTTP response.

    :param status: 400 for a malformed upgrade, 426 when the client speaks
        another WebSocket version, 500 when the server does not let the
        application reach the client socket.
    :param reason: What is wrong and how to fix it.
    :param headers: Headers for the error response, e.g.
        ``Sec-WebSocket-Version: 13`` with a 426 (RFC 6455 section 4.4);
        ``None`` adds none.
    """

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.headers = headers or []

    def __str__(self) -> str:
        return f"{self.status}: {self.reason}"


class ConnectionClosed(DocSyncError):
    """The WebSocket connection is closed; raised by every transport method
    that needs an open connection.

    :param code: The close code received from the client, or sent by the
        server if it closed first. :attr:`CloseCode.ABNORMAL` (1006) means
        the TCP connection ended without a close frame,
        :attr:`CloseCode.NO_STATUS` (1005) that the client's close frame
        carried no code.
    :param reason: The reason that came with the code, possibly empty.
    """

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        if self.reason:
            return f"WebSocket closed with code {self.code}: {self.reason}"
        return f"WebSocket closed with code {self.code}"


class MessageTooBig(ConnectionClosed):
    """The client sent a WebSocket message larger than the transport's
    ``max_message_size``; the connection has been closed with
    :attr:`CloseCode.MESSAGE_TOO_BIG` (1009)."""
