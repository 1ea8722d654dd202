"""Flask's extension contract: one DocSync, many apps, an app factory that runs again and again.

Extension tests with Flask fixtures; the WebSocket side of the same apps is
covered by the integration tests.
"""

from __future__ import annotations

import gc
import logging
import signal
import subprocess
import sys
import weakref

import gevent
import pytest
from bokeh.models import Div
from flask import Flask

from flask_docsync import ConfigurationError, DocSync, DocSyncError, deploy, errors
from flask_docsync.errors import CloseCode, ConnectionClosed, HandshakeError, MessageTooBig

from conftest import APPS, ROOT


def hello(doc):
    doc.add_root(Div(text="hello", name="hello"))


@pytest.fixture
def stop_all():
    """Stops every app handed to it at the end of the test."""
    apps: list[tuple[DocSync, Flask]] = []
    yield lambda docsync, app: apps.append((docsync, app)) or app
    for docsync, app in apps:
        docsync.stop(app)


def test_the_readme_factory_runs_twice(stop_all):
    docsync = DocSync()

    def create_app():
        app = Flask(__name__)
        app.config["DOCSYNC_SECRET_KEY"] = "k" * 32
        docsync.init_app(app)
        docsync.add_app("/sliders", str(APPS / "sliders.py"))
        return stop_all(docsync, app)

    first, second = create_app(), create_app()
    for app in (first, second):
        assert app.test_client().get("/docsync/sliders").status_code == 200
        assert docsync.server(app).routes() == ["/sliders"]
    assert docsync.server(first) is not docsync.server(second)
    assert docsync.server(first).session_count() == docsync.server(second).session_count() == 1


def test_a_decorated_app_in_the_factory_belongs_to_that_app(stop_all):
    docsync = DocSync()

    def create_app(text):
        app = Flask(__name__)
        docsync.init_app(app)

        @docsync.app("/hello")
        def hello_app(doc):
            doc.add_root(Div(text=text, name="hello"))

        return stop_all(docsync, app)

    one, two = create_app("one"), create_app("two")
    for app, text in ((one, "one"), (two, "two")):
        assert app.test_client().get("/docsync/hello").status_code == 200
        [session] = docsync.server(app).get_context("/hello").sessions
        assert session.document.get_model_by_name("hello").text == text
    with pytest.raises(ConfigurationError, match="already registered at '/hello' in this Flask app"):
        docsync.add_app("/hello", hello, app=one)


def test_extension_registrations_reach_every_app_and_add_app_can_name_the_app(stop_all):
    docsync = DocSync()
    docsync.add_app("/shared", hello)
    one = stop_all(docsync, Flask("one"))
    two = stop_all(docsync, Flask("two"))
    docsync.init_app(one)
    docsync.init_app(two)
    docsync.add_app("/only-one", hello, app=one)
    assert docsync.server(one).routes() == ["/only-one", "/shared"]
    assert docsync.server(two).routes() == ["/shared"]
    assert two.test_client().get("/docsync/only-one").status_code == 404
    with one.app_context():
        docsync.add_app("/in-context", hello)  # current_app, not the app bound last
    assert "/in-context" in docsync.server(one).routes()
    assert "/in-context" not in docsync.server(two).routes()


def test_add_app_after_init_app_fails_at_once_for_a_broken_script(tmp_path, stop_all):
    bad = tmp_path / "bad.py"
    bad.write_text("this is not python(")
    docsync = DocSync()
    app = stop_all(docsync, Flask(__name__))
    docsync.init_app(app)
    with pytest.raises(ConfigurationError, match="Invalid syntax"):
        docsync.add_app("/bad", str(bad))
    assert docsync.server(app).routes() == []


def test_add_app_after_init_app_makes_the_same_index_choice(stop_all):
    # One app registered after init_app: the index redirects to it.
    docsync = DocSync()
    app = stop_all(docsync, Flask(__name__))
    docsync.init_app(app)
    docsync.add_app("/only", hello)
    response = app.test_client().get("/docsync/")
    assert response.status_code == 302 and response.headers["Location"].endswith("/docsync/only")
    # An app at "/" with an empty prefix (no index of its own): "/" serves it.
    docsync = DocSync(url_prefix="")
    app = stop_all(docsync, Flask(__name__, static_folder=None))
    docsync.init_app(app)
    docsync.add_app("/", hello)
    assert app.test_client().get("/").status_code == 200
    assert len(docsync.server(app).get_context("/").sessions) == 1


def test_a_failed_init_app_leaves_the_app_untouched_and_a_retry_works(stop_all):
    docsync = DocSync()
    docsync.add_app("/hello", hello)
    app = stop_all(docsync, Flask(__name__))
    app.config["DOCSYNC_KEEP_ALIVE_MS"] = "often"
    before = (dict(app.blueprints), list(app.before_request_funcs.get(None, [])),
              dict(app.jinja_env.globals), list(app.cli.commands))
    with pytest.raises(ConfigurationError, match="DOCSYNC_KEEP_ALIVE_MS='often'"):
        docsync.init_app(app)
    after = (dict(app.blueprints), list(app.before_request_funcs.get(None, [])),
             dict(app.jinja_env.globals), list(app.cli.commands))
    assert after == before and "docsync" not in app.extensions
    app.config["DOCSYNC_KEEP_ALIVE_MS"] = 1000
    docsync.init_app(app)
    assert app.test_client().get("/docsync/hello").status_code == 200


@pytest.mark.parametrize(
    ("key", "value", "accepted"),
    [
        ("DOCSYNC_WEBSOCKET_MAX_MESSAGE_SIZE", "20MB", "integer number of bytes"),
        ("DOCSYNC_WEBSOCKET_MAX_MESSAGE_SIZE", 0, "at least 1"),
        ("DOCSYNC_OUTBOUND_QUEUE_SIZE", -5, "at least 1"),
        ("DOCSYNC_SESSION_TOKEN_EXPIRATION", True, "integer number of seconds"),
        ("DOCSYNC_URL_PREFIX", 7, "a string"),
        ("DOCSYNC_INCLUDE_HEADERS", [1, 2], "list of strings"),
        ("DOCSYNC_INDEX_TEMPLATE", "/no/such/template.html", "not a file"),
        ("DOCSYNC_STATS_ENDPOINT", "sometimes", "use true or false"),
    ],
)
def test_invalid_settings_fail_in_init_app_naming_key_and_form(key, value, accepted):
    app = Flask(__name__)
    app.config[key] = value
    with pytest.raises(ConfigurationError) as info:
        DocSync(app)
    assert key in str(info.value) and accepted in str(info.value)
    assert "docsync" not in app.extensions


def test_unknown_docsync_keys_are_logged_with_a_suggestion(caplog, stop_all):
    docsync = DocSync()
    app = stop_all(docsync, Flask(__name__))
    app.config["DOCSYNC_KEEPALIVE_MS"] = 5
    with caplog.at_level(logging.WARNING, logger="flask_docsync.config"):
        docsync.init_app(app)
    assert "DOCSYNC_KEEPALIVE_MS (did you mean DOCSYNC_KEEP_ALIVE_MS?)" in caplog.text


def test_config_keys_win_over_bokeh_environment_variables(monkeypatch, stop_all):
    monkeypatch.setenv("BOKEH_ALLOW_WS_ORIGIN", "env.example:80")
    monkeypatch.setenv("BOKEH_SECRET_KEY", "e" * 32)
    docsync = DocSync()
    app = stop_all(docsync, Flask(__name__))
    app.config.update(DOCSYNC_ALLOW_WEBSOCKET_ORIGIN=["config.example:443"], DOCSYNC_SECRET_KEY="c" * 32)
    docsync.init_app(app)
    settings = docsync.server(app).settings
    assert settings.allow_websocket_origin == ("config.example:443",)
    assert settings.secret_key == "c" * 32
    # Without the keys, Bokeh's variables apply.
    other = stop_all(docsync, Flask("other"))
    docsync.init_app(other)
    assert docsync.server(other).settings.allow_websocket_origin == ("env.example:80",)
    assert docsync.server(other).settings.secret_key == "e" * 32


def test_stop_ends_the_background_greenlets_and_a_second_stop_does_nothing():
    docsync = DocSync(keep_alive_ms=50, check_unused_sessions_ms=50, stats_log_ms=50)
    app = Flask(__name__)
    docsync.add_app("/hello", hello, app=None)
    docsync.init_app(app)
    assert app.test_client().get("/docsync/hello").status_code == 200
    greenlets = list(docsync.server(app)._greenlets)
    assert len(greenlets) == 3 and not any(g.dead for g in greenlets)
    docsync.stop(app)
    assert all(g.dead for g in greenlets)
    assert docsync.server(app).session_count() == 0
    docsync.stop(app)


def test_a_dropped_app_is_not_kept_alive_by_its_background_greenlets():
    docsync = DocSync(keep_alive_ms=20, check_unused_sessions_ms=20, stats_log_ms=20)
    docsync.add_app("/hello", hello)
    app = Flask(__name__)
    docsync.init_app(app)
    assert app.test_client().get("/docsync/hello").status_code == 200
    greenlets = list(app.extensions["docsync"]._greenlets)
    assert greenlets
    ref = weakref.ref(app)
    del app
    gc.collect()
    assert ref() is None, "the app is still referenced"
    gevent.sleep(0.1)
    assert all(g.dead for g in greenlets)


def test_app_protocol_is_set_only_where_gevent_websocket_needs_it():
    script = (
        "import sys; from flask import Flask; from flask_docsync import DocSync\n"
        "plain = Flask('plain'); DocSync(plain)\n"
        "assert not hasattr(plain, 'app_protocol'), 'set without gevent-websocket'\n"
        "import geventwebsocket.handler\n"
        "served = Flask('served'); DocSync(served)\n"
        "assert served.app_protocol('/docsync/x/ws') == 'bokeh'\n"
    )
    pytest.importorskip("geventwebsocket")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_stop_signal_handlers_are_installed_once_for_many_apps(monkeypatch):
    class Worker:
        class cfg:
            graceful_timeout = 1

    monkeypatch.setattr(deploy, "gunicorn_worker", lambda: Worker())
    monkeypatch.setattr(deploy, "_stop_callbacks", [])
    monkeypatch.setattr(deploy, "_installed", [])
    monkeypatch.setattr(deploy, "_stopping", [])
    monkeypatch.setattr(deploy.atexit, "register", lambda *a: None)
    saved = {name: signal.getsignal(getattr(signal, name)) for name in deploy._STOP_SIGNALS}
    previous_calls, calls = [], []
    try:
        for name in deploy._STOP_SIGNALS:  # stands in for gunicorn's own handlers
            signal.signal(getattr(signal, name), lambda sig, frame: previous_calls.append(sig))

        class Server:
            def __init__(self, name):
                self.name = name

            def stop_hook(self, signal_name):
                calls.append((self.name, signal_name))

        servers = [Server(n) for n in ("a", "b", "c")]
        for server in servers:
            assert deploy.on_stop_signal(server.stop_hook)
        del servers[1]
        gc.collect()
        handler = signal.getsignal(signal.SIGTERM)
        handler(signal.SIGTERM, None)
        gevent.joinall(deploy._stopping, timeout=1)
        assert sorted(calls) == [("a", "SIGTERM"), ("c", "SIGTERM")]
        assert previous_calls == [signal.SIGTERM], "handlers were chained more than once"
    finally:
        for name, previous in saved.items():
            signal.signal(getattr(signal, name), previous)


def test_callback_figures_are_per_app(stop_all, tmp_path):
    script = tmp_path / "tick.py"
    script.write_text(
        "from bokeh.io import curdoc\nfrom bokeh.models import Div\n"
        "d = Div(text='0'); curdoc().add_root(d)\n"
        "curdoc().add_next_tick_callback(lambda: setattr(d, 'text', '1'))\n"
    )
    docsync = DocSync()
    docsync.add_app("/tick", str(script))
    docsync.add_app("/hello", hello)
    one = stop_all(docsync, Flask("one"))
    two = stop_all(docsync, Flask("two"))
    docsync.init_app(one)
    docsync.init_app(two)
    one.test_client().get("/docsync/tick")
    one.test_client().get("/docsync/tick")
    two.test_client().get("/docsync/hello")
    gevent.sleep(0.05)
    stats_one, stats_two = docsync.server(one).stats(), docsync.server(two).stats()
    assert stats_one["callbacks"]["runs"] == 2
    assert stats_one["apps"]["/tick"]["callback_runs"]["runs"] == 2
    assert stats_two["callbacks"]["runs"] == 0


def test_one_exception_tree_and_one_set_of_close_codes():
    for cls in (HandshakeError, ConnectionClosed, MessageTooBig, errors.ProtocolViolation, errors.TokenError):
        assert issubclass(cls, DocSyncError)
    assert issubclass(MessageTooBig, ConnectionClosed)
    assert MessageTooBig(CloseCode.MESSAGE_TOO_BIG).code == 1009
    from flask_docsync import protocol, websocket

    for module in (protocol, websocket):
        constants = [n for n, v in vars(module).items() if isinstance(v, int) and not isinstance(v, bool)
                     and 1000 <= v <= 4999 and n.isupper()]
        assert constants == [], f"{module.__name__} defines close codes of its own: {constants}"
    assert len({c.value for c in CloseCode}) == len(CloseCode)
