"""The Bokeh protocol and session callbacks against a real `flask_docsync serve` process.

One server (module scope) serves tests/apps/sliders.py, streaming.py and
callbacks.py; every test makes its own sessions. Clients are bokeh.client
(as users run it) and the raw WireClient (to see every frame).
"""

from __future__ import annotations

import json
import time

import bokeh
import numpy as np
import pytest
from bokeh.client import pull_session, push_session
from bokeh.document import Document
from bokeh.models import Div

from flask_docsync.protocol import encode, protocol
from serve_util import (
    assert_server_healthy,
    attr,
    changed,
    decode_ndarray,
    events_of,
    log_has_line,
    map_entries,
    model_id,
    pull_doc,
    session_id_of,
    start_server,
    value_patch,
    wait_until,
)
from wire import WireClient, fetch_token, find_model

APPS = ("tests/apps/sliders.py", "tests/apps/streaming.py", "tests/apps/callbacks.py")


@pytest.fixture(scope="module")
def server():
    # Long unused-session lifetime: sessions here must outlive their
    # connections while a test pulls them again.
    s = start_server(*APPS, "--keep-alive", "0", "--unused-session-lifetime", "600000")
    yield s
    s.stop()


def ws(server, route: str) -> str:
    return f"{server.ws_url}{route}/ws"


def callbacks_session(server, mode: str) -> str:
    """Create a tests/apps/callbacks.py session in ``mode``; return its token."""
    return fetch_token(f"{server.url}/callbacks?mode={mode}")


def pulled_text(server, token: str, name: str, route: str = "/callbacks") -> str:
    return attr(pull_doc(server, route, token), name)


# 1. bokeh.client


def test_pull_session_arguments_and_server_callback(server):
    session = pull_session(url=server.url + "/sliders", arguments={"start": "7"})
    try:
        doc = session.document
        # sliders.py reads session_context.request.arguments["start"].
        assert doc.get_model_by_name("slider").value == 7
        assert doc.get_model_by_name("result").text == "value=7"

        doc.get_model_by_name("slider").value = 42
        session.force_roundtrip()

        # bokeh.client drops server PATCH-DOCs while it awaits a reply, so
        # read the server's state with a second pull of the same session.
        again = pull_session(session_id=session.id, url=server.url + "/sliders")
        try:
            assert again.document.get_model_by_name("slider").value == 42
            assert again.document.get_model_by_name("result").text == "value=42"
        finally:
            again.close()
    finally:
        session.close()


def test_push_session_replaces_the_server_document(server):
    doc = Document()
    doc.add_root(Div(text="pushed by the client", name="pushed"))
    doc.title = "pushed title"
    pushed = push_session(doc, url=server.url + "/sliders")  # raises unless the server answers OK
    try:
        again = pull_session(session_id=pushed.id, url=server.url + "/sliders")
        try:
            assert again.document.get_model_by_name("pushed").text == "pushed by the client"
            assert again.document.get_model_by_name("slider") is None
            assert again.document.title == "pushed title"
        finally:
            again.close()
    finally:
        pushed.close()


def test_push_doc_gets_ok_reply(server):
    token = fetch_token(server.url + "/sliders")
    doc = Document()
    doc.add_root(Div(text="raw push", name="raw"))
    message = protocol.create("PUSH-DOC", doc)
    with WireClient(ws(server, "/sliders"), token) as client:
        assert client.recv().msgtype == "ACK"
        client.send_raw(*encode(message))
        ok, _ = client.recv_until("OK", message.header["msgid"])
        assert ok.content == {}
    assert attr(pull_doc(server, "/sliders", token), "raw") == "raw push"


def test_server_info(server):
    session = pull_session(url=server.url + "/sliders")
    try:
        info = session.request_server_info()
    finally:
        session.close()
    assert info["version_info"]["bokeh"] == bokeh.__version__
    assert info["version_info"]["server"] == bokeh.__version__


# 2. The wire exchange


def test_ack_first_pull_reply_carries_reqid(server):
    token = fetch_token(server.url + "/sliders")
    with WireClient(ws(server, "/sliders"), token) as client:
        first = client.recv()
        assert first.msgtype == "ACK" and first.content == {}
        reqid = client.send("PULL-DOC-REQ", {})
        reply = client.recv()
        assert reply.msgtype == "PULL-DOC-REPLY"
        assert reply.header["reqid"] == reqid
        assert reply.header["msgid"] != reqid
        assert [r["attributes"]["name"] for r in reply.content["doc"]["roots"]] == ["layout"]
        info_id = client.send("SERVER-INFO-REQ", {})
        info = client.recv()
        assert info.msgtype == "SERVER-INFO-REPLY" and info.header["reqid"] == info_id


def test_patch_effect_arrives_before_ok_without_echo(server):
    token = fetch_token(server.url + "/sliders")
    with WireClient(ws(server, "/sliders"), token) as client:
        doc = client.handshake().content["doc"]
        slider, result = model_id(doc, "slider"), model_id(doc, "result")
        reqid = client.send("PATCH-DOC", value_patch(slider, "value", 5), num_buffers=0)
        ok, before = client.recv_until("OK", reqid)
        events = events_of(before)
        assert changed(events, result, "text") == ["value=5"]
        # The patching connection is not sent its own change back.
        assert changed(events, slider, "value") == []
        assert all(len(m.content["events"]) == 1 for m in before if m.msgtype == "PATCH-DOC")


def test_second_connection_gets_echo_and_callback_effect(server):
    token = fetch_token(server.url + "/sliders")
    with WireClient(ws(server, "/sliders"), token) as one, WireClient(ws(server, "/sliders"), token) as two:
        doc = one.handshake().content["doc"]
        two.handshake()
        slider, result = model_id(doc, "slider"), model_id(doc, "result")
        reqid = one.send("PATCH-DOC", value_patch(slider, "value", 63), num_buffers=0)
        one.recv_until("OK", reqid)
        seen = []
        while not (changed(events_of(seen), slider, "value") and changed(events_of(seen), result, "text")):
            assert len(seen) < 20, seen
            seen.append(two.recv())  # times out (fails) if they never come
        events = events_of(seen)
        assert changed(events, slider, "value") == [63]
        assert changed(events, result, "text") == ["value=63"]
        assert not [m for m in seen if m.msgtype in ("OK", "ERROR")]


def test_button_click_event_runs_python_callback(server):
    token = fetch_token(server.url + "/sliders")
    with WireClient(ws(server, "/sliders"), token) as client:
        doc = client.handshake().content["doc"]
        button, clicks = model_id(doc, "button"), model_id(doc, "clicks")
        click = {"events": [{
            "kind": "MessageSent", "msg_type": "bokeh_event",
            "msg_data": {"type": "event", "name": "button_click",
                         "values": {"type": "map", "entries": [["model", {"id": button}]]}},
        }]}
        for n in (1, 2):
            reqid = client.send("PATCH-DOC", click, num_buffers=0)
            ok, before = client.recv_until("OK", reqid)
            assert changed(events_of(before), clicks, "text") == [f"clicks={n}"]


def test_numpy_columns_are_binary_buffers(server):
    token = fetch_token(server.url + "/streaming")
    with WireClient(ws(server, "/streaming"), token) as client:
        reply = client.handshake()
        source = find_model(reply.content["doc"], "source")
        columns = map_entries(source["attributes"]["data"])
        assert reply.header["num_buffers"] == len(reply.buffers) >= 2
        x = decode_ndarray(columns["x"], reply.buffers)
        y = decode_ndarray(columns["y"], reply.buffers)
        # Ticks may already have streamed more points; the columns stay consistent.
        assert x.dtype == np.float64 and len(x) >= 5
        np.testing.assert_array_equal(x, np.arange(len(x), dtype="float64"))
        np.testing.assert_array_equal(y, x / 2)

        streamed = []
        while len(streamed) < 3:
            message, _ = client.recv_until("PATCH-DOC")
            (event,) = message.content["events"]
            assert event["kind"] == "ColumnsStreamed" and event["model"]["id"] == source["id"]
            data = map_entries(event["data"])
            assert message.header["num_buffers"] == len(message.buffers) == 2
            sx = decode_ndarray(data["x"], message.buffers)
            sy = decode_ndarray(data["y"], message.buffers)
            assert sx.shape == (1,) and sx.dtype == np.float64
            np.testing.assert_array_equal(sy, sx / 2)
            streamed.append(float(sx[0]))
        # Consecutive ticks, continuing where the pulled columns ended.
        assert streamed[0] >= len(x)
        assert streamed == [streamed[0] + i for i in range(3)]


def test_new_model_is_sent_in_full_to_every_connection(server):
    # Bokeh 3.9 (defect #2) sends it in full only to the first connection.
    token = callbacks_session(server, "addroot")
    with WireClient(ws(server, "/callbacks"), token) as one, WireClient(ws(server, "/callbacks"), token) as two:
        doc = one.handshake().content["doc"]
        two.handshake()
        button = model_id(doc, "button")
        click = {"events": [{
            "kind": "MessageSent", "msg_type": "bokeh_event",
            "msg_data": {"type": "event", "name": "button_click",
                         "values": {"type": "map", "entries": [["model", {"id": button}]]}},
        }]}
        reqid = one.send("PATCH-DOC", click, num_buffers=0)
        _, before_ok = one.recv_until("OK", reqid)
        added_two, _ = two.recv_until("PATCH-DOC")
        for events in (events_of(before_ok), added_two.content["events"]):
            (root_added,) = [e for e in events if e["kind"] == "RootAdded"]
            model = root_added["model"]
            assert model.get("type") == "object" and model.get("name") == "Div", model
            assert model["attributes"]["text"] == "added by a callback"


# 3. Callbacks on greenlets


def test_periodic_callback_never_overlaps(server):
    token = callbacks_session(server, "overlap")
    # The callback gevent.sleep()s 80 ms with a 30 ms period.
    runs = wait_until(lambda: (r := json.loads(pulled_text(server, token, "runs"))) and len(r) >= 8 and r,
                      message="8 runs of the slow periodic callback")
    for (start, end), (next_start, _) in zip(runs, runs[1:]):
        assert end > start
        assert next_start >= end, f"run started at {next_start} before the previous ended at {end}"


def test_raising_periodic_callback_keeps_running(server):
    token = callbacks_session(server, "periodic_raise")
    sid = session_id_of(token)
    # The callback raises on every run and removes itself on the 10th.
    wait_until(lambda: pulled_text(server, token, "count") == "10", message="10 runs of a raising callback")
    line = log_has_line(server, sid, "error in PeriodicCallback")
    assert "explode" in line
    log_has_line(server, "periodic exploded on purpose, run 9")
    assert_server_healthy(server)


def test_next_tick_callback_from_a_real_thread(server):
    token = callbacks_session(server, "thread")
    text = wait_until(lambda: (t := pulled_text(server, token, "thread")) != "waiting" and t,
                      message="the thread's next-tick callback")
    assert text == "ran asker_is_other_thread=True runner_is_hub=True"


def test_async_callbacks_run_to_completion(server):
    token = callbacks_session(server, "async")
    wait_until(lambda: (d := pull_doc(server, "/callbacks", token))
               and attr(d, "async_periodic") == "3" and attr(d, "async_tick") != "waiting",
               message="async periodic x3 and async next-tick")
    assert pulled_text(server, token, "async_tick") == "done curdoc_ok=True"


def test_without_document_lock_callback(server):
    token = callbacks_session(server, "nolock")
    # A locked callback holds the lock until the unlocked one releases it:
    # that can only finish if the unlocked callback does not take the lock.
    text = wait_until(lambda: (t := pulled_text(server, token, "nolock")) != "waiting" and t,
                      message="the unlocked callback's result")
    assert text == "done proxy=True hog_released=True"


def test_curdoc_is_per_session_when_callbacks_interleave(server):
    tokens = [callbacks_session(server, "curdoc") for _ in range(2)]

    def stats(token):
        return dict(part.split("=") for part in pulled_text(server, token, "curdoc").split())

    for token in tokens:
        final = wait_until(lambda: (s := stats(token))["runs"] == "40" and s, message="40 curdoc checks")
        assert final["ok"] == "40", final
        # Each check sleeps longer than the period, so the two sessions'
        # callbacks were suspended at the same time.
        assert int(final["interleaved"]) > 0, final


def test_remove_periodic_callback_stops_it(server):
    token = callbacks_session(server, "remove")
    wait_until(lambda: (d := pull_doc(server, "/callbacks", token))
               and attr(d, "self_removed") == "3" and attr(d, "removed") == "3",
               message="both periodic callbacks at 3 runs")
    # Ten more periods: neither may run again.
    time.sleep(0.3)
    doc = pull_doc(server, "/callbacks", token)
    assert (attr(doc, "self_removed"), attr(doc, "removed")) == ("3", "3")


def test_patches_before_a_raising_callback_are_sent(server):
    # Bokeh 3.9 (defect #1) drops them and (defect #13) leaks the traceback.
    token = callbacks_session(server, "raise")
    sid = session_id_of(token)
    with WireClient(ws(server, "/callbacks"), token) as client:
        doc = client.handshake().content["doc"]
        slider, result = model_id(doc, "slider"), model_id(doc, "result")
        reqid = client.send("PATCH-DOC", value_patch(slider, "value", 9), num_buffers=0)
        error, before = client.recv_until("ERROR", reqid)
        assert changed(events_of(before), result, "text") == ["set before raise 9"]
        assert error.content["traceback"] is None
        assert "on_change exploded on purpose" in error.content["text"]
        assert "Traceback" not in error.content["text"] and 'File "' not in error.content["text"]
        # The connection stays open.
        info_id = client.send("SERVER-INFO-REQ", {})
        client.recv_until("SERVER-INFO-REPLY", info_id)
    assert attr(pull_doc(server, "/callbacks", token), "result") == "set before raise 9"
    log_has_line(server, sid, "PATCH-DOC", reqid, "failed")
