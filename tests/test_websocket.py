"""Tests for flask_docsync.websocket.

Two layers: server-level tests run tests/ws_apps/echo_app.py under each
real server in tests/ws_apps/servers.py (pywsgi with and without monkey
patching, gunicorn -k gevent, gunicorn with gevent-websocket's worker,
Werkzeug patched by gevent) and talk to it with websocket-client or a raw
socket; unit tests drive the frame layer over a gevent socketpair.
"""

import base64
import json
import os
import socket
import struct
import sys
import time

import gevent
import gevent.socket
import pytest
import websocket as wsclient

from flask_docsync import websocket as ws_mod
from flask_docsync.errors import ConnectionClosed
from flask_docsync.websocket import GeventWebSocketBackend
from flask_docsync.errors import HandshakeError
from flask_docsync.websocket import is_websocket_request
from flask_docsync.errors import MessageTooBig
from flask_docsync.websocket import requested_subprotocols
from flask_docsync.websocket import validate_upgrade
from flask_docsync.websocket import WebSocket

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ws_apps.rawclient import build_frame  # noqa: E402
from ws_apps.rawclient import close_payload  # noqa: E402
from ws_apps.rawclient import RawClient  # noqa: E402
from ws_apps.servers import GWS_KINDS  # noqa: E402
from ws_apps.servers import KINDS  # noqa: E402
from ws_apps.servers import ServerProcess  # noqa: E402

MiB = 1024 * 1024


def _has_gevent_websocket():
    try:
        import geventwebsocket.gunicorn.workers  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module", params=KINDS)
def server(request):
    if request.param in GWS_KINDS and not _has_gevent_websocket():
        pytest.skip(
            "gevent-websocket is not installed (pip install gevent-websocket);"
            " it is only needed for GeventWebSocketWorker deployments"
        )
    proc = ServerProcess(request.param).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def raw(server):
    clients = []

    def connect(**kwargs):
        client = RawClient.connect(server.port, **kwargs)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


@pytest.fixture
def wsc(server):
    clients = []

    def connect(protocols=("bokeh", "sometoken")):
        client = wsclient.create_connection(
            f"ws://127.0.0.1:{server.port}/ws", subprotocols=list(protocols), timeout=10
        )
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close(timeout=1)
        client.shutdown()  # close() leaves the socket open once a close frame was received


def http_get(port, path="/"):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk


def test_handshake_selects_bokeh_and_no_extensions(server, raw):
    client = raw(
        protocols="bokeh, sometoken",
        extra=["Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"],
    )
    assert client.status == 101
    assert client.headers["sec-websocket-accept"] == client.expected_accept()
    assert client.headers["sec-websocket-protocol"] == "bokeh"
    assert "sec-websocket-extensions" not in client.headers

    client.send_text("cmd:info")
    _, opcode, payload = client.recv_frame()
    info = json.loads(payload)
    assert opcode == 1
    assert info["offered"] == ["bokeh", "sometoken"]
    assert info["subprotocol"] == "bokeh"
    expected = "GeventWebSocketBackend" if server.kind in GWS_KINDS else "WebSocket"
    assert info["class"] == expected
    assert info["patched"] is (server.kind != "pywsgi-plain")


def test_handshake_errors(server, raw):
    if server.kind in GWS_KINDS:
        # gevent-websocket answers bad handshakes itself, before the
        # application runs, and accepts versions 7 and 8 too. (Its error
        # bodies are str, which pywsgi logs as a TypeError.)
        return

    client = raw(key="dG9vc2hvcnQ=")  # "tooshort": 8 bytes, not 16
    assert client.status == 400

    client = raw(version="8")
    assert client.status == 426
    assert client.headers["sec-websocket-version"] == "13"
    assert b"13" in client.read_body()


def test_frames_sent_with_the_handshake_are_kept(server, raw):
    # Servers read ahead into their own buffers while parsing the request;
    # a client that does not wait for the 101 must not lose its frames.
    client = raw(pipelined=build_frame(1, b"early") + build_frame(2, b"bird"))
    assert client.status == 101
    assert client.recv_frame() == (True, 1, b"early")
    assert client.recv_frame() == (True, 2, b"bird")


def test_text_binary_mix_keeps_order(server, wsc):
    ws = wsc()
    assert ws.getsubprotocol() == "bokeh"
    ws.send("cmd:mix")
    frames = [ws.recv_data() for _ in range(7)]
    assert [opcode for opcode, _ in frames] == [1, 1, 1, 1, 2, 1, 2]
    assert frames[4][1] == b"\x00buf1"
    assert frames[6][1] == b"\x01buf2"


def test_echo_fragmented_with_ping_in_between(server, raw):
    client = raw()
    client.send_frame(1, "héllo ".encode(), fin=False)
    client.send_frame(9, b"mid")
    client.send_frame(0, b"fragmented ", fin=False)
    client.send_frame(0, "wörld".encode())
    assert client.recv_frame() == (True, 10, b"mid")
    assert client.recv_frame() == (True, 1, "héllo fragmented wörld".encode())

    client.send_frame(2, b"\x00\x01", fin=False)
    client.send_frame(0, b"\x02")
    assert client.recv_frame() == (True, 2, b"\x00\x01\x02")


def test_large_binary_echo(server, wsc):
    ws = wsc()
    data = os.urandom(10 * MiB)
    ws.send_binary(data)
    opcode, echoed = ws.recv_data()
    assert opcode == 2
    assert len(echoed) == len(data)
    assert echoed == data


def test_message_too_big_is_refused_from_the_header(server, raw):
    client = raw()
    # Announce 25 MiB (limit 20 MiB) but send only 1 KiB: the server can
    # only answer if it checked the declared length before the payload.
    client.send_frame(2, os.urandom(1024), length=25 * MiB)
    code, _, _ = client.recv_close()
    assert code == 1009
    assert client.at_eof()


def test_invalid_utf8_closes_with_1007(server, raw):
    client = raw()
    client.send_frame(1, b"ok \xff\xfe")
    code, _, _ = client.recv_close()
    assert code == 1007
    assert client.at_eof()


def test_unmasked_frame_closes_with_1002(server, raw):
    client = raw()
    client.send_frame(1, b"not masked", mask=False)
    code, _, _ = client.recv_close()
    assert code == 1002
    assert client.at_eof()


def test_ping_pong(server, raw):
    client = raw()
    client.send_frame(9, b"abc")
    assert client.recv_frame() == (True, 10, b"abc")

    client.send_text("cmd:ping:xyz")
    assert client.recv_frame() == (True, 9, b"xyz")
    client.send_frame(10, b"xyz")
    client.send_text("cmd:last_pong")
    _, opcode, payload = client.recv_frame()
    assert opcode == 1
    assert payload != b"None"
    float(payload)


def test_client_close_code_is_echoed(server, raw):
    client = raw()
    client.send_frame(8, close_payload(4321, b"client bye"))
    code, reason, payload = client.recv_close()
    assert code == 4321
    assert payload == b"\x10\xe1"
    assert client.at_eof()


def test_server_close_code_and_tcp_eof(server, raw, wsc):
    ws = wsc()
    ws.send("cmd:close:4000:bye")
    opcode, payload = ws.recv_data(control_frame=True)
    assert opcode == 8
    assert struct.unpack("!H", payload[:2])[0] == 4000
    assert payload[2:] == b"bye"

    client = raw()
    client.send_text("cmd:close:4000:bye")
    code, reason, _ = client.recv_close()
    assert (code, reason) == (4000, "bye")
    client.send_frame(8, close_payload(4000))
    assert client.at_eof()


def test_close_from_another_greenlet_unblocks_receive(server, raw):
    client = raw()
    client.send_text("cmd:close_later:4001")
    code, reason, _ = client.recv_close()
    assert (code, reason) == (4001, "from another greenlet")
    client.send_frame(8, close_payload(4001))
    assert client.at_eof()


def test_abort_drops_tcp_without_close_frame(server, raw):
    client = raw()
    client.send_text("cmd:abort")
    assert client.at_eof()


def test_plain_http_after_websocket_sessions(server, wsc):
    ws = wsc()
    ws.send("x")
    assert ws.recv() == "x"
    ws.close(timeout=2)
    response = http_get(server.port)
    assert response.startswith(b"HTTP/1.1 200")
    assert response.endswith(b"hello")


def test_server_log_has_no_errors(server, raw):
    client = raw()
    client.send_frame(2, b"", length=25 * MiB)
    assert client.recv_close()[0] == 1009
    assert client.at_eof()

    client = raw()
    client.send_frame(8, close_payload(4321))
    client.recv_close()
    assert client.at_eof()
    assert http_get(server.port).startswith(b"HTTP/1.1 200")

    # The app logs after the client already saw EOF.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        log = server.log_text()
        if "closed 1009 MessageTooBig" in log and "closed 4321 ConnectionClosed" in log:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the app did not log both closes:\n{log}")

    # Also covers every earlier test on this server.
    assert "Traceback" not in log
    assert "Invalid HTTP method" not in log
    assert "Error" not in log


def test_is_websocket_request():
    environ = {
        "REQUEST_METHOD": "GET",
        "HTTP_UPGRADE": "WebSocket",
        "HTTP_CONNECTION": "keep-alive, Upgrade",
    }
    assert is_websocket_request(environ)
    assert not is_websocket_request({**environ, "REQUEST_METHOD": "POST"})
    assert not is_websocket_request({**environ, "HTTP_CONNECTION": "keep-alive"})
    assert not is_websocket_request({"REQUEST_METHOD": "GET"})


def test_requested_subprotocols():
    assert requested_subprotocols({"HTTP_SEC_WEBSOCKET_PROTOCOL": "bokeh, sometoken"}) == [
        "bokeh",
        "sometoken",
    ]
    assert requested_subprotocols({"HTTP_SEC_WEBSOCKET_PROTOCOL": "bokeh,tok"}) == ["bokeh", "tok"]
    assert requested_subprotocols({}) == []


def upgrade_environ(**overrides):
    environ = {
        "REQUEST_METHOD": "GET",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_UPGRADE": "websocket",
        "HTTP_CONNECTION": "Upgrade",
        "HTTP_SEC_WEBSOCKET_KEY": base64.b64encode(os.urandom(16)).decode(),
        "HTTP_SEC_WEBSOCKET_VERSION": "13",
    }
    environ.update(overrides)
    return {k: v for k, v in environ.items() if v is not None}


@pytest.mark.parametrize(
    ("overrides", "status"),
    [
        ({"REQUEST_METHOD": "POST"}, 400),
        ({"SERVER_PROTOCOL": "HTTP/1.0"}, 400),
        ({"HTTP_UPGRADE": None}, 400),
        ({"HTTP_CONNECTION": "keep-alive"}, 400),
        ({"HTTP_SEC_WEBSOCKET_KEY": None}, 400),
        ({"HTTP_SEC_WEBSOCKET_KEY": "not base64!"}, 400),
        ({"HTTP_SEC_WEBSOCKET_KEY": base64.b64encode(b"x" * 15).decode()}, 400),
        ({"HTTP_SEC_WEBSOCKET_VERSION": "8"}, 426),
        ({"HTTP_SEC_WEBSOCKET_VERSION": None}, 426),
    ],
)
def test_validate_upgrade_errors(overrides, status):
    with pytest.raises(HandshakeError) as info:
        validate_upgrade(upgrade_environ(**overrides))
    assert info.value.status == status
    assert info.value.reason
    if status == 426:
        assert ("Sec-WebSocket-Version", "13") in info.value.headers
        assert "Sec-WebSocket-Version: 13" in info.value.reason


def test_validate_upgrade_trusts_gevent_websocket():
    validate_upgrade({"REQUEST_METHOD": "GET", "wsgi.websocket": object()})
    validate_upgrade(upgrade_environ())


def test_accept_without_socket():
    with pytest.raises(HandshakeError) as info:
        WebSocket.accept(upgrade_environ())
    assert info.value.status == 500
    assert "gunicorn -k gevent" in info.value.reason


def test_accept_refuses_blocking_socket():
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(HandshakeError) as info:
            WebSocket.accept(upgrade_environ(**{"gunicorn.socket": a}))
    assert info.value.status == 500
    assert "monkey.patch_all" in info.value.reason


@pytest.fixture
def pair():
    """A server WebSocket over one end of a gevent socketpair and a raw
    client on the other end. Without a WSGI server, only the frame layer
    is exercised."""
    socks = []

    def make(buffered=b"", **kwargs):
        a, b = gevent.socket.socketpair()
        socks.extend((a, b))
        ws = WebSocket({}, a, buffered=buffered, **kwargs)
        return ws, RawClient(b)

    yield make
    for sock in socks:
        sock.close()


def test_accept_writes_101_and_wsgi_response_under_gunicorn():
    from gunicorn.workers.base_async import ALREADY_HANDLED

    a, b = gevent.socket.socketpair()
    with a, b:
        environ = upgrade_environ(
            HTTP_SEC_WEBSOCKET_PROTOCOL="bokeh, tok",
            HTTP_SEC_WEBSOCKET_EXTENSIONS="permessage-deflate",
            **{"gunicorn.socket": a},
        )
        ws = WebSocket.accept(environ, subprotocol="bokeh")
        client = RawClient(b)
        client.key = environ["HTTP_SEC_WEBSOCKET_KEY"]
        assert client.read_response() == 101
        assert client.headers["sec-websocket-accept"] == client.expected_accept()
        assert client.headers["sec-websocket-protocol"] == "bokeh"
        assert "sec-websocket-extensions" not in client.headers
        assert ws.subprotocol == "bokeh"

        client.sock.sendall(build_frame(8, close_payload(1000)))
        with pytest.raises(ConnectionClosed):
            ws.receive()
        assert ws.wsgi_response() is ALREADY_HANDLED


def test_unit_text_binary_and_buffered_bytes(pair):
    ws, client = pair(buffered=build_frame(1, b"early"))
    client.send_frame(2, b"\x00\xff")
    client.send_frame(1, b"")
    assert ws.receive() == "early"
    assert ws.receive() == b"\x00\xff"
    assert ws.receive() == ""


def test_unit_sizes_and_fragments(pair):
    ws, client = pair()
    for size in (125, 126, 65535, 65536, 200_000):
        data = os.urandom(size)
        gevent.spawn(client.send_frame, 2, data)
        assert ws.receive() == data

    text = "ü" * 50_000
    raw = text.encode()
    client.send_frame(1, raw[:3], fin=False)  # splits a character
    client.send_frame(9, b"p")
    client.send_frame(0, raw[3:70_001], fin=False)
    client.send_frame(0, raw[70_001:])
    assert ws.receive() == text
    assert client.recv_frame() == (True, 10, b"p")


def test_unit_timeout_keeps_partial_frames(pair):
    ws, client = pair()
    assert ws.receive(timeout=0.01) is None

    frame = build_frame(1, b"x" * 1000)
    client.sock.sendall(frame[:1])
    assert ws.receive(timeout=0.05) is None
    client.sock.sendall(frame[1:500])
    assert ws.receive(timeout=0.05) is None
    client.sock.sendall(frame[500:])
    assert ws.receive(timeout=5) == "x" * 1000

    client.send_frame(1, b"part ", fin=False)
    assert ws.receive(timeout=0.05) is None
    client.send_frame(0, b"two")
    assert ws.receive(timeout=5) == "part two"


def test_unit_pong_recorded(pair):
    ws, client = pair()
    assert ws.last_pong is None
    ws.ping(b"hi")
    assert client.recv_frame() == (True, 9, b"hi")
    client.send_frame(10, b"hi")
    client.send_frame(1, b"after")
    before = time.monotonic()
    assert ws.receive() == "after"
    assert ws.last_pong is not None and ws.last_pong <= time.monotonic()
    assert ws.last_pong >= before - 5

    with pytest.raises(ValueError):
        ws.ping(b"x" * 126)


def test_unit_unread_sees_the_kernel_buffer_without_reading_it(pair):
    # What keep-alive asks before it counts a ping as unanswered.
    ws, client = pair()
    assert not ws.unread
    client.send_frame(10, b"pong")
    deadline = time.monotonic() + 5
    while not ws.unread and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ws.unread and not ws.buffered  # still in the kernel, not taken
    client.send_frame(1, b"after")
    assert ws.receive(timeout=5) == "after"
    assert ws.last_pong is not None and not ws.unread
    ws, _ = pair(buffered=build_frame(1, b"early"))
    assert ws.unread and ws.buffered
    ws.abort()
    assert not ws.unread

@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([build_frame(1, b"x", mask=False)], 1002),
        ([build_frame(1, b"x", rsv=4)], 1002),
        ([build_frame(3, b"x")], 1002),
        ([build_frame(11, b"x")], 1002),
        ([build_frame(9, b"x", fin=False)], 1002),
        ([build_frame(9, b"x" * 126)], 1002),
        ([build_frame(0, b"x")], 1002),
        ([build_frame(1, b"a", fin=False), build_frame(1, b"b")], 1002),
        ([build_frame(8, b"\x03")], 1002),
        ([build_frame(8, close_payload(999))], 1002),
        ([build_frame(8, close_payload(1005))], 1002),
        ([build_frame(8, close_payload(2000))], 1002),
        ([build_frame(8, close_payload(5000))], 1002),
        ([build_frame(8, close_payload(1000, b"\xff"))], 1007),
        ([build_frame(1, b"\xc3")], 1007),
        ([build_frame(1, b"\xc3", fin=False), build_frame(0, b"x")], 1007),
    ],
)
def test_unit_protocol_violations(pair, frames, code):
    ws, client = pair()
    for frame in frames:
        client.sock.sendall(frame)
    with pytest.raises(ConnectionClosed) as info:
        ws.receive()
    assert info.value.code == code
    assert ws.closed and ws.close_code == code
    assert client.recv_close()[0] == code
    assert client.at_eof()


def test_unit_message_too_big_from_header(pair):
    ws, client = pair(max_message_size=1000)
    client.sock.sendall(build_frame(2, b"", length=1001))  # header only, no payload
    with pytest.raises(MessageTooBig) as info:
        ws.receive()
    assert info.value.code == 1009
    assert client.recv_close()[0] == 1009

    # The limit covers the whole fragmented message.
    ws, client = pair(max_message_size=1000)
    client.send_frame(2, b"x" * 600, fin=False)
    client.send_frame(0, b"x" * 401)
    with pytest.raises(MessageTooBig):
        ws.receive()

    ws, client = pair(max_message_size=None)
    data = os.urandom(3 * MiB)
    gevent.spawn(client.send_frame, 2, data)
    assert ws.receive() == data


def test_unit_client_close_and_eof(pair):
    ws, client = pair()
    client.send_frame(8)
    with pytest.raises(ConnectionClosed) as info:
        ws.receive()
    assert info.value.code == 1005
    assert client.recv_close()[0] == 1000
    assert client.at_eof()
    with pytest.raises(ConnectionClosed):
        ws.receive()
    with pytest.raises(ConnectionClosed):
        ws.send("late")

    ws, client = pair()
    client.send_frame(1, b"x" * 100)
    client.sock.sendall(build_frame(1, b"y" * 100)[:50])
    client.sock.shutdown(socket.SHUT_WR)
    assert ws.receive() == "x" * 100
    with pytest.raises(ConnectionClosed) as info:
        ws.receive()
    assert info.value.code == 1006
    assert ws.close_code == 1006


def test_unit_close_from_other_greenlet_unblocks_receive(pair):
    ws, client = pair()
    ws.close_timeout = 30  # prove it is the client's answer that ends it
    reader = gevent.spawn(ws.receive)
    gevent.sleep(0.01)
    ws.close(4000, "bye")
    assert client.recv_close()[:2] == (4000, "bye")
    client.send_frame(8, close_payload(4000))
    with gevent.Timeout(5):
        with pytest.raises(ConnectionClosed) as info:
            reader.get()
    assert info.value.code == 4000
    assert client.at_eof()


def test_unit_close_from_other_greenlet_silent_client(pair):
    ws, client = pair()
    ws.close_timeout = 0.1
    reader = gevent.spawn(ws.receive)
    gevent.sleep(0.01)
    ws.close(1001)
    with gevent.Timeout(5):
        with pytest.raises(ConnectionClosed) as info:
            reader.get()
    assert info.value.code == 1001
    assert client.recv_close()[0] == 1001
    assert client.at_eof()


def test_unit_close_drains_until_client_answers(pair):
    ws, client = pair()

    def client_side():
        code = client.recv_close()[0]
        client.send_frame(1, b"in flight")
        client.send_frame(8, close_payload(code))
        return client.at_eof()

    answer = gevent.spawn(client_side)
    ws.close_timeout = 30
    with gevent.Timeout(5):
        ws.close(4100, "é" * 100)
        assert answer.get() is True
    assert ws.closed and ws.close_code == 4100
    assert len(ws.close_reason.encode()) <= 123
    ws.close()  # idempotent
    with pytest.raises(ConnectionClosed) as info:
        ws.send("late")
    assert info.value.code == 4100
    with pytest.raises(ValueError):
        WebSocket({}, None).close(10000)


def test_unit_send_many_is_atomic(pair):
    ws, client = pair()
    big = os.urandom(512 * 1024)

    def sender(tag):
        for _ in range(4):
            ws.send_many([tag, big, tag + "-end"])

    def pinger():
        for _ in range(20):
            ws.ping(b"p")
            gevent.sleep(0)

    greenlets = [gevent.spawn(sender, "a"), gevent.spawn(sender, "b"), gevent.spawn(pinger)]
    frames = []
    with gevent.Timeout(20):
        while len(frames) < 2 * 4 * 3 + 20:
            frames.append(client.recv_frame())
    gevent.joinall(greenlets, raise_error=True)

    data = [(op, payload) for _, op, payload in frames if op != 9]
    assert len(data) == 24
    for i in range(0, 24, 3):
        tag = data[i][1].decode()
        assert data[i + 1] == (2, big)
        assert data[i + 2] == (1, (tag + "-end").encode())


def test_unit_abort_unblocks_stuck_sender(pair):
    ws, client = pair()
    sender = gevent.spawn(ws.send, b"x" * (64 * MiB))
    gevent.sleep(0.05)
    assert not sender.ready()  # nobody reads the client end
    ws.abort()
    with gevent.Timeout(5):
        with pytest.raises(ConnectionClosed) as info:
            sender.get()
    assert info.value.code == 1006
    assert ws.closed


def test_unit_send_types(pair):
    ws, client = pair()
    ws.send_many(["t", b"b", bytearray(b"ba"), memoryview(b"mv")])
    assert [client.recv_frame() for _ in range(4)] == [
        (True, 1, b"t"),
        (True, 2, b"b"),
        (True, 2, b"ba"),
        (True, 2, b"mv"),
    ]
    with pytest.raises(TypeError):
        ws.send(42)


def test_unit_python_unmask_matches_c(monkeypatch):
    mask = b"\x01\x02\x03\x04"
    data = os.urandom(1001)
    expected = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    assert ws_mod._unmask(mask, data) == expected
    assert ws_mod._unmask(mask, bytearray(data)) == expected
    monkeypatch.setattr(ws_mod, "_c_mask", None)
    assert ws_mod._unmask(mask, data) == expected
    assert ws_mod._unmask(mask, b"") == b""


def test_gevent_websocket_backend_is_a_websocket():
    assert issubclass(GeventWebSocketBackend, WebSocket)
    assert "app_protocol" in GeventWebSocketBackend.__doc__


class FakeGeventWebSocket:
    """Stands in for environ['wsgi.websocket'] after gevent-websocket's
    handler answered the handshake on ``sock``."""

    def __init__(self, sock, response_headers):
        self.closed = False
        self.handler = type("Handler", (), {})()
        self.handler.socket = sock
        self.handler.rfile = sock.makefile("rb")
        self.handler.response_headers = response_headers


@pytest.mark.parametrize(
    ("headers", "expected", "warns"),
    [
        ([(b"Upgrade", b"websocket"), (b"Sec-WebSocket-Protocol", b"bokeh")], "bokeh", False),
        ([(b"Upgrade", b"websocket")], None, True),
    ],
)
def test_gevent_websocket_backend_takes_over(caplog, headers, expected, warns):
    a, b = gevent.socket.socketpair()
    with a, b:
        gws = FakeGeventWebSocket(a, headers)
        b.sendall(build_frame(1, b"pipelined"))
        gevent.sleep(0.01)
        gws.handler.rfile.peek(1)  # the handler's reader has buffered the frame
        environ = {"REQUEST_METHOD": "GET", "wsgi.websocket": gws}
        ws = WebSocket.accept(environ, subprotocol="bokeh", max_message_size=100)

        assert isinstance(ws, GeventWebSocketBackend)
        assert ws.subprotocol == expected
        assert ("app_protocol" in caplog.text) is warns
        assert gws.closed, "gevent-websocket must not send its own close frame"
        assert ws.receive() == "pipelined"

        client = RawClient(b)
        client.send_frame(2, b"", length=101)
        with pytest.raises(MessageTooBig):
            ws.receive()
        assert client.recv_close()[0] == 1009
        assert ws.wsgi_response() == []
        gws.handler.rfile.close()


def test_unit_one_reader_at_a_time(pair):
    ws, client = pair()
    reader = gevent.spawn(ws.receive)
    gevent.sleep(0.01)
    with pytest.raises(RuntimeError, match="only one"):
        ws.receive()
    client.send_frame(1, b"for the first reader")
    assert reader.get(timeout=5) == "for the first reader"


@pytest.mark.parametrize(
    "flood, messages",
    [
        # 20,000 empty pongs, then one text message: receive() returns once.
        ([(0xA, b"")] * 20_000 + [(0x1, b"done")], 1),
        # Four 600 kB binary messages already arrived: four receive() calls.
        ([(0x2, b"x" * 600_000)] * 4, 4),
    ],
    ids=["control-frames", "large-messages"],
)
def test_reading_what_has_already_arrived_gives_other_greenlets_a_turn(pair, flood, messages):
    # Parsing bytes that are already buffered never waits on the socket, so
    # without an explicit yield nothing else in the worker would run until
    # the flood was parsed.
    from ws_apps.rawclient import build_frame

    ws, _client = pair(buffered=b"".join(build_frame(op, payload) for op, payload in flood))
    turns = 0

    def other_session():
        nonlocal turns
        while True:
            turns += 1
            gevent.sleep(0)

    ticker = gevent.spawn(other_session)
    try:
        gevent.sleep(0)
        before = turns
        received = [ws.receive() for _ in range(messages)]
        during = turns - before
    finally:
        ticker.kill()
    assert len(received) == messages and received[-1] in ("done", b"x" * 600_000)
    assert during > 0
