"""Hostile input against a real `flask-docsync serve`, and property-based tests of the parsers.

Complements tests/test_serve_bad_input.py (malformed header JSON, binary
header frame, text buffer payload, unknown and server-only message types,
num_buffers 10**9/-1/"many", unknown model, oversize message, missing,
garbled, expired and foreign tokens, client-chosen id in the page query and
the WebSocket token, origins) and tests/test_websocket.py (frame-level
violations on a plain echo app). Every attack here checks:

- the exact reply (ERROR text, HTTP status) or close code,
- the reason in the server log,
- that another session on the same server kept completing round trips
  *during* the attack: :func:`reliability_util.under_attack` repeats the
  attack in this thread while a :class:`~reliability_util.HealthyClient`
  thread does PATCH-DOC round trips, until at least three of them both
  started and ended while attacks were under way.

Where the right answer is no refusal (a replayed token joins its session,
readonly and unknown properties are handled as Bokeh does, a slowloris
handshake gets no answer at all), the docstring says so.

The property-based tests at the end drive ``flask_docsync.websocket``'s
frame parser over a gevent socketpair, and ``MessageDecoder`` directly,
with arbitrary input.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import sys
import time
import uuid
import zlib

import gevent
import gevent.socket
import pytest
import websocket
from bokeh.util.token import (
    _TOKEN_ZLIB_KEY,
    _base64_encode,
    generate_jwt_token,
    generate_session_id,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_util import HealthyClient, raw_request, stats, under_attack
from serve_util import (
    APPS,
    assert_server_healthy,
    attr,
    changed,
    connected,
    events_of,
    log_has_line,
    model_id,
    pull_doc,
    session_id_of,
    sliders_ws_url,
    start_server,
    value_patch,
)
from wire import WireClient, fetch_token

from flask_docsync.errors import ProtocolViolation
from flask_docsync.protocol import (
    CLIENT_MESSAGE_TYPES,
    MAX_BUFFERS,
    MAX_CONTENT_DEPTH,
    MessageDecoder,
    protocol,
)
from flask_docsync.tokens import MAX_TOKEN_PAYLOAD
from flask_docsync.errors import ConnectionClosed
from flask_docsync.websocket import WebSocket, _valid_close_code

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ws_apps.rawclient import build_frame, close_payload  # noqa: E402

SLIDERS = APPS / "sliders.py"
THROTTLED = APPS / "throttled.py"
SECRET = "flask-docsync-hostile-secret-key-0123456789abcdef"
MAX_MESSAGE = 4_000_000
STATS_ON = {"DOCSYNC_STATS_ENDPOINT": "true"}


@pytest.fixture(scope="module")
def server():
    s = start_server(SLIDERS, THROTTLED, "--keep-alive", "0", "--websocket-max-message-size", MAX_MESSAGE,
                     env=STATS_ON)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def signed_server():
    s = start_server(SLIDERS, "--keep-alive", "0", env={"BOKEH_SECRET_KEY": SECRET, **STATS_ON})
    yield s
    s.stop()


ws_url = sliders_ws_url


def unique_id() -> str:
    return "chosen" + uuid.uuid4().hex


def unsigned_token(session_id: str | None = None, **extra) -> str:
    return generate_jwt_token(session_id or unique_id(), secret_key=None, signed=False, expiration=300,
                              extra_payload=extra or None)


def session_count(server) -> int:
    return stats(server)["sessions"]


def upgrade_lines(server, token: str, drop: tuple[str, ...] = (), extra: tuple[str, ...] = (),
                  request_line: str = "GET /sliders/ws HTTP/1.1") -> list[str]:
    """A hand-written upgrade request; ``drop`` names headers to leave out."""
    headers = {
        "Host": f"127.0.0.1:{server.port}",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Protocol": f"bokeh, {token}",
    }
    return [request_line] + [f"{k}: {v}" for k, v in headers.items() if k not in drop] + list(extra)


def expect_refused(server, token: str, status: int, *log_parts: str, **kwargs) -> None:
    """A WebSocket with ``token`` is refused with HTTP ``status`` before the upgrade."""
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        WireClient(ws_url(server), token, **kwargs).close()
    assert info.value.status_code == status
    log_has_line(server, f"refused ({status})", *log_parts)


def attack_closes(server, frames, code: int, *log_parts: str, raw: bool = False):
    """An attack: a fresh session sends ``frames``; the server must close with ``code``."""

    def attack() -> None:
        client, sid, doc = connected(server)
        with client:
            for frame in frames(doc) if callable(frames) else frames:
                if raw:
                    client.ws.sock.sendall(frame)
                else:
                    client.send_raw(frame)
            got, reason = client.expect_close()
            assert got == code and reason, (got, reason)  # the reason goes to the client too
        log_has_line(server, sid, *log_parts)

    return attack


# Wrong frame types and malformed Bokeh messages: close 1002


def _header(num_buffers: int = 0, **extra) -> str:
    return json.dumps({"msgid": "h1", "msgtype": "PATCH-DOC", "num_buffers": num_buffers, **extra})


@pytest.mark.parametrize(("frames", "slot"), [
    ([_header(), b"{}"], "metadata"),
    ([_header(), "{}", b'{"events": []}'], "content"),
    # A binary frame where the text buffer header is due (header-less buffer).
    ([_header(1), "{}", '{"events": []}', b"\x00\x01payload"], "buffer header"),
], ids=["metadata", "content", "buffer-header"])
def test_binary_frame_in_a_text_slot(server, frames, slot):
    under_attack(server, attack_closes(
        server, frames, 1002, "closed with 1002", f"expected a text frame with the {slot}"))


@pytest.mark.parametrize("buffer_header", ['[1, 2]', '{"ID": "0"}', '"id"', "null", "not json"])
def test_buffer_header_that_is_not_an_id_object(server, buffer_header):
    frames = [_header(1), "{}", '{"events": []}', buffer_header, b"\x00payload"]
    under_attack(server, attack_closes(server, frames, 1002, "closed with 1002", "malformed message"))


@pytest.mark.parametrize("num_buffers", [MAX_BUFFERS + 1, 2**64, 1.5, None])
def test_num_buffers_over_the_limit_or_not_an_integer(server, num_buffers):
    frames = [json.dumps({"msgid": "nb", "msgtype": "PATCH-DOC", "num_buffers": num_buffers})]
    under_attack(server, attack_closes(
        server, frames, 1002, "closed with 1002", f"num_buffers must be an integer from 0 to {MAX_BUFFERS}"))


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(("frames", "reason"), [
    (['{"msgid": "d", "msgtype": "PATCH-DOC", "x": ' + DEEP + "}"], "message header: JSON nested too deeply"),
    ([_header(), DEEP, '{"events": []}'], "malformed message: JSON nested too deeply"),
    ([_header(), "{}", '{"events": ' + DEEP + "}"], "malformed message: JSON nested too deeply"),
], ids=["header", "metadata", "content"])
def test_100k_nested_lists_close_with_1002(server, frames, reason):
    # Python's JSON parser raises RecursionError on these; that is the
    # client's fault (1002), not an internal error (1011).
    under_attack(server, attack_closes(server, frames, 1002, "closed with 1002", reason))


# RFC 6455 violations at the Bokeh endpoint: the close code, and a warning naming the session


@pytest.mark.parametrize(("frame", "code", "reason"), [
    (build_frame(1, b'{"x": 1}', mask=False), 1002, "client frames must be masked"),
    (build_frame(1, b"{}", rsv=4), 1002, "reserved bits set"),
    (build_frame(3, b"{}"), 1002, "unknown opcode 0x3"),
    (build_frame(9, b"ping", fin=False), 1002, "fragmented control frame"),
    (build_frame(0, b"{}"), 1002, "continuation frame without a message"),
    (build_frame(8, close_payload(1005)), 1002, "invalid close code 1005"),
    (build_frame(1, b'{"text": "\xff\xfe"}'), 1007, "text message is not valid UTF-8"),
], ids=["unmasked", "rsv", "opcode", "fragmented-ping", "continuation", "close-1005", "utf8"])
def test_malformed_frames_at_the_bokeh_endpoint(server, frame, code, reason):
    under_attack(server, attack_closes(server, [frame], code, f"closed ({code}", reason, raw=True))


# Bad patches: an ERROR reply, and the connection stays


def _slider_event(doc, attribute, new):
    return {"kind": "ModelChanged", "model": {"id": model_id(doc, "slider")}, "attr": attribute, "new": new}


BAD_EVENTS = {
    "wrong-type-str": (lambda d: [_slider_event(d, "value", "abc")], "expected a value of type Real, got abc"),
    "wrong-type-null": (lambda d: [_slider_event(d, "value", None)], "expected a value of type Real, got None"),
    "wrong-type-list": (lambda d: [_slider_event(d, "value", [1, 2])], "expected a value of type Real"),
    "wrong-model-type": (lambda d: [_slider_event(d, "title", {"id": model_id(d, "result")})],
                         "expected either None or a value of type String, got Div"),
    "readonly-wrong-type": (lambda d: [_slider_event(d, "value_throttled", "abc")],
                            "value_throttled: expected a value of type Real"),
    "dangling-ref": (lambda d: [_slider_event(d, "value", {"type": "ref", "id": "p99999"})],
                     "can't resolve reference 'p99999'"),
    "missing-buffer": (lambda d: [_slider_event(d, "value", {
        "type": "ndarray", "array": {"type": "bytes", "data": {"id": "nobuf"}},
        "shape": [1], "dtype": "float64", "order": "little"})], "can't resolve buffer 'nobuf'"),
    "unknown-event-kind": (lambda d: [{"kind": "NoSuchEvent"}], "unknown patch event type"),
    "event-without-model": (lambda d: [{"kind": "ModelChanged", "attr": "value", "new": 1}], "'model'"),
    "unknown-root": (lambda d: [{"kind": "RootAdded", "model": {"id": "p4242"}}], "can't resolve reference 'p4242'"),
    "too-deep-value": (lambda d: [_slider_event(d, "tags", json.loads("[" * 300 + "]" * 300))],
                       f"nested more than {MAX_CONTENT_DEPTH} levels deep"),
}


@pytest.mark.parametrize("case", list(BAD_EVENTS))
def test_bad_patch_gets_error_reply_and_connection_stays(server, case):
    make_events, expected = BAD_EVENTS[case]

    def attack() -> None:
        client, sid, doc = connected(server)
        with client:
            reqid = client.send("PATCH-DOC", {"events": make_events(doc)}, num_buffers=0)
            error, _ = client.recv_until("ERROR", reqid)
            assert expected in error.content["text"], error.content
            assert error.content["traceback"] is None
            # The same connection still works, and the bad value did not stick.
            slider, result = model_id(doc, "slider"), model_id(doc, "result")
            reqid2 = client.send("PATCH-DOC", value_patch(slider, "value", 42), num_buffers=0)
            _, before = client.recv_until("OK", reqid2)
            assert changed(events_of(before), result, "text") == ["value=42"]
            pulled = client.send("PULL-DOC-REQ", {})
            doc2 = client.recv_until("PULL-DOC-REPLY", pulled)[0].content["doc"]
            assert attr(doc2, "slider", "value") == 42
            assert attr(doc2, "slider", "title") == "value"
        log_has_line(server, sid, "PATCH-DOC", reqid, "failed")

    under_attack(server, attack)


def test_nesting_below_the_limit_is_accepted_and_stays_pullable(server):
    client, sid, doc = connected(server)
    nested = json.loads("[" * 100 + "]" * 100)
    with client:
        reqid = client.send("PATCH-DOC", {"events": [_slider_event(doc, "tags", nested)]}, num_buffers=0)
        client.recv_until("OK", reqid)
    token = fetch_token(server.url + "/sliders")  # another session is unaffected either way
    assert pull_doc(server, "/sliders", token)
    assert_server_healthy(server)


def test_readonly_and_unknown_properties_behave_as_in_bokeh(server):
    """Not ERROR replies, deliberately, as in Bokeh.

    ``readonly`` only stops Python code from assigning: BokehJS itself sends
    the readonly properties it computes (``Slider.value_throttled``,
    ``Plot.inner_width``), and apps react to them
    (``slider.on_change("value_throttled", ...)``), so a patch to one is
    applied; its type is still validated (``readonly-wrong-type`` above).
    A property the model does not have is ignored with Bokeh's warning,
    since BokehJS may send client-only attributes.
    """

    def attack() -> None:
        token = fetch_token(server.url + "/throttled")
        with WireClient(server.ws_url + "/throttled/ws", token) as client:
            doc = client.handshake().content["doc"]
            slider, throttled = model_id(doc, "slider"), model_id(doc, "throttled")
            reqid = client.send("PATCH-DOC", {"events": [
                _slider_event(doc, "value_throttled", 7),
                _slider_event(doc, "no_such_property", 5),
                _slider_event(doc, "__class__", "Div"),
            ]}, num_buffers=0)
            _, before = client.recv_until("OK", reqid)
            assert changed(events_of(before), throttled, "text") == ["throttled=7"]
            pulled = client.send("PULL-DOC-REQ", {})
            doc2 = client.recv_until("PULL-DOC-REPLY", pulled)[0].content["doc"]
        model = [m for m in _models(doc2) if m["id"] == slider][0]
        assert model["name"] == "Slider" and "no_such_property" not in model["attributes"]
        log_has_line(server, "JSON had attr 'no_such_property'", "client-only or invalid attribute")

    under_attack(server, attack)


def _models(node):
    if isinstance(node, dict):
        if node.get("type") == "object":
            yield node
        for value in node.values():
            yield from _models(value)
    elif isinstance(node, list):
        for value in node:
            yield from _models(value)


def test_huge_json_near_the_size_limit(server):
    """Just under --websocket-max-message-size: accepted, applied, and pulled back.

    (Just over it is refused with 1009 from the frame header:
    test_serve_bad_input.test_oversize_message.)
    """
    big_text = "y" * (MAX_MESSAGE - 2000)

    def attack() -> None:
        client, sid, doc = connected(server)
        with client:
            result = model_id(doc, "result")
            frames_size = len(json.dumps(value_patch(result, "text", big_text)))
            assert MAX_MESSAGE - 2100 < frames_size < MAX_MESSAGE
            reqid = client.send("PATCH-DOC", value_patch(result, "text", big_text), num_buffers=0)
            client.recv_until("OK", reqid)
            pulled = client.send("PULL-DOC-REQ", {})
            doc2 = client.recv_until("PULL-DOC-REPLY", pulled)[0].content["doc"]
            assert attr(doc2, "result") == big_text
            # A large array of numbers, also just under the limit.
            numbers = list(range(300_000))
            reqid = client.send("PATCH-DOC", value_patch(result, "tags", numbers), num_buffers=0)
            client.recv_until("OK", reqid)

    under_attack(server, attack, min_round_trips=2)


# Tokens and session ids


def test_replayed_token_joins_the_live_session(server):
    """As in Bokeh, a session token is a bearer credential for its session.

    A second client presenting the token of a live session (a second tab, or
    someone who copied it) joins that same session, with nothing to refuse
    or log: both see the same document and each other's changes. What
    protects a session is that its token is unguessable, travels over TLS in
    production, and (with ``DocSync(authorize=...)``) that a reconnect must
    come from the user the session was made for.
    """

    def attack() -> None:
        token = fetch_token(server.url + "/sliders")
        before = session_count(server)
        with WireClient(ws_url(server), token) as first, WireClient(ws_url(server), token) as replay:
            doc1 = first.handshake().content["doc"]
            doc2 = replay.handshake().content["doc"]
            assert model_id(doc1, "slider") == model_id(doc2, "slider")
            slider, result = model_id(doc1, "slider"), model_id(doc1, "result")
            reqid = first.send("PATCH-DOC", value_patch(slider, "value", 64), num_buffers=0)
            _, before_ok = first.recv_until("OK", reqid)
            assert changed(events_of(before_ok), result, "text") == ["value=64"]
            # The replaying client gets the first client's change and its effect.
            patch, _ = replay.recv_until("PATCH-DOC")
            seen = [patch, replay.recv()]
            assert changed(events_of(seen), slider, "value") == [64]
            assert changed(events_of(seen), result, "text") == ["value=64"]
        assert session_count(server) <= before  # joined, not created
        assert attr(pull_doc(server, "/sliders", token), "result") == "value=64"

    under_attack(server, attack)


def _tampered(token: str, **changes) -> str:
    """``token`` with its payload changed and the original signature kept."""
    body, _, signature = token.partition(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload.update(changes)
    return _base64_encode(json.dumps(payload)) + "." + signature


def test_forged_tokens_are_refused(signed_server):
    server = signed_server
    real = fetch_token(server.url + "/sliders")
    other_id = session_id_of(fetch_token(server.url + "/sliders"))
    forgeries = [
        # A longer life for a real token.
        (_tampered(real, session_expiry=time.time() + 10**6), "signature does not match"),
        # A real token pointed at another (valid, signed) session id.
        (_tampered(real, session_id=other_id), "signature does not match"),
        # The signature stripped.
        (real.partition(".")[0], "signature does not match"),
        # An unsigned session id, properly encoded.
        (unsigned_token(), "signature does not match"),
        # Signed with another key.
        (generate_jwt_token(generate_session_id(secret_key=b"x" * 40, signed=True),
                            secret_key=b"x" * 40, signed=True, expiration=300), "signature does not match"),
    ]
    base = session_count(server)

    def attack() -> None:
        for token, reason in forgeries:
            expect_refused(server, token, 403, reason)

    under_attack(server, attack)
    assert session_count(server) <= base + 1  # only the healthy client's own session


def test_client_chosen_session_ids_are_refused_when_signing(signed_server):
    """Page query and WebSocket token: test_serve_bad_input. Here: the header, autoload.js, fake signatures."""
    server = signed_server
    foreign_signed = generate_session_id(secret_key=b"x" * 40, signed=True)
    base = session_count(server)

    def attack() -> None:
        status, _, body = server.get("/sliders", headers={"Bokeh-Session-Id": unique_id()})
        assert status == 403 and b"not signed" in body
        status, _, _ = server.get(f"/sliders?bokeh-session-id={foreign_signed}")
        assert status == 403
        status, _, _ = server.get(f"/sliders?bokeh-session-id={unique_id()}.fakesignature")
        assert status == 403
        status, _, body = server.get(
            f"/sliders/autoload.js?bokeh-autoload-element=x&bokeh-session-id={unique_id()}")
        assert status == 403 and b"not signed" in body
        status, _, body = server.get(f"/sliders?bokeh-session-id={foreign_signed}",
                                     headers={"Bokeh-Session-Id": foreign_signed})
        assert status == 403 and b"provided as an argument and header" in body
        log_has_line(server, "Refused session request /sliders/autoload.js", "not signed")
        log_has_line(server, "Refused session request /sliders", "provided as an argument and header")

    under_attack(server, attack)
    assert session_count(server) <= base + 1


def _zlib_token(inflated: bytes, session_id: str, signature: str | None) -> str:
    payload = {"session_id": session_id, "session_expiry": int(time.time()) + 300,
               _TOKEN_ZLIB_KEY: _base64_encode(zlib.compress(inflated, 9))}
    token = _base64_encode(json.dumps(payload))
    return token if signature is None else token + "." + signature


def test_oversize_and_inflating_tokens_on_a_signing_server(signed_server):
    """Forged tokens are refused before their payload is unpacked.

    Bokeh's token payload may be zlib-compressed. A forged ~58 KB token that
    inflates to 33 MB would otherwise cost the server that memory and the
    event loop ~0.15 s per request; a token whose compressed part is corrupt
    shows the order: it is refused for its signature, not as malformed.
    Past the 64 KB header line limit gevent answers 400 before the app runs.
    """
    server = signed_server
    signed_id = generate_session_id(secret_key=SECRET.encode(), signed=True)
    bomb = _zlib_token(json.dumps({"arguments": {"a": ["x" * 33_000_000]}}).encode(), signed_id, "forged")
    assert 40_000 < len(bomb) < 64_000
    corrupt = _base64_encode(json.dumps({"session_id": signed_id, "session_expiry": int(time.time()) + 300,
                                         _TOKEN_ZLIB_KEY: _base64_encode(b"not zlib at all")})) + ".forged"
    garbage = "A" * 20_000
    too_long = "B" * 70_000

    def attack() -> None:
        expect_refused(server, bomb, 403, "signature does not match")
        expect_refused(server, corrupt, 403, "signature does not match")
        expect_refused(server, garbage, 403, "session token is malformed")
        status, _, _ = raw_request(server, upgrade_lines(server, too_long))
        assert status == 400
        log_has_line(server, "Invalid headers status: 'Line too long'")

    under_attack(server, attack)


def test_oversize_and_inflating_tokens_on_an_unsigned_server(server):
    """Without signing, clients may choose session ids and token payloads (Bokeh's unsigned mode).

    A 20 KB token of incompressible arguments is accepted and its arguments
    reach the app; one that inflates past MAX_TOKEN_PAYLOAD is refused.
    """
    pad = base64.b64encode(os.urandom(15_000)).decode()

    def attack() -> None:
        big = unsigned_token(arguments={"start": [b"42"], "pad": [pad.encode()]})
        assert len(big) > 20_000
        with WireClient(ws_url(server), big) as client:
            assert attr(client.handshake().content["doc"], "slider", "value") == 42
        bomb = _zlib_token(json.dumps({"arguments": {"a": ["x" * (2 * MAX_TOKEN_PAYLOAD)]}}).encode(),
                           unique_id(), None)
        expect_refused(server, bomb, 403, f"payload is over {MAX_TOKEN_PAYLOAD} bytes")

    under_attack(server, attack)


# The WebSocket handshake: refused with 400/426 before the upgrade


HANDSHAKES = {
    "duplicate-key": (dict(extra=(f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",)),
                      400, "Invalid Sec-WebSocket-Key"),
    "missing-key": (dict(drop=("Sec-WebSocket-Key",)), 400, "needs a Sec-WebSocket-Key header"),
    "missing-upgrade": (dict(drop=("Upgrade",)), 400, "not a WebSocket upgrade request"),
    "duplicate-upgrade": (dict(extra=("Upgrade: websocket",)), 400, "not a WebSocket upgrade request"),
    "missing-connection": (dict(drop=("Connection",)), 400, "not a WebSocket upgrade request"),
    "missing-version": (dict(drop=("Sec-WebSocket-Version",)), 426, "no Sec-WebSocket-Version"),
    "duplicate-version": (dict(extra=("Sec-WebSocket-Version: 13",)), 426, "version '13,13'"),
    "http-1.0": (dict(request_line="GET /sliders/ws HTTP/1.0"), 400, "needs HTTP/1.1 or later"),
}


@pytest.mark.parametrize("case", list(HANDSHAKES))
def test_upgrade_with_missing_or_duplicate_headers(server, case):
    kwargs, status, reason = HANDSHAKES[case]

    def attack() -> None:
        before = session_count(server)
        got, headers, body = raw_request(server, upgrade_lines(server, unsigned_token(), **kwargs))
        assert got == status, (got, body)
        assert "sec-websocket-accept" not in headers
        if status == 426:
            assert headers["sec-websocket-version"] == "13"
        log_has_line(server, f"refused ({status})", reason)
        assert session_count(server) <= before  # no session for a refused handshake

    under_attack(server, attack)


def test_split_subprotocol_headers_are_joined_as_http_says(server):
    """Two Sec-WebSocket-Protocol lines are one list (RFC 9110 5.3), so the upgrade succeeds."""
    token = fetch_token(server.url + "/sliders")
    lines = upgrade_lines(server, token, drop=("Sec-WebSocket-Protocol",),
                          extra=("Sec-WebSocket-Protocol: bokeh", f"Sec-WebSocket-Protocol: {token}"))
    status, headers, _ = raw_request(server, lines)
    assert status == 101 and headers["sec-websocket-protocol"] == "bokeh"


def test_slowloris_partial_handshakes_do_not_block_other_clients(server):
    """150 connections dribble an unfinished request; new and existing sessions carry on.

    Nothing is logged and nothing answered: gevent's WSGI server has no
    request-header timeout, so each such connection holds a greenlet and a
    file descriptor until the client goes away (the README recommends a
    proxy's header timeout in front).
    """
    socks = []
    try:
        with HealthyClient(server) as healthy:
            started = time.monotonic()
            for i in range(100):
                s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                s.sendall(b"GET /sliders/ws HT")  # half a request line
                socks.append(s)
            for i in range(50):
                s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                s.sendall(b"GET /sliders/ws HTTP/1.1\r\nHost: x\r\nUpgrade: webs")  # half the headers
                socks.append(s)
            for _ in range(3):
                for s in socks:
                    s.sendall(b"X")  # one byte at a time, never a line end
                assert_server_healthy(server)  # a brand-new session works meanwhile
            healthy.wait_for(healthy.count + 3)
            ended = time.monotonic()
            assert healthy.completed_between(started, ended) >= 3
        for s in socks:
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)  # still pending: the server neither answered nor hung up
    finally:
        for s in socks:
            s.close()
    assert_server_healthy(server)


# Property-based tests: the frame parser and the message decoder


def _server_frames(data: bytes) -> list[tuple[bool, int, bytes]]:
    """Parse what the server wrote: complete, unmasked frames only."""
    frames = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 2, data[pos:]
        b0, b1 = data[pos], data[pos + 1]
        assert not b1 & 0x80, "server frames are never masked"
        length, pos = b1 & 0x7F, pos + 2
        if length == 126:
            length, pos = struct.unpack_from("!H", data, pos)[0], pos + 2
        elif length == 127:
            length, pos = struct.unpack_from("!Q", data, pos)[0], pos + 8
        assert pos + length <= len(data), "truncated server frame"
        frames.append((bool(b0 & 0x80), b0 & 0x0F, data[pos:pos + length]))
        pos += length
    return frames


def _drain(sock) -> bytes:
    data = b""
    sock.settimeout(5)
    while True:
        try:
            chunk = sock.recv(65536)
        except OSError:
            return data
        if not chunk:
            return data
        data += chunk


def _run_parser(chunks: list[bytes], use_timeouts: bool, max_message_size: int | None = 4096):
    """Feed ``chunks`` to a server WebSocket; return (messages, ConnectionClosed, server output)."""
    a, b = gevent.socket.socketpair()
    try:
        ws = WebSocket({}, a, max_message_size=max_message_size)
        ws.close_timeout = 0.2

        def feed() -> None:
            try:
                for chunk in chunks:
                    b.sendall(chunk)
                    gevent.sleep(0)
                b.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server hung up first

        feeder = gevent.spawn(feed)
        messages: list[str | bytes] = []
        closed = None
        with gevent.Timeout(20, AssertionError("the frame parser hung")):
            try:
                for _ in range(100_000):
                    message = ws.receive(timeout=0.005 if use_timeouts else None)
                    if message is not None:
                        assert isinstance(message, (str, bytes))
                        messages.append(message)
            except ConnectionClosed as exc:
                closed = exc
            feeder.join()
        assert closed is not None, "the parser neither ended nor hung"
        assert ws.closed
        return messages, closed, _drain(b)
    finally:
        a.close()
        b.close()


def _check_server_output(output: bytes, closed: ConnectionClosed) -> list[tuple[bool, int, bytes]]:
    frames = _server_frames(output)
    for fin, opcode, payload in frames:
        assert fin and opcode in (0x8, 0xA), (opcode, payload)  # only pongs and a close
    closes = [payload for _, opcode, payload in frames if opcode == 0x8]
    assert len(closes) <= 1 and (not closes or frames[-1][1] == 0x8)
    if closes:
        code = struct.unpack("!H", closes[0][:2])[0]
        assert _valid_close_code(code), code
        closes[0][2:].decode("utf-8")
    return frames


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(st.binary(max_size=300), max_size=20), use_timeouts=st.booleans())
def test_frame_parser_on_arbitrary_bytes(chunks, use_timeouts):
    """Any byte stream: messages, then ConnectionClosed with a valid code; never a hang or another error."""
    _, closed, output = _run_parser(chunks, use_timeouts)
    assert closed.code in (1005, 1006) or _valid_close_code(closed.code), closed
    _check_server_output(output, closed)


def _payload(n: int) -> bytes:
    return (bytes(range(256)) * (n // 256 + 1))[:n]


message_st = st.one_of(
    st.text(max_size=60).map(lambda s: (1, s.encode("utf-8"), s)),
    st.binary(max_size=60).map(lambda b: (2, b, b)),
    st.integers(0, 70_000).map(lambda n: (2, _payload(n), _payload(n))),
)


@st.composite
def framed_stream(draw):
    """Valid client frames: fragmented messages with pings between frames, cut anywhere."""
    messages = draw(st.lists(message_st, max_size=6))
    stream = b""
    pings = []
    for opcode, data, _ in messages:
        cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
        parts = [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)])]
        for index, part in enumerate(parts):
            stream += build_frame(opcode if index == 0 else 0, part, fin=index == len(parts) - 1)
            if draw(st.booleans()):
                ping = draw(st.binary(max_size=125))
                pings.append(ping)
                stream += build_frame(9, ping)
    stream += build_frame(8, close_payload(1000, b"bye"))
    cut_points = sorted(set(draw(st.lists(st.integers(0, len(stream)), max_size=30))))
    chunks = [stream[i:j] for i, j in zip([0, *cut_points], [*cut_points, len(stream)])]
    return [expected for _, _, expected in messages], pings, chunks


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=framed_stream(), use_timeouts=st.booleans())
def test_frame_parser_on_valid_frames_split_anywhere(case, use_timeouts):
    """Valid frames, fragmented and cut at random: exactly the messages sent, pongs in order, close 1000."""
    expected, pings, chunks = case
    messages, closed, output = _run_parser(chunks, use_timeouts, max_message_size=None)
    assert messages == expected
    assert (closed.code, closed.reason) == (1000, "bye")
    frames = _check_server_output(output, closed)
    assert [payload for _, opcode, payload in frames if opcode == 0xA] == pings
    assert frames[-1] == (True, 0x8, close_payload(1000))


def _nest(inner):
    return inner | st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)


# JSON values up to three levels deep (deeper ones come from fragment_st's "[[[...]]]").
json_value = _nest(_nest(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                         | st.text(max_size=8)))
header_st = st.fixed_dictionaries(
    {"msgid": st.text(max_size=4), "msgtype": st.sampled_from(sorted(protocol._messages) + ["NOPE", ""])},
    optional={"num_buffers": st.one_of(st.integers(-2, 3), st.none(), st.text(max_size=2), st.floats())},
).map(json.dumps)


@st.composite
def valid_message(draw):
    msgtype = draw(st.sampled_from(sorted(CLIENT_MESSAGE_TYPES)))
    n = draw(st.integers(0, 2))
    frames = [json.dumps({"msgid": "m", "msgtype": msgtype, "num_buffers": n}), "{}",
              json.dumps(draw(st.dictionaries(st.text(max_size=5), json_value, max_size=3)))]
    for i in range(n):
        frames += [json.dumps({"id": str(i)}), draw(st.binary(max_size=16))]
    return frames


fragment_st = st.one_of(
    st.text(max_size=40), st.binary(max_size=40), header_st, json_value.map(json.dumps),
    st.one_of(st.text(max_size=4), st.integers(), st.none()).map(lambda i: json.dumps({"id": i})),
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(st.one_of(fragment_st.map(lambda f: [f]), valid_message()), max_size=8))
def test_message_decoder_on_arbitrary_fragments(parts):
    """Only a client message, None (need more) or ProtocolViolation(1002): never another exception."""
    decoder = MessageDecoder()
    for fragment in [f for part in parts for f in part]:
        try:
            message = decoder.feed(fragment)
        except ProtocolViolation as exc:
            assert exc.code == 1002 and exc.reason
            return  # the connection ends here
        if message is not None:
            assert message.msgtype in CLIENT_MESSAGE_TYPES
