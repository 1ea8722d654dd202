"""Concurrency defects of async callbacks and session discard, against a real `flask-docsync serve`.

- ``await session_context.with_locked_document(fn)`` from a
  ``without_document_lock`` coroutine took the gevent lock on the asyncio
  loop's own greenlet and then waited for that loop: every async callback
  and hook of the worker froze for good.
- A greenlet killed while waiting for a coroutine left the asyncio task
  running: async callbacks went on after their session was destroyed.
- A reconnect during a discard (which yields while callbacks are stopped)
  found the destroyed session and attached to it: its PULL-DOC failed, a
  blank page on a live socket.

Apps: tests/apps/async_locking.py and tests/apps/slow_teardown.py.
"""

from __future__ import annotations

import time

import pytest
from serve_util import APPS, assert_server_healthy, attr, changed, events_of, log_has_line, model_id, \
    session_id_of, start_server, value_patch, wait_until
from wire import WireClient, fetch_token

ASYNC = APPS / "async_locking.py"
SLOW_TEARDOWN = APPS / "slow_teardown.py"
SLIDERS = APPS / "sliders.py"


@pytest.fixture(scope="module")
def server():
    s = start_server(ASYNC, SLIDERS, SLOW_TEARDOWN, "--keep-alive", "0",
                     "--unused-session-lifetime", "300", "--check-unused-sessions", "200")
    yield s
    s.stop()


def open_session(server, route: str, query: str = "") -> tuple[WireClient, str, dict]:
    token = fetch_token(f"{server.url}{route}{query}")
    client = WireClient(f"{server.ws_url}{route}/ws", token, timeout=10)
    return client, token, client.handshake().content["doc"]


def wait_for_text(client: WireClient, result_id: str, text: str, limit: int = 50) -> None:
    for _ in range(limit):
        message = client.recv()
        if text in changed(events_of([message]), result_id, "text"):
            return
    raise AssertionError(f"no change of result to {text!r} in {limit} messages")


def test_with_locked_document_from_an_unlocked_coroutine_does_not_freeze_the_worker(server):
    """Both forms (coroutine and plain function) apply their change under the lock, twice in a row.

    Before, the first ``await with_locked_document(...)`` never returned and
    every later coroutine of the worker waited behind it.
    """
    client, _, doc = open_session(server, "/async_locking", "?mode=locked")
    with client:
        slider, result = model_id(doc, "slider"), model_id(doc, "result")
        for value in (5, 6):
            reqid = client.send("PATCH-DOC", value_patch(slider, "value", value), num_buffers=0)
            client.recv_until("OK", reqid)
            wait_for_text(client, result, f"async {value}")
            wait_for_text(client, result, f"sync {value}")
    # Another session's coroutines run too: the loop is not stuck.
    other, _, doc = open_session(server, "/async_locking", "?mode=locked")
    with other:
        reqid = other.send("PATCH-DOC", value_patch(model_id(doc, "slider"), "value", 9), num_buffers=0)
        other.recv_until("OK", reqid)
        wait_for_text(other, model_id(doc, "result"), "sync 9")
    assert_server_healthy(server)


def test_destroying_a_session_cancels_its_async_callbacks(server):
    """The never-ending coroutine is cancelled before the destroy hook, and ticks no more after it."""
    token = fetch_token(f"{server.url}/async_locking?mode=forever")
    sid = session_id_of(token)
    log_has_line(server, f"async tick {sid}")
    # Never connected: discarded after the 300 ms unused lifetime.
    destroyed = log_has_line(server, f"session destroyed {sid}", timeout=15)
    time.sleep(0.5)
    lines = server.log().splitlines()
    cancelled = [i for i, line in enumerate(lines) if f"async cancelled {sid}" in line]
    at_destroy = lines.index(destroyed)
    assert cancelled and cancelled[0] < at_destroy, "the coroutine was not cancelled before the destroy hook"
    late = [line for line in lines[at_destroy:] if f"async tick {sid}" in line]
    assert not late, f"{len(late)} ticks after the session was destroyed"


def test_a_reconnect_during_a_discard_gets_a_working_session(server):
    """Reconnecting while the discard waits for a callback to stop yields a fresh, working session.

    Before, the reconnect attached to the session being discarded: ACK,
    then an ERROR for its PULL-DOC instead of the document.
    """
    token = fetch_token(f"{server.url}/slow_teardown")
    sid = session_id_of(token)
    with WireClient(f"{server.ws_url}/slow_teardown/ws", token) as client:
        assert attr(client.handshake().content["doc"], "result") == "fresh"
    # Closed: the discard starts after the unused lifetime and takes 2 s.
    log_has_line(server, f"cleaning up {sid}", timeout=15)
    with WireClient(f"{server.ws_url}/slow_teardown/ws", token, timeout=15) as client:
        ack = client.recv()
        assert ack.msgtype == "ACK", ack
        reqid = client.send("PULL-DOC-REQ", {})
        reply = client.recv()
        assert reply.msgtype == "PULL-DOC-REPLY" and reply.header["reqid"] == reqid, reply
        assert attr(reply.content["doc"], "result") == "fresh"
    # The reconnect made the session anew, after the old one was gone.
    wait_until(lambda: server.log().count(f"session created {sid}") == 2, message="second creation")
    assert_server_healthy(server)
