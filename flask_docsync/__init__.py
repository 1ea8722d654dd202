"""flask-docsync: the Bokeh Server as a Flask extension on gevent.

Importing the package does nothing else: no monkey-patching, no greenlets,
no Bokeh import until a name below is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_ERRORS = (
    "BroadcastError",
    "CloseCode",
    "ConfigurationError",
    "ConnectionClosed",
    "DocSyncError",
    "HandshakeError",
    "MessageTooBig",
    "ProtocolViolation",
    "SessionError",
    "TokenError",
    "UnknownApplication",
)

__all__ = [*_ERRORS, "DocSync", "__version__", "broadcast", "offload", "restorable", "restoring", "subscribe"]

if TYPE_CHECKING:
    from .errors import (
        BroadcastError,
        CloseCode,
        ConfigurationError,
        ConnectionClosed,
        DocSyncError,
        HandshakeError,
        MessageTooBig,
        ProtocolViolation,
        SessionError,
        TokenError,
        UnknownApplication,
    )
    from .extension import DocSync
    from .monitor import offload
    from .pubsub import broadcast, subscribe
    from .restore import restorable, restoring


def __getattr__(name: str) -> Any:
    # Lazy, so `flask-docsync serve` can monkey-patch before bokeh is imported.
    if name == "DocSync":
        from .extension import DocSync

        return DocSync
    if name == "offload":
        from .monitor import offload

        return offload
    if name in ("broadcast", "subscribe"):
        from . import pubsub

        return getattr(pubsub, name)
    if name in ("restorable", "restoring"):
        from . import restore

        return getattr(restore, name)
    if name in _ERRORS:
        from . import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'flask_docsync' has no attribute {name!r}")
