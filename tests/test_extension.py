"""Extension tests: DocSync on a Flask app, driven with Flask's test client."""

from __future__ import annotations

import re

import pytest
from bokeh.models import Div
from flask import Flask

from flask_docsync import ConfigurationError, DocSync
from flask_docsync.errors import UnknownApplication

APPS = __import__("pathlib").Path(__file__).parent / "apps"


def hello(doc):
    doc.add_root(Div(text="hello", name="hello"))
    doc.title = "Hello"


@pytest.fixture
def make_app():
    apps: list[Flask] = []

    def factory(config=None, **options):
        app = Flask(__name__)
        app.config.update(config or {})
        docsync = DocSync(**options)
        docsync.add_app("/hello", hello)
        docsync.init_app(app)
        apps.append(app)
        return app, docsync

    yield factory
    for app in apps:
        app.extensions["docsync"].stop()


def test_state_lives_in_app_extensions(make_app):
    app, docsync = make_app()
    server = app.extensions["docsync"]
    assert DocSync.server(app) is server
    assert not isinstance(getattr(docsync, "app", None), Flask)
    assert server.settings.url_prefix == "/docsync"


def test_one_extension_serves_two_apps_separately(make_app):
    app1, docsync = make_app()
    app2 = Flask("second")
    docsync.init_app(app2)
    try:
        assert app2.extensions["docsync"] is not app1.extensions["docsync"]
        assert app2.test_client().get("/docsync/hello").status_code == 200
        assert app1.extensions["docsync"].session_count() == 0
    finally:
        app2.extensions["docsync"].stop()


def test_page_has_token_title_and_versioned_bokehjs(make_app):
    app, _ = make_app()
    response = app.test_client().get("/docsync/hello?foo=bar")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert "<title>Hello</title>" in html
    assert re.search(r'src="/docsync/static/js/bokeh\.min\.js\?v=[0-9a-f]{128}"', html)
    server = app.extensions["docsync"]
    [session] = server.get_context("/hello").sessions
    assert session.token in html
    assert session.document.session_context.request.arguments == {"foo": [b"bar"]}


def test_page_scripts_follow_the_prefix_and_are_rendered_once(make_app, monkeypatch):
    from flask_docsync import blueprint

    renders = []
    bundle = blueprint.bundle_for_objs_and_resources
    monkeypatch.setattr(blueprint, "bundle_for_objs_and_resources",
                        lambda objs, res: renders.append(res.root_url) or bundle(objs, res))
    app, _ = make_app()
    blueprint._page_resources.clear()
    client = app.test_client()
    first = client.get("/docsync/hello").get_data(as_text=True)
    second = client.get("/docsync/hello").get_data(as_text=True)
    proxied = client.get("/docsync/hello", base_url="http://localhost/corp").get_data(as_text=True)
    scripts = re.compile(r'<script src="[^"]*"></script>')
    assert scripts.findall(first) == scripts.findall(second) != []
    assert all("/corp/docsync/static/" in tag for tag in scripts.findall(proxied))
    assert renders == ["/docsync/", "/corp/docsync/"]  # once per root URL, not once per page


def test_bokehjs_static_has_long_cache_when_versioned(make_app):
    app, _ = make_app()
    client = app.test_client()
    response = client.get("/docsync/static/js/bokeh.min.js?v=abc")
    assert response.status_code == 200
    assert "max-age=315360000" in response.headers["Cache-Control"]
    assert client.get("/docsync/static/js/nope.js").status_code == 404


def test_autoload_js_validates_before_creating_a_session(make_app):
    app, _ = make_app()
    client = app.test_client()
    response = client.get("/docsync/hello/autoload.js")
    assert response.status_code == 400
    assert app.extensions["docsync"].session_count() == 0
    response = client.get("/docsync/hello/autoload.js?bokeh-autoload-element=el1&bokeh-app-path=/docsync/hello&x=1")
    assert response.status_code == 200
    assert response.mimetype == "application/javascript"
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "el1" in response.get_data(as_text=True)
    [session] = app.extensions["docsync"].get_context("/hello").sessions
    assert session.document.session_context.request.arguments["x"] == [b"1"]


def test_autoload_options_with_and_without_origin(make_app):
    app, _ = make_app()
    client = app.test_client()
    assert client.options("/docsync/hello/autoload.js").status_code == 200
    response = client.options("/docsync/hello/autoload.js", headers={"Origin": "http://other:1"})
    assert response.headers["Access-Control-Allow-Origin"] == "http://other:1"
    assert "GET" in response.headers["Access-Control-Allow-Methods"]


def test_metadata_index_and_unknown_routes(make_app):
    app, docsync = make_app()
    client = app.test_client()
    assert client.get("/docsync/hello/metadata").get_json() == {"url": "/hello", "data": {}}
    response = client.get("/docsync/")
    assert response.status_code == 302 and response.headers["Location"].endswith("/docsync/hello")
    assert client.get("/docsync/nothing").status_code == 404
    with pytest.raises(UnknownApplication, match="/hello"):
        app.extensions["docsync"].get_context("/nothing")


def test_apps_added_after_init_app_and_by_decorator(make_app):
    app, docsync = make_app()

    @docsync.app("/later")
    def later(doc):
        doc.add_root(Div(text="later"))

    client = app.test_client()
    assert client.get("/docsync/later").status_code == 200
    response = client.get("/docsync/")
    assert response.status_code == 200 and "/docsync/later" in response.get_data(as_text=True)


def test_script_and_directory_targets(make_app, tmp_path):
    app, docsync = make_app()
    docsync.add_app(None, str(APPS / "sliders.py"))
    assert "/sliders" in docsync.routes
    assert app.test_client().get("/docsync/sliders?start=3").status_code == 200


def test_websocket_url_refuses_plain_get(make_app):
    app, _ = make_app()
    assert app.test_client().get("/docsync/hello/ws").status_code == 400


def test_config_keys_override_options(make_app):
    app, _ = make_app({"DOCSYNC_URL_PREFIX": "/bk", "DOCSYNC_KEEP_ALIVE_MS": 0}, keep_alive_ms=1000)
    assert app.extensions["docsync"].settings.keep_alive_ms == 0
    assert app.test_client().get("/bk/hello").status_code == 200


def test_registration_errors_are_instructive(tmp_path):
    docsync = DocSync()
    with pytest.raises(ConfigurationError, match="does not exist"):
        docsync.add_app("/x", str(tmp_path / "missing.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("this is not python(")
    docsync.add_app("/bad", str(bad))
    with pytest.raises(ConfigurationError, match="Invalid syntax"):
        docsync.init_app(Flask("x"))
    docsync2 = DocSync()
    docsync2.add_app("/a", hello)
    with pytest.raises(ConfigurationError, match="already registered"):
        docsync2.add_app("a/", hello)
    with pytest.raises(ConfigurationError, match="ends in 'ws'"):
        docsync2.add_app("/x/ws", hello)


def test_empty_prefix_with_the_apps_own_static_folder_is_refused():
    docsync = DocSync(url_prefix="")
    with pytest.raises(ConfigurationError, match="static_folder=None"):
        docsync.init_app(Flask(__name__))
    app = Flask(__name__, static_folder=None)
    docsync.init_app(app)
    assert app.test_client().get("/static/js/bokeh.min.js").status_code == 200
