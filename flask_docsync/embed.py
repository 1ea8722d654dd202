"""Jinja helpers that put live documents into the host app's own templates.

Registered as template globals by :meth:`DocSync.init_app
<flask_docsync.DocSync.init_app>`::

    {{ docsync_resources() }}
    <div class="card">{{ docsync_document("/sliders", arguments={"ticker": "AAPL"}) }}</div>

The session is created in-process while the page renders, so there is no
extra HTTP round trip, no second origin and no CORS. Markup comes from the
overridable templates ``docsync/resources.html``, ``docsync/embed.html``
and ``docsync/refused.html``.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from bokeh.core.templates import CSS_RESOURCES, JS_RESOURCES
from bokeh.embed.bundle import Bundle
from bokeh.embed.elements import script_for_render_items
from bokeh.embed.util import RenderItem
from flask import current_app, g, render_template, request
from markupsafe import Markup

from .blueprint import create_session, page_bundle, page_resources, resources
from .errors import SessionError

if TYPE_CHECKING:
    from .session import ServerSession


def docsync_resources() -> Markup:
    """The script and style tags of BokehJS and of every Bokeh extension
    imported in this process (Panel's among them), all from this app,
    never a CDN; once per page, in its ``<head>``.

    As on the app pages, every extension known is included rather than
    those of the documents on this page. An app may import more (a Panel
    app's first session imports Panel, a widget Panel loads lazily such as
    Tabulator brings its library) while the body renders; each
    :func:`docsync_document` adds what the head lacked just before its
    document, so the page needs nothing else.
    """
    bundle = page_bundle(resources())
    _sent().update(_parts(bundle))
    js, css = page_resources(resources())
    return Markup(render_template("docsync/resources.html", js=Markup(js), css=Markup(css)))


def _sent() -> set[tuple[str, str]]:
    """What this response has already loaded: ``(kind, url or code)`` pairs."""
    if not hasattr(g, "_docsync_resources"):
        g._docsync_resources = set()
    sent: set[tuple[str, str]] = g._docsync_resources
    return sent


def _parts(bundle: Bundle) -> list[tuple[str, str]]:
    return ([("css", str(url)) for url in bundle.css_files] + [("css_raw", raw) for raw in bundle.css_raw]
            + [("js", str(url)) for url in bundle.js_files] + [("js_raw", raw) for raw in bundle.js_raw])


def _missing_resources() -> Markup:
    """Tags for what the document about to be embedded needs and the page has not loaded yet."""
    bundle = page_bundle(resources())
    sent = _sent()
    missing = [part for part in _parts(bundle) if part not in sent]
    sent.update(missing)
    if not missing:
        return Markup("")
    kinds: dict[str, list[str]] = {"css": [], "css_raw": [], "js": [], "js_raw": []}
    for kind, value in missing:
        kinds[kind].append(value)
    css = CSS_RESOURCES.render(css_files=kinds["css"], css_raw=kinds["css_raw"])
    js = JS_RESOURCES.render(js_files=kinds["js"], js_raw=kinds["js_raw"], hashes=bundle.hashes)
    return Markup(css + js)


def docsync_document(route: str, arguments: dict[str, Any] | None = None) -> Markup:
    """Create a session of the app at ``route`` for this request and embed it.

    :param route: A registered app route, e.g. ``"/sliders"``.
    :param arguments: Seen by the app as ``session_context.request.arguments``
        (each value a list of bytes, as with ``bokeh serve``). ``None`` gives
        the app no arguments.
    :raises UnknownApplication: when nothing is registered at ``route``;
        the message lists what is.

    A user the ``authorize`` hook refuses gets ``docsync/refused.html``
    (an empty placeholder) and no session or token.
    """
    try:
        session = create_session(route, arguments)
    except SessionError as exc:
        # A refusal by the authorize hook: 401/403, or the redirect it chose.
        if exc.status in (401, 403) or 300 <= exc.status < 400:
            return Markup(render_template("docsync/refused.html", route=route, reason=exc.reason))
        raise
    return docsync_session(session)


def docsync_session(session: ServerSession, route: str | None = None) -> Markup:
    """Embed a session the view created with ``docsync.create_session``.

    :param route: The app's route; ``None`` reads it from the session.
    """
    server = current_app.extensions["docsync"]
    route = route or getattr(session, "route", None)
    if route is None:
        raise ValueError("Pass route= for a session that does not know its app route.")
    element_id = "docsync-" + uuid.uuid4().hex
    app_path = request.script_root + server.settings.url_prefix + (route if route != "/" else "")
    script = script_for_render_items(
        {},
        [RenderItem(token=session.token, elementid=element_id, use_for_title=False)],
        app_path=app_path or "/",
        absolute_url=request.host_url,
    )
    return Markup(render_template(
        "docsync/embed.html", element_id=element_id, route=route, script=Markup(script),
        resources=_missing_resources(),
    ))
