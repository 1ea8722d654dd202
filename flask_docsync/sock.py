"""The Flask side of the WebSocket layer, with flask-sock's route idiom.

``Sock`` gives applications the API they know from flask-sock::

    sock = Sock(app)

    @sock.route("/echo")
    def echo(ws):
        while True:
            ws.send(ws.receive())

but runs on :mod:`flask_docsync.websocket` (whole-message ``sendall`` under
one lock, no compression, proper close codes and TCP close on gevent). The
Bokeh WebSocket routes of the ``docsync`` blueprint use the same pieces.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request

from . import websocket
from .config import DEFAULT_WEBSOCKET_MAX_MESSAGE_SIZE
from .errors import ConnectionClosed, HandshakeError
from .transport import Transport


class WebSocketDone(Response):
    """Ends the WSGI request once its WebSocket is finished, the way the server needs.

    For a connection on the server's socket that is
    :meth:`~flask_docsync.websocket.WebSocket.wsgi_response`; an injected
    transport (the test client's) ends as a ``101`` response with no body.
    """

    def __init__(self, ws: Transport) -> None:
        super().__init__(status=101)
        self._ws = ws

    def __call__(self, environ: Any, start_response: Any) -> Any:  # type: ignore[override]
        if isinstance(self._ws, websocket.WebSocket):
            return self._ws.wsgi_response()
        return super().__call__(environ, start_response)


class HandedOver(Response):
    """Ends a WSGI request whose connection another worker now serves."""

    def __init__(self, detached: websocket.Detached) -> None:
        super().__init__(status=101)
        self._detached = detached

    def __call__(self, environ: Any, start_response: Any) -> Any:  # type: ignore[override]
        return self._detached.release()


def bokeh_app_protocol(path: str) -> str | None:
    """gevent-websocket asks the WSGI app which subprotocol to select."""
    return "bokeh" if path.rstrip("/").endswith("/ws") else None


class Sock:
    """Register plain WebSocket routes, as flask-sock does.

    Options come from the ``SOCK_SERVER_OPTIONS`` config key:
    ``subprotocols`` (the first one the client also offers is selected)
    and ``max_message_size`` (bytes; ``None`` for no limit).

    :param app: Bind at once; without it routes are collected on a
        blueprint registered by :meth:`init_app`.
    """

    def __init__(self, app: Flask | None = None) -> None:
        self._blueprint = Blueprint("flask_docsync_sock", __name__)
        # Apps bound before a route is declared get it directly; weak so a
        # Sock never keeps an app alive.
        self._bound: weakref.WeakSet[Flask] = weakref.WeakSet()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        app.register_blueprint(self._blueprint)
        self._bound.add(app)

    def route(self, path: str, bp: Blueprint | Flask | None = None, **kwargs: Any) -> Callable[..., Any]:
        """Decorator: ``f(ws, **view_args)`` serves WebSocket connections at ``path``."""

        def decorator(f: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(f)
            def websocket_view(*args: Any, **view_args: Any) -> Response:
                options = current_app.config.get("SOCK_SERVER_OPTIONS", {})
                offered = websocket.requested_subprotocols(request.environ)
                chosen = next((p for p in options.get("subprotocols") or () if p in offered), None)
                try:
                    websocket.validate_upgrade(request.environ)
                except HandshakeError as exc:
                    return Response(exc.reason, status=exc.status, mimetype="text/plain")
                ws = websocket.WebSocket.accept(
                    request.environ,
                    subprotocol=chosen,
                    max_message_size=options.get("max_message_size", DEFAULT_WEBSOCKET_MAX_MESSAGE_SIZE),
                )
                try:
                    f(ws, *args, **view_args)
                except ConnectionClosed:
                    pass
                finally:
                    ws.close()
                return WebSocketDone(ws)

            kwargs["websocket"] = True
            if bp is not None:
                bp.route(path, **kwargs)(websocket_view)
                return f
            if not self._blueprint._got_registered_once:
                self._blueprint.route(path, **kwargs)(websocket_view)
            for app in list(self._bound):
                app.route(path, **kwargs)(websocket_view)
            return f

        return decorator
