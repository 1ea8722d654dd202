"""Memory an unauthenticated client controls, against a real `flask-docsync serve`.

Two defects let one client commit far more server memory than it sent:

- the frame reader allocated a frame's declared length as soon as its
  header arrived, so a 14-byte header announcing a maximum-size frame
  committed that much memory per connection;
- a Bokeh message (header, metadata, content, then up to 10,000 buffer
  pairs, each a WebSocket message under the limit) had no total cap, so one
  message could accumulate many times ``--websocket-max-message-size``.

The proof runs both attacks at once, 200 stalled connections and 50
feeding ones, while another session does round trips, and bounds the
worker's RSS growth. The last test is an in-process check of the frame
reader with tracemalloc, which needs no server.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import time
import tracemalloc

import gevent
import gevent.socket
import pytest
from reliability_util import HealthyClient, rss_mb
from serve_util import APPS, assert_server_healthy, connected, log_has_line, session_id_of, start_server
from wire import fetch_token
from ws_apps.rawclient import RawClient, build_frame

from flask_docsync.protocol import FRAGMENT_COST
from flask_docsync.websocket import WebSocket

SLIDERS = APPS / "sliders.py"
#: Small enough that 50 connections each holding a whole message stay well
#: under the 50 MiB bound; the stalled frames announce exactly this much.
LIMIT = 512 * 1024
STALLED = 200
FEEDERS = 50
BUFFER = 4 * 1024


@pytest.fixture(scope="module")
def server():
    s = start_server(SLIDERS, "--keep-alive", "0", "--websocket-max-message-size", LIMIT)
    yield s
    s.stop()


def open_raw(server, token: str) -> RawClient:
    client = RawClient.connect(server.port, protocols=f"bokeh, {token}", path="/sliders/ws", timeout=20)
    assert client.status == 101, (client.status, client.read_body()[:300])
    return client


def header(num_buffers: int) -> bytes:
    text = json.dumps({"msgid": "big", "msgtype": "PATCH-DOC", "num_buffers": num_buffers})
    return build_frame(1, text.encode())


def stall(client: RawClient) -> None:
    """Announce a text frame of ``LIMIT`` bytes (a 14-byte header) and send one byte of it."""
    frame = build_frame(1, b"{", length=LIMIT)
    assert len(frame) == 14 + 1
    client.sock.sendall(frame)


def close_code(payload: bytes) -> int | None:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None


def feed_until_closed(client: RawClient, most: int) -> tuple[int | None, int]:
    """Send one PATCH-DOC of many small buffers until the server closes; return (code, bytes sent).

    Stops writing once the server's close frame has arrived or after
    ``most`` bytes, then reads up to the close frame.
    """
    sock = client.sock
    sock.sendall(header(10_000) + build_frame(1, b"{}") + build_frame(1, b'{"events": []}'))
    sent = 0
    n = 0
    payload = b"\x00" * BUFFER
    while sent < most:
        pair = build_frame(1, json.dumps({"id": str(n)}).encode()) + build_frame(2, payload)
        try:
            sock.sendall(pair)
        except OSError:
            break
        sent += len(pair)
        n += 1
        while client.buf or select.select([sock], [], [], 0)[0]:
            _, opcode, data = client.recv_frame()  # the ACK, then the close frame
            if opcode == 8:
                return close_code(data), sent
    sock.settimeout(3)
    try:
        code, _, _ = client.recv_close()
    except (OSError, EOFError):
        code = None
    return code, sent


def test_frame_headers_and_many_buffer_messages_commit_no_memory_beyond_what_was_sent(server):
    """200 stalled maximum-size frames + 50 connections feeding many-buffer messages.

    Before: each stalled header committed ``LIMIT`` bytes at once (200 ×
    512 KiB), and the feeders were never closed (no total cap), each
    holding what it sent. Now the stalled frames hold what arrived, the
    feeders are closed with 1009 at the limit, the worker's RSS grows by
    less than 50 MiB, and another session's round trips go on throughout.
    """
    token = fetch_token(server.url + "/sliders")
    attacker_session = session_id_of(token)
    assert_server_healthy(server)
    with HealthyClient(server) as healthy:
        time.sleep(0.5)
        before = rss_mb(server)
        stalled = []
        feeders = []
        try:
            for _ in range(STALLED):
                client = open_raw(server, token)
                stall(client)
                stalled.append(client)
            started = healthy.count
            for _ in range(FEEDERS):
                feeders.append(open_raw(server, token))
            results = [feed_until_closed(client, 4 * LIMIT) for client in feeders]
            time.sleep(1.0)  # let the server read what is in flight
            grown = rss_mb(server) - before
            during = healthy.count - started
        finally:
            for client in stalled + feeders:
                client.close()
    print(f"RSS {before:.1f} MiB before, +{grown:.1f} MiB with {STALLED} stalled and {FEEDERS}"
          f" fed connections; {during} round trips meanwhile; most sent {max(s for _, s in results)}")
    codes = [code for code, _ in results]
    assert codes == [1009] * FEEDERS, codes
    assert grown < 50, f"RSS grew {grown:.1f} MiB"
    assert during >= 10, f"only {during} round trips of another session during the attack"
    log_has_line(server, attacker_session, "closed with 1009", f"message over the limit of {LIMIT} bytes")
    assert_server_healthy(server)


def test_a_bokeh_message_is_capped_as_a_whole(server):
    """Header + metadata + content + buffers, each WebSocket message under the limit.

    Before: 3 buffers of 0.4 × LIMIT each completed the message and got an
    OK. The whole message now counts, so it is closed with 1009 (logged)
    and the session keeps working for another connection.
    """
    client, sid, _ = connected(server)
    with client:
        chunk = b"\x00" * int(LIMIT * 0.4)
        client.send("PATCH-DOC", {"events": []}, buffers=[("a", chunk), ("b", chunk), ("c", chunk)])
        code, reason = client.expect_close()
    assert code == 1009, (code, reason)
    assert "over the limit" in reason
    log_has_line(server, sid, "closed with 1009", "header, metadata, content and buffers together")
    assert_server_healthy(server)


def test_a_message_just_under_the_limit_is_accepted(server):
    """The cap counts what was sent plus a small cost per frame, no more."""
    client, _, _ = connected(server)
    with client:
        frames_cost = 5 * FRAGMENT_COST + 200  # header/metadata/content/buffer-header text
        chunk = b"\x00" * (LIMIT - frames_cost)
        reqid = client.send("PATCH-DOC", {"events": []}, buffers=[("a", chunk)])
        ok, _ = client.recv_until("OK", reqid)
    assert ok.header["reqid"] == reqid


def test_a_frame_header_alone_commits_no_memory():
    """In process: a header announcing 16 MiB plus one byte holds about one byte, not 16 MiB."""
    a, b = gevent.socket.socketpair()
    try:
        ws = WebSocket({}, a, max_message_size=32 * 1024 * 1024)
        b.sendall(build_frame(2, b"x", length=16 * 1024 * 1024))
        tracemalloc.start()
        try:
            assert ws.receive(timeout=0.2) is None
            current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 1024 * 1024, f"peak {peak} bytes traced for a 1-byte partial frame"
        # What does arrive is kept: the rest of the frame completes the message.
        rest = 16 * 1024 * 1024 - 1
        sender = gevent.spawn(b.sendall, b"\x00" * rest)
        message = ws.receive(timeout=10)
        sender.get(timeout=10)
        assert isinstance(message, bytes) and len(message) == 16 * 1024 * 1024
    finally:
        a.close()
        b.close()
