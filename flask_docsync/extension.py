"""The Flask extension object."""

from __future__ import annotations

import functools
import logging
import io
import os
import sys
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flask import Flask, current_app, has_app_context, request
from werkzeug.exceptions import SecurityError

from . import deploy, embed, websocket
from .apps import AppTarget, normalize_route, route_for_path
from .blueprint import add_index_rule, create_session, make_blueprint
from .commands import docsync_cli
from .config import Settings
from .context import RequestData
from .errors import ConfigurationError
from .server import DocSyncServer
from .session import ServerSession
from .sock import bokeh_app_protocol

log = logging.getLogger(__name__)


class DocSync:
    """Serve live Bokeh documents from a Flask app.

    ::

        docsync = DocSync()

        def create_app():
            app = Flask(__name__)
            docsync.init_app(app)
            docsync.add_app("/sliders", "apps/sliders.py")
            return app

    One ``DocSync`` may be bound to many apps (an app factory may run any
    number of times); each app keeps its settings, apps, sessions and
    figures in ``app.extensions["docsync"]`` (a
    :class:`~flask_docsync.server.DocSyncServer`), and the extension object
    keeps only what it was constructed with and the apps registered before
    any ``init_app``.

    :param app: Bind to this app at once (same as calling :meth:`init_app`).
    :param authorize: ``authorize(route)``, called in the request context of
        every page, ``autoload.js``, metadata and WebSocket request (before
        the upgrade) and of :meth:`create_session`. Return the user (any
        truthy value; apps see it as ``session_context.request.user``) to
        allow, a falsy value to refuse with 403, or a response (e.g. a
        redirect to the login page) to send instead. ``None`` allows all.
    :param decorators: View decorators wrapped around the same views, e.g.
        ``[login_required]``.
    :param options: Defaults for the :class:`~flask_docsync.config.Settings`
        fields (``url_prefix``, ``allow_websocket_origin``, ``keep_alive_ms``,
        ...). A ``DOCSYNC_<NAME>`` key in an app's config wins over the
        option of the same name.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        authorize: Callable[[str], Any] | None = None,
        decorators: Sequence[Callable[..., Any]] = (),
        **options: Any,
    ) -> None:
        Settings.check_options(options)
        self._options = options
        self._authorize = authorize
        self._decorators = tuple(decorators)
        # Registered before any app was bound: every app bound gets them.
        self._registrations: dict[str, tuple[AppTarget, tuple[str, ...], bool | None]] = {}
        # Weak, so the extension never keeps an app alive; they only decide
        # where add_app() without app= registers.
        self._bound: weakref.WeakSet[Flask] = weakref.WeakSet()
        self._last_bound: weakref.ReferenceType[Flask] | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Validate the settings, load the registered apps, then register the
        blueprint and keep this app's state in ``app.extensions["docsync"]``.

        Nothing is changed on ``app`` until the settings are valid and every
        app registered so far has loaded, so after a failure a corrected
        retry works.

        :raises ConfigurationError: for an invalid setting (naming the key),
            or an app that does not load.
        """
        if "docsync" in app.extensions:
            raise ConfigurationError("DocSync is already initialized on this app.")
        settings = Settings.load(app.config, self._options)
        if not settings.url_prefix and app.static_url_path == "/static" and app.has_static_folder:
            raise ConfigurationError(
                "With an empty DOCSYNC_URL_PREFIX, BokehJS is served at /static, where this app"
                " already serves its own static folder. Create the app with"
                " Flask(__name__, static_folder=None) (or another static_url_path), or give"
                " DocSync a prefix such as '/docsync'."
            )
        problems = deploy.problems(settings, deploy.worker_count())
        if problems:
            raise ConfigurationError(" ".join(problems))
        server = DocSyncServer(settings, app_scope=_make_app_scope(app))
        server.authorize = self._authorize
        server.serve_handed_over = functools.partial(_serve_handed_over, weakref.ref(app))
        for route, (target, argv, restore) in self._registrations.items():
            # Loaded now, so a broken script fails at start-up instead of
            # on the first page view.
            server.add_app(route, target, argv, restore=restore)

        app.register_blueprint(make_blueprint(
            settings.url_prefix, bool(settings.index) or server.has_route("/"), self._decorators
        ))
        app.before_request(_untrusted_host_logger(settings.url_prefix))
        app.cli.add_command(docsync_cli)
        app.add_template_global(embed.docsync_resources, "docsync_resources")
        app.add_template_global(embed.docsync_document, "docsync_document")
        app.add_template_global(embed.docsync_session, "docsync_session")
        if deploy.uses_gevent_websocket() and not hasattr(app, "app_protocol"):
            # gevent-websocket's handler answers the handshake before Flask
            # runs and takes the subprotocol from this hook of the WSGI
            # app; without "bokeh" in the 101 browsers give up.
            app.app_protocol = bokeh_app_protocol  # type: ignore[attr-defined]
        app.extensions["docsync"] = server
        self._bound.add(app)
        self._last_bound = weakref.ref(app)

    def _registration_app(self) -> Flask | None:
        """Where :meth:`add_app` without ``app=`` registers; ``None`` is the extension."""
        if has_app_context() and current_app._get_current_object() in self._bound:  # type: ignore[attr-defined]
            return current_app._get_current_object()  # type: ignore[attr-defined,no-any-return]
        return self._last_bound() if self._last_bound is not None else None

    def add_app(
        self, route: str | None, target: AppTarget, argv: Sequence[str] = (), *, app: Flask | None = None,
        restore: bool | None = None,
    ) -> str:
        """Serve a Bokeh application at ``route``.

        Where it is registered:

        - with ``app``, in that app (already initialized);
        - otherwise in the current app, inside an app context of an app this
          extension is bound to; else in the app this extension was bound to
          last (so that a factory can call ``init_app`` and then ``add_app``,
          and run again for the next app);
        - before any app is bound, in the extension: every app bound later
          gets it.

        Either way the app is built at once when it goes to a bound app, and
        at :meth:`init_app` otherwise, so a broken script fails at start-up.

        :param route: The URL path below the blueprint prefix, e.g.
            ``"/sliders"``. ``None`` takes the script's or directory's name,
            as ``bokeh serve`` does.
        :param target: A ``modify_doc(doc)`` function, a bokeh
            ``Application``, or the path of a ``.py`` script, ``.ipynb``
            notebook or app directory.
        :param argv: Arguments a script or directory app sees in ``sys.argv[1:]``.
        :param app: The Flask app to register in; ``None`` chooses as above.
        :param restore: Save this app's sessions in Redis and rebuild them
            when a reconnect finds their worker gone (see
            :mod:`flask_docsync.restore`); ``None`` follows
            ``DOCSYNC_RESTORE_SESSIONS``. ``True`` needs ``DOCSYNC_REDIS_URL``
            and signed session ids.
        :return: The normalized route.
        :raises ConfigurationError: for a taken route, a missing path, an
            app that does not load, or restore without Redis.
        """
        if route is None:
            if not isinstance(target, (str, os.PathLike)):
                raise ConfigurationError("A route is required unless the target is a path.")
            route = route_for_path(os.fspath(target))
        route = normalize_route(route)
        if isinstance(target, (str, os.PathLike)) and not os.path.exists(os.fspath(target)):
            raise ConfigurationError(f"App path {os.fspath(target)!r} does not exist.")
        flask_app = app if app is not None else self._registration_app()
        if flask_app is None:
            if route in self._registrations:
                raise ConfigurationError(f"An app is already registered at {route!r}.")
            self._registrations[route] = (target, tuple(argv), restore)
            return route
        server = self.server(flask_app)
        server.add_app(route, target, argv, restore=restore)
        if route == "/" and not server.settings.index:
            add_index_rule(flask_app, server.settings.url_prefix, self._decorators)
        return route

    def app(self, route: str, *, app: Flask | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator form of :meth:`add_app` for a ``modify_doc(doc)`` function."""

        def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
            self.add_app(route, func, app=app)
            return func

        return decorator

    def create_session(self, route: str, arguments: Mapping[str, Any] | None = None) -> ServerSession:
        """Create a session of ``route`` for the current request, in-process.

        The view may read or change the document before the page renders
        (``with session.locked() as doc: ...``), then embed it with
        ``{{ docsync_session(session) }}`` — what ``pull_session`` plus
        ``server_session()`` do with a second server, without one.

        :param arguments: The app's ``session_context.request.arguments``;
            string values are encoded, lists kept. ``None`` gives none.
        :raises SessionError: 403 (or the hook's status) when the
            ``authorize`` hook refuses; no session or token is made.
        :raises UnknownApplication: listing the registered routes.
        """
        return create_session(route, arguments)

    def broadcast(self, topic: str, payload: Any, app: Flask | None = None) -> None:
        """Send ``payload`` to every session subscribed to ``topic``
        (``flask_docsync.subscribe(topic, handler)`` in the app script), in
        every worker and host that shares ``DOCSYNC_REDIS_URL``; without
        Redis, the sessions of this process only.

        Call it from a view (say, after a database write) or a CLI command.
        It returns once the broadcast is in Redis, or queued while Redis is
        unreachable (sent in order when it is back).

        :param payload: A JSON value, at most ``DOCSYNC_BROADCAST_MAX_BYTES``.
        :param app: ``None`` is ``current_app``.
        :raises BroadcastError: for a bad topic or payload, or a full outbox.
        """
        self.server(app).broadcasts.publish(topic, payload)

    def stop(self, app: Flask | None = None) -> None:
        """Stop an app's DocSync work: close its WebSockets (1001), destroy its
        sessions (their hooks run), run the apps' ``on_server_unloaded``
        hooks and end its background greenlets.

        Call it when an app is done with, e.g. at the end of a test fixture;
        the next session starts everything again. Stopping twice does
        nothing. An app dropped without it does not stay alive because of
        DocSync's background greenlets, but sessions with callbacks still
        scheduled do keep it.

        :param app: The app to stop; ``None`` is ``current_app``.
        """
        self.server(app).stop()

    @property
    def routes(self) -> list[str]:
        """The routes of the app :meth:`add_app` without ``app=`` registers in
        (the current app, else the app bound last), or before any app is
        bound, the extension's own.

        Any app's own routes are ``docsync.server(app).routes()``.
        """
        flask_app = self._registration_app()
        if flask_app is None:
            return sorted(self._registrations)
        return self.server(flask_app).routes()

    @staticmethod
    def server(app: Flask | None = None) -> DocSyncServer:
        """The :class:`~flask_docsync.server.DocSyncServer` of ``app`` (default: ``current_app``)."""
        target = app if app is not None else current_app
        try:
            return target.extensions["docsync"]  # type: ignore[no-any-return]
        except KeyError:
            raise ConfigurationError("DocSync is not initialized on this app; call docsync.init_app(app).") from None


def _untrusted_host_logger(url_prefix: str) -> Callable[[], None]:
    """A ``before_request`` hook logging requests Flask refuses for their ``Host``.

    With ``TRUSTED_HOSTS`` set, Flask answers 400 to a request for any other
    host (a DNS-rebinding page's, for one) before a view runs, and logs
    nothing. For this extension's URLs the refusal gets a log line, as every
    other refusal of a document or WebSocket does.
    """

    def log_untrusted_host() -> None:
        exc = request.routing_exception
        if isinstance(exc, SecurityError) and request.path.startswith(url_prefix + "/"):
            log.warning(
                "Refused %s %s (400): %s Flask's TRUSTED_HOSTS does not name it; if this site is"
                " served under that name, add it there.", request.method, request.path, exc.description,
            )

    return log_untrusted_host


def _make_app_scope(app: Flask) -> Callable[[RequestData | None], Any]:
    """``scope(request)``: the Flask app context app code runs in.

    It carries a URL adapter bound to the request that created the session,
    so ``url_for`` works in callbacks (also ``_external=True``) without the
    cost of a whole request context per callback. Adapters are shared by
    sessions of the same host and prefix.
    """

    @functools.lru_cache(maxsize=256)
    def adapter(host: str, script_root: str, scheme: str) -> Any:
        return app.url_map.bind(host, script_name=script_root or "/", url_scheme=scheme)

    def scope(data: RequestData | None) -> Any:
        ctx = app.app_context()
        if data is not None and data.host:
            ctx.url_adapter = adapter(data.host, data.script_root, data.protocol)
        return ctx

    return scope


def _serve_handed_over(app_ref: weakref.ReferenceType[Flask], head: dict[str, Any], client: Any, buffered: bytes) -> None:
    """Serve a WebSocket upgrade another worker handed over, as if this worker had accepted it.

    The request runs through the Flask app again, view decorators, the
    ``authorize`` hook and every check included (the process-level WSGI
    middleware already ran in the worker that read the request). What the
    view answers other than the upgrade is written to the client as an HTTP
    response that closes the connection.
    """
    app = app_ref()
    if app is None:
        return
    environ: dict[str, Any] = dict(head)
    environ.update({
        "wsgi.version": (1, 0), "wsgi.input": io.BytesIO(b""), "wsgi.errors": sys.stderr,
        "wsgi.multithread": False, "wsgi.multiprocess": True, "wsgi.run_once": False,
        websocket.HANDOVER_KEY: (client, buffered),
    })
    environ.setdefault("wsgi.url_scheme", "http")
    started: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started[:] = [status, headers]
        return lambda data: None

    body = Flask.wsgi_app(app, environ, start_response)
    try:
        chunks = b"".join(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    if not started or started[0].startswith("101"):
        return  # the WebSocket was served and is finished
    status, headers = started
    lines = [f"HTTP/1.1 {status}"] + [f"{k}: {v}" for k, v in headers if k.lower() not in ("connection", "content-length")]
    lines += [f"Content-Length: {len(chunks)}", "Connection: close"]
    try:
        client.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + chunks)
    except OSError:
        pass
