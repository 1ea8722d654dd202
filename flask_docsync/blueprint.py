"""The Flask side: HTTP routes and the WebSocket route of the ``docsync`` blueprint.

URLs are the ones ``bokeh serve`` gives, under the blueprint's prefix::

    <prefix>/                      index of apps (or a redirect to the only one)
    <prefix>/static/<file>         BokehJS from the installed bokeh, versioned
    <prefix>/static/extensions/... compiled Bokeh extensions
    <prefix><app>                  the app page
    <prefix><app>/autoload.js      script for bokeh.embed.server_document
    <prefix><app>/metadata         the app's metadata as JSON
    <prefix><app>/static/<file>    a directory app's static/ folder
    <prefix><app>/ws               the Bokeh protocol WebSocket
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlparse

from bokeh.core.templates import AUTOLOAD_JS
from bokeh.embed.bundle import URL, Bundle, Script, bundle_for_objs_and_resources, extension_dirs
from bokeh.core.has_props import HasProps
from bokeh.embed.elements import html_page_for_render_items, script_for_render_items
from bokeh.embed.util import RenderItem
from bokeh.resources import Resources
from bokeh.settings import settings as bokeh_settings
from flask import Blueprint, Flask, Response, abort, current_app, jsonify, redirect, render_template, request, send_file, send_from_directory
from markupsafe import escape
from werkzeug.wrappers import Response as BaseResponse

from . import handover, panel, relay, routing, websocket
from .apps import normalize_route
from .context import RequestData
from .errors import ConfigurationError, ConnectionClosed, HandshakeError, SessionError, TokenError, UnknownApplication
from .tokens import origin_refusal
from .sock import HandedOver, WebSocketDone
from .transport import ENVIRON_KEY

if TYPE_CHECKING:
    from .server import DocSyncServer
    from .session import ServerSession

log = logging.getLogger(__name__)

#: Versioned static URLs never change content, so browsers may keep them
#: for ten years, as Bokeh's server tells them.
LONG_CACHE_SECONDS = 315_360_000

_TEMPLATE_FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "templates")
if not os.path.isdir(_TEMPLATE_FOLDER):  # installed: templates are package data
    _TEMPLATE_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")


def _server() -> DocSyncServer:
    return current_app.extensions["docsync"]


@functools.lru_cache(maxsize=512)
def _file_version(path: str, mtime: float) -> str:
    digest = hashlib.sha512()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()


def version_path(path: str) -> str:
    """Bokeh's ``?v=<sha512>`` static URL versioning (plain paths in BOKEH_DEV mode)."""
    if bokeh_settings.dev:
        return path
    full = os.path.join(bokeh_settings.bokehjs_path(), path)
    try:
        return f"{path}?v={_file_version(full, os.path.getmtime(full))}"
    except OSError:
        return path


def resources(server_url: str | None = None) -> Resources:
    """BokehJS resources served by this blueprint, as the current request sees it."""
    mode = bokeh_settings.resources(default="server")
    if mode not in ("server", "server-dev"):
        return Resources(mode=mode)
    base = server_url.rstrip("/") if server_url else ""
    root_url = f"{base}{request.script_root}{_server().settings.url_prefix}/"
    return Resources(mode=mode, root_url=root_url, path_versioner=version_path)


#: Rendered BokehJS script and style tags of app pages, by what they depend on.
_page_resources: dict[tuple[Any, ...], tuple[str, str, Bundle]] = {}


def _cached_bundle(res: Resources) -> tuple[str, str, Bundle]:
    key = (res.mode, res.root_url, res.minified, res.log_level, len(HasProps.model_class_reverse_map))
    cached = _page_resources.get(key)
    if cached is None:
        if len(_page_resources) >= 64:  # e.g. many Host names seen through a proxy
            _page_resources.clear()
        bundle = served_bundle(res)
        js, css = bundle
        cached = _page_resources[key] = (js, css, bundle)
    return cached


def page_resources(res: Resources) -> tuple[str, str]:
    """The BokehJS ``<script>`` and ``<link>`` tags of an app page.

    The same for every page served with the same resources, so they are
    rendered once rather than for each session (a few milliseconds each).
    The number of known model classes is part of the key because importing
    a custom extension model adds that extension's script.
    """
    js, css, _ = _cached_bundle(res)
    return js, css


def page_bundle(res: Resources) -> Bundle:
    """The bundle behind :func:`page_resources` (not to be modified)."""
    return _cached_bundle(res)[2]


def served_bundle(res: Resources | None) -> Bundle:
    """Bokeh's script and style bundle for a page, with every extension file
    under this blueprint.

    ``None`` for ``res`` gives the bundle without BokehJS's own files, as
    with Bokeh. Bokeh takes a model's ``__javascript__``/``__css__`` entries
    as they are. Panel's, in server mode, are paths such as
    ``static/extensions/panel/bundled/...`` relative to the page: right for
    a server at ``/`` and a page at its root, wrong under a URL prefix or on
    an app page (``/docsync/app/``). They are made absolute under the root
    URL, where :func:`extension_static` serves them; so are files of
    Panel's bundle that Panel names by their CDN URL
    (:func:`flask_docsync.panel.served_path`).
    """
    bundle = bundle_for_objs_and_resources(None, res)
    root = res.root_url if res is not None and res.mode in ("server", "server-dev") else None
    if root:
        def served(url: URL) -> URL:
            path = panel.served_path(url.url)
            return URL(root + path) if path.startswith("static/") else url

        bundle.js_files = [served(url) for url in bundle.js_files]
        bundle.css_files = [served(url) for url in bundle.css_files]
    return bundle


def request_data(user: Any = None) -> RequestData:
    """What a session keeps of the current Flask request."""
    return RequestData(
        arguments={k: [v.encode("utf-8") for v in request.args.getlist(k)] for k in request.args},
        cookies=dict(request.cookies),
        headers=dict(request.headers.items()),
        method=request.method,
        path=request.path,
        query=request.query_string.decode("latin-1"),
        uri=request.full_path if request.query_string else request.path,
        host=request.host,
        protocol=request.scheme,
        remote_ip=request.remote_addr,
        script_root=request.script_root,
        user=user,
    )


def _refuse(status: int, reason: str, headers: Any = None) -> Response:
    return Response(str(escape(reason)) + "\n", status=status, mimetype="text/plain", headers=headers)


def authorize(route: str) -> tuple[Any, Response | None]:
    """Run the host app's ``authorize(route)`` hook for the current request.

    :return: ``(user, None)`` when allowed (``user`` is what the hook
        returned, ``None`` without a hook), or ``(None, response)`` with the
        refusal to send: the hook's own response (e.g. a redirect to the
        login page), or 403.
    """
    hook = _server().authorize
    if hook is None:
        return None, None
    result = hook(route)
    if isinstance(result, BaseResponse):
        return None, result
    if not result:
        log.info("Refused %s %s: not authorized", request.method, request.path)
        return None, _refuse(403, "You are not allowed to use this document.")
    return result, None


def _authorized(route: str) -> Any:
    """The user :func:`authorize` allows; otherwise the request ends with its refusal."""
    user, refusal = authorize(route)
    if refusal is not None:
        abort(refusal)
    return user


def _session_for_http(route: str, user: Any = None):
    """Create or join the session of a page or autoload.js request (Bokeh's rules)."""
    server = _server()
    context = server.get_context(route)
    token = request.args.get("bokeh-token")
    arg_id = request.args.get("bokeh-session-id")
    header_id = request.headers.get("Bokeh-Session-Id")
    if arg_id is not None and header_id is not None:
        raise SessionError(403, "session ID was provided as an argument and header")
    session_id = arg_id if arg_id is not None else header_id
    data = request_data(user)
    if token is not None:
        if session_id is not None:
            raise SessionError(403, "Both token and session ID were provided")
        return server.session_for_token(route, token, data), token
    # Application.process_request hooks get the request data (arguments,
    # cookies, headers, ...), the parts of Tornado's request they use.
    extra = context.application.process_request(data) or None
    session = server.create_session(route, data, session_id, extra)
    return session, session.token


def _app_route(app_path: str) -> str:
    try:
        route = normalize_route(app_path) if app_path else "/"
    except ConfigurationError:
        base, _, last = app_path.rstrip("/").rpartition("/")
        if last == "ws" and _server().has_route(normalize_route(base) if base else "/"):
            # A plain GET of the WebSocket URL lands on the page rule.
            log.warning("WebSocket %s refused (400): not a WebSocket upgrade request", request.path)
            abort(Response("This URL takes a WebSocket connection (Upgrade: websocket).\n",
                           status=400, mimetype="text/plain"))
        abort(404)
    if not _server().has_route(route):
        abort(404)
    return route


def _error_response(exc: Exception) -> Response:
    if isinstance(exc, UnknownApplication):
        return _refuse(404, str(exc))
    if isinstance(exc, SessionError):
        log.warning("Refused session request %s: %s", request.path, exc.reason)
        return _refuse(exc.status, exc.reason)
    raise exc


def page(app_path: str = "") -> Response:
    route = _app_route(app_path)
    user = _authorized(route)
    try:
        session, _ = _session_for_http(route, user)
    except (SessionError, UnknownApplication) as exc:
        return _error_response(exc)
    doc = session.document
    if panel.is_panel_document(doc):
        return Response(panel.page_html(session, resources()), mimetype="text/html")
    # What bokeh.embed.server_html_page_for_session does, with the
    # resources rendered once.
    item = RenderItem(token=session.token, roots=doc.roots, use_for_title=True)
    html = html_page_for_render_items(
        page_resources(resources()), {}, [item], doc.title,
        template=doc.template, template_variables=doc.template_variables or {},
    )
    return Response(html, mimetype="text/html")


def autoload_js(app_path: str = "") -> Response:
    route = _app_route(app_path)
    origin = request.headers.get("Origin")
    if request.method == "OPTIONS":
        response = Response("", status=200)
        if origin:
            # Bokeh 3.9 fails with 500 here when there is no Origin.
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Methods"] = "PUT, GET, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = "*"
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers["Vary"] = "Origin"
        return response
    element_id = request.args.get("bokeh-autoload-element")
    if not element_id:
        # Checked before a session exists; Bokeh creates one first and leaks it.
        return _refuse(400, "No bokeh-autoload-element query parameter")
    app_url_path = request.args.get("bokeh-app-path", "/")
    absolute_url = request.args.get("bokeh-absolute-url")
    server_url = None
    if absolute_url:
        parsed = urlparse(absolute_url)
        server_url = f"{parsed.scheme}://{parsed.netloc}"
    user = _authorized(route)
    try:
        session, token = _session_for_http(route, user)
    except (SessionError, UnknownApplication) as exc:
        return _error_response(exc)
    res = resources(server_url) if request.args.get("resources", "default") != "none" else None
    if res is not None and panel.is_panel_document(session.document):
        js = panel.autoload_js(session, res, element_id, app_url_path, absolute_url)
    else:
        bundle = served_bundle(res)
        render_items = [RenderItem(token=token, elementid=element_id, use_for_title=False)]
        bundle.add(Script(script_for_render_items({}, render_items, app_path=app_url_path, absolute_url=absolute_url)))
        js = AUTOLOAD_JS.render(bundle=bundle, elementid=element_id)
    response = Response(js, mimetype="application/javascript")
    if origin and request.cookies:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
    else:
        response.headers["Access-Control-Allow-Origin"] = "*"
    response.headers["Access-Control-Allow-Headers"] = "*"
    response.headers["Access-Control-Allow-Credentials"] = "true"
    return response


def metadata(app_path: str = "") -> Response:
    route = _app_route(app_path)
    _authorized(route)
    context = _server().get_context(route)
    data = context.application.metadata
    if callable(data):
        data = data()
    return jsonify({"url": context.url, "data": data if data is not None else {}})


def app_static(app_path: str, filename: str) -> Response:
    route = _app_route(app_path)
    static_path = _server().get_context(route).application.static_path
    if static_path is None:
        return bokehjs_static(filename)
    return send_from_directory(static_path, filename)


def bokehjs_static(filename: str) -> Response:
    max_age = LONG_CACHE_SECONDS if request.args.get("v") else None
    return send_from_directory(bokeh_settings.bokehjs_path(), filename, max_age=max_age)


def favicon() -> Response:
    """Panel's icon when Panel is in use (its pages link it), else Bokeh's."""
    ico = panel.favicon_path() or os.path.join(os.path.dirname(bokeh_settings.ico_path()), "bokeh.ico")
    if not os.path.isfile(ico):
        return _refuse(404, "No favicon")
    return send_file(ico, mimetype="image/x-icon", max_age=86400)


def panel_component(path: str) -> Response:
    """A file a Panel component lists as its own (``panel serve``'s ``/components/``)."""
    try:
        filename = panel.component_file(path, _server().app_dirs)
    except panel.ComponentRefused as exc:
        log.info("Refused Panel component asset %s (%d): %s", path, exc.status, exc.reason)
        return _refuse(exc.status, f"Component asset {path}: {exc.reason}")
    if not os.path.isfile(filename):
        return _refuse(404, f"Component asset {path}: no such file")
    return send_file(filename)


def extension_static(filename: str) -> Response:
    name, _, rest = filename.partition("/")
    # A page rendered by another worker may ask for Panel's files here
    # before anything in this process has imported Panel.
    directory = extension_dirs.get(name) or (panel.dist_dir() if name == "panel" else None)
    if directory is None or not rest:
        abort(404)
    max_age = LONG_CACHE_SECONDS if request.args.get("v") else None
    return send_from_directory(directory, rest, max_age=max_age)


def index() -> Response:
    server = _server()
    if "/" in server.routes():
        return page("")
    settings = server.settings
    if not settings.index:
        abort(404)
    routes = sorted(server.routes())
    titles = dict(settings.index_titles)
    prefix = request.script_root + settings.url_prefix
    if len(routes) == 1 and settings.index_redirect:
        return redirect(prefix + routes[0], code=302)
    if settings.index_template:
        with open(settings.index_template, encoding="utf-8") as f:
            source = f.read()
        return Response(current_app.jinja_env.from_string(source).render(
            prefix=prefix, items=routes, titles=titles), mimetype="text/html")
    return Response(render_template("docsync/index.html", prefix=prefix, items=routes, titles=titles),
                    mimetype="text/html")


def ws(app_path: str = "") -> Response:
    route = _app_route(app_path)
    server = _server()
    environ = request.environ
    if not websocket.is_websocket_request(environ):
        log.warning("WebSocket %s refused (400): not a WebSocket upgrade request", request.path)
        return _refuse(400, "This URL takes a WebSocket connection (Upgrade: websocket).")
    try:
        websocket.validate_upgrade(environ)
    except HandshakeError as exc:
        log.warning("WebSocket %s refused (%d): %s", request.path, exc.status, exc.reason)
        return _refuse(exc.status, exc.reason, exc.headers)
    hops, refused = _relay_hops(server, environ)
    if refused is not None:
        return refused
    origin = request.headers.get("Origin") or request.headers.get("Sec-WebSocket-Origin")
    # Flask 3.1 refuses requests for other hosts (400) before this view when
    # TRUSTED_HOSTS is set; the config is read too for a Flask that does not.
    trusted_hosts = request.trusted_hosts or current_app.config.get("TRUSTED_HOSTS")
    reason = origin_refusal(origin, request.host, request.scheme, server.settings.allow_websocket_origin,
                            trusted_hosts=trusted_hosts, same_origin_hosts=server.same_origin_hosts)
    if reason is not None:
        return _refuse_ws(environ, 403, reason)
    user, refusal = authorize(route)
    if refusal is not None:
        # Before the upgrade, so the browser sees a status, never a silent close.
        status = refusal.status_code if 400 <= refusal.status_code < 500 else 401
        return _refuse_ws(environ, status, "Not authorized to open this document's WebSocket.")
    protocols = websocket.requested_subprotocols(environ)
    if len(protocols) != 2 or protocols[0] != "bokeh":
        return _refuse_ws(
            environ, 403,
            "Expected the subprotocols 'bokeh' and a session token (new WebSocket(url, ['bokeh', token])).",
        )
    try:
        # Once: routing trusts the owner's tag only under the signature, and
        # the session lookup needs the payload.
        decoded = server.tokens.decode(protocols[1])
    except TokenError as exc:
        return _refuse_ws(environ, exc.status, exc.reason)
    handed = _route_to_home(server, route, decoded[0], environ, hops)
    if handed is not None:
        return handed
    try:
        session = server.session_for_token(route, protocols[1], request_data(user), decoded)
    except TokenError as exc:
        return _refuse_ws(environ, exc.status, exc.reason)
    except SessionError as exc:
        return _refuse_ws(environ, exc.status, exc.reason)
    except UnknownApplication as exc:
        return _refuse_ws(environ, 404, str(exc))
    except Exception:
        log.exception("App %s: could not create the session for a WebSocket", route)
        return _refuse_ws(environ, 500, "The application failed to create the session; see the server log.")
    # Not discarded between here and the connection's subscription: the
    # handshake may yield to the cleanup loop.
    session.block_expiration()
    try:
        try:
            conn = websocket.WebSocket.accept(
                environ, subprotocol="bokeh", max_message_size=server.settings.websocket_max_message_size
            )
        except ConnectionClosed as exc:
            # Nothing to answer: the session stays for the client's reconnect.
            log.info("WebSocket %s: the client went away during the handshake (%s)", request.path, exc.reason)
            return Response(status=400)
        server.serve_connection(conn, session)
    finally:
        session.unblock_expiration()
    return WebSocketDone(conn)


#: Reasons already logged why a connection could not be handed over: each
#: applies to every connection of the process, so it is said once.
_NOT_ROUTED: set[str] = set()

#: What a handed-over request keeps of the WSGI environ: the CGI variables
#: and the HTTP headers, the rest belongs to the process that read it.
_HANDOVER_KEYS = ("REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "SERVER_NAME", "SERVER_PORT",
                  "SERVER_PROTOCOL", "REMOTE_ADDR", "REMOTE_PORT", "wsgi.url_scheme", "CONTENT_TYPE",
                  "CONTENT_LENGTH")


def _relay_path() -> str:
    """The path and query a relay's MAC covers, the same on both hosts."""
    query = request.environ.get("QUERY_STRING", "")
    return request.path + ("?" + query if query else "")


def _relay_hops(server: DocSyncServer, environ: Any) -> tuple[int, Response | None]:
    """How many times the request was relayed by another host, or the refusal of a bad relay.

    A verified relay brings the client's address and scheme, which replace
    the relaying host's for every check that follows. A request handed over
    by a worker of this host was checked by that worker already.
    """
    value = environ.get(relay.ENVIRON_HEADER)
    if value is None:
        return 0, None
    if websocket.HANDOVER_KEY in environ:
        return relay.MAX_HOPS, None
    secret = server.settings.secret_key_bytes if server.settings.signed else None
    peer = environ.get("REMOTE_ADDR")
    try:
        if secret is None:
            raise relay.RelayRefused("this server signs no session ids, so it has no secret to check the relay with")
        relayed = relay.verify(value, secret, environ.get("REQUEST_METHOD", ""), _relay_path(),
                               relay.headers_digest(environ))
    except relay.RelayRefused as exc:
        return 0, _refuse_ws(environ, 403, f"Refused a WebSocket relayed by {peer}: {exc}.")
    if relayed.host != server.router.host:
        return 0, _refuse_ws(
            environ, 502,
            f"A WebSocket relayed by {peer} for host {relayed.host} reached host {server.router.host}: the"
            f" DOCSYNC_ADVERTISE_URL of host {relayed.host} names this one; give each host its own address.",
        )
    server.router.figures["relay_received"] += 1
    client = environ.get(relay.ENVIRON_FOR_HEADER)
    if client:
        environ["REMOTE_ADDR"] = request.remote_addr = client
    environ["wsgi.url_scheme"] = request.scheme = relayed.scheme
    return relayed.hops, None


def _relay_head(server: DocSyncServer, environ: Any, hops: int, host: str) -> bytes:
    """The upgrade request as host ``host`` gets it from a relay: the client's, signed."""
    target = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if not target:
        target = quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""))
        if environ.get("QUERY_STRING"):
            target += "?" + environ["QUERY_STRING"]
    forwarded = {
        key: value for key, value in environ.items()
        if key.startswith("HTTP_") and isinstance(value, str)
        and key not in (relay.ENVIRON_HEADER, relay.ENVIRON_FOR_HEADER)
    }
    forwarded[relay.ENVIRON_FOR_HEADER] = environ.get("REMOTE_ADDR") or ""
    signature = relay.sign(
        server.settings.secret_key_bytes or b"", hops + 1, host, environ.get("wsgi.url_scheme", "http"),
        environ.get("REQUEST_METHOD", "GET"), _relay_path(), relay.headers_digest(forwarded),
    )
    headers = [("-".join(part.capitalize() for part in key[5:].split("_")), value) for key, value in forwarded.items()]
    headers.append((relay.HEADER, signature))
    return relay.request_head(environ.get("REQUEST_METHOD", "GET"), target, headers)


def _route_to_home(server: DocSyncServer, route: str, session_id: str, environ: Any, hops: int = 0) -> Response | None:
    """Hand the WebSocket to the worker that holds its session; ``None`` serves it here.

    ``session_id`` comes from a token whose signature has been checked: the
    owner's tag is trusted only under it. A session this worker already
    holds is served here. A session of another host is relayed there
    (unless the request was relayed here already, ``hops``).
    """
    if "wsgi.websocket" in environ or ENVIRON_KEY in environ:
        return None
    server.start()  # a worker that has made no session yet still routes
    if not server.router.active:
        return None
    if not server.router.owner_elsewhere(session_id):
        return None
    # A copy here is the session's home unless its owner may be alive on
    # another host: one made while Redis could not be asked gives way to the
    # owner once it can, so that every reconnect finds the same one.
    held_here = server.has_session(route, session_id)
    if held_here and not server.router.may_live_elsewhere(session_id):
        return None
    try:
        detached = websocket.Detached(environ)
    except HandshakeError as exc:
        if exc.reason not in _NOT_ROUTED:
            _NOT_ROUTED.add(exc.reason)
            log.warning(
                "WebSockets that reach a worker other than their session's are served from the token"
                " there, as a second copy of the session: %s", exc.reason,
            )
        return None
    head = {key: environ[key] for key in _HANDOVER_KEYS if isinstance(environ.get(key), str)}
    head.update({key: value for key, value in environ.items() if key.startswith("HTTP_") and isinstance(value, str)})
    secret = server.settings.secret_key_bytes or b""
    opened: list[relay.Relay] = []

    def open_relay(url: str, host: str) -> None:
        opened.append(relay.Relay.open(detached.sock, url, _relay_head(server, environ, hops, host), detached.buffered))

    try:
        outcome = server.router.deliver(
            session_id, lambda address: handover.hand_over(address, secret, detached.sock, head, detached.buffered),
            open_relay, hops, held_here,
        )
    except handover.HandOverFailed as exc:
        server.router.figures["handover_failed"] += 1
        return _refuse_ws(environ, 503, f"The worker holding this session did not take the connection ({exc}); retry.")
    if outcome is routing.Outcome.RELAYED:
        log.debug("WebSocket %s relayed to the host holding session %s", request.path, session_id)
        server.serve_relay(opened[0])
        return HandedOver(detached)
    if outcome is not routing.Outcome.HANDED:
        return None
    log.debug("WebSocket %s handed to the worker holding session %s", request.path, session_id)
    return HandedOver(detached)


def _refuse_ws(environ: Any, status: int, reason: str) -> Response:
    log.warning("WebSocket %s refused (%d): %s", request.path, status, reason)
    if "wsgi.websocket" in environ:
        # gevent-websocket has already completed the handshake: all that is
        # left is a close frame with a policy code.
        conn = websocket.WebSocket.accept(environ)
        conn.close(1008 if status in (401, 403) else 1011, reason[:120])
        return WebSocketDone(conn)
    return _refuse(status, reason)


#: Headers a proxy adds to what it forwards (``Via`` is required of HTTP
#: proxies by RFC 9110; nginx adds the others when configured to). Behind a
#: proxy on the same machine every client connects from loopback, so only a
#: request that carries none of them can be the operator's own.
FORWARDING_HEADERS = ("Forwarded", "Via", "X-Real-IP", "X-Forwarded-For", "X-Forwarded-Host",
                      "X-Forwarded-Proto", "X-Forwarded-Port", "X-Forwarded-Prefix")


def _is_loopback_address(address: str | None) -> bool:
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:  # a Unix socket gives "" or None
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # "::ffff:127.0.0.1" on dual-stack sockets
    return (mapped or ip).is_loopback


def stats() -> Response:
    """The process's figures as JSON, for the operator on the server machine.

    Off (404) unless ``DOCSYNC_STATS_ENDPOINT`` is set. The figures describe
    the whole process, so they are refused (403) to a client that is not on
    loopback, and to any request that came through a proxy: behind a proxy
    on the same machine (nginx in front of gunicorn, without ``ProxyFix``)
    every visitor's request arrives from ``127.0.0.1``.
    """
    server = _server()
    if not server.settings.stats_endpoint:
        abort(404)
    # Where the TCP connection came from, and the mount point without any
    # proxy's: ProxyFix replaces both with values taken from headers (and
    # leaves the headers in place, so the check below sees them).
    environ = request.environ
    orig = environ.get("werkzeug.proxy_fix.orig") or {}
    peer = orig.get("REMOTE_ADDR", environ.get("REMOTE_ADDR"))
    script_name = (orig.get("SCRIPT_NAME") if orig else environ.get("SCRIPT_NAME")) or ""
    forwarded = [name for name in FORWARDING_HEADERS if name in request.headers]
    if forwarded:
        reason = (
            f"Stats are not served through a proxy (this request carries {', '.join(forwarded)}):"
            " behind a proxy on the same machine every visitor looks like a loopback client."
            " Ask the app's own address from the server machine, e.g. flask docsync stats --url"
            f" http://127.0.0.1:<port>{script_name}{server.settings.url_prefix}"
        )
    elif not _is_loopback_address(peer):
        reason = (
            f"Stats are served to loopback clients only, not to {peer or 'an unknown address'}:"
            " ask from the server machine itself."
        )
    else:
        return jsonify(server.stats())
    log.warning("Refused %s from %s (403): %s", request.path, peer or "?", reason)
    return _refuse(403, reason)


def _guarded(view: Callable[..., Any], decorators: Sequence[Callable[..., Any]]) -> Callable[..., Any]:
    for decorator in reversed(list(decorators)):
        view = decorator(view)
    return view


def make_blueprint(
    url_prefix: str, with_index: bool = True, decorators: Sequence[Callable[..., Any]] = ()
) -> Blueprint:
    """The ``docsync`` blueprint mounted at ``url_prefix``.

    :param with_index: Route the prefix root to the index (or to an app at
        ``/``). Off when the host app owns ``/``.
    :param decorators: View decorators of the host app (e.g. Flask-Login's
        ``login_required``) wrapped around every view that reaches a
        document: page, autoload.js, metadata and the WebSocket.
    """

    def guarded(view: Callable[..., Any]) -> Callable[..., Any]:
        return _guarded(view, decorators)

    bp = Blueprint("docsync", __name__, template_folder=_TEMPLATE_FOLDER, url_prefix=url_prefix or None)
    if with_index:
        bp.add_url_rule("/", "index", guarded(index), strict_slashes=False)
    bp.add_url_rule("/_stats", "stats", stats)
    bp.add_url_rule("/static/extensions/<path:filename>", "extension_static", extension_static)
    bp.add_url_rule("/static/<path:filename>", "bokehjs_static", bokehjs_static)
    bp.add_url_rule("/components/<path:path>", "panel_component", panel_component)
    if url_prefix:
        # Panel's pages link <root>/favicon.ico; at the site's root it is the host app's.
        bp.add_url_rule("/favicon.ico", "favicon", favicon)
    bp.add_url_rule("/ws", "root_ws", guarded(ws), websocket=True)
    bp.add_url_rule("/autoload.js", "root_autoload_js", guarded(autoload_js), methods=["GET", "OPTIONS"])
    bp.add_url_rule("/metadata", "root_metadata", guarded(metadata))
    bp.add_url_rule("/<path:app_path>/ws", "ws", guarded(ws), websocket=True)
    bp.add_url_rule("/<path:app_path>/autoload.js", "autoload_js", guarded(autoload_js), methods=["GET", "OPTIONS"])
    bp.add_url_rule("/<path:app_path>/metadata", "metadata", guarded(metadata))
    bp.add_url_rule("/<path:app_path>/static/<path:filename>", "app_static", app_static)
    bp.add_url_rule("/<path:app_path>/", "page", guarded(page), strict_slashes=False)
    return bp


def add_index_rule(app: Flask, url_prefix: str, decorators: Sequence[Callable[..., Any]] = ()) -> None:
    """Route the prefix root to the app at ``/`` when the blueprint was made without it.

    :raises ConfigurationError: once the app has served a request, when
        Flask no longer takes new routes.
    """
    if "docsync.index" in app.view_functions:
        return
    try:
        app.add_url_rule(url_prefix + "/", "docsync.index", _guarded(index, decorators), strict_slashes=False)
    except AssertionError as exc:  # Flask's "setup method ... can no longer be called"
        raise ConfigurationError(
            f"An app at '/' needs a route at {url_prefix + '/'!r}, and this Flask app has already"
            " served a request, so Flask takes no new routes. Register it before the first request."
        ) from exc


def _encode_arguments(arguments: Mapping[str, Any]) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for key, value in arguments.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        out[str(key)] = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in values]
    return out


def create_session(route: str, arguments: Mapping[str, Any] | None = None) -> ServerSession:
    """:meth:`DocSync.create_session <flask_docsync.DocSync.create_session>` for the current app and request."""
    if not request:
        raise RuntimeError("create_session needs a request context: call it from a view.")
    server = _server()
    route = normalize_route(route)
    context = server.get_context(route)
    user, refusal = authorize(route)
    if refusal is not None:
        raise SessionError(refusal.status_code, "not authorized")
    data = request_data(user)
    data.arguments = _encode_arguments(arguments or {})
    extra = context.application.process_request(data) or None
    return server.create_session(route, data, None, extra)
