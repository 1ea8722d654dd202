"""HoloViz Panel apps served by flask-docsync.

Panel is built on the Bokeh server and assumes Tornado's: one OS thread that
owns every document, an ``IOLoop``, and its own ``Application`` class. This
module makes those assumptions hold under gevent. Nothing here runs unless
Panel is imported: :func:`prepare` and :func:`adopt` are called for every
session, and return at once when ``panel`` is not in :data:`sys.modules`.

Install it with ``pip install flask-docsync[panel]``. Panel 1.9 (bokeh 3.9)
and 1.10 (bokeh 3.10) are supported; the private Panel names this module
relies on are listed in :data:`PANEL_NAMES` and checked by the test suite.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import json
import logging
import os
import re
import sys
import threading
import types
import weakref
from collections.abc import Sequence
from typing import Any

import gevent.monkey
from bokeh.document import Document

from . import aio
from .errors import ConfigurationError

log = logging.getLogger(__name__)

#: The OS thread's id, also under gevent's monkey-patching (where
#: ``threading.get_ident`` names the current greenlet).
_os_thread_ident = gevent.monkey.get_original("_thread", "get_ident")

#: Private names of ``panel.io.state.state`` this module reads or replaces.
PANEL_NAMES = (
    "_current_thread", "_thread_id_", "_schedule_on_load", "_loaded", "_connected", "_rel_paths", "_base_urls",
    "_ioloop", "_scheduled",
)
#: What Panel's ``pn.io.unlocked()`` calls to write to a connection of a
#: server other than Tornado's (``panel.io.document``).
PANEL_DOCUMENT_NAMES = ("extra_socket_handlers",)

_installed = False

#: The server's root URL of each document built by :func:`prepare`.
_roots: weakref.WeakKeyDictionary[Document, str] = weakref.WeakKeyDictionary()


def active() -> bool:
    """Whether Panel has been imported in this process (only then is anything done)."""
    return "panel" in sys.modules


class _OsThreadIds(weakref.WeakKeyDictionary):  # type: ignore[type-arg]
    """Panel's document → thread-id map, holding OS thread ids.

    Panel records ``threading.get_ident()`` when it sets a document up and
    compares it with the current one before it touches the document, to send
    changes made in other threads through the event loop. Under gevent that
    id names a greenlet: the request greenlet that made the document differs
    from the greenlets that run its callbacks, so every change was deferred
    and ``pn.io.unlocked()`` warned on every call. All greenlets of a hub
    share one OS thread and the document lock, so the OS thread's id is the
    one to compare; a real thread (``--num-threads``) still differs.
    """

    def __setitem__(self, key: Any, value: Any) -> None:
        if value is not None and value == threading.get_ident():
            value = _os_thread_ident()
        super().__setitem__(key, value)


def _os_current_thread(self: Any) -> int:
    return _os_thread_ident()


class _AdaptOnImport(importlib.abc.MetaPathFinder):
    """Adapts Panel the moment it is imported (see :func:`watch`).

    It only wraps the loader of the spec it finds: a mere lookup
    (``importlib.util.find_spec("panel")``, as :func:`dist_dir` does)
    imports nothing, and the finder stays until Panel is really imported.
    """

    _looking = False

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "panel" or self._looking:
            return None
        self._looking = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._looking = False
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module
        finder = self

        def exec_then_adapt(module: Any) -> None:
            exec_module(module)
            if finder in sys.meta_path:
                sys.meta_path.remove(finder)
            install()

        loader.exec_module = exec_then_adapt
        return spec


def watch() -> None:
    """Adapt Panel now if it is imported, else as soon as anything imports it.

    Called when a server is made: a Flask factory or a ``--setup`` script
    may call ``pn.state.schedule_task`` before any session exists, and the
    task must go to the loop that runs. A process that serves nothing
    (a notebook using Panel) is left alone.
    """
    if active():
        install()
    elif not any(isinstance(finder, _AdaptOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AdaptOnImport())


def _running_ioloop(self: Any) -> Any:
    # Panel's pn.state.schedule_task calls IOLoop.current(); Tornado's loop
    # on the asyncio loop that runs here (see aio).
    return aio.tornado_loop()


def _session_user(state: Any) -> Any:
    """What the host app's ``authorize`` hook returned for the current session's request."""
    doc = state.curdoc
    context = doc.session_context if doc is not None else None
    request = getattr(context, "request", None) if context is not None else None
    user = getattr(request, "user", None) if request is not None else None
    return None if user is True else user  # True: let in, nobody in particular


def user_name(user: Any) -> str:
    """The name ``pn.state.user`` gives for a user object of the host app.

    A string is the name; otherwise a mapping's ``username``/``user``/
    ``name`` key, or an object's ``username``/``name`` attribute or
    ``get_id()`` (Flask-Login's users); otherwise ``str(user)``.
    """
    if isinstance(user, str):
        return user
    if isinstance(user, dict):
        for key in ("username", "user", "name"):
            if user.get(key) is not None:
                return str(user[key])
    for attr in ("username", "name"):
        value = getattr(user, attr, None)
        if isinstance(value, str):
            return value
    get_id = getattr(user, "get_id", None)
    if callable(get_id):
        return str(get_id())
    return str(user)


def _host_user(panels: property) -> Any:
    # pn.state.user: Panel reads its own OAuth cookie; behind the host app's
    # login, the user is who the authorize hook let in.
    def user(self: Any) -> Any:
        found = _session_user(self)
        return user_name(found) if found is not None else panels.fget(self)  # type: ignore[misc]

    return user


def _host_user_info(panels: property) -> Any:
    def user_info(self: Any) -> Any:
        found = _session_user(self)
        if found is None:
            return panels.fget(self)  # type: ignore[misc]
        info = dict(found) if isinstance(found, dict) else {}
        info.setdefault("user", user_name(found))
        info.setdefault("username", user_name(found))
        return info

    return user_info


def _without_panels_collection(schedule_task: Any) -> Any:
    """``pn.state.schedule_task``, except Panel's own full ``gc.collect``.

    Panel schedules one a few seconds after each session it destroys. Here
    :mod:`flask_docsync.reclaim` decides when a full collection is worth
    its pause (within a stated budget, from the number of live sessions),
    so Panel's is not scheduled; every other task is.
    """

    @functools.wraps(schedule_task)
    def schedule(self: Any, name: str, callback: Any, *args: Any, **kwargs: Any) -> Any:
        if name == "gc.collect" and getattr(callback, "__module__", "") == "panel.io.document":
            return None
        return schedule_task(self, name, callback, *args, **kwargs)

    return schedule


def install() -> None:
    """Adapt Panel's process-wide state to gevent; idempotent.

    Called by :func:`prepare` once Panel is imported.
    """
    global _installed
    if _installed or not active():
        return
    from panel.io.state import state

    cls = type(state)
    missing = [name for name in PANEL_NAMES if not hasattr(state, name)]
    if missing:
        log.warning(
            "This Panel release (%s) lacks %s; Panel apps may misbehave under flask-docsync."
            " Use Panel 1.9 or 1.10.", _panel_version(), ", ".join(missing),
        )
        _installed = True
        return
    from panel.io.document import extra_socket_handlers

    from .connection import ServerConnection

    extra_socket_handlers[ServerConnection] = _write
    from panel.io.application import Application as PanelApplication

    PanelApplication._set_session_prefix = _session_prefix(PanelApplication._set_session_prefix)
    cls._current_thread = property(_os_current_thread)  # type: ignore[attr-defined]
    cls._ioloop = property(_running_ioloop)  # type: ignore[attr-defined]
    cls.user = property(_host_user(cls.user))  # type: ignore[attr-defined]
    cls.user_info = property(_host_user_info(cls.user_info))  # type: ignore[attr-defined]
    cls.schedule_task = _without_panels_collection(cls.schedule_task)  # type: ignore[attr-defined]
    ids = _OsThreadIds()
    for doc, ident in list(state._thread_id_.items()):
        ids[doc] = ident
    state._thread_id_ = ids
    _installed = True
    log.debug("Panel %s adapted to gevent", _panel_version())


def _write(conn: Any, events: list[Any] | None = None, msg: Any = None) -> list[Any]:
    """Send what ``pn.io.unlocked()`` collected to one of our connections.

    Panel calls this once per connection with the same ``events`` list
    (1.9), or with one ``msg`` made for all of them (1.10). Where the current
    greenlet holds the session's document lock (a click handled in the
    reader, an onload callback), the events join the changes already
    collected under the lock, so the client gets them in the order they
    were made, once, when the lock is released. Without the lock (Panel runs
    most callbacks unlocked) the message is written straight to the
    connection's queue, as Panel writes to Tornado's sockets.

    :return: Futures to await: none, the connection's writer sends it.
    """
    session = conn.session
    if events is not None and session.lock_held_here and session._pending is not None:
        if getattr(session, "_panel_events", None) is not events:
            session._panel_events = events  # once per list, not once per connection
            session._pending.extend((event, None) for event in events)
        return []
    if msg is None:
        if not events:
            return []
        msg = conn.protocol.create("PATCH-DOC", events)
    conn.send_message(msg)
    return []


def _session_prefix(panels: Any) -> Any:
    """Panel's ``Application._set_session_prefix``, told where our routes are.

    Panel works out the root of its server from the request path and the
    app's route, and gives paths relative to the page; it cannot know a
    Flask app's script root or our URL prefix, and a page of the host app
    that embeds a document is anywhere. For documents :func:`prepare`
    placed, the root it was given is used instead.
    """

    @functools.wraps(panels)
    def set_session_prefix(self: Any, doc: Document) -> None:
        root = _roots.get(doc)
        if root is None:
            panels(self, doc)
        else:
            _place(doc, root)

    return set_session_prefix


def _place(doc: Document, root: str) -> None:
    from panel.io.resources import LOCAL_DIST
    from panel.io.state import state

    # What Panel's state.rel_path / state.base_url give while ``doc`` is
    # current: Panel prefixes its bundles, stylesheets and component
    # assets with the first, and links to its pages (login, logout) with
    # the second.
    state._rel_paths[doc] = root
    state._base_urls[doc] = root + "/"
    # Read when Panel creates a model's stylesheets, so they are ours
    # rather than its CDN's from the start.
    doc._template_variables["dist_url"] = f"{root}/{LOCAL_DIST}"


def is_panel_target(target: Any) -> bool:
    """Whether ``add_app``'s ``target`` is one that only Panel can serve.

    A Panel object (a component or a template), a function that takes no
    argument and returns one (``pn.serve``'s convention; a Bokeh app
    function takes the document), a ``.md`` file, or a notebook that
    imports Panel.
    """
    if isinstance(target, (str, os.PathLike)):
        path = os.fspath(target)
        return path.endswith(".md") or (path.endswith(".ipynb") and _notebook_imports_panel(path))
    if isinstance(target, (types.FunctionType, types.MethodType)):
        try:
            parameters = inspect.signature(target).parameters.values()
        except (TypeError, ValueError):
            return False
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        return not any(p.default is p.empty and p.kind in positional for p in parameters)
    if "panel" not in sys.modules:
        return False
    from panel.viewable import ServableMixin

    return isinstance(target, ServableMixin)


_IMPORTS_PANEL = re.compile(r"^\s*(?:import\s+panel\b|from\s+panel\b)", re.MULTILINE)


def _notebook_imports_panel(path: str) -> bool:
    """Whether a code cell of the notebook at ``path`` imports Panel.

    Such a notebook is served by Panel's notebook handler, as by ``panel
    serve``: without a ``.servable()`` call it shows every cell's output
    in Panel's notebook template. Other notebooks keep Bokeh's handler, as
    with ``bokeh serve``. An unreadable file is Bokeh's to report.
    """
    try:
        with open(path, encoding="utf-8") as f:
            cells = json.load(f).get("cells", [])
    except (OSError, ValueError, AttributeError):
        return False
    for cell in cells:
        if isinstance(cell, dict) and cell.get("cell_type") == "code":
            source = cell.get("source", "")
            if _IMPORTS_PANEL.search("".join(source) if isinstance(source, list) else str(source)):
                return True
    return False


def build_application(target: Any) -> Any:
    """Panel's ``Application`` for a target :func:`is_panel_target` accepts, built as ``pn.serve`` builds it.

    :raise ConfigurationError: when Panel is not installed.
    """
    try:
        from panel.io.application import build_applications
    except ImportError:
        raise ConfigurationError(
            f"{target!r} is a Panel app (a function without arguments, a Panel object, a .md file"
            " or a notebook that imports Panel),"
            " and Panel is not installed: pip install 'flask-docsync[panel]'. A Bokeh app function"
            " takes the document: def modify_doc(doc): ..."
        ) from None
    install()
    if isinstance(target, os.PathLike):
        target = os.fspath(target)
    return build_applications({"/": target})["/"]


def prepare(doc: Document | None = None, root: str | None = None) -> None:
    """Before a session's document is built: adapt Panel if it has been imported.

    :param root: Where the server's routes are as the session's page
        reaches them (``/docsync``, ``/site/docsync``, or with scheme and
        host for ``autoload.js`` on another site). Panel's scripts,
        stylesheets and component assets of the document are given under
        it. ``None`` or ``""`` (a server at the site's root) leaves Panel's
        own paths relative to the page, as ``panel serve`` has them.
    """
    if doc is not None and root:
        _roots[doc] = root  # also for Panel imported by this run (see adopt)
    if not active():
        return
    install()
    if doc is not None and root:
        _place(doc, root)


def is_panel_document(doc: Document) -> bool:
    """Whether ``doc`` shows Panel objects (Panel then renders its page)."""
    return active() and any(type(root).__module__.startswith("panel.") for root in doc.roots)


def page_html(session: Any, resources: Any) -> str:
    """The page of a session whose document is Panel's, rendered by Panel.

    Panel's page template, its stylesheets from our static route (Panel
    points every model's stylesheets at the bundle directory here rather
    than at its CDN), the scripts and modules its models declare, and the
    loading spinner when ``pn.config.global_loading_spinner`` is set.

    :param resources: Bokeh's resources for this request (ours).
    """
    from panel.io.resources import Resources as PanelResources
    from panel.io.server import server_html_page_for_session
    from panel.io.state import set_curdoc

    with session.locked() as doc, set_curdoc(doc):
        return str(server_html_page_for_session(
            session, resources=PanelResources.from_bokeh(resources), title=doc.title,
            token=session.token, template=doc.template, template_variables=doc.template_variables,
        ))


def autoload_js(session: Any, resources: Any, element_id: str, app_path: str, absolute_url: str | None) -> str:
    """``autoload.js`` for a session whose document is Panel's, with Panel's bundle."""
    from panel.io.server import autoload_js_script
    from panel.io.state import set_curdoc

    with session.locked() as doc, set_curdoc(doc):
        return str(autoload_js_script(
            doc, resources, session.token, element_id, app_path, absolute_url, absolute=bool(absolute_url),
        ))


def served_path(url: str) -> str:
    """``url`` as a path under our static route if it names a file of
    Panel's bundle on Panel's CDN, else ``url`` unchanged.

    Panel gives some stylesheets as CDN URLs and, on its own server, maps
    them to its local bundle when it renders a page (a Tabulator's theme,
    once a Tabulator has been made, is one). Bokeh's bundle, which embedded
    documents get, takes them as they are, so the browser would ask Panel's
    CDN: a site behind a firewall or a strict content policy loses them.
    """
    if not active():
        return url
    from panel.config import config
    from panel.io.resources import CDN_DIST, LOCAL_DIST, JS_VERSION

    npm_dist = f"{config.npm_cdn}/@holoviz/panel@{JS_VERSION}/dist/"
    for prefix in (CDN_DIST, npm_dist):
        if url.startswith(prefix):
            return LOCAL_DIST + url[len(prefix):]
    return url


def dist_dir() -> str | None:
    """Panel's bundle directory (its ``static/extensions/panel/``), found
    without importing Panel; ``None`` when Panel is not installed.

    Bokeh learns an extension's directory when the extension is imported.
    Under several workers a page rendered by one may have its scripts
    fetched from another that has not imported Panel yet.
    """
    try:
        spec = importlib.util.find_spec("panel")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    folder = os.path.join(os.path.dirname(spec.origin), "dist")
    return folder if os.path.isdir(folder) else None


def _import_component_module(module: str, app_dirs: Sequence[str]) -> bool:
    """Import ``module`` if it is Panel's or an app's own; whether it is imported now."""
    if module == "panel" or module.startswith("panel."):
        importlib.import_module(module)
        return True
    folders = [os.path.realpath(folder) for folder in app_dirs]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None and "." not in module:
        # The app puts its folder on sys.path when it runs, which in this
        # worker it may not have done yet.
        spec = importlib.machinery.PathFinder.find_spec(module, folders)
    origin = getattr(spec, "origin", None)
    if spec is None or spec.loader is None or not origin:
        return False
    if not any(os.path.realpath(origin).startswith(folder + os.sep) for folder in folders):
        return False
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[module] = loaded
    try:
        spec.loader.exec_module(loaded)
    except BaseException:
        sys.modules.pop(module, None)
        log.warning("Component module %s could not be imported", module, exc_info=True)
        return False
    return True


def favicon_path() -> str | None:
    """Panel's icon, or ``None`` when Panel is not in use."""
    if not active():
        return None
    from panel.io.resources import DIST_DIR

    return str(DIST_DIR / "images" / "favicon.ico")


class ComponentRefused(Exception):
    """A ``/components/`` request Panel's rules refuse; ``status`` is the HTTP status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def component_file(path: str, app_dirs: Sequence[str] = ()) -> str:
    """The file of a Panel component asset, ``<module>/<Class>/<attribute>/<file>``.

    Panel's own resolution: only files the component lists in one of its
    resource attributes are served. ``panel serve`` imports whatever module
    the URL names; here a module not imported yet is imported only when it
    is Panel's or lies in one of ``app_dirs`` (the folders of the apps):
    another worker may have rendered the page, and importing any installed
    module on a client's request runs code the deployment never asked for.

    :raise ComponentRefused: with Panel's status (400, 403, 404).
    """
    module = path.split("/", 1)[0]
    if not active():
        if dist_dir() is None:
            raise ComponentRefused(404, "Panel is not installed")
        import panel  # noqa: F401  (a page from another worker uses it)

        install()
    if module not in sys.modules and not _import_component_module(module, app_dirs):
        raise ComponentRefused(404, f"No component module {module!r} is loaded")
    from panel.io.server import ComponentResourceHandler
    from tornado.web import HTTPError

    try:
        return str(ComponentResourceHandler.parse_url_path(ComponentResourceHandler, path))  # type: ignore[arg-type]
    except HTTPError as exc:
        raise ComponentRefused(exc.status_code, exc.log_message or exc.reason or "refused") from None


def adopt(doc: Document, application: Any) -> None:
    """After a session's document is built by ``application``.

    The app may have imported Panel just now (a script's ``import panel``),
    so Panel is adapted here too. Panel's own ``Application`` wires the
    browser's ``document_ready`` event to Panel's on-load step (which sets
    ``pn.state.loaded``, runs ``pn.state.onload`` callbacks and lets
    ``pn.io.hold()`` send what it held); a Bokeh ``Application`` built
    before Panel was imported, or from a function, does not, so the same
    is done here for it. Running that step twice does nothing more.
    """
    if not active():
        return
    install()
    from panel.io.application import Application as PanelApplication
    from panel.io.resources import LOCAL_DIST, patch_model_css
    from panel.io.state import state

    root = _roots.get(doc)
    if root and doc._template_variables.get("dist_url") != f"{root}/{LOCAL_DIST}":
        # Panel was imported by this very run (the first session of a
        # script that imports it): its models were made before Panel knew
        # where our routes are, and point at its CDN.
        _place(doc, root)
        for model in doc.roots:
            patch_model_css(model, dist_url=f"{root}/{LOCAL_DIST}")

    if not isinstance(application, PanelApplication):
        doc.on_event("document_ready", functools.partial(state._schedule_on_load, doc))


def _panel_version() -> str:
    module = sys.modules.get("panel")
    return str(getattr(module, "__version__", "?"))
