"""Exceptions raised by flask-docsync.

The hierarchy::

    DocSyncError
     ├── ConfigurationError      a setting or registration is wrong; raised at start-up
     ├── UnknownApplication      no app is registered at the requested route
     ├── SessionError            a session cannot be created or joined (carries an HTTP status)
     │    └── TokenError         a session token is missing, malformed, forged or expired
     └── ProtocolViolation       a client broke the Bokeh wire protocol (carries a close code)

Every message says what to change to make the problem go away.
"""

from __future__ import annotations


class DocSyncError(Exception):
    """Base class of every error raised by flask-docsync."""


class ConfigurationError(DocSyncError):
    """A setting, flag or app registration is invalid."""


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
