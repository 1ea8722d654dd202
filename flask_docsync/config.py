"""Settings of one DocSync binding, read once from options and ``DOCSYNC_*`` keys.

The names and defaults mirror ``bokeh serve`` flags so a deployment can be
moved across without surprises; every default below carries Bokeh's reason.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import urllib.parse
from collections.abc import Mapping
from typing import Any

from bokeh.server.util import create_hosts_allowlist

from .errors import ConfigurationError

log = logging.getLogger(__name__)

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
DEFAULT_OUTBOUND_QUEUE_BYTES = 64 * 1024 * 1024
DEFAULT_BROADCAST_MAX_BYTES = 256 * 1024
DEFAULT_BROADCAST_HISTORY = 10_000
DEFAULT_RESTORE_FLUSH_MS = 300
DEFAULT_RESTORE_CONCURRENCY = 2
DEFAULT_RESTORE_MAX_BYTES = 256 * 1024
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
    #: Message data that may wait for a slow client, bytes: a queue of a
    #: few large messages (pulled documents, big streamed columns) would
    #: otherwise hold up to ``outbound_queue_size`` times their size.
    #: ``None``: only the message count bounds it.
    outbound_queue_bytes: int | None = DEFAULT_OUTBOUND_QUEUE_BYTES
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
    #: Titles the index shows for app routes (``--index-titles``), as
    #: ``(route, title)`` pairs; a route without one shows its path.
    index_titles: tuple[tuple[str, str], ...] = ()
    #: Run each app once when the server starts, into a document nobody
    #: sees and no session hook hears of (``--warm``, as ``panel serve``
    #: has it), so the imports of its first run are done before the first
    #: visitor waits for them.
    warm: bool = False
    #: Give the memory of discarded sessions back to the system
    #: (:mod:`flask_docsync.reclaim`): freeze the heap as it is when the
    #: server starts out of garbage collection, and after cleanup passes
    #: collect (when cheap), clear the type cache and trim glibc's heap.
    #: ``False`` leaves the process's collector and allocator alone.
    reclaim_memory: bool = True
    #: The Redis that joins the processes of a deployment, such as
    #: ``redis://localhost:6379/0`` (``--redis-url``): broadcasts reach
    #: every worker and host through it. ``None``: no Redis; a broadcast
    #: reaches the sessions of its own process only.
    redis_url: str | None = None
    #: Of every Redis key, so that deployments can share one Redis.
    redis_prefix: str = "docsync"
    #: The base URL (``http://host:port``, no path) at which the other hosts
    #: of the deployment reach this one directly, not through the balancer
    #: (``--advertise-url``). With ``redis_url`` set, a WebSocket that
    #: reaches another host for one of this host's sessions is relayed
    #: here. ``None``: other hosts cannot relay to this one, and their
    #: WebSockets for its sessions get fresh sessions there, with a warning.
    advertise_url: str | None = None
    #: Largest broadcast payload (its JSON): each session of the topic gets
    #: a copy, and one huge entry can stall every reader.
    broadcast_max_bytes: int = DEFAULT_BROADCAST_MAX_BYTES
    #: Broadcasts each topic's stream keeps (about): how far a worker may
    #: fall behind, and how many wait while Redis is unreachable.
    broadcast_history: int = DEFAULT_BROADCAST_HISTORY
    #: Save what the browser changes in each session (and the state apps
    #: declare with ``flask_docsync.restorable``) in Redis, so that a
    #: reconnect whose worker died (``kill -9``, a crash, a deploy) gets the
    #: session back, rebuilt on a live worker (:mod:`flask_docsync.restore`).
    #: Needs ``redis_url``. ``add_app(..., restore=)`` overrides it per app.
    restore_sessions: bool = False
    #: How often changed sessions are written to Redis: what a ``kill -9``
    #: loses at most. A graceful stop writes everything first.
    restore_flush_ms: int = DEFAULT_RESTORE_FLUSH_MS
    #: Restores running at once in a worker; the others wait (up to 20 s,
    #: then get a fresh session), so that a dead worker's many sessions do
    #: not stall the sessions the survivors already serve.
    restore_concurrency: int = DEFAULT_RESTORE_CONCURRENCY
    #: Largest saved data of one session (JSON bytes, about): what a browser
    #: sends is bounded only by what it sends, and each save rewrites it.
    #: A session past it is no longer saved (logged) and restores fresh.
    restore_max_bytes: int = DEFAULT_RESTORE_MAX_BYTES

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
    def config_keys(cls) -> set[str]:
        """The ``DOCSYNC_*`` config keys of the settings."""
        return {"DOCSYNC_" + f.name.upper() for f in dataclasses.fields(cls)}

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Refuse option names that are not settings.

        :raises ConfigurationError: listing the valid names.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(options) - names
        if unknown:
            raise ConfigurationError(
                f"Unknown DocSync option(s): {', '.join(sorted(unknown))}."
                f" Valid options: {', '.join(sorted(names))}."
            )

    @classmethod
    def load(cls, config: Mapping[str, Any], options: Mapping[str, Any]) -> Settings:
        """Build settings from a Flask config and constructor options.

        A ``DOCSYNC_*`` key of ``config`` wins over the option of the same
        name, which wins over the ``BOKEH_*`` environment variable Bokeh
        reads for it (``BOKEH_SECRET_KEY``, ``BOKEH_SIGN_SESSIONS``,
        ``BOKEH_ALLOW_WS_ORIGIN``), which wins over the default.

        :raises ConfigurationError: naming the offending key and the form it takes.
        """
        cls.check_options(options)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        by_key = {"DOCSYNC_" + name.upper(): name for name in fields}
        typos = [k for k in config if isinstance(k, str) and k.startswith("DOCSYNC_") and k not in by_key]
        if typos:
            hints = []
            for key in sorted(typos):
                close = difflib.get_close_matches(key, list(by_key), n=1)
                hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
            # A warning, not an error: apps may keep keys of their own under
            # the prefix, but a misspelt setting should not go unnoticed.
            log.warning(
                "DocSync ignores the config key(s) %s; its settings are %s.",
                ", ".join(hints), ", ".join(sorted(by_key)),
            )
        values: dict[str, Any] = {}
        for name in fields:
            key = "DOCSYNC_" + name.upper()
            if key in config:
                values[name] = config[key]
            elif name in options:
                values[name] = options[name]
        env = os.environ
        for name, variable in (("secret_key", "BOKEH_SECRET_KEY"), ("sign_sessions", "BOKEH_SIGN_SESSIONS"),
                               ("allow_websocket_origin", "BOKEH_ALLOW_WS_ORIGIN")):
            if values.get(name) is None and env.get(variable):
                values[name] = env[variable]

        for name, value in list(values.items()):
            values[name] = _PARSERS[name](value, "DOCSYNC_" + name.upper())
        prefix = (values.get("url_prefix", cls.url_prefix) or "").strip("/")
        values["url_prefix"] = "/" + prefix if prefix else ""
        if values.get("index") is None:
            values["index"] = bool(values["url_prefix"])
        settings = cls(**values)
        settings._validate()
        return settings

    def _validate(self) -> None:
        if self.index_template is not None and not os.path.isfile(self.index_template):
            raise ConfigurationError(
                f"DOCSYNC_INDEX_TEMPLATE={self.index_template!r} is not a file; give the path of a"
                " Jinja template, or None for the built-in index."
            )
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
        if self.restore_sessions and self.redis_url is None:
            raise ConfigurationError(
                "DOCSYNC_RESTORE_SESSIONS needs DOCSYNC_REDIS_URL: sessions are saved in Redis so that"
                " they outlive their worker. Set DOCSYNC_REDIS_URL=redis://host:6379/0, or turn"
                " DOCSYNC_RESTORE_SESSIONS off."
            )
        if self.restore_sessions and not self.signed:
            raise ConfigurationError(
                "DOCSYNC_RESTORE_SESSIONS needs signed session ids (set DOCSYNC_SECRET_KEY): a restore"
                " hands saved data to whoever brings the session's token, and only a signed id proves"
                " which worker made the session."
            )
        if not self.generate_session_ids and not self.signed:
            raise ConfigurationError(
                "External session ids (--session-ids external-signed) must be signed;"
                " set DOCSYNC_SECRET_KEY."
            )


def _integer(minimum: int, unit: str, example: str, none_means: str | None = None) -> Any:
    """A parser of whole numbers ``>= minimum`` (also from environment strings)."""

    def parse(value: Any, key: str) -> int | None:
        if value is None and none_means is not None:
            return None
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            number = int(value.strip())
        elif isinstance(value, str) and none_means is not None and value.strip().lower() in ("", "none"):
            return None
        if number is None or number < minimum:
            accepted = f"an integer number of {unit}, at least {minimum}, such as {example}"
            if none_means is not None:
                accepted += f", or None for {none_means}"
            raise ConfigurationError(f"{key}={value!r} is not accepted; give {accepted}.")
        return number

    return parse


def _boolean(value: Any, key: str) -> bool:
    return parse_bool(value, key)


def _optional_boolean(value: Any, key: str) -> bool | None:
    return None if value is None else parse_bool(value, key)


def _string(none_means: str | None = None) -> Any:
    def parse(value: Any, key: str) -> str | None:
        if value is None and none_means is not None:
            return None
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            accepted = "a string" + (f", or None for {none_means}" if none_means else "")
            raise ConfigurationError(f"{key}={value!r} is not accepted; give {accepted}.")
        return value

    return parse


def _list(value: Any, key: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigurationError(
        f"{key}={value!r} is not accepted; give a list of strings or one comma-separated string."
    )


def _titles(value: Any, key: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise ConfigurationError(f"{key}={value!r} is not accepted; give route=title pairs separated by commas.")
        value = dict(pairs)
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return tuple(("/" + k.strip().strip("/"), v.strip()) for k, v in value.items())
    raise ConfigurationError(f"{key}={value!r} is not accepted; give a dict of route to title, or route=title pairs.")


def _redis_url(value: Any, key: str) -> str | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, str) and value.strip().startswith(("redis://", "rediss://", "unix://")):
        return value.strip()
    raise ConfigurationError(
        f"{key}={value!r} is not accepted; give a Redis URL such as redis://localhost:6379/0"
        " (rediss:// for TLS, unix:///run/redis.sock), or None for no Redis."
    )


def _advertise_url(value: Any, key: str) -> str | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, str):
        parts = urllib.parse.urlsplit(value.strip())
        try:
            port = parts.port
        except ValueError:
            port = None
        if (parts.scheme == "http" and parts.hostname and parts.hostname not in ("0.0.0.0", "::")
                and port is not None and parts.path in ("", "/")
                and not parts.query and not parts.fragment and not parts.username):
            return f"http://{parts.netloc}"
    raise ConfigurationError(
        f"{key}={value!r} is not accepted; give the plain-HTTP address at which the other hosts reach this"
        " one's server directly, with its port and no path, such as http://10.0.0.5:8000 (the hosts' own"
        " port behind the balancer, where TLS has already ended; not a wildcard such as 0.0.0.0), or None."
    )


def _key_prefix(value: Any, key: str) -> str:
    if isinstance(value, str) and value and value.isprintable() and " " not in value and len(value) <= 64:
        return value
    raise ConfigurationError(
        f"{key}={value!r} is not accepted; give a short name without spaces, such as 'docsync' or 'shop-prod'."
    )


def _origins(value: Any, key: str) -> tuple[str, ...]:
    origins = _list(value, key) or ()
    if origins and "*" not in origins:
        try:
            # Bokeh's own normalization: a bare host means port 80.
            origins = tuple(create_hosts_allowlist(list(origins), None))
        except ValueError as exc:
            raise ConfigurationError(f"{key}: {exc}. Use host or host:port entries.") from None
    return origins


_PARSERS: dict[str, Any] = {
    "url_prefix": _string(none_means="no prefix"),
    "allow_websocket_origin": _origins,
    "secret_key": _string(none_means="BOKEH_SECRET_KEY, or no signing"),
    "sign_sessions": _optional_boolean,
    "generate_session_ids": _boolean,
    "session_token_expiration": _integer(1, "seconds", "300"),
    "keep_alive_ms": _integer(0, "milliseconds", "37000 (0 turns pings off)"),
    # Positive: unused sessions would otherwise never be cleaned up.
    "check_unused_sessions_ms": _integer(1, "milliseconds", "17000"),
    "unused_session_lifetime_ms": _integer(0, "milliseconds", "15000"),
    "websocket_max_message_size": _integer(1, "bytes", "20971520 (20 MiB)", none_means="no limit"),
    "include_headers": _list,
    "exclude_headers": _list,
    "include_cookies": _list,
    "exclude_cookies": _list,
    "outbound_queue_size": _integer(1, "messages", "1024"),
    "outbound_queue_bytes": _integer(1, "bytes", "67108864 (64 MiB)", none_means="no limit but the message count"),
    "recreate_expired_sessions": _optional_boolean,
    "blocking_warning_ms": _integer(0, "milliseconds", "1000 (0 turns the warning off)"),
    "stats_log_ms": _integer(0, "milliseconds", "15000 (0 turns the log off)"),
    "stats_endpoint": _boolean,
    "index": _optional_boolean,
    "index_template": _string(none_means="the built-in index"),
    "index_redirect": _boolean,
    "index_titles": _titles,
    "warm": _boolean,
    "reclaim_memory": _boolean,
    "redis_url": _redis_url,
    "redis_prefix": _key_prefix,
    "advertise_url": _advertise_url,
    "broadcast_max_bytes": _integer(1, "bytes", "262144 (256 KiB)"),
    "broadcast_history": _integer(1, "broadcasts", "10000"),
    "restore_sessions": _boolean,
    # At least 10 ms: below that the flusher would hold the event loop.
    "restore_flush_ms": _integer(10, "milliseconds", "300"),
    "restore_concurrency": _integer(1, "restores", "2"),
    "restore_max_bytes": _integer(1024, "bytes", "262144 (256 KiB)"),
}
