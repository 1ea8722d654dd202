"""Settings of one DocSync binding, read once from options and ``DOCSYNC_*`` keys.

The names and defaults mirror ``bokeh serve`` flags so a deployment can be
moved across without surprises; every default below carries Bokeh's reason.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from bokeh.server.util import create_hosts_allowlist

from .errors import ConfigurationError

#: Ping interval. Heroku and nginx drop idle connections after 60 s, so
#: Bokeh pings a little more often than that.
DEFAULT_KEEP_ALIVE_MS = 37_000
DEFAULT_CHECK_UNUSED_SESSIONS_MS = 17_000
DEFAULT_UNUSED_SESSION_LIFETIME_MS = 15_000
DEFAULT_SESSION_TOKEN_EXPIRATION = 300
#: One incoming WebSocket message may not exceed this, so a client cannot
#: make the server buffer arbitrary amounts of memory.
DEFAULT_WEBSOCKET_MAX_MESSAGE_SIZE = 20 * 1024 * 1024
#: Messages waiting for a slow client before its connection is dropped.
DEFAULT_OUTBOUND_QUEUE_SIZE = 1024
#: A token above this size risks the 8 KB header limits of nginx and gunicorn.
TOKEN_SIZE_WARNING = 6 * 1024

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_bool(value: Any, name: str) -> bool:
    """Read a boolean from a config value or environment string.

    Bokeh reads ``BOKEH_SIGN_SESSIONS=false`` as true; this does not.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigurationError(f"{name}={value!r} is not a boolean; use true or false.")


def _as_tuple(value: Any, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    try:
        return tuple(str(v) for v in value)
    except TypeError:
        raise ConfigurationError(f"{name} must be a list of strings, got {value!r}.") from None


@dataclasses.dataclass(frozen=True)
class Settings:
    """Frozen settings of one Flask app's DocSync state.

    Each field ``name`` is read from the ``DOCSYNC_NAME`` config key, falling
    back to the option given to :class:`~flask_docsync.DocSync`, then to the
    default shown.
    """

    #: Where the blueprint is mounted. ``flask-docsync serve`` uses ``""`` so
    #: its URLs are the ones ``bokeh serve`` gives.
    url_prefix: str = "/docsync"
    #: ``--allow-websocket-origin``. Empty means only the serving host itself
    #: (same origin as the page); ``"*"`` allows any origin.
    allow_websocket_origin: tuple[str, ...] = ()
    #: Key that signs session ids and tokens. ``None`` reads
    #: ``BOKEH_SECRET_KEY`` from the environment.
    secret_key: str | None = None
    #: ``--session-ids signed``. ``None`` signs whenever a secret key exists.
    sign_sessions: bool | None = None
    #: ``False`` is ``--session-ids external-signed``: a page request must
    #: bring an id signed by another process instead of getting a new one.
    generate_session_ids: bool = True
    session_token_expiration: int = DEFAULT_SESSION_TOKEN_EXPIRATION
    #: ``0`` turns keep-alive pings and dead-peer detection off.
    keep_alive_ms: int = DEFAULT_KEEP_ALIVE_MS
    check_unused_sessions_ms: int = DEFAULT_CHECK_UNUSED_SESSIONS_MS
    unused_session_lifetime_ms: int = DEFAULT_UNUSED_SESSION_LIFETIME_MS
    #: ``None`` means no limit.
    websocket_max_message_size: int | None = DEFAULT_WEBSOCKET_MAX_MESSAGE_SIZE
    #: Headers and cookies carried in the token. ``None`` include lists carry
    #: none: a session created in the same process sees the live request, so
    #: the token only needs what another worker would need. Set the include
    #: lists to carry more, or ``["*"]`` for Bokeh's "everything".
    include_headers: tuple[str, ...] | None = None
    exclude_headers: tuple[str, ...] | None = None
    include_cookies: tuple[str, ...] | None = None
    exclude_cookies: tuple[str, ...] | None = None
    outbound_queue_size: int = DEFAULT_OUTBOUND_QUEUE_SIZE
    #: When a reconnecting browser's session is gone (its worker restarted)
    #: and its token has expired, create a fresh session instead of refusing.
    #: ``None`` does so when tokens are signed, since then only this
    #: deployment can have made the token.
    recreate_expired_sessions: bool | None = None
    #: Warn, naming the session and callback, when app code holds the event
    #: loop longer than this without yielding. ``0`` turns the check off.
    blocking_warning_ms: int = 1000
    #: ``--stats-log-frequency``: log sessions, connections and queues at
    #: DEBUG on the ``flask_docsync.stats`` logger this often; ``0`` is off.
    stats_log_ms: int = 15_000
    #: Serve this process's figures as JSON at ``<prefix>/_stats`` to
    #: loopback clients (``flask docsync stats --url ...``).
    stats_endpoint: bool = False
    #: Serve an index of apps at the prefix root. ``None`` serves it unless
    #: the prefix is empty, where ``/`` belongs to the host app.
    index: bool | None = None
    #: A Jinja template file used for the index instead of the built-in one.
    index_template: str | None = None
    #: With a single app, redirect the index to it as Bokeh does.
    index_redirect: bool = True
    #: Give the memory of discarded sessions back to the system
    #: (:mod:`flask_docsync.reclaim`): freeze the heap as it is when the
    #: server starts out of garbage collection, and after cleanup passes
    #: collect (when cheap), clear the type cache and trim glibc's heap.
    #: ``False`` leaves the process's collector and allocator alone.
    reclaim_memory: bool = True

    @property
    def signed(self) -> bool:
        if self.sign_sessions is None:
            return self.secret_key is not None
        return self.sign_sessions

    @property
    def recreates_expired_sessions(self) -> bool:
        if self.recreate_expired_sessions is None:
            return self.signed
        return self.recreate_expired_sessions

    @property
    def secret_key_bytes(self) -> bytes | None:
        return self.secret_key.encode("utf-8") if self.secret_key else None

    @classmethod
    def load(cls, config: Mapping[str, Any], options: Mapping[str, Any]) -> Settings:
        """Build settings from a Flask config and constructor options.

        :raises ConfigurationError: with the offending key named.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(options) - set(fields)
        if unknown:
            raise ConfigurationError(
                f"Unknown DocSync option(s): {', '.join(sorted(unknown))}."
                f" Valid options: {', '.join(sorted(fields))}."
            )
        values: dict[str, Any] = {}
        for name, field in fields.items():
            key = "DOCSYNC_" + name.upper()
            if key in config:
                values[name] = config[key]
            elif name in options:
                values[name] = options[name]
        env = os.environ
        if values.get("secret_key") is None and env.get("BOKEH_SECRET_KEY"):
            values["secret_key"] = env["BOKEH_SECRET_KEY"]
        if values.get("sign_sessions") is None and env.get("BOKEH_SIGN_SESSIONS"):
            values["sign_sessions"] = env["BOKEH_SIGN_SESSIONS"]
        if env.get("BOKEH_ALLOW_WS_ORIGIN"):
            # Bokeh lets the environment replace the list, not extend it.
            values["allow_websocket_origin"] = env["BOKEH_ALLOW_WS_ORIGIN"]

        if "allow_websocket_origin" in values:
            origins = _as_tuple(values["allow_websocket_origin"], "allow_websocket_origin") or ()
            if origins and "*" not in origins:
                try:
                    # Bokeh's own normalization: a bare host means port 80.
                    origins = tuple(create_hosts_allowlist(list(origins), None))
                except ValueError as exc:
                    raise ConfigurationError(
                        f"DOCSYNC_ALLOW_WEBSOCKET_ORIGIN: {exc}. Use host or host:port entries."
                    ) from None
            values["allow_websocket_origin"] = origins
        for name in ("include_headers", "exclude_headers", "include_cookies", "exclude_cookies"):
            if name in values:
                values[name] = _as_tuple(values[name], name)
        for name in ("sign_sessions", "recreate_expired_sessions"):
            if values.get(name) is not None:
                values[name] = parse_bool(values[name], "DOCSYNC_" + name.upper())
        for name in ("generate_session_ids", "index", "index_redirect", "stats_endpoint", "reclaim_memory"):
            if values.get(name) is not None:
                values[name] = parse_bool(values[name], "DOCSYNC_" + name.upper())
        for name in ("session_token_expiration", "keep_alive_ms", "check_unused_sessions_ms",
                     "unused_session_lifetime_ms", "outbound_queue_size", "blocking_warning_ms",
                     "stats_log_ms"):
            if name in values:
                try:
                    values[name] = int(values[name])
                except (TypeError, ValueError):
                    raise ConfigurationError(
                        f"DOCSYNC_{name.upper()}={values[name]!r} must be an integer."
                    ) from None
        if values.get("websocket_max_message_size") is not None:
            values["websocket_max_message_size"] = int(values["websocket_max_message_size"])
        prefix = values.get("url_prefix", cls.url_prefix) or ""
        prefix = prefix.strip("/")
        values["url_prefix"] = "/" + prefix if prefix else ""

        if values.get("index") is None:
            values["index"] = bool(values["url_prefix"])
        settings = cls(**values)
        settings._validate()
        return settings

    def _validate(self) -> None:
        if self.session_token_expiration <= 0:
            raise ConfigurationError(
                "DOCSYNC_SESSION_TOKEN_EXPIRATION must be a positive number of seconds"
                f" (got {self.session_token_expiration})."
            )
        for name in ("keep_alive_ms", "check_unused_sessions_ms", "unused_session_lifetime_ms"):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"DOCSYNC_{name.upper()} cannot be negative.")
        if self.check_unused_sessions_ms == 0:
            raise ConfigurationError(
                "DOCSYNC_CHECK_UNUSED_SESSIONS_MS must be positive; unused sessions"
                " would otherwise never be cleaned up."
            )
        if self.outbound_queue_size <= 0:
            raise ConfigurationError("DOCSYNC_OUTBOUND_QUEUE_SIZE must be at least 1.")
        for kind in ("headers", "cookies"):
            if getattr(self, f"include_{kind}") and getattr(self, f"exclude_{kind}"):
                raise ConfigurationError(
                    f"Set either DOCSYNC_INCLUDE_{kind.upper()} or DOCSYNC_EXCLUDE_{kind.upper()},"
                    " not both (bokeh serve refuses the same combination)."
                )
        if self.signed and not self.secret_key:
            raise ConfigurationError(
                "Signed session ids need a secret key. Set DOCSYNC_SECRET_KEY (or the"
                " BOKEH_SECRET_KEY environment variable; `bokeh secret` makes one), or"
                " turn signing off with DOCSYNC_SIGN_SESSIONS=false."
            )
        if not self.generate_session_ids and not self.signed:
            raise ConfigurationError(
                "External session ids (--session-ids external-signed) must be signed;"
                " set DOCSYNC_SECRET_KEY."
            )
