"""ServerConnection's two writers (the writer greenlet and the reader's
replies) against a scripted WebSocket, for orderings a real socket makes
hard to arrange."""

from __future__ import annotations

import time

import gevent
import gevent.lock
import gevent.queue
import pytest

from flask_docsync.connection import ServerConnection
from flask_docsync.errors import ConnectionClosed


class ScriptedSession:
    id = "session-under-test"

    def subscribe(self, connection) -> bool:
        return True

    def unsubscribe(self, connection) -> None:
        pass

    def notify_connection_lost(self) -> None:
        pass


class ScriptedWebSocket:
    """Records what is written, under one write lock as the real layer does.

    ``stall[kind]`` makes writes of that kind ("message" or "ping") wait that
    long while holding the lock, as a send to a full socket does;
    ``fail_with`` makes the next message write raise.
    """

    def __init__(self) -> None:
        self.lock = gevent.lock.RLock()
        self.wire: list = []
        self.closed = False
        self.aborted = False
        self.stall: dict[str, float] = {}
        self.fail_with: BaseException | None = None
        self.inbox: gevent.queue.Queue = gevent.queue.Queue()
        self.last_pong: float | None = None
        self.buffered = False
        self.unread = False

    def _write(self, kind: str, what: list) -> None:
        with self.lock:
            if self.closed:
                raise ConnectionClosed(1006, "closed")
            if kind in self.stall:
                gevent.sleep(self.stall[kind])
            if kind == "message" and self.fail_with is not None:
                exc, self.fail_with = self.fail_with, None
                raise exc
            self.wire.extend(what)

    def send_many(self, frames) -> None:
        # Each test message is a single frame, so the wire shows messages.
        self._write("message", list(frames))

    def ping(self, payload: bytes) -> None:
        self._write("ping", ["ping"])

    def close(self, code: int = 1000, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            self.wire.append(f"close {code}")

    def abort(self) -> None:
        self.closed = self.aborted = True
        self.inbox.put(ConnectionClosed(1006, "aborted"))

    def receive(self):
        item = self.inbox.get()
        if isinstance(item, BaseException):
            raise item
        return item


@pytest.fixture
def connection():
    made = []

    def make(ws: ScriptedWebSocket) -> ServerConnection:
        conn = ServerConnection(ws, ScriptedSession(), max_queue=16)
        made.append(conn)
        return conn

    yield make
    for conn in made:
        conn._writer.kill()


def test_a_reply_never_overtakes_what_the_writer_already_took(connection):
    # A keep-alive ping is stuck on a full socket; the reader then replies
    # with the document as it is (R), and a callback changes the document
    # (P). The client must get R before P, or it would apply P to a copy
    # that R then replaces with the older state.
    ws = ScriptedWebSocket()
    ws.stall["ping"] = 0.05
    conn = connection(ws)
    conn.keepalive()
    gevent.sleep(0.01)  # the writer is inside the ping
    reader = gevent.spawn(conn._reply, ["R"])
    gevent.sleep(0.01)
    conn.send_frames(["P"])
    reader.join()
    gevent.sleep(0.1)
    assert ws.wire == ["ping", "R", "P"]


def test_a_reply_goes_out_at_once_when_nothing_is_queued(connection):
    ws = ScriptedWebSocket()
    conn = connection(ws)
    gevent.sleep(0)  # let the writer start and wait
    conn._reply(["R"])
    assert ws.wire == ["R"]  # written by the reader itself, no turn of the loop needed


@pytest.mark.parametrize("failure", [ConnectionClosed(1006, "reset"), UnicodeEncodeError("utf-8", "\ud800", 0, 1, "x")],
                         ids=["socket-gone", "unsendable"])
def test_a_failed_reply_ends_the_connection_without_waiting_for_the_writer(connection, failure):
    ws = ScriptedWebSocket()
    conn = connection(ws)
    runner = gevent.spawn(conn.run)  # sends ACK through the writer, then reads
    gevent.sleep(0.01)
    ws.fail_with = failure
    conn._reply(["R"])
    if isinstance(failure, ConnectionClosed):
        ws.inbox.put(failure)  # the reader's next receive() sees the broken socket
    else:
        assert ws.aborted  # nothing else would wake the reader
    runner.join(timeout=4)  # the writer's grace period is 5 s
    assert runner.dead and conn._writer.dead


# -- keep-alive ------------------------------------------------------------------


def closes(ws: ScriptedWebSocket) -> list:
    return [item for item in ws.wire if str(item).startswith("close")]


@pytest.fixture
def keepalive_peer(connection):
    """``keepalive_peer(**settings)``: a scripted socket with those attributes
    set (``stall``, ``unread``) and its connection, for the pinger's tests."""

    def make(**settings) -> tuple[ScriptedWebSocket, ServerConnection]:
        ws = ScriptedWebSocket()
        for name, value in settings.items():
            setattr(ws, name, value)
        return ws, connection(ws)

    return make


def run_pinger(conn: ServerConnection, passes: int, *, writer_turns: bool = True, after_each=None) -> None:
    """``passes`` passes of the pinger, each followed by a turn for the writer
    (unless ``writer_turns`` is false) and then by ``after_each()``, if given."""
    for _ in range(passes):
        conn.keepalive()
        if writer_turns:
            gevent.sleep(0.01)  # the writer sends the ping, or is still stuck
        if after_each is not None:
            after_each()


def test_a_silent_peer_is_closed_after_two_unanswered_pings(keepalive_peer):
    ws, conn = keepalive_peer()
    run_pinger(conn, 3)  # no pong comes
    assert ws.wire.count("ping") == 2 and closes(ws) == ["close 1008"]


def test_an_answered_ping_keeps_the_peer(keepalive_peer):
    ws, conn = keepalive_peer()

    def pong() -> None:
        ws.last_pong = time.monotonic()

    run_pinger(conn, 4, after_each=pong)
    assert closes(ws) == []


def test_a_pong_the_busy_worker_has_not_read_yet_counts_as_an_answer(keepalive_peer):
    # The pong is in the socket; the reader has not been scheduled to read it.
    ws, conn = keepalive_peer(unread=True)
    run_pinger(conn, 5)
    assert ws.wire.count("ping") == 5 and closes(ws) == []


def test_a_ping_the_busy_worker_has_not_written_yet_is_not_a_miss(keepalive_peer):
    # Three passes of the pinger before the writer gets a turn: the peer
    # never had a ping to answer, and no pings pile up for it.
    ws, conn = keepalive_peer()
    run_pinger(conn, 3, writer_turns=False)
    gevent.sleep(0.01)
    assert ws.wire == ["ping"] and not conn._closing


def test_a_ping_stuck_behind_a_write_the_peer_does_not_take_is_a_miss(keepalive_peer):
    # A closed laptop with a large message half sent: the writer is blocked,
    # so the ping never goes out; the connection must still be closed.
    ws, conn = keepalive_peer(stall={"message": 60})
    conn.send_frames(["big"])
    gevent.sleep(0.01)  # the writer is inside the write
    run_pinger(conn, 3)
    assert conn._closing and "ping" not in ws.wire


# -- slow clients: the queue's bound in bytes ---------------------------------------


def test_a_slow_client_is_closed_when_its_queue_holds_too_many_bytes(connection):
    ws = ScriptedWebSocket()
    ws.stall["message"] = 60  # the client reads nothing
    conn = ServerConnection(ws, ScriptedSession(), max_queue=1000, max_queue_bytes=1000)
    try:
        conn.send_frames(["x" * 10])
        gevent.sleep(0.01)  # the writer is stuck inside that write
        for _ in range(2):
            conn.send_frames(["y" * 400])
        assert not conn._closing and conn.queued_bytes == 800
        conn.send_frames(["z" * 400])  # 1,200 bytes would wait: too far behind
        assert conn._closing and conn.queued_bytes == 0
    finally:
        conn._writer.kill()


def test_a_message_bigger_than_the_byte_bound_still_goes_out_alone(connection):
    ws = ScriptedWebSocket()
    conn = ServerConnection(ws, ScriptedSession(), max_queue=1000, max_queue_bytes=100)
    try:
        conn.send_frames(["a document of 5,000 characters" + "." * 4970])
        gevent.sleep(0.01)
        assert ws.wire and len(ws.wire[0]) == 5000 and not conn._closing and conn.queued_bytes == 0
    finally:
        conn._writer.kill()
