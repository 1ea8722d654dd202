"""Bad input against a real `flask_docsync serve` process.

Every test checks three things: the exact reply or close code, the reason in
the server log, and that a fresh session on the same server still completes
a handshake and a patch round trip afterwards.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
import websocket
from bokeh.util.token import generate_jwt_token, generate_session_id
from serve_util import (
    APPS,
    assert_server_healthy,
    attr,
    changed,
    connected,
    events_of,
    log_has_line,
    model_id,
    sliders_ws_url,
    start_server,
    value_patch,
)
from wire import WireClient, fetch_token

SLIDERS = APPS / "sliders.py"
SECRET = "flask-docsync-test-secret-key-0123456789abcdef"


@pytest.fixture(scope="module")
def server():
    s = start_server(SLIDERS, "--websocket-max-message-size", "1000", "--keep-alive", "0")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def signed_server():
    s = start_server(SLIDERS, "--keep-alive", "0", env={"BOKEH_SECRET_KEY": SECRET})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def origin_server():
    s = start_server(SLIDERS, "--keep-alive", "0", "--allow-websocket-origin", "evil.example")
    yield s
    s.stop()


ws_url = sliders_ws_url


def refused(server, token: str | None, **kwargs) -> websocket.WebSocketBadStatusException:
    """Open a WebSocket that must be refused before the upgrade; return the error."""
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        WireClient(ws_url(server), token, **kwargs).close()
    return info.value


def unique_id() -> str:
    return "chosen" + uuid.uuid4().hex


# Protocol violations: close 1002


def closes_with_1002(server, send, reason: str) -> None:
    """``send(client, doc)`` breaks the protocol: the connection is closed with
    1002, the log names the session and ``reason``, the server stays healthy."""
    client, sid, doc = connected(server)
    with client:
        send(client, doc)
        assert client.expect_close()[0] == 1002
    log_has_line(server, sid, "closed with 1002", reason)
    assert_server_healthy(server)


def test_malformed_json_header(server):
    closes_with_1002(server, lambda c, doc: c.send_raw("{not json", "{}", "{}"), "header is not valid JSON")


def test_binary_frame_where_header_expected(server):
    closes_with_1002(server, lambda c, doc: c.send_raw(b'{"msgid": "x", "msgtype": "PULL-DOC-REQ"}'),
                     "expected a text frame")


def test_text_frame_where_buffer_expected(server):
    def send(client, doc):
        header = {"msgid": "buf1", "msgtype": "PATCH-DOC", "num_buffers": 1}
        patch = value_patch(model_id(doc, "slider"), "value", 3)
        client.send_raw(json.dumps(header), "{}", json.dumps(patch), json.dumps({"id": "0"}), "not binary")

    closes_with_1002(server, send, "malformed message")


def test_unknown_message_type(server):
    closes_with_1002(server, lambda c, doc: c.send("NO-SUCH-TYPE", {}), "unknown message type 'NO-SUCH-TYPE'")


@pytest.mark.parametrize("msgtype", ["ACK", "OK"])
def test_server_only_message_type_from_client(server, msgtype):
    closes_with_1002(server, lambda c, doc: c.send(msgtype, {}), f"'{msgtype}' is sent by servers, not clients")


@pytest.mark.parametrize("num_buffers", [10**9, -1, "many"])
def test_absurd_num_buffers(server, num_buffers):
    header = json.dumps({"msgid": "nb", "msgtype": "PATCH-DOC", "num_buffers": num_buffers})
    closes_with_1002(server, lambda c, doc: c.send_raw(header), "num_buffers must be an integer")


# A failing request: ERROR reply, the connection stays


def test_patch_naming_unknown_model_gets_error_reply(server):
    client, sid, doc = connected(server)
    with client:
        reqid = client.send("PATCH-DOC", value_patch("p99999", "value", 1), num_buffers=0)
        error, _ = client.recv_until("ERROR", reqid)
        assert "p99999" in error.content["text"]
        assert error.content["traceback"] is None
        # Still open and still working.
        slider, result = model_id(doc, "slider"), model_id(doc, "result")
        reqid2 = client.send("PATCH-DOC", value_patch(slider, "value", 4), num_buffers=0)
        _, before = client.recv_until("OK", reqid2)
        assert changed(events_of(before), result, "text") == ["value=4"]
    log_has_line(server, sid, "PATCH-DOC", reqid, "failed", "p99999")
    assert_server_healthy(server)


# Size limit: close 1009


def test_oversize_message(server):
    client, sid, _ = connected(server)
    with client:
        client.send("PATCH-DOC", {"events": [], "padding": "x" * 5000}, num_buffers=0)
        assert client.expect_close()[0] == 1009
    log_has_line(server, sid, "closed 1009")
    assert_server_healthy(server)


# Tokens: HTTP 403 before the upgrade


def test_missing_token(server):
    error = refused(server, None, subprotocols=["bokeh"])
    assert error.status_code == 403
    log_has_line(server, "refused (403)", "Expected the subprotocols 'bokeh' and a session token")
    assert_server_healthy(server)


def test_garbled_token(server):
    error = refused(server, "garbage.token.xyz")
    assert error.status_code == 403
    log_has_line(server, "refused (403)", "session token is malformed")
    assert_server_healthy(server)


@pytest.fixture(scope="module")
def expiry_case():
    """A server with 1 s tokens, a token for a new id and a live session, both past expiry.

    The live session got value 33 from its first connection.
    """
    s = start_server(SLIDERS, "--keep-alive", "0", "--session-token-expiration", "1",
                     "--unused-session-lifetime", "600000")
    try:
        new_token = generate_jwt_token(unique_id(), secret_key=None, signed=False, expiration=1)
        live_token = fetch_token(s.url + "/sliders")
        with WireClient(ws_url(s), live_token) as client:
            doc = client.handshake().content["doc"]
            reqid = client.send("PATCH-DOC", value_patch(model_id(doc, "slider"), "value", 33), num_buffers=0)
            client.recv_until("OK", reqid)
        time.sleep(2)
        yield s, new_token, live_token
    finally:
        s.stop()


def test_expired_token_cannot_create_a_session(expiry_case):
    server, new_token, _ = expiry_case
    error = refused(server, new_token)
    assert error.status_code == 403
    log_has_line(server, "refused (403)", "Token is expired")
    # A fresh page token is fine.
    assert_server_healthy(server)


def test_live_session_reattaches_after_expiry(expiry_case):
    # Bokeh 3.9 (defect #9) refuses this reconnect.
    server, _, live_token = expiry_case
    with WireClient(ws_url(server), live_token) as client:
        doc = client.handshake().content["doc"]
    # The same session: it kept the value its first connection set.
    assert attr(doc, "slider", "value") == 33
    assert attr(doc, "result") == "value=33"
    assert_server_healthy(server)


def test_foreign_signed_token(signed_server):
    foreign_id = generate_session_id(secret_key=b"other", signed=True)
    token = generate_jwt_token(foreign_id, secret_key=b"other", signed=True, expiration=300)
    error = refused(signed_server, token)
    assert error.status_code == 403
    log_has_line(signed_server, "refused (403)", "signature does not match")
    assert_server_healthy(signed_server)


def test_client_chosen_unsigned_id_when_signing(signed_server):
    token = generate_jwt_token(unique_id(), secret_key=None, signed=False, expiration=300)
    error = refused(signed_server, token)
    assert error.status_code == 403
    log_has_line(signed_server, "refused (403)", "signature does not match")
    # The page refuses a chosen id too.
    status, _, _ = signed_server.get("/sliders?bokeh-session-id=" + unique_id())
    assert status == 403
    log_has_line(signed_server, "Refused session request /sliders", "not signed")
    assert_server_healthy(signed_server)


# Origins


def test_foreign_origin_refused_before_upgrade(server):
    error = refused(server, fetch_token(server.url + "/sliders"), origin="http://evil.example")
    assert error.status_code == 403
    log_has_line(server, "refused (403)", "Refusing websocket connection from Origin 'http://evil.example'")
    assert_server_healthy(server)


@pytest.mark.parametrize("origin", [None, "same-host", "localhost"])
def test_allowed_origins(server, origin):
    if origin == "same-host":
        origin = server.url
    elif origin == "localhost":
        origin = f"http://localhost:{server.port}"  # bokeh serve's default allowlist
    with WireClient(ws_url(server), fetch_token(server.url + "/sliders"), origin=origin) as client:
        assert client.handshake().msgtype == "PULL-DOC-REPLY"
    assert_server_healthy(server)


def test_allow_websocket_origin_flag(origin_server):
    token = fetch_token(origin_server.url + "/sliders")
    with WireClient(ws_url(origin_server), token, origin="http://evil.example") as client:
        assert client.handshake().msgtype == "PULL-DOC-REPLY"
    error = refused(origin_server, token, origin="http://other.example")
    assert error.status_code == 403
    log_has_line(origin_server, "refused (403)", "'http://other.example'")
    assert_server_healthy(origin_server)
