"""The Flask extension object."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flask import Flask, current_app, request
from werkzeug.exceptions import SecurityError

from .apps import AppTarget, build_application, normalize_route
from .blueprint import make_blueprint
from .commands import docsync_cli
from .config import Settings
from .errors import ConfigurationError
from . import deploy, embed
from .context import RequestData
from .errors import SessionError
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

    One ``DocSync`` may be bound to several apps; each app keeps its own
    sessions in ``app.extensions["docsync"]``.

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
        self._options = options
        self._authorize = authorize
        self._decorators = tuple(decorators)
        self._targets: dict[str, tuple[AppTarget, tuple[str, ...]]] = {}
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Register the blueprint and keep this app's state in ``app.extensions["docsync"]``.

        :raises ConfigurationError: for invalid settings or an app that
            does not load.
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
        server = DocSyncServer(
            settings,
            app_scope=_make_app_scope(app),
            resolver=self._resolve,
            known_routes=lambda: list(self._targets),
        )
        server.authorize = self._authorize
        app.extensions["docsync"] = server
        app.register_blueprint(
            make_blueprint(settings.url_prefix, settings.index or "/" in self._targets, self._decorators)
        )
        app.before_request(_untrusted_host_logger(settings.url_prefix))
        app.cli.add_command(docsync_cli)
        app.add_template_global(embed.docsync_resources, "docsync_resources")
        app.add_template_global(embed.docsync_document, "docsync_document")
        app.add_template_global(embed.docsync_session, "docsync_session")
        if not hasattr(app, "app_protocol"):
            # Under gevent-websocket's handler (GeventWebSocketWorker) the
            # handshake happens before Flask runs, and the subprotocol comes
            # from this hook; without "bokeh" in the 101 browsers give up.
            app.app_protocol = bokeh_app_protocol  # type: ignore[attr-defined]
        for route in list(self._targets):
            # Apps registered so far load now, so a broken script fails at
            # start-up instead of on the first page view.
            server.get_context(route)

    def _resolve(self, route: str) -> Any:
        entry = self._targets.get(route)
        if entry is None:
            return None
        target, argv = entry
        return build_application(target, argv)

    def add_app(self, route: str | None, target: AppTarget, argv: Sequence[str] = ()) -> str:
        """Serve a Bokeh application at ``route``.

        :param route: The URL path below the blueprint prefix, e.g.
            ``"/sliders"``. ``None`` takes the script's or directory's name,
            as ``bokeh serve`` does.
        :param target: A ``modify_doc(doc)`` function, a bokeh
            ``Application``, or the path of a ``.py`` script, ``.ipynb``
            notebook or app directory.
        :param argv: Arguments a script or directory app sees in ``sys.argv[1:]``.
        :return: The normalized route.
        """
        if route is None:
            if not isinstance(target, (str, os.PathLike)):
                raise ConfigurationError("A route is required unless the target is a path.")
            from .apps import route_for_path

            route = route_for_path(os.fspath(target))
        route = normalize_route(route)
        if route in self._targets:
            raise ConfigurationError(f"An app is already registered at {route!r}.")
        if isinstance(target, (str, os.PathLike)) and not os.path.exists(os.fspath(target)):
            raise ConfigurationError(f"App path {os.fspath(target)!r} does not exist.")
        self._targets[route] = (target, tuple(argv))
        return route

    def app(self, route: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator form of :meth:`add_app` for a ``modify_doc(doc)`` function."""

        def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
            self.add_app(route, func)
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

    @staticmethod
    def test_client(app: Flask, **kwargs: Any) -> Any:
        """A :class:`~flask_docsync.testing.DocSyncTestClient` for ``app``."""
        from .testing import DocSyncTestClient

        return DocSyncTestClient(app, **kwargs)

    @property
    def routes(self) -> list[str]:
        return sorted(self._targets)

    @staticmethod
    def server(app: Flask | None = None) -> DocSyncServer:
        """The :class:`~flask_docsync.server.DocSyncServer` of ``app`` (default: ``current_app``)."""
        target = app if app is not None else current_app
        try:
            return target.extensions["docsync"]
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


def _encode_arguments(arguments: Mapping[str, Any]) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for key, value in arguments.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        out[str(key)] = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in values]
    return out


def create_session(route: str, arguments: Mapping[str, Any] | None = None) -> ServerSession:
    """:meth:`DocSync.create_session` for the current app and request."""
    from .blueprint import authorize, request_data

    if not request:
        raise RuntimeError("create_session needs a request context: call it from a view.")
    server: DocSyncServer = current_app.extensions["docsync"]
    route = normalize_route(route)
    context = server.get_context(route)
    user, refusal = authorize(route)
    if refusal is not None:
        raise SessionError(refusal.status_code, "not authorized")
    data = request_data(user)
    data.arguments = _encode_arguments(arguments or {})
    extra = context.application.process_request(data) or None
    return server.create_session(route, data, None, extra)
