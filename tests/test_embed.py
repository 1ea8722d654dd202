"""Embedding in the host app's own templates, driven with Flask's test client.

``docsync_resources()``, ``docsync_document(route, arguments)``,
``docsync_session(session)`` and ``docsync.create_session(...)``: what the
markup contains, which sessions exist afterwards and what their apps see.
No browser and no sockets; the browser side is tests/test_browser_site.py.
"""

from __future__ import annotations

import json
import re
import sys

import gevent
import pytest
from bokeh.models import Div
from flask import Flask, current_app, render_template_string, request, url_for
from werkzeug.middleware.proxy_fix import ProxyFix

from conftest import ROOT
from flask_docsync import DocSync, SessionError, UnknownApplication
from flask_docsync.context import RequestData
from flask_docsync.protocol import protocol
from wire import find_model

PAGE = """<!DOCTYPE html><html><head>{{ docsync_resources() }}</head>
<body><h1>Host page</h1>{{ docsync_document(route, arguments=arguments) }}</body></html>"""

TOKEN = re.compile(r'"token":"([A-Za-z0-9_.\-]+)"')


def hello(doc):
    doc.add_root(Div(text="hello", name="hello"))


def linking(doc):
    """Builds URLs with url_for from a next-tick callback, as app code would."""
    div = Div(text="", name="links")

    def fill():
        # No request context here, so Flask makes URLs external by default.
        div.text = "|".join([
            current_app.name,
            url_for("docsync.page", app_path="linking", _external=False),
            url_for("host_page", _external=False),
            url_for("host_page"),
        ])

    doc.add_next_tick_callback(fill)
    doc.add_root(div)


@pytest.fixture
def make_app():
    """``make_app(**DocSync options)`` -> (app, docsync, server); servers stop at teardown."""
    apps: list[Flask] = []

    def factory(config=None, template_folder=None, **options):
        app = Flask(__name__, template_folder=template_folder)
        app.config.update({"TESTING": True, **(config or {})})
        docsync = DocSync(**options)
        docsync.add_app("/hello", hello)
        docsync.add_app("/linking", linking)
        docsync.init_app(app)

        @app.route("/page")
        def host_page():
            route = request.args.get("route", "/hello")
            arguments = {k: request.args.getlist(k) for k in request.args if k.startswith("a_")}
            return render_template_string(PAGE, route=route, arguments=arguments or None)

        apps.append(app)
        return app, docsync, app.extensions["docsync"]

    yield factory
    for app in apps:
        app.extensions["docsync"].stop()


def sessions_of(server, route="/hello"):
    return server.get_context(route).sessions


# ---------------------------------------------------------------------------
# docsync_resources()
# ---------------------------------------------------------------------------


def test_resources_are_versioned_script_tags_under_the_blueprint_prefix(make_app):
    for prefix, config in (("/docsync", None), ("/bk", {"DOCSYNC_URL_PREFIX": "/bk"})):
        app, _, server = make_app(config)
        client = app.test_client()
        html = client.get("/page").get_data(as_text=True)
        sources = re.findall(r'<script src="([^"]+)"', html)
        assert sources, html
        assert any(re.fullmatch(rf"{prefix}/static/js/bokeh\.min\.js\?v=[0-9a-f]{{128}}", s) for s in sources)
        assert all(re.fullmatch(rf"{prefix}/static/js/[\w.-]+\.js\?v=[0-9a-f]{{128}}", s) for s in sources), sources
        # Served by this app, long-cached because versioned; no CDN anywhere.
        response = client.get(sources[0])
        assert response.status_code == 200 and "max-age=315360000" in response.headers["Cache-Control"]
        assert "cdn.bokeh.org" not in html


# ---------------------------------------------------------------------------
# docsync_document(route, arguments)
# ---------------------------------------------------------------------------


def test_document_creates_one_session_with_exactly_the_given_arguments(make_app):
    app, _, server = make_app()
    # The page's own query (?route=..., ?other=...) is not passed on; only
    # the arguments the template gives, each a list of bytes.
    html = app.test_client().get("/page?a_color=red&a_n=1&a_n=2&other=x").get_data(as_text=True)
    [session] = sessions_of(server)
    assert server.session_count() == 1
    seen = session.document.session_context.request
    assert seen.arguments == {"a_color": [b"red"], "a_n": [b"1", b"2"]}
    assert TOKEN.findall(html) == [session.token]
    assert '"/docsync/hello"' in html  # app_path: where BokehJS opens the WebSocket
    assert re.search(r'<div id="docsync-[0-9a-f]{32}" class="docsync-document" data-docsync-app="/hello">', html)


def test_document_without_arguments_gives_the_app_none(make_app):
    app, _, server = make_app()
    with app.test_request_context("/somewhere?x=1"):
        render_template_string("{{ docsync_document('/hello') }}")
    [session] = sessions_of(server)
    assert session.document.session_context.request.arguments == {}


def test_unknown_route_raises_listing_the_registered_routes(make_app):
    app, _, server = make_app()
    with app.test_request_context("/page"):
        with pytest.raises(UnknownApplication) as info:
            render_template_string("{{ docsync_document('/nope') }}")
    message = str(info.value)
    assert "/nope" in message and "/hello" in message and "/linking" in message
    assert server.session_count() == 0


def test_argument_values_cannot_inject_markup(make_app):
    app, _, server = make_app()
    evil = "</script><script>alert(1)</script>"
    quotes = "\"'><img src=x onerror=alert(2)>"
    response = app.test_client().get("/page", query_string={"a_evil": evil, "a_quotes": quotes})
    html = response.get_data(as_text=True)
    body = html.split("<body>", 1)[1]
    # One script element in the body (the embed's), nothing of the values
    # in the markup: they travel inside the signed token only.
    assert body.count("<script") == 1 and body.count("</script>") == 1, body
    for needle in ("alert(", "onerror", "<img", evil, quotes):
        assert needle not in html
    # ...and reach the app intact.
    [session] = sessions_of(server)
    arguments = session.document.session_context.request.arguments
    assert arguments == {"a_evil": [evil.encode()], "a_quotes": [quotes.encode()]}


# ---------------------------------------------------------------------------
# authorize hook
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("refusal", [None, "", False])
def test_refused_user_gets_placeholder_and_no_session_or_token(make_app, refusal):
    calls = []

    def authorize(route):
        calls.append(route)
        return refusal

    app, docsync, server = make_app(authorize=authorize)
    html = app.test_client().get("/page").get_data(as_text=True)
    assert calls == ["/hello"]
    assert re.search(r'<div class="docsync-document docsync-refused" data-docsync-app="/hello"></div>', html)
    assert "token" not in html and "embed_items" not in html
    assert server.session_count() == 0
    with app.test_request_context("/view"):
        with pytest.raises(SessionError) as info:
            docsync.create_session("/hello")
    assert info.value.status == 403
    assert server.session_count() == 0


def test_authorized_user_reaches_the_app(make_app):
    app, _, server = make_app(authorize=lambda route: {"name": "alice", "route": route})
    html = app.test_client().get("/page").get_data(as_text=True)
    [session] = sessions_of(server)
    assert session.document.session_context.request.user == {"name": "alice", "route": "/hello"}
    assert TOKEN.findall(html) == [session.token]


# ---------------------------------------------------------------------------
# create_session + session.locked() + docsync_session
# ---------------------------------------------------------------------------


def test_view_changes_under_locked_are_in_the_served_document(make_app):
    app, docsync, server = make_app()

    @app.route("/report")
    def report():
        session = docsync.create_session("/hello", arguments={"who": "bob"})
        with session.locked() as doc:
            doc.get_model_by_name("hello").text = "changed by the view"
            doc.title = "Report"
        return render_template_string("<main>{{ docsync_session(s) }}</main>", s=session)

    html = app.test_client().get("/report").get_data(as_text=True)
    [session] = sessions_of(server)
    [token] = TOKEN.findall(html)
    assert token == session.token
    assert session.document.session_context.request.arguments == {"who": [b"bob"]}
    # The page's token leads to this very session, and what a connecting
    # client pulls is the changed document.
    with app.test_request_context("/docsync/hello/ws"):
        assert server.session_for_token("/hello", token, RequestData()) is session
    frames = session.handle_pull(protocol.create("PULL-DOC-REQ"), None)
    doc_json = json.loads(frames[2])["doc"]
    assert find_model(doc_json, "hello")["attributes"]["text"] == "changed by the view"
    assert doc_json["title"] == "Report"


def test_create_session_needs_a_request(make_app):
    app, docsync, _ = make_app()
    with app.app_context():
        with pytest.raises(RuntimeError, match="request context"):
            docsync.create_session("/hello")


# ---------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------


def test_host_app_overrides_the_embed_and_refused_templates(make_app, tmp_path):
    (tmp_path / "docsync").mkdir()
    (tmp_path / "docsync" / "embed.html").write_text(
        '<figure class="my-embed" data-app="{{ route }}"><div id="{{ element_id }}"></div></figure>'
        "<script>{{ script }}</script>"
    )
    (tmp_path / "docsync" / "refused.html").write_text('<p class="my-refused">Log in to see {{ route }}.</p>')

    app, _, server = make_app(template_folder=str(tmp_path))
    html = app.test_client().get("/page").get_data(as_text=True)
    assert '<figure class="my-embed" data-app="/hello"><div id="docsync-' in html
    assert "docsync-document" not in html
    [session] = sessions_of(server)
    assert TOKEN.findall(html) == [session.token]

    refusing, _, refusing_server = make_app(template_folder=str(tmp_path), authorize=lambda route: None)
    html = refusing.test_client().get("/page").get_data(as_text=True)
    assert '<p class="my-refused">Log in to see /hello.</p>' in html
    assert refusing_server.session_count() == 0


# ---------------------------------------------------------------------------
# url_for in callbacks, and URL prefixes (SCRIPT_NAME)
# ---------------------------------------------------------------------------


def wait_for_text(session, name, timeout=5.0):
    """Let the session's next-tick callbacks run (they are greenlets) and read a Div."""
    with gevent.Timeout(timeout, AssertionError(f"{name} was never filled")):
        while not session.document.get_model_by_name(name).text:
            gevent.sleep(0.01)
    return session.document.get_model_by_name(name).text


def test_url_for_works_inside_a_callback(make_app):
    app, _, server = make_app()
    app.test_client().get("/page?route=/linking", base_url="http://site.example:8080")
    [session] = sessions_of(server, "/linking")
    assert wait_for_text(session, "links").split("|") == [
        app.name,
        "/docsync/linking/",
        "/page",
        "http://site.example:8080/page",  # bound to the request that made the session
    ]


@pytest.mark.parametrize("how", ["script_name", "x_forwarded_prefix"])
def test_every_url_in_the_markup_carries_the_prefix(make_app, how):
    app, _, server = make_app()
    client = app.test_client()
    if how == "script_name":
        # The WSGI server (or a DispatcherMiddleware) mounts the app at /prefix.
        response = client.get("/page?route=/linking", base_url="http://localhost/prefix")
    else:
        # A reverse proxy tells the app with X-Forwarded-Prefix; ProxyFix applies it.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_prefix=1)
        response = client.get("/page?route=/linking", headers={"X-Forwarded-Prefix": "/prefix"})
    html = response.get_data(as_text=True)
    sources = re.findall(r'<script src="([^"]+)"', html)
    assert sources and all(s.startswith("/prefix/docsync/static/") for s in sources), sources
    # embed_items(docs_json, render_items, app_path, absolute_url): BokehJS
    # opens ws://<host of absolute_url><app_path>/ws.
    match = re.search(r'embed_items\(docs_json, render_items, "([^"]*)", "([^"]*)"\)', html)
    assert match, html
    assert match.group(1) == "/prefix/docsync/linking"
    assert match.group(2) == "http://localhost/"
    # No other absolute path in the markup escapes the prefix.
    paths = re.findall(r'(?:src|href)="(/[^"]*)"', html)
    assert all(p.startswith("/prefix/") for p in paths), paths
    [session] = sessions_of(server, "/linking")
    links = wait_for_text(session, "links").split("|")
    assert links[1:] == ["/prefix/docsync/linking/", "/prefix/page", "http://localhost/prefix/page"]


# ---------------------------------------------------------------------------
# The example site (examples/site), without a browser
# ---------------------------------------------------------------------------


@pytest.fixture
def site():
    sys.path.insert(0, str(ROOT))
    try:
        from examples.site.app import create_app
    finally:
        sys.path.remove(str(ROOT))
    app = create_app({"TESTING": True})
    yield app
    app.extensions["docsync"].stop()


def test_example_site_embeds_only_for_logged_in_users(site):
    server = site.extensions["docsync"]
    client = site.test_client()
    response = client.get("/dashboard")
    assert response.status_code == 302 and response.headers["Location"] == "/login?next=/dashboard"
    # Logged out, the apps' own URLs refuse too.
    assert client.get("/docsync/sliders").status_code == 403
    assert server.session_count() == 0

    response = client.post("/login?next=/dashboard", data={"username": "alice", "password": "wrong"})
    assert response.status_code == 200 and "Wrong user name or password" in response.get_data(as_text=True)
    response = client.post("/login?next=/dashboard?color=red",
                           data={"username": "alice", "password": "docsync", "color": "green"})
    assert response.status_code == 302 and response.headers["Location"] == "/dashboard?color=red"

    html = client.get("/dashboard").get_data(as_text=True)
    assert len(TOKEN.findall(html)) == 2
    [sliders] = sessions_of(server, "/sliders")
    [streaming] = sessions_of(server, "/streaming")
    assert sliders.document.session_context.request.user == "alice"
    assert streaming.document.session_context.request.user == "alice"
    assert sliders.document.session_context.request.arguments == {"color": [b"#2ca02c"]}  # green, from login
    assert sliders.document.get_model_by_name("line").glyph.line_color == "#2ca02c"

    html = client.get("/report?bins=7").get_data(as_text=True)
    [histogram] = sessions_of(server, "/histogram")
    assert TOKEN.findall(html) == [histogram.token]
    doc = histogram.document
    assert doc.get_model_by_name("heading").text == "<h2>Report for alice</h2>"
    assert doc.get_model_by_name("plot").title.text == "Sample of alice"
    assert doc.get_model_by_name("bins").value == 7
    # url_for in the app's next-tick callback.
    assert 'href="/report?bins=7"' in wait_for_text(histogram, "stats")

    client.get("/logout")
    assert client.get("/report").status_code == 302
    assert server.session_count() == 3  # nothing new for the logged-out visit


def test_example_site_escapes_user_names_in_documents(site):
    client = site.test_client()
    client.post("/login", data={"username": "<b>eve</b>", "password": "docsync"})
    client.get("/report")
    [histogram] = sessions_of(site.extensions["docsync"], "/histogram")
    assert histogram.document.get_model_by_name("heading").text == "<h2>Report for &lt;b&gt;eve&lt;/b&gt;</h2>"


def test_authorize_redirect_gives_the_refused_placeholder():
    from flask import Flask, redirect, render_template_string

    from flask_docsync import DocSync

    docsync = DocSync(authorize=lambda route: redirect("/login"))

    @docsync.app("/hello")
    def hello(doc):
        from bokeh.models import Div

        doc.add_root(Div(text="hi"))

    app = Flask(__name__)
    docsync.init_app(app)
    try:
        with app.test_request_context("/page"):
            markup = render_template_string('{{ docsync_document("/hello") }}')
        assert "docsync-refused" in markup
        assert app.extensions["docsync"].session_count() == 0
    finally:
        app.extensions["docsync"].stop()
