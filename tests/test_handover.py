"""Hand-overs between workers, in one process: real abstract Unix sockets and real TCP connections.

Two :class:`~flask_docsync.routing.Router` objects stand for two workers
(each has its own tag); the gunicorn integration is tests/test_one_home.py.
"""

from __future__ import annotations

import array
import json
import logging
import socket
import struct
import time

import gevent
import gevent.event
import gevent.socket
import pytest

from flask_docsync import handover, routing
from flask_docsync.config import Settings
from flask_docsync.tokens import TokenPolicy, owner_tag

pytestmark = pytest.mark.skipif(not handover.SUPPORTED, reason="hand-overs need Linux")

SECRET = b"s" * 32


def tcp_pair() -> tuple[gevent.socket.socket, gevent.socket.socket]:
    """A connected TCP connection: (the server's end, the client's end)."""
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = gevent.socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    return server, client


@pytest.fixture
def received():
    """A Listener at a fresh address whose serve() records what it got."""
    got = gevent.event.AsyncResult()
    listeners = []

    def make(secret: bytes = SECRET) -> tuple[bytes, handover.Listener]:
        address = handover.socket_name("test", f"l{len(listeners)}-{time.monotonic_ns()}")
        listener = handover.Listener(address, secret, lambda head, client, buffered: got.set((head, client, buffered)) or gevent.sleep(0.2))
        listeners.append(listener)
        return address, listener

    yield make, got
    for listener in listeners:
        listener.close()


def test_a_connection_moves_to_the_owner_and_only_there(received):
    make, got = received
    address, listener = make()
    server_end, client = tcp_pair()
    handover.hand_over(address, SECRET, server_end, {"PATH_INFO": "/x/ws"}, b"pipelined")
    handover.forget(server_end)
    head, owned, buffered = got.get(timeout=5)
    assert head == {"PATH_INFO": "/x/ws"} and buffered == b"pipelined" and listener.received == 1
    # The owner's socket is the client's connection; the sender's copy is dead.
    owned.sendall(b"from the owner")
    assert client.recv(100) == b"from the owner"
    assert server_end.recv(100) == b""
    server_end.close()  # closes only the dead copy
    client.sendall(b"still open")
    assert owned.recv(100) == b"still open"
    client.close()


def test_nobody_listening_is_an_owner_gone():
    server_end, client = tcp_pair()
    with server_end, client, pytest.raises(handover.OwnerGone):
        handover.hand_over(handover.socket_name("test", "nobody-here"), SECRET, server_end, {}, b"")


def test_another_secret_is_refused_with_a_logged_reason(received, caplog):
    make, got = received
    address, listener = make()
    server_end, client = tcp_pair()
    with server_end, client, caplog.at_level(logging.WARNING, logger="flask_docsync.handover"):
        with pytest.raises(handover.HandOverFailed, match="not signed with this deployment's secret"):
            handover.hand_over(address, b"another" * 5, server_end, {}, b"")
        # The connection is still the sender's to answer.
        server_end.sendall(b"refused here")
        assert client.recv(100) == b"refused here"
    assert listener.refused == 1 and not got.ready()
    assert "not signed" in caplog.text


def test_an_old_message_is_refused(received):
    make, got = received
    address, listener = make()
    server_end, client = tcp_pair()
    body = json.dumps({"ts": time.time() - 60, "head": {}, "buffered": ""}).encode()
    frame = struct.pack("!I", len(body)) + body + handover._sign(SECRET, body)  # signed, but recorded long ago
    conn = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(address)
    with conn, server_end, client:
        conn.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [server_end.fileno()]))])
        assert conn.recv(200).startswith(b"NO the message is 60")
    assert listener.refused == 1 and not got.ready()


def test_a_message_over_the_limit_is_not_sent(received):
    make, _ = received
    address, listener = make()
    server_end, client = tcp_pair()
    with server_end, client, pytest.raises(handover.HandOverFailed, match="over the hand-over limit"):
        handover.hand_over(address, SECRET, server_end, {}, b"x" * handover.MAX_MESSAGE)
    assert listener.received == listener.refused == 0


@pytest.mark.parametrize("what", ["no socket", "garbage", "too long"])
def test_what_is_not_a_hand_over_is_refused(received, what):
    make, got = received
    address, listener = make()
    conn = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(address)
    with conn:
        if what == "no socket":
            body = json.dumps({"ts": time.time(), "head": {}, "buffered": ""}).encode()
            conn.sendall(struct.pack("!I", len(body)) + body + b"\0" * 32)
            expected = b"NO expected one socket"
        elif what == "garbage":
            server_end, client = tcp_pair()
            fds = array.array("i", [server_end.fileno()])
            conn.sendmsg([b"\0\0\0\x05hello" + b"\0" * 32], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            expected = b"NO the message is not signed"
        else:
            server_end, client = tcp_pair()
            fds = array.array("i", [server_end.fileno()])
            conn.sendmsg([struct.pack("!I", handover.MAX_MESSAGE)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            expected = b"NO the message is over"
        assert conn.recv(200).startswith(expected)
    assert listener.refused == 1 and not got.ready()


def test_a_session_id_names_its_owner_under_the_signature():
    policy = TokenPolicy(Settings.load({}, {"secret_key": SECRET.decode()}))
    session_id = policy.new_session_id(owner="ab12cd34")
    assert owner_tag(session_id) == "ab12cd34"
    policy.check_session_id(session_id)
    forged = session_id.replace("-ab12cd34.", "-ab12cd35.")
    with pytest.raises(Exception, match="not signed"):
        policy.check_session_id(forged)
    assert owner_tag(policy.new_session_id()) is None


def _worker() -> tuple[routing.Router, list]:
    served: list = []
    router = routing.Router(SECRET, lambda head, client, buffered: served.append((head, client)))
    router.start(active=True)
    return router, served


def test_routers_hand_to_the_owner_or_adopt_once_for_a_gone_owner():
    one, served_one = _worker()
    two, served_two = _worker()
    try:
        assert one.tag != two.tag
        mine = f"{'r' * 44}-{one.tag}.sig"

        def send_from(router):
            server_end, client = tcp_pair()
            return (lambda address: handover.hand_over(address, SECRET, server_end, {"n": 1}, b"")), client

        send, client = send_from(two)
        assert two.deliver(mine, send) is routing.Outcome.HANDED
        gevent.sleep(0.05)
        assert len(served_one) == 1 and one.stats()["received"] == 1
        assert one.deliver(mine, send) is routing.Outcome.LOCAL  # its own session

        orphan = f"{'o' * 44}-deadbeef.sig"  # a worker that is gone
        send, _ = send_from(two)
        assert two.deliver(orphan, send) is routing.Outcome.ADOPT  # two becomes the heir
        send, _ = send_from(one)
        assert one.deliver(orphan, send) is routing.Outcome.HANDED  # ... so one hands it to two
        gevent.sleep(0.05)
        assert len(served_two) == 1
        assert two.stats()["heir_of"] == 1 and two.stats()["adopted"] == 1
        client.close()
    finally:
        one.stop()
        two.stop()
    # Stopped: a connect to its address is refused, so it counts as gone.
    server_end, client = tcp_pair()
    with server_end, client, pytest.raises(handover.OwnerGone):
        handover.hand_over(handover.socket_name(one._namespace(), one.tag), SECRET, server_end, {}, b"")


def test_an_heir_lets_go_of_a_gone_worker_once_none_of_its_sessions_lives_here():
    heir, _ = _worker()
    other, _ = _worker()
    try:
        orphan = f"{'o' * 44}-deadbeef.sig"
        server_end, client = tcp_pair()
        with server_end, client:
            send = lambda address: handover.hand_over(address, SECRET, server_end, {}, b"")  # noqa: E731
            assert heir.deliver(orphan, send) is routing.Outcome.ADOPT
            assert heir.release_heirships(lambda tag: tag == "deadbeef", grace=0) == 0  # still holds one
            assert heir.release_heirships(lambda tag: False, grace=60) == 0  # within the grace
            assert heir.release_heirships(lambda tag: False, grace=0) == 1
            assert heir.stats()["heir_of"] == 0
            # Its heir socket is gone: the next worker to see the orphan becomes the heir.
            assert other.deliver(orphan, send) is routing.Outcome.ADOPT
    finally:
        heir.stop()
        other.stop()
