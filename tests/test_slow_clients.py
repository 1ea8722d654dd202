"""Slow and dead clients against a real `flask-docsync serve`.

The policies (README, "Reliability"):

- Every connection has one writer greenlet and a queue of at most
  ``DOCSYNC_OUTBOUND_QUEUE_SIZE`` whole messages. A client that falls that
  far behind is sent close 1008 ("client too slow: outbound queue full");
  if it does not read even that within 5 s its TCP connection is cut. The
  session stays, so the client can reconnect with its token and pull.
- Keep-alive pings every ``--keep-alive`` ms; a peer that leaves two
  unanswered is closed with 1008 ("keep-alive timeout"), and its session is
  then reaped like any unused session.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import websocket

from reliability_util import HealthyClient, rss_mb, stats
from serve_util import APPS, attr, log_has_line, model_id, pull_doc, session_id_of, value_patch, wait_until
from ws_apps.rawclient import build_frame
from wire import WireClient, fetch_token

FIREHOSE = APPS / "firehose.py"
SLIDERS = APPS / "sliders.py"
BIGDOC = APPS / "bigdoc.py"
#: Per tick, at 20 Hz: 40 MB/s for each streaming session.
TICK_KB = 2000
QUEUE = 20
RSS_BOUND_MB = 150


def slow_client(server, token: str) -> WireClient:
    """A WireClient with a small receive buffer, so the server's sends block soon after it stops reading."""
    client = WireClient.__new__(WireClient)
    client.ws = websocket.create_connection(
        f"{server.ws_url}/firehose/ws", subprotocols=["bokeh", token], timeout=30, suppress_origin=True,
        sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024),),
    )
    return client


class PeakRSS(threading.Thread):
    def __init__(self, server) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.peak = rss_mb(server)
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.05):
            self.peak = max(self.peak, rss_mb(self.server))

    def stop(self) -> float:
        self._done.set()
        self.join(5)
        return self.peak


def test_client_that_stops_reading_is_cut_off_and_memory_stays_bounded(serve):
    server = serve(FIREHOSE, SLIDERS, "--keep-alive", "0", "--unused-session-lifetime", "120000",
                   env={"DOCSYNC_OUTBOUND_QUEUE_SIZE": str(QUEUE), "DOCSYNC_STATS_ENDPOINT": "true"})
    token_a = fetch_token(f"{server.url}/firehose?kb={TICK_KB}")
    token_b = fetch_token(f"{server.url}/firehose?kb={TICK_KB}")
    sid_a, sid_b = session_id_of(token_a), session_id_of(token_b)

    with HealthyClient(server) as healthy:
        baseline = rss_mb(server)
        sampler = PeakRSS(server)
        sampler.start()
        try:
            started = time.monotonic()
            # Setting the marker starts the stream. A reads again once it has
            # been dropped; B never reads again.
            a, b = slow_client(server, token_a), slow_client(server, token_b)
            for client, mark in ((a, "kept-A"), (b, "B")):
                doc = client.handshake().content["doc"]
                reqid = client.send("PATCH-DOC", value_patch(model_id(doc, "marker"), "text", mark), num_buffers=0)
                client.recv_until("OK", reqid)

            log_has_line(server, f"Session {sid_a}: connection",
                         f"fell {QUEUE} messages behind; closing it with 1008", timeout=60)
            # A reads: what the kernel held, the message being written, then the close.
            assert a.expect_close() == (1008, "client too slow: outbound queue full")
            a.close()

            log_has_line(server, f"Session {sid_b}: connection", "fell", "closing it with 1008", timeout=60)
            log_has_line(server, f"Session {sid_b}: connection", "is not reading; dropping TCP", timeout=30)
            ticks_b = int(attr(pull_doc(server, "/firehose", token_b), "ticks"))
            ended = time.monotonic()
        finally:
            peak = sampler.stop()

        # B's TCP connection is gone: draining it ends in EOF or a reset, not a wait.
        b.ws.sock.settimeout(30)
        received = 0
        try:
            while chunk := b.ws.sock.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
        b.close()

        # Another session's round trips kept completing during all of it.
        assert healthy.completed_between(started, ended) >= 3

    produced_mb = ticks_b * TICK_KB / 1000
    growth = peak - baseline
    print(f"slow client: {produced_mb:.0f} MB produced for B while it read nothing; server RSS"
          f" {baseline:.0f} MB -> peak {peak:.0f} MB (+{growth:.0f} MB); B drained {received / 1e6:.1f} MB")
    assert produced_mb > RSS_BOUND_MB, "the stream must outgrow the bound for the bound to mean something"
    assert growth < RSS_BOUND_MB

    # Both sessions stayed; A's reconnect with its token finds its own session.
    figures = stats(server)
    assert figures["apps"]["/firehose"]["sessions"] == 2, figures
    assert figures["connections"] == 0 and figures["queued_messages"] == 0, figures
    with WireClient(f"{server.ws_url}/firehose/ws", token_a, timeout=30) as again:
        doc = again.handshake().content["doc"]
    assert attr(doc, "marker") == "kept-A"
    assert int(attr(pull_doc(server, "/firehose", token_b), "ticks")) > ticks_b  # still streaming


def test_dead_peers_are_closed_by_keepalive_and_their_sessions_reaped(serve):
    server = serve(SLIDERS, "--keep-alive", "300", "--check-unused-sessions", "200",
                   "--unused-session-lifetime", "500", env={"DOCSYNC_STATS_ENDPOINT": "true"})
    ws_url = f"{server.ws_url}/sliders/ws"
    with HealthyClient(server) as healthy:  # it reads all the time, so it answers every ping
        silent_token, truncated_token = fetch_token(f"{server.url}/sliders"), fetch_token(f"{server.url}/sliders")
        # One peer goes silent after the handshake (a closed laptop): no reads, no pongs, no FIN.
        silent = WireClient(ws_url, silent_token, timeout=30)
        silent.handshake()
        # Another stops in the middle of a frame and then goes silent.
        truncated = WireClient(ws_url, truncated_token, timeout=30)
        truncated.handshake()
        truncated.ws.sock.sendall(build_frame(1, b'{"msgid": "x", "msgtype": "PULL-DOC-REQ"}')[:20])

        for token in (silent_token, truncated_token):
            log_has_line(server, f"Session {session_id_of(token)}: connection", "missed 2 keep-alive pongs",
                         timeout=30)
        wait_until(lambda: stats(server)["connections"] == 1, message="only the healthy connection left")
        healthy.wait_for(healthy.count + 3)  # and it still works (pinged all along)

    # Reading now, the dead peers find the server's close frame behind the pings.
    assert silent.expect_close() == (1008, "keep-alive timeout")
    assert truncated.expect_close() == (1008, "keep-alive timeout")
    silent.close()
    truncated.close()

    # Every session, the dead peers' included, is reaped as unused.
    figures = wait_until(lambda: (s := stats(server))["sessions"] == 0 and s, timeout=30,
                         message="all sessions reaped")
    assert figures["connections"] == 0
    assert figures["live_sessions_in_process"] == 0
    assert figures["greenlets_scheduled"] == 0


def test_client_that_does_not_read_its_replies_holds_up_only_itself(serve):
    # Replies are written by the connection's reader when nothing is queued
    # ahead of them. A client that keeps asking without reading must then
    # stall only its own reader: not the session's document lock (another
    # connection to the same session keeps working), not other sessions,
    # and every reply still arrives, whole and in order, once it reads.
    server = serve(SLIDERS, BIGDOC, "--keep-alive", "0")
    token = fetch_token(f"{server.url}/bigdoc?kb=500")
    with HealthyClient(server) as healthy:
        greedy = WireClient.__new__(WireClient)
        greedy.ws = websocket.create_connection(
            f"{server.ws_url}/bigdoc/ws", subprotocols=["bokeh", token], timeout=30, suppress_origin=True,
            sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024),),
        )
        doc = greedy.handshake().content["doc"]
        slider = model_id(doc, "slider")
        # Each PULL-DOC-REPLY carries the whole 500 kB document: 20 MB of
        # them is far more than the server's send buffer (at most 4 MB on
        # Linux by default) and the client's small receive buffer can hold.
        sent = [greedy.send("PULL-DOC-REQ", {}) for _ in range(40)]
        started = time.monotonic()
        with WireClient(f"{server.ws_url}/bigdoc/ws", token, timeout=30) as same_session:
            same_session.handshake()
            reqid = same_session.send("PATCH-DOC", value_patch(slider, "value", 42), num_buffers=0)
            reply, before = same_session.recv_until("OK", reqid)
            assert any("value=42" in json.dumps(m.content) for m in before)
        healthy.wait_for(healthy.count + 3)
        assert healthy.completed_between(started, time.monotonic()) >= 3

        # Reading now, it gets its replies in order: all of them, or as many
        # as fitted before its queue overflowed and it was closed with 1008
        # (which of the two depends on how far ahead its requests ran). No
        # reply showing the old slider value may come after the patch that
        # changed it, or the client would apply the patch and then replace
        # its copy with an older one.
        received: list[str] = []
        values_after_patch = []
        patched = False
        close = None
        while len(received) < len(sent):
            parts = []
            while len(parts) < 3 and close is None:
                opcode, data = greedy.ws.recv_data()
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    close = (int.from_bytes(data[:2], "big"), data[2:].decode())
                else:
                    parts.append(json.loads(data))
            if close is not None:
                break
            header, _, content = parts
            if header["msgtype"] == "PATCH-DOC":
                patched = patched or any(e.get("attr") == "value" and e.get("new") == 42 for e in content["events"])
            elif header["msgtype"] == "PULL-DOC-REPLY":
                received.append(header["reqid"])
                if patched:
                    values_after_patch.append(attr(content["doc"], "slider", "value"))
        greedy.close()
        print(f"greedy client: {len(received)} of {len(sent)} replies, close {close}")
        assert received == sent[: len(received)] and received
        assert close is None or close == (1008, "client too slow: outbound queue full"), close
        assert set(values_after_patch) <= {42}, values_after_patch


def test_a_burst_of_requests_does_not_keep_the_worker_to_itself(serve):
    # 3000 requests arrive in one write, so the server finds them all
    # buffered. Serving them must still let the rest of the worker run: a
    # patch sent by another connection of the same session right after the
    # burst is applied while the burst is being served, and its broadcast
    # reaches the flooding connection before the burst's last reply.
    server = serve(SLIDERS, "--keep-alive", "0")
    token = fetch_token(f"{server.url}/sliders")
    with WireClient(f"{server.ws_url}/sliders/ws", token, timeout=60) as flood, \
            WireClient(f"{server.ws_url}/sliders/ws", token, timeout=60) as other:
        slider = model_id(flood.handshake().content["doc"], "slider")
        other.handshake()
        frames = []
        for n in range(3000):
            header = json.dumps({"msgid": f"f{n}", "msgtype": "SERVER-INFO-REQ"}).encode()
            frames += [build_frame(1, header), build_frame(1, b"{}"), build_frame(1, b"{}")]
        flood.ws.sock.sendall(b"".join(frames))
        reqid = other.send("PATCH-DOC", value_patch(slider, "value", 7), num_buffers=0)
        other.recv_until("OK", reqid)

        replies_before_patch = None
        replies = 0
        while replies < 3000:
            message = flood.recv()
            if message.msgtype == "SERVER-INFO-REPLY":
                replies += 1
            elif message.msgtype == "PATCH-DOC" and replies_before_patch is None:
                replies_before_patch = replies
    print(f"burst: the other connection's patch arrived after {replies_before_patch} of 3000 replies")
    assert replies_before_patch is not None and replies_before_patch < 3000
