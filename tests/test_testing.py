"""flask_docsync.testing: the test client, used as an app author would use it."""

from __future__ import annotations

import functools
import logging

import gevent
import gevent.monkey
import numpy as np
import pytest
from bokeh.events import ValueSubmit
from bokeh.models import Button, ColumnDataSource, Div, Slider, TextInput
from flask import Flask, abort, redirect, render_template_string, request, session

from flask_docsync import DocSync
from flask_docsync.errors import UnknownApplication
from flask_docsync.scheduler import REAL_CLOCK, CallbackScheduler
from flask_docsync.session import live_sessions
from flask_docsync.transport import ENVIRON_KEY, Transport
from flask_docsync.testing import (
    DocSyncTestClient,
    ErrorReply,
    InMemoryWebSocket,
    SessionClosed,
    SessionRefused,
    VirtualClock,
    VirtualTime,
    VirtualTimeScheduler,
)

APPS = __import__("pathlib").Path(__file__).parent / "apps"


@pytest.fixture
def make_app():
    """``make_app(**docsync_options)`` -> (app, docsync); servers stop after the test."""
    apps: list[Flask] = []

    def factory(**options):
        app = Flask(__name__)
        app.config["SECRET_KEY"] = "test"
        docsync = DocSync(**options)
        docsync.add_app("/sliders", str(APPS / "sliders.py"))
        docsync.add_app("/streaming", str(APPS / "streaming.py"))
        docsync.init_app(app)
        apps.append(app)
        return app, docsync

    yield factory
    for app in apps:
        app.extensions["docsync"].stop()


# widgets ----------------------------------------------------------------------

def test_widget_change_runs_on_change_through_the_protocol(make_app):
    app, _ = make_app()
    with DocSyncTestClient(app).open("/sliders") as session:
        assert [m.msgtype for m in session.received] == ["ACK", "PULL-DOC-REPLY"]
        session.clear()
        reply = session.set("slider", "value", 7)
        assert reply.msgtype == "OK"
        assert session.model("result").text == "value=7"          # the server's document
        assert session.browser_model("result").text == "value=7"  # what the browser shows
        assert session.document.select_one({"name": "slider"}).value == 7
        # The callback's change came back; the browser's own change did not echo.
        assert [(p["kind"], p["attr"], p["new"]) for p in session.patches()] == [("ModelChanged", "text", "value=7")]
        assert [m.msgtype for m in session.received] == ["PATCH-DOC", "OK"]


def test_set_accepts_a_model_or_an_id_and_sends_nothing_for_the_same_value(make_app):
    app, _ = make_app()
    with DocSyncTestClient(app).open("/sliders") as session:
        slider = session.get_model("slider")
        session.set(slider, "value", 4)
        session.set(slider.id, "value", 5)
        assert session.model("result").text == "value=5"
        session.clear()
        assert session.set(slider, "value", 5) is None
        assert session.received == []


def test_click_runs_on_event(make_app):
    app, _ = make_app()
    with DocSyncTestClient(app).open("/sliders") as session:
        session.click("button")
        session.click(session.model("button"))
        assert session.model("clicks").text == "clicks=2"
        assert session.browser_model("clicks").text == "clicks=2"


def test_trigger_sends_any_ui_event(make_app):
    app, docsync = make_app()
    seen = []

    @docsync.app("/submit")
    def submit(doc):
        box = TextInput(name="box")
        out = Div(name="out")

        def on_submit(event):
            seen.append((event.model is box, event.value))
            out.text = f"submitted {event.value}"

        box.on_event("value_submit", on_submit)
        doc.add_root(box)
        doc.add_root(out)

    with DocSyncTestClient(app).open("/submit") as session:
        session.trigger(ValueSubmit(session.get_model("box"), value="hello"))
        assert seen == [(True, "hello")]
        assert session.browser_model("out").text == "submitted hello"


def test_arguments_reach_the_app(make_app):
    app, docsync = make_app()
    seen = {}

    @docsync.app("/args")
    def args(doc):
        seen.update(doc.session_context.request.arguments)
        doc.add_root(Div())

    client = DocSyncTestClient(app)
    with client.open("/sliders", arguments={"start": 3}) as session:
        assert session.model("slider").value == 3
        assert session.browser_model("result").text == "value=3"
    with client.open("args", arguments={"ticker": "AAPL", "n": ["1", "2"]}, headers={"X-Desk": "7"}) as session:
        assert seen == {"ticker": [b"AAPL"], "n": [b"1", b"2"]}
        assert session.document.session_context.request.headers["X-Desk"] == "7"


# virtual time -----------------------------------------------------------------

def test_periodic_streaming_advances_with_virtual_time(make_app):
    app, _ = make_app()
    with DocSyncTestClient(app).open("/streaming") as session:
        session.clear()
        gevent.sleep(0.2)  # real time passes: nothing runs on its own
        assert session.run_callbacks(49) == 0
        assert session.patches() == []
        assert session.run_callbacks(1) == 1  # first run after one period (50 ms)
        assert session.run_callbacks(1000) == 20
        streamed = session.patches("ColumnsStreamed")
        assert len(streamed) == 21
        rows = [dict(e["data"]["entries"])["x"]["shape"][0] for e in streamed]
        assert rows == [1] * 21
        first = dict(streamed[0]["data"]["entries"])["x"]["array"]["data"]
        assert np.frombuffer(first, dtype="float64").tolist() == [5.0]
        assert len(session.model("source").data["x"]) == 5 + 21
        assert list(session.browser_model("source").data["x"]) == list(range(5 + 21))
        assert session.now == 1050


def test_timeout_callback_fires_only_after_its_delay(make_app):
    app, docsync = make_app()

    @docsync.app("/timeout")
    def timeout_app(doc):
        div = Div(text="waiting", name="status")
        doc.add_root(div)
        doc.add_timeout_callback(lambda: setattr(div, "text", "fired"), 500)

    with DocSyncTestClient(app).open("/timeout") as session:
        assert session.run_callbacks(499) == 0
        assert session.browser_model("status").text == "waiting"
        assert session.run_callbacks(1) == 1
        assert session.model("status").text == "fired"
        assert session.browser_model("status").text == "fired"
        assert session.run_callbacks(10_000) == 0  # once only
        assert session.server_session.callback_count == 0


def test_next_tick_callbacks_wait_for_run_callbacks(make_app):
    app, docsync = make_app()

    @docsync.app("/tick")
    def tick_app(doc):
        slider = Slider(start=0, end=10, value=0, name="slider")
        div = Div(text="", name="out")

        def later(attr, old, new):
            doc.add_next_tick_callback(lambda: setattr(div, "text", f"ticked {new}"))

        slider.on_change("value", later)
        doc.add_root(slider)
        doc.add_root(div)

    with DocSyncTestClient(app).open("/tick") as session:
        session.set("slider", "value", 2)
        assert session.model("out").text == ""
        assert session.run_callbacks() == 1
        assert session.browser_model("out").text == "ticked 2"


def test_raising_periodic_callback_is_logged_and_keeps_its_schedule(make_app, caplog):
    app, docsync = make_app()
    runs = []

    @docsync.app("/raising")
    def raising(doc):
        def explode():
            runs.append(len(runs))
            raise RuntimeError("on purpose")

        doc.add_periodic_callback(explode, 100)
        doc.add_root(Div())

    with DocSyncTestClient(app).open("/raising") as session:
        with caplog.at_level(logging.ERROR, logger="flask_docsync.session"):
            assert session.run_callbacks(300) == 3
        assert runs == [0, 1, 2]
        errors = [r for r in caplog.records if "on purpose" in str(r.exc_info)]
        assert len(errors) == 3 and session.id in errors[0].getMessage()
        assert session.scheduler.pending()[0][0] == 100


def _virtual_scheduler(invoke):
    """The production scheduler on a virtual clock, seen as the test client's sessions see it."""
    return VirtualTime(CallbackScheduler(invoke, "s", clock=VirtualClock()))


def test_virtual_scheduler_runs_due_callbacks_in_order():
    from bokeh.server.callbacks import NextTickCallback, PeriodicCallback, TimeoutCallback

    calls: list[tuple[str, float]] = []
    greenlets = []

    def invoke(cb):
        greenlets.append(gevent.getcurrent())
        calls.append((cb.callback(), scheduler.now))

    scheduler = _virtual_scheduler(invoke)
    scheduler.scheduler.add(PeriodicCallback(lambda: "p", 30, callback_id="p"))
    scheduler.scheduler.add(TimeoutCallback(lambda: "t", 30, callback_id="t"))
    scheduler.scheduler.add(NextTickCallback(lambda: "n", callback_id="n"))
    gevent.sleep(0.05)  # real time passes: nothing runs on its own
    assert calls == []
    assert scheduler.advance(0) == 1
    assert scheduler.advance(100) == 4
    assert calls == [("n", 0), ("p", 30), ("t", 30), ("p", 60), ("p", 90)]
    assert scheduler.now == 100 and len(scheduler) == 1
    assert scheduler.pending()[0][0] == 20
    # Each callback ran on the scheduler's own greenlet for it, as in production.
    assert gevent.getcurrent() not in greenlets and len(set(greenlets)) == 3
    with pytest.raises(ValueError):
        scheduler.advance(-1)
    scheduler.scheduler.close()
    assert scheduler.advance(1000) == 0 and len(scheduler) == 0
    assert scheduler.clock.waiting() == []


def test_callbacks_that_schedule_each_other_forever_are_stopped():
    from bokeh.server.callbacks import NextTickCallback

    scheduler = _virtual_scheduler(
        lambda cb: scheduler.scheduler.add(NextTickCallback(lambda: None, callback_id="x"))
    )
    scheduler.scheduler.add(NextTickCallback(lambda: None, callback_id="first"))
    with pytest.raises(RuntimeError, match="keep scheduling"):
        scheduler.advance(0)
    scheduler.scheduler.close()


# access control ---------------------------------------------------------------

def test_authorize_refusal_raises_a_clear_error(make_app):
    app, _ = make_app(authorize=lambda route: False)
    with pytest.raises(SessionRefused, match="403") as info:
        DocSyncTestClient(app).open("/sliders")
    assert info.value.status == 403
    assert "log the user in" in str(info.value)
    assert app.extensions["docsync"].session_count() == 0


def test_websocket_refusal_discards_the_new_session(make_app):
    app, _ = make_app(authorize=lambda route: not request.path.endswith("/ws"))
    with pytest.raises(SessionRefused, match="refused the WebSocket"):
        DocSyncTestClient(app).open("/sliders")
    assert app.extensions["docsync"].session_count() == 0


def _add_login(app):
    @app.post("/login")
    def login():
        session["user"] = request.form["user"]
        return "ok"

    @app.get("/login")
    def login_page():
        return "please log in"


def test_logged_in_user_is_the_session_request_user(make_app):
    app, docsync = make_app(authorize=lambda route: session.get("user") or False)
    _add_login(app)
    seen = {}

    @docsync.app("/whoami")
    def whoami(doc):
        seen["user"] = doc.session_context.request.user
        seen["cookies"] = doc.session_context.request.cookies
        doc.add_root(Div(text=f"hello {doc.session_context.request.user}", name="greeting"))

    with app.test_client() as http:
        client = DocSyncTestClient(app, flask_test_client=http)
        with pytest.raises(SessionRefused):
            client.open("/whoami")
        http.post("/login", data={"user": "ann"})
        with client.open("/whoami") as s:
            assert seen["user"] == "ann"
            assert "session" in seen["cookies"]
            assert s.browser_model("greeting").text == "hello ann"


# errors -----------------------------------------------------------------------

def test_patch_to_an_unknown_model_gets_error(make_app):
    app, _ = make_app()
    bad = [{"kind": "ModelChanged", "model": {"id": "no-such-id"}, "attr": "value", "new": 1}]
    with DocSyncTestClient(app).open("/sliders") as session:
        session.clear()
        reply = session.send_patch(bad, check=False)
        assert reply.msgtype == "ERROR"
        [error] = [m for m in session.received if m.msgtype == "ERROR"]
        assert "no-such-id" in error.content["text"]
        with pytest.raises(ErrorReply, match="no-such-id"):
            session.send_patch(bad)
        # The session goes on.
        session.set("slider", "value", 2)
        assert session.model("result").text == "value=2"


def test_callback_error_raises_error_reply(make_app):
    app, docsync = make_app()

    @docsync.app("/broken")
    def broken(doc):
        slider = Slider(start=0, end=10, value=0, name="slider")
        slider.on_change("value", lambda attr, old, new: 1 / 0)
        doc.add_root(slider)

    with DocSyncTestClient(app).open("/broken") as session:
        with pytest.raises(ErrorReply, match="ZeroDivisionError"):
            session.set("slider", "value", 1)


def test_unknown_route_and_model_list_what_exists(make_app):
    app, _ = make_app()
    client = DocSyncTestClient(app)
    with pytest.raises(UnknownApplication, match="/sliders, /streaming"):
        client.open("/nope")
    with client.open("/sliders") as session:
        with pytest.raises(LookupError, match="'button', 'clicks', 'layout', 'result', 'slider'"):
            session.get_model("sldier")
        with pytest.raises(LookupError, match="browser document"):
            session.click("nope")


def test_not_initialized_app_is_refused():
    with pytest.raises(Exception, match="init_app"):
        DocSyncTestClient(Flask("bare"))


# lifecycle --------------------------------------------------------------------

def test_close_discards_the_session_and_runs_hooks(make_app):
    app, docsync = make_app()
    events = []

    @docsync.app("/hooks")
    def hooks(doc):
        doc.on_session_destroyed(lambda ctx: events.append(("destroyed", ctx.id)))
        doc.on_event("connection_lost", lambda event: events.append(("lost", None)))
        doc.add_periodic_callback(lambda: None, 10)
        doc.add_root(Div())

    client = DocSyncTestClient(app)
    session = client.open("/hooks")
    server_session = session.server_session
    assert client.sessions == [session]
    client.close()
    assert session.closed and server_session.destroyed
    assert events == [("lost", None), ("destroyed", session.id)]
    assert app.extensions["docsync"].session_count() == 0
    assert server_session not in live_sessions()
    session.close()  # again: nothing happens
    with pytest.raises(RuntimeError, match="closed"):
        session.set("x", "value", 1)


def test_server_stop_closes_the_test_session(make_app):
    app, _ = make_app()
    session = DocSyncTestClient(app).open("/sliders")
    app.extensions["docsync"].stop()
    assert session.closed and session.close_code == 1001
    with pytest.raises(SessionClosed, match="1001"):
        session.set("slider", "value", 3)
    session.close()


def test_sessions_opened_by_the_page_use_real_time_otherwise(make_app):
    app, _ = make_app()
    DocSyncTestClient(app).open("/sliders").close()
    assert app.test_client().get("/docsync/streaming").status_code == 200
    [real] = app.extensions["docsync"].get_context("/streaming").sessions
    assert not isinstance(real.scheduler, VirtualTimeScheduler)
    assert real.scheduler.clock is REAL_CLOCK
    app.extensions["docsync"].get_context("/streaming").discard_session(real)


def test_open_page_attaches_every_embedded_document(make_app):
    app, docsync = make_app()

    @app.route("/dashboard")
    def dashboard():
        return render_template_string(
            "{{ docsync_resources() }}"
            "{{ docsync_document('/sliders', arguments={'start': 4}) }}"
            "{{ docsync_document('/streaming') }}"
        )

    @app.route("/missing")
    def missing():
        abort(404)

    client = DocSyncTestClient(app)
    sliders, streaming = client.open_page("/dashboard")
    try:
        assert sliders.route == "/sliders" and streaming.route == "/streaming"
        assert sliders.model("slider").value == 4
        sliders.set("slider", "value", 6)
        assert sliders.browser_model("result").text == "value=6"
        assert streaming.run_callbacks(100) == 2
    finally:
        client.close()
    with pytest.raises(SessionRefused, match="404"):
        client.open_page("/missing")


def test_new_models_from_callbacks_reach_the_browser(make_app):
    app, docsync = make_app()

    @docsync.app("/grow")
    def grow(doc):
        button = Button(name="add")
        source = ColumnDataSource(data={"x": [1, 2]}, name="source")

        def add(event):
            doc.add_root(Div(text=f"rows={len(source.data['x'])}", name="added"))

        button.on_event("button_click", add)
        doc.add_root(button)
        doc.add_root(source)

    with DocSyncTestClient(app).open("/grow") as session:
        session.click("add")
        assert session.browser_model("added").text == "rows=2"
        [root_added] = session.patches("RootAdded")
        assert root_added["model"]["type"] == "object"
        # The browser's copy is complete: a fresh pull gives the same models.
        before = {m.id for m in session.browser_document.models}
        assert {m.id for m in session.pull().models} == before


# the real WebSocket view --------------------------------------------------------

def test_in_memory_websocket_is_a_transport():
    assert isinstance(InMemoryWebSocket(lambda frames: None), Transport)


def test_view_decorator_refusing_the_websocket_discards_the_page_session(make_app):
    def no_websockets(view):
        @functools.wraps(view)
        def wrapper(*args, **kwargs):
            if request.path.endswith("/ws"):
                abort(403)
            return view(*args, **kwargs)

        return wrapper

    app, docsync = make_app(decorators=[no_websockets])
    destroyed = []

    @docsync.app("/hooks")
    def hooks(doc):
        doc.on_session_destroyed(lambda ctx: destroyed.append(ctx.id))
        doc.add_root(Div())

    client = DocSyncTestClient(app)
    with pytest.raises(SessionRefused, match="refused the WebSocket") as info:
        client.open("/hooks")
    assert info.value.status == 403
    assert info.value.response.status_code == 403
    assert "/docsync/hooks/ws" in str(info.value)
    assert len(destroyed) == 1
    assert app.extensions["docsync"].session_count() == 0
    assert client.sessions == []


def test_view_decorator_redirect_is_reported_and_guards_the_websocket(make_app):
    seen = []

    def login_required(view):
        @functools.wraps(view)
        def wrapper(*args, **kwargs):
            seen.append((request.path, session.get("user")))
            if "user" not in session:
                return redirect("/login")
            return view(*args, **kwargs)

        return wrapper

    app, _ = make_app(decorators=[login_required])
    _add_login(app)
    with app.test_client() as http:
        client = DocSyncTestClient(app, flask_test_client=http)
        with pytest.raises(SessionRefused, match="redirected to /login") as info:
            client.open("/sliders")
        assert info.value.status == 302
        http.post("/login", data={"user": "bob"})
        with client.open("/sliders") as s:
            s.set("slider", "value", 9)
            assert s.model("result").text == "value=9"
        # The flask client's cookies went with the upgrade request too.
        assert seen == [("/docsync/sliders", None), ("/docsync/sliders", "bob"), ("/docsync/sliders/ws", "bob")]
    assert app.extensions["docsync"].session_count() == 0


def test_origin_check_of_the_websocket_view_runs(make_app):
    app, _ = make_app(allow_websocket_origin=["other.example"])
    client = DocSyncTestClient(app)
    # A page of a host the server does not trust may be a DNS-rebinding page.
    with pytest.raises(SessionRefused, match="Origin 'http://app.example'") as info:
        client.open("/sliders", headers={"Host": "app.example"})
    assert info.value.status == 403
    assert app.extensions["docsync"].session_count() == 0
    with client.open("/sliders") as s:  # localhost: a loopback name, trusted
        assert s.server_session.connection_count == 1

    app, _ = make_app(allow_websocket_origin=["app.example"])
    with DocSyncTestClient(app).open("/sliders", headers={"Host": "app.example"}) as s:
        assert s.server_session.document.session_context.request.headers["Host"] == "app.example"


def test_the_upgrade_request_goes_through_the_ws_view(make_app):
    calls = []

    def authorize(route):
        protocols = request.headers.get("Sec-WebSocket-Protocol", "")
        calls.append((route, request.path, protocols.split(",")[0], ENVIRON_KEY in request.environ))
        return "ann"

    app, _ = make_app(authorize=authorize)
    finished = []

    @app.after_request
    def record(response):
        finished.append((request.path, response.status_code))
        return response

    with DocSyncTestClient(app).open("/sliders") as s:
        assert s.server_session.connection_count == 1
        assert calls == [
            ("/sliders", "/docsync/sliders", "", False),
            ("/sliders", "/docsync/sliders/ws", "bokeh", True),
        ]
        assert finished == [("/docsync/sliders", 200)]  # the view serves the connection
    # Closing ends the view, with the 101 of an injected transport.
    assert finished == [("/docsync/sliders", 200), ("/docsync/sliders/ws", 101)]


def test_sessions_other_greenlets_create_meanwhile_stay_on_real_time(make_app):
    app, docsync = make_app()
    other = {}

    @docsync.app("/spawner")
    def spawner(doc):
        # Another visitor's request, on another greenlet, while the test
        # client's page request creates this session.
        def elsewhere():
            other["status"] = app.test_client().get("/docsync/streaming").status_code

        gevent.spawn(elsewhere).join()
        doc.add_root(Div(name="d"))

    server = app.extensions["docsync"]
    client = DocSyncTestClient(app)
    with client.open("/spawner") as s:
        assert other["status"] == 200
        [real] = server.get_context("/streaming").sessions
        assert real.scheduler.clock is REAL_CLOCK
        assert isinstance(s.server_session.scheduler.clock, VirtualClock)
        assert client.sessions == [s]
    server.get_context("/streaming").discard_session(real)


def test_a_next_tick_callback_added_from_another_thread_waits_for_run_callbacks(make_app):
    app, docsync = make_app()

    @docsync.app("/threads")
    def threads(doc):
        doc.add_root(Div(text="", name="out"))

    with DocSyncTestClient(app).open("/threads") as s:
        doc, div = s.document, s.model("out")
        thread = gevent.monkey.get_original("threading", "Thread")(
            target=lambda: doc.add_next_tick_callback(lambda: setattr(div, "text", "from a thread"))
        )
        thread.start()
        thread.join()
        gevent.sleep(0.05)  # the add reaches the hub's thread; the callback does not run
        assert len(s.scheduler) == 1 and div.text == ""
        assert s.run_callbacks() == 1
        assert s.browser_model("out").text == "from a thread"
