"""Faulty app code against a real `flask-docsync serve`: the server keeps serving everyone else.

tests/apps/faults.py has one ``?mode=`` per fault. Each test runs a
:class:`~reliability_util.HealthyClient` (round trips on a /sliders session
of the same server) through the whole fault, and checks that the faulty
session's problems are logged with its session id.

Already covered elsewhere: a periodic callback that raises on every run and
an on_change that raises after changing the document
(test_serve_protocol.py), a script that raises at import
(test_serve_sessions.py), a periodic callback removing itself or being
removed by a timeout (test_serve_protocol.py).
"""

from __future__ import annotations

import threading
import time

import pytest
import websocket
from bokeh.util.token import generate_jwt_token

from reliability_util import HealthyClient, stats
from serve_util import (
    APPS,
    assert_server_healthy,
    attr,
    changed,
    events_of,
    log_has_line,
    model_id,
    pull_doc,
    session_id_of,
    start_server,
    value_patch,
    wait_until,
)
from wire import WireClient, fetch_token

FAULTS = APPS / "faults.py"
PERIODIC_RUNS = 10  # tests/apps/faults.py
SLOW_IMPORT_SECONDS = 3


@pytest.fixture(scope="module")
def server():
    s = start_server(FAULTS, APPS / "sliders.py", APPS / "exit_at_import.py", APPS / "slow_import.py",
                     "--keep-alive", "0", "--check-unused-sessions", "200", "--unused-session-lifetime", "60000",
                     env={"DOCSYNC_BLOCKING_WARNING_MS": "300", "DOCSYNC_STATS_ENDPOINT": "true",
                          "SLOW_IMPORT_SECONDS": str(SLOW_IMPORT_SECONDS)})
    yield s
    s.stop()


def faults_session(server, mode: str) -> tuple[str, str]:
    token = fetch_token(f"{server.url}/faults?mode={mode}")
    return token, session_id_of(token)


def open_faults(server, token: str) -> tuple[WireClient, dict]:
    client = WireClient(f"{server.ws_url}/faults/ws", token)
    return client, client.handshake().content["doc"]


def click(client: WireClient, doc: dict) -> str:
    return client.send("PATCH-DOC", {"events": [{
        "kind": "MessageSent", "msg_type": "bokeh_event",
        "msg_data": {"type": "event", "name": "button_click",
                     "values": {"type": "map", "entries": [["model", {"id": model_id(doc, "button")}]]}},
    }]}, num_buffers=0)


def pulled(server, token: str, name: str) -> str:
    return attr(pull_doc(server, "/faults", token), name)


def test_raising_callbacks_are_logged_with_the_session_and_it_lives_on(server):
    with HealthyClient(server) as healthy:
        started = time.monotonic()
        token, sid = faults_session(server, "raise")
        client, doc = open_faults(server, token)
        with client:
            slider, result = model_id(doc, "slider"), model_id(doc, "result")
            reqid = client.send("PATCH-DOC", value_patch(slider, "value", 5), num_buffers=0)
            error, before = client.recv_until("ERROR", reqid)
            assert error.content == {"text": "RuntimeError: on_change exploded on purpose", "traceback": None}
            assert changed(events_of(before), result, "text") == ["value=5"]
            click_id = click(client, doc)
            error, _ = client.recv_until("ERROR", click_id)
            assert error.content["text"] == "RuntimeError: on_event exploded on purpose"
            # The same connection still serves requests.
            pull_id = client.send("PULL-DOC-REQ", {})
            client.recv_until("PULL-DOC-REPLY", pull_id)

        for kind, name in (("NextTickCallback", "next_tick_raises"), ("TimeoutCallback", "timeout_raises"),
                           ("PeriodicCallback", "periodic_raises")):
            log_has_line(server, f"Session {sid}: error in {kind} {name}; the session goes on")
        log_has_line(server, f"Session {sid}: PATCH-DOC {reqid} from connection",
                     "failed: RuntimeError('on_change exploded on purpose')")
        log_has_line(server, f"Session {sid}: PATCH-DOC {click_id} from connection",
                     "failed: RuntimeError('on_event exploded on purpose')")
        for text in ("next-tick exploded on purpose", "timeout exploded on purpose",
                     f"periodic exploded on purpose, run {PERIODIC_RUNS}"):
            log_has_line(server, text)
        # The periodic callback kept its schedule through every raise.
        wait_until(lambda: pulled(server, token, "periodic") == str(PERIODIC_RUNS),
                   message=f"{PERIODIC_RUNS} runs of the raising periodic callback")
        assert pulled(server, token, "result") == "value=5"
        assert healthy.completed_between(started, time.monotonic()) >= 3


def test_sys_exit_in_callbacks_or_at_import_does_not_stop_the_server(server):
    """``sys.exit()`` raises SystemExit, which gevent would re-raise in the main greenlet.

    In callbacks it is logged like any exception (ERROR replies for on_change
    and on_event); at import it fails that app's session creation (500).
    """
    with HealthyClient(server) as healthy:
        started = time.monotonic()
        token, sid = faults_session(server, "exit")
        client, doc = open_faults(server, token)
        with client:
            reqid = client.send("PATCH-DOC", value_patch(model_id(doc, "slider"), "value", 6), num_buffers=0)
            assert client.recv_until("ERROR", reqid)[0].content["text"] == "SystemExit: 14"
            click_id = click(client, doc)
            assert client.recv_until("ERROR", click_id)[0].content["text"] == "SystemExit: 15"
        for kind, name, code in (("NextTickCallback", "next_tick_exits", 11), ("TimeoutCallback", "timeout_exits", 12),
                                 ("PeriodicCallback", "periodic_exits", 13), ("NextTickCallback", "async_exits", 16)):
            log_has_line(server, f"Session {sid}: error in {kind} {name}; the session goes on")
            log_has_line(server, f"SystemExit: {code}")
        wait_until(lambda: pulled(server, token, "periodic") == str(PERIODIC_RUNS),
                   message="the periodic callback ran on after sys.exit()")

        # A script that calls sys.exit() in its module body.
        status, _, _ = server.get("/exit_at_import")
        assert status == 500
        log_has_line(server, "App /exit_at_import: session", "could not be created")
        log_has_line(server, "SystemExit: 3")
        made_up = generate_jwt_token("exit" + sid[:20], secret_key=None, signed=False, expiration=300)
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            WireClient(f"{server.ws_url}/exit_at_import/ws", made_up).close()
        assert refused.value.status_code == 500
        log_has_line(server, "WebSocket /exit_at_import/ws refused (500)")

        assert server.proc.poll() is None
        assert healthy.completed_between(started, time.monotonic()) >= 3
    assert_server_healthy(server)


def test_sys_exit_in_session_hooks_does_not_stop_the_server(serve, tmp_path):
    app = tmp_path / "exithooks"
    app.mkdir()
    (app / "main.py").write_text(
        "from bokeh.io import curdoc\nfrom bokeh.models import Div\n"
        "curdoc().add_root(Div(text='main ran', name='main'))\n")
    (app / "app_hooks.py").write_text(
        "import sys\n\n"
        "def on_session_created(session_context):\n    sys.exit(7)\n\n"
        "def on_session_destroyed(session_context):\n    sys.exit(8)\n")
    server = serve(app, APPS / "sliders.py", "--keep-alive", "0", "--check-unused-sessions", "200",
                   "--unused-session-lifetime", "300")
    with HealthyClient(server) as healthy:
        started = time.monotonic()
        token = fetch_token(f"{server.url}/exithooks")
        sid = session_id_of(token)
        assert attr(pull_doc(server, "/exithooks", token), "main") == "main ran"
        log_has_line(server, f"App /exithooks: session {sid}: error in on_session_created")
        log_has_line(server, "SystemExit: 7")
        # Reaped 300 ms after the pull's connection closed.
        log_has_line(server, f"App /exithooks: session {sid}: error in on_session_destroyed")
        log_has_line(server, "SystemExit: 8")
        assert server.proc.poll() is None
        healthy.wait_for(healthy.count + 3)
        assert healthy.completed_between(started, time.monotonic()) >= 3


def test_a_busy_loop_is_reported_by_the_blocking_warning(server):
    """A callback that never yields is named in the log; everyone else waits for it.

    One hub runs every session of a worker, and a greenlet cannot be
    interrupted while it computes, so an infinite loop cannot be cut: the
    warning, repeated every DOCSYNC_BLOCKING_WARNING_MS, names the session
    and the callback (and gunicorn's --timeout eventually restarts the
    worker). Here the loop is bounded, 1.5 s, with warnings from 0.3 s.
    """
    with HealthyClient(server) as healthy:
        token, sid = faults_session(server, "busy")  # the loop starts 300 ms after creation
        line = log_has_line(server, f"Session {sid}: TimeoutCallback busy_loop blocked the event loop"
                                    " for more than 0.3 s", timeout=30)
        assert "flask_docsync.offload" in line
        wait_until(lambda: pulled(server, token, "busy") == "done", message="the busy loop's end")
        # Stalled during the loop, the other session carries on after it.
        count = healthy.count
        healthy.wait_for(count + 3)


def test_callbacks_that_remove_themselves_or_other_callbacks(server):
    with HealthyClient(server) as healthy:
        started = time.monotonic()
        token, sid = faults_session(server, "remove")
        doc = wait_until(lambda: (d := pull_doc(server, "/faults", token)) and attr(d, "left") and d,
                         message="the purge")
        assert attr(doc, "left") == "left=0"
        assert attr(doc, "purger") == "5"
        assert attr(doc, "killer") == "3"
        victim = int(attr(doc, "victim"))
        assert victim <= 1  # removed by the killer's first run
        assert attr(doc, "errors") == ("ValueError: callback already ran or was already removed,"
                                       " cannot be removed again")
        log_has_line(server, f"Session {sid}: error in PeriodicCallback killer; the session goes on")
        time.sleep(0.3)  # 15 periods, and past the cancelled timeout's 150 ms
        doc = pull_doc(server, "/faults", token)
        assert (attr(doc, "killer"), attr(doc, "victim"), attr(doc, "purger")) == ("3", str(victim), "5")
        assert attr(doc, "late") == "pending"
        assert healthy.completed_between(started, time.monotonic()) >= 3


def test_a_callback_can_end_its_own_session(server):
    """What an app can do to end its session, and that nothing hangs when it does.

    Bokeh gives app code no "destroy this session" call. With flask-docsync a
    callback can (1) clear the document, remove its callbacks and call
    ``session_context.session.request_expiration()``: the next cleanup pass
    after the client leaves destroys it, long before the unused-session
    lifetime (60 s here); or (2) discard it server-side through
    ``session_context.server_context.application_context.discard_session``,
    even from one of the session's own locked callbacks: the discard then
    waits until that callback has released the document lock (taking the
    lock again there would wait forever).
    """
    with HealthyClient(server) as healthy:
        started = time.monotonic()
        token, sid = faults_session(server, "quit")
        client, doc = open_faults(server, token)
        with client:
            reqid = click(client, doc)
            _, before = client.recv_until("OK", reqid, limit=1000)
            assert {e["kind"] for e in events_of(before)} >= {"RootRemoved"}
            assert len([e for e in events_of(before) if e["kind"] == "RootRemoved"]) == len(doc["roots"])
        log_has_line(server, f"faults: session {sid} asked to expire")
        log_has_line(server, f"faults: session {sid} destroyed", timeout=10)

        token, sid = faults_session(server, "selfdestruct")
        client, doc = open_faults(server, token)
        client.close()  # connection_lost: 50 ms later the session discards itself
        log_has_line(server, f"faults: session {sid} discarded itself: False")
        log_has_line(server, f"faults: session {sid} destroyed")

        assert healthy.completed_between(started, time.monotonic()) >= 3
    # Neither session is left, and the cleanup loop still reaps others.
    wait_until(lambda: stats(server)["apps"]["/faults"]["unused"] == 0, message="no unused sessions")
    assert_server_healthy(server)


def test_an_app_blocking_at_import_does_not_stop_other_sessions(server):
    """tests/apps/slow_import.py sleeps 3 s in its module body (time.sleep is gevent's under serve).

    Sessions that exist keep their round trips going meanwhile. New sessions
    of other *script or directory* apps do wait for it: Bokeh runs app
    scripts with process-wide sys.path, sys.argv and cwd patched, so those
    runs take turns. (Slow work belongs in a callback or an
    ``on_session_created`` hook, which run outside that turn.)
    """
    with HealthyClient(server) as healthy:
        slow = {}

        def load_slow_page() -> None:
            slow["status"] = server.get("/slow_import")[0]
            slow["ended"] = time.monotonic()

        loader = threading.Thread(target=load_slow_page)
        started = time.monotonic()
        loader.start()
        count = healthy.count
        healthy.wait_for(count + 5, timeout=SLOW_IMPORT_SECONDS * 10)
        during = time.monotonic()
        assert loader.is_alive(), "the slow import ended before the round trips: nothing was shown"
        loader.join(timeout=60)
        assert slow["status"] == 200
        assert healthy.completed_between(started, during) >= 5
        assert "ended" in slow and slow["ended"] > during
    assert_server_healthy(server)
