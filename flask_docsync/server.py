"""The state DocSync keeps per Flask app: applications, sessions, background work.

Transport-neutral. The Flask extension stores one :class:`DocSyncServer`
in ``app.extensions["docsync"]``; the blueprint and the WebSocket adapter
call into it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import gevent

from . import compat
from .apps import AppTarget, build_application
from .config import Settings
from .connection import ServerConnection
from .context import ApplicationContext, RequestData
from .errors import CloseCode, ConfigurationError, SessionError, TokenError, UnknownApplication
from . import deploy, monitor, panel, pubsub, reclaim, registry, relay, restore, routing, signals
from .scheduler import CallbackScheduler, new_session_clock
from .session import ServerSession, live_sessions
from .tokens import TokenPolicy, owner_tag

log = logging.getLogger(__name__)
#: Periodic figures (DEBUG), like bokeh serve's --stats-log-frequency lines.
stats_log = logging.getLogger("flask_docsync.stats")


class DocSyncServer:
    """Applications and sessions of one Flask app.

    Background greenlets (unused-session cleanup and keep-alive pings) start
    lazily with the first session, so importing or configuring an app
    never spawns anything.

    :param settings: The frozen settings.
    :param app_scope: ``app_scope(request)`` returns a context manager
        entered around app code (the Flask app context); see
        :class:`~flask_docsync.context.ApplicationContext`. ``None`` enters
        nothing.

    The background greenlets hold the server weakly: a server (and the
    Flask app holding it) that is dropped without :meth:`stop` ends them at
    their next wake-up instead of being kept alive by them.
    """

    def __init__(
        self,
        settings: Settings,
        app_scope: Callable[[RequestData | None], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        compat.install()
        self.settings = settings
        self.tokens = TokenPolicy(settings)
        self.app_scope = app_scope
        #: ``authorize(route)`` from the adapter: the user, or a refusal.
        self.authorize: Callable[[str], Any] | None = None
        #: The hosts (``host:port``, Bokeh's allowlist patterns) whose own
        #: pages may open WebSockets besides the allowlist's, replacing the
        #: extension's default of Flask's ``TRUSTED_HOSTS`` and the loopback
        #: names (see :func:`~flask_docsync.tokens.origin_refusal`).
        #: ``flask-docsync serve`` sets its bind address here.
        self.same_origin_hosts: tuple[str, ...] | None = None
        self.contexts: dict[str, ApplicationContext] = {}
        self.connections: set[ServerConnection] = set()
        self._greenlets: list[gevent.Greenlet] = []
        #: Returns the memory of discarded sessions to the system (see
        #: :mod:`flask_docsync.reclaim`); the cleanup loop calls it.
        self.reclaimer = reclaim.Reclaimer(lambda: len(live_sessions()), enabled=settings.reclaim_memory)
        #: ``serve(head, client_socket, buffered)`` for connections other
        #: workers hand over; the Flask adapter sets it (it runs the app).
        self.serve_handed_over: Callable[[dict[str, Any], Any, bytes], None] | None = None
        #: The deployment's live workers on every host (see :mod:`flask_docsync.registry`).
        self.registry = registry.Registry(settings.redis_url, settings.redis_prefix, settings.advertise_url)
        #: Which worker is the home of each session (see :mod:`flask_docsync.routing`).
        self.router = routing.Router(
            settings.secret_key_bytes if settings.signed else None, self._serve_handed_over, self.registry
        )
        #: Connections relayed from here to the host of their session.
        self.relays: set[relay.Relay] = set()
        #: Broadcasts to the sessions of every worker (see :mod:`flask_docsync.pubsub`).
        self.broadcasts = pubsub.Hub(
            settings.redis_url, settings.redis_prefix, settings.broadcast_max_bytes, settings.broadcast_history,
        )
        #: Saves sessions for a restore after their worker dies (see
        #: :mod:`flask_docsync.restore`); ``None`` without Redis, since the
        #: saved data must outlive this process.
        self.restorer: restore.Restorer | None = None
        if settings.redis_url is not None:
            self.restorer = restore.Restorer(
                settings.redis_url, settings.redis_prefix, settings.restore_flush_ms,
                settings.restore_concurrency, settings.restore_max_bytes,
                ttl_ms=settings.unused_session_lifetime_ms + settings.check_unused_sessions_ms
                + restore.RECONNECT_GRACE_MS,
                secret=settings.secret_key_bytes,
            )
        self._started = False
        self._stopping = False
        self._stop_hooked = False
        panel.watch()
        #: Folders of the script and directory apps (their component modules
        #: may be imported for a ``/components/`` request; see panel.component_file).
        self.app_dirs: list[str] = []

    def add_application(
        self, route: str, application: Any, logout_url: str | None = None, restore: bool | None = None,
    ) -> ApplicationContext:
        """Serve a built Bokeh ``Application`` at ``route``.

        :param restore: Save and restore its sessions (see
            :mod:`flask_docsync.restore`); ``None`` follows
            ``DOCSYNC_RESTORE_SESSIONS``.
        :raises ConfigurationError: for ``restore=True`` without ``DOCSYNC_REDIS_URL``.
        """
        restores = self.settings.restore_sessions if restore is None else restore
        if restores and self.restorer is None:
            raise ConfigurationError(
                f"App {route}: restoring sessions (add_app(..., restore=True) or DOCSYNC_RESTORE_SESSIONS)"
                " needs DOCSYNC_REDIS_URL: the saved sessions must outlive the worker. Set"
                " DOCSYNC_REDIS_URL=redis://host:6379/0, or pass restore=False."
            )
        if restores and not self.settings.signed:
            raise ConfigurationError(
                f"App {route}: restoring sessions needs signed session ids (set DOCSYNC_SECRET_KEY): only"
                " a signed id proves which worker made a session, and that its token is ours."
            )
        context = ApplicationContext(
            application, route, self.app_scope, logout_url, scheduler_factory=self._make_scheduler,
            on_session_created=functools.partial(self._session_created, route),
            url_root=self.settings.url_prefix,
        )
        context.broadcasts = self.broadcasts
        if restores:
            context.restorer = self.restorer
        self.contexts[route] = context
        return context

    def _session_created(self, route: str, session: ServerSession) -> None:
        self.broadcasts.attach(session)
        signals.session_created.send(self, session=session, route=route)

    def _make_scheduler(self, invoke: Callable[..., Any], name: str) -> CallbackScheduler:
        # The clock comes from the context creating the session: the test
        # client of flask_docsync.testing sets a virtual one around its own
        # requests (scheduler.session_clock); everything else runs on real time.
        return CallbackScheduler(invoke, name, clock=new_session_clock())

    def add_app(
        self, route: str, target: AppTarget, argv: Sequence[str] = (), restore: bool | None = None,
    ) -> ApplicationContext:
        """Build the application ``target`` and serve it at ``route`` (normalized).

        It is built at once, so a broken script fails here, at start-up,
        rather than on its first page view; added to a running server, its
        ``on_server_loaded`` hook runs at once.

        :param restore: See :meth:`add_application`.
        :raises ConfigurationError: when ``route`` is taken, the target
            does not load, or restore is asked for without Redis.
        """
        if route in self.contexts:
            raise ConfigurationError(
                f"An app is already registered at {route!r} in this Flask app; pick another route."
            )
        context = self.add_application(route, build_application(target, argv), restore=restore)
        if isinstance(target, (str, os.PathLike)):
            path = os.path.abspath(os.fspath(target))
            self.app_dirs.append(path if os.path.isdir(path) else os.path.dirname(path))
        if self._started:
            context.run_load_hook()
        return context

    def routes(self) -> list[str]:
        """Every registered route, sorted."""
        return sorted(self.contexts)

    def has_route(self, route: str) -> bool:
        return route in self.contexts

    def get_context(self, route: str) -> ApplicationContext:
        """The context of the app at ``route``.

        :raises UnknownApplication: listing the registered routes.
        """
        context = self.contexts.get(route)
        if context is None:
            raise UnknownApplication(route, self.routes())
        return context

    @property
    def stopping(self) -> bool:
        return self._stopping

    def start(self) -> None:
        """Run ``on_server_loaded`` hooks and start background greenlets (idempotent).

        Inside a gunicorn worker it also hooks the worker's stop signals, so a
        restart closes WebSockets with 1012 (browsers reconnect to a live
        worker) and runs every destroy and unload hook.
        """
        if self._started:
            return
        if self.restorer is not None and any(c.restorer is not None for c in self.contexts.values()):
            # Here, before any session: a page that cannot be saved should
            # fail loudly at once, not log failed saves for ever.
            self.restorer.check()
        self._started = True
        if not self._stop_hooked:
            self._stop_hooked = deploy.on_stop_signal(self._stop_on_signal)
        monitor.enable(self.settings.blocking_warning_ms)
        # Sessions get a home only where there are sibling workers to send
        # their connections elsewhere: a gunicorn worker with siblings.
        self.router.start(active=deploy.worker_count() > 1, holds=self._holds_sessions_of)
        for context in self.contexts.values():
            context.run_load_hook()
        if self.settings.warm:
            for context in self.contexts.values():
                context.warm()
        self.reclaimer.start()
        self.broadcasts.start()
        if self.restorer is not None:
            self.restorer.restart()
        settings = self.settings
        loops = [("docsync-unused-session-cleanup", settings.check_unused_sessions_ms, DocSyncServer._cleanup)]
        if settings.keep_alive_ms > 0:
            loops.append(("docsync-keepalive", settings.keep_alive_ms, DocSyncServer._keepalive))
        if settings.stats_log_ms > 0:
            loops.append(("docsync-stats-log", settings.stats_log_ms, DocSyncServer._log_stats))
        for name, interval_ms, method in loops:
            greenlet = gevent.spawn(_every, interval_ms / 1000.0, weakref.ref(self), method)
            greenlet.name = name
            self._greenlets.append(greenlet)

    def _stop_on_signal(self, name: str) -> None:
        log.info("Worker received %s: closing WebSockets and destroying sessions", name)
        self.stop(CloseCode.SERVICE_RESTART, "server restarting")

    def stop(self, code: int = CloseCode.GOING_AWAY, reason: str = "server shutting down") -> None:
        """Close every connection, destroy every session, run unload hooks."""
        if not self._started or self._stopping:
            return
        self._stopping = True
        # First, so that the browsers' reconnects find this worker gone.
        self.router.stop()
        for relayed in list(self.relays):
            relayed.close()
        for greenlet in self._greenlets:
            greenlet.kill(block=False)
        gevent.joinall(self._greenlets, timeout=5)
        self._greenlets.clear()
        self.reclaimer.stop()
        if self.restorer is not None:
            # Before any WebSocket closes: the browsers reconnect at once, to
            # workers that restore from what is in Redis by then.
            self.restorer.save_all()
        for connection in list(self.connections):
            connection.close(code, reason)
        deadline = gevent.Timeout(5)
        deadline.start()
        try:
            while self.connections:
                gevent.sleep(0.05)
        except gevent.Timeout:
            log.warning("%d connection(s) did not close in time", len(self.connections))
        finally:
            deadline.close()
        if self.restorer is not None:
            # What arrived while the connections closed.
            self.restorer.save_all()
        for context in self.contexts.values():
            context.destroy_all(force=True)
            context.run_unload_hook()
        self.registry.stop()
        self.broadcasts.stop()
        if self.restorer is not None:
            self.restorer.stop()
        self._started = False
        self._stopping = False

    # Sessions

    def create_session(
        self,
        route: str,
        request: RequestData,
        session_id: str | None = None,
        token_extra: dict[str, Any] | None = None,
    ) -> ServerSession:
        """Create (or join) a session for an HTTP request, making its token.

        :param session_id: An id the client brought (``bokeh-session-id``);
            ``None`` generates one. A brought id must be signed when signing
            is on.
        :raises SessionError: when the id is refused.
        """
        context = self.get_context(route)
        if self._stopping:
            raise SessionError(503, "The server is shutting down; retry in a moment.")
        policy = self.tokens
        if session_id is None:
            if not self.settings.generate_session_ids:
                raise SessionError(
                    403, "No bokeh-session-id provided: this server only joins externally signed session ids."
                )
            session_id = policy.new_session_id(owner=self.router.tag)
        else:
            policy.check_session_id(session_id)
        token = policy.make_token(
            session_id, request.arguments, request.headers, request.cookies, token_extra
        )
        _, payload = policy.decode(token)
        self.start()
        return context.create_session_if_needed(session_id, request, token, payload)

    def session_for_token(
        self, route: str, token: str, live_request: RequestData, decoded: tuple[str, dict[str, Any]] | None = None
    ) -> ServerSession:
        """The session a WebSocket's token names, created if this worker lacks it.

        The token's expiry is checked only when the session has to be
        created; a live session accepts its valid token again, so a
        reconnect after the expiry window still reattaches.

        :param decoded: ``tokens.decode(token)`` if the caller has it
            already; ``None`` decodes here.
        """
        context = self.get_context(route)
        if self._stopping:
            raise SessionError(503, "The server is shutting down; retry in a moment.")
        session_id, payload = decoded if decoded is not None else self.tokens.decode(token)
        session = context.get_session(session_id)
        if session is not None and not session.destroyed:
            self.router.figures["attached"] += 1
            owner = context.session_user(session_id)
            if self.authorize is not None and owner != live_request.user:
                # A reconnect must come back as the user the session was made for.
                raise TokenError("This session belongs to another user.")
            return session
        tag = owner_tag(session_id) if self.tokens.signed else None
        # Made by a worker that is gone (a killed or restarted one, or an
        # earlier process): only the heir gets here with such an id (see
        # routing). Made here, or not made by any worker: discarded
        # normally, or never existed.
        owner_gone = tag is not None and tag != self.router.tag
        try:
            self.tokens.check_expiry(payload)
        except TokenError:
            if not self.settings.recreates_expired_sessions or (tag is not None and not owner_gone):
                raise
            # The browser is reconnecting with its page's token to a session
            # whose worker is gone: a fresh session beats a dead page. The
            # signature proves the token is ours.
            log.info("App %s: recreating session %s from an expired token", route, session_id)
        if not session_id:
            raise TokenError("The session token names no session.")
        request = RequestData(
            arguments=payload.get("arguments") or live_request.arguments,
            cookies=payload.get("cookies") or live_request.cookies,
            headers=payload.get("headers") or live_request.headers,
            method=live_request.method,
            path=live_request.path,
            query=live_request.query,
            uri=live_request.uri,
            host=live_request.host,
            protocol=live_request.protocol,
            remote_ip=live_request.remote_ip,
            script_root=live_request.script_root,
            user=live_request.user,
        )
        self.start()
        if owner_gone and context.restorer is not None:
            session = context.restorer.restore(context, session_id, request, token, payload)
        else:
            session = context.create_session_if_needed(session_id, request, token, payload)
        session.made_for_websocket = True
        return session

    def _serve_handed_over(self, head: dict[str, Any], client: Any, buffered: bytes) -> None:
        if self.serve_handed_over is None:
            log.warning("A connection was handed over, but nothing serves them in this process; closing it")
            return
        self.serve_handed_over(head, client, buffered)

    def _holds_sessions_of(self, tag: str) -> bool:
        return any(
            owner_tag(session.id) == tag for context in self.contexts.values() for session in context.sessions
        )

    def serve_relay(self, relayed: relay.Relay) -> None:
        """Copy a connection to and from the host of its session until it ends."""
        if self._stopping:  # opened while the stop closed the others
            relayed.close()
        self.relays.add(relayed)
        try:
            relayed.run()
        finally:
            self.relays.discard(relayed)

    def serve_connection(self, ws: Any, session: ServerSession) -> None:
        """Serve an accepted WebSocket until it closes."""
        settings = self.settings
        connection = ServerConnection(
            ws, session, settings.outbound_queue_size, settings.websocket_max_message_size,
            settings.outbound_queue_bytes,
        )
        self.connections.add(connection)
        try:
            connection.run()
        finally:
            self.connections.discard(connection)

    def has_session(self, route: str, session_id: str) -> bool:
        """Whether this process holds the live session ``session_id`` of ``route``."""
        context = self.contexts.get(route)
        return context is not None and context.get_session(session_id) is not None

    def session_count(self) -> int:
        return sum(len(c.sessions) for c in self.contexts.values())

    def stats(self) -> dict[str, Any]:
        """Figures of this process for monitoring (``flask docsync stats``).

        Cheap enough to log every few seconds: no garbage-collector scans.
        """
        lifetime = self.settings.unused_session_lifetime_ms
        apps = {}
        for route, context in self.contexts.items():
            sessions = context.sessions
            apps[route] = {
                "sessions": len(sessions),
                "unused": sum(
                    1 for s in sessions
                    if s.connection_count == 0 and s.milliseconds_since_last_unsubscribe > lifetime
                ),
                "callbacks": sum(s.callback_count for s in sessions),
                "models": sum(len(s.document.models) for s in sessions if not s.destroyed),
                "callback_runs": context.callback_stats.as_dict(),
            }
        return {
            "pid": os.getpid(),
            "sessions": sum(a["sessions"] for a in apps.values()),
            "live_sessions_in_process": len(live_sessions()),
            "connections": len(self.connections),
            "queued_messages": sum(c.queued for c in self.connections),
            "queued_bytes": sum(c.queued_bytes for c in self.connections),
            "greenlets_scheduled": sum(a["callbacks"] for a in apps.values()),
            "callbacks": {
                key: sum(a["callback_runs"][key] for a in apps.values()) for key in ("runs", "errors", "seconds")
            },
            "reclaim": dict(self.reclaimer.figures),
            "routing": {**self.router.stats(), "relays_open": len(self.relays)},
            "broadcast": self.broadcasts.stats(),
            "restore": self.restorer.stats() if self.restorer is not None else None,
            "apps": apps,
        }

    # Background work, one pass each; see _every.

    def _cleanup(self) -> None:
        lifetime = self.settings.unused_session_lifetime_ms
        discarded = 0
        for context in list(self.contexts.values()):
            try:
                discarded += context.cleanup_unused_sessions(lifetime)
            except Exception:
                log.exception("App %s: unused-session cleanup failed", context.url)
        if discarded:
            self.reclaimer.request()
        self.router.release_heirships(self._holds_sessions_of)

    def _log_stats(self) -> None:
        if not stats_log.isEnabledFor(logging.DEBUG):
            return
        s = self.stats()
        stats_log.debug(
            "[pid %d] %d sessions, %d connections, %d queued messages, %d callbacks run"
            " (%d raised, %.1f s)", s["pid"], s["sessions"], s["connections"],
            s["queued_messages"], s["callbacks"]["runs"], s["callbacks"]["errors"],
            s["callbacks"]["seconds"],
        )
        for route, app in s["apps"].items():
            stats_log.debug("[pid %d] %s has %d sessions with %d unused", s["pid"], route,
                            app["sessions"], app["unused"])
        r = s["routing"]
        if r["active"]:
            stats_log.debug(
                "[pid %d] worker %s: %d WebSockets attached to live sessions, %d handed to other workers,"
                " %d taken from them, %d sessions made anew for gone workers", s["pid"], r["tag"],
                r["attached"], r["handed_over"], r["received"], r["adopted"],
            )
        if r["registry"]["enabled"]:
            stats_log.debug(
                "[pid %d] hosts: %d WebSockets relayed to other hosts (%d open, %d hosts unreachable), %d relayed"
                " here, %d made anew here for lack of Redis; registry %s",
                s["pid"], r["relayed"], r["relays_open"], r["relay_failed"], r["relay_received"],
                r["cross_host_fresh"], "available" if r["registry"]["available"] else "UNAVAILABLE",
            )
        b = s["broadcast"]
        if b["topics"] or b["published"]:
            stats_log.debug(
                "[pid %d] broadcasts: %d published, %d received, %d delivered to %d subscriptions"
                " (%d handler errors), %d in the outbox, %d waiting, reader alive %s s ago, lag %s ms",
                s["pid"], b["published"], b["received"], b["delivered"], b["subscriptions"],
                b["handler_errors"], b["outbox"], b["waiting"], b["reader_seconds_since_alive"], b["lag_ms"],
            )
        r = s["restore"]
        if r is not None and (r["recorded_sessions"] or r["restored"] or r["saved"]):
            stats_log.debug(
                "[pid %d] restore: %d sessions recorded (%d bytes), %d saves (%d failed), %d restored,"
                " %d fresh (mismatch %d, busy %d, Redis error %d, nothing saved %d), %d changes skipped",
                s["pid"], r["recorded_sessions"], r["recorded_bytes"], r["saved"], r["save_errors"], r["restored"],
                r["fresh_because_mismatch"] + r["fresh_because_busy"] + r["fresh_because_error"] + r["nothing_saved"],
                r["fresh_because_mismatch"], r["fresh_because_busy"], r["fresh_because_error"], r["nothing_saved"],
                r["skipped"],
            )

    def _keepalive(self) -> None:
        for connection in list(self.connections):
            try:
                connection.keepalive()
            except Exception:
                log.exception("Keep-alive ping to connection %d failed", connection.id)


def _every(interval: float, ref: weakref.ReferenceType[DocSyncServer], work: Callable[[DocSyncServer], None]) -> None:
    """Run ``work(server)`` every ``interval`` seconds while the server exists.

    Between passes only the weak reference is held, so a server that is
    dropped without :meth:`DocSyncServer.stop` is freed, and this greenlet
    ends at its next wake-up.
    """
    while True:
        gevent.sleep(interval)
        server = ref()
        if server is None:
            return
        try:
            work(server)
        except Exception:
            log.exception("%s failed; it runs again in %g s", work.__name__, interval)
        del server
