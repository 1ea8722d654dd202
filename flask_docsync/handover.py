"""Passing a client connection to the worker process that owns its session.

Every worker of a deployment listens on an abstract Unix socket named after
the deployment and the worker's tag (the tag is part of each session id the
worker makes; see :mod:`flask_docsync.tokens`). A worker that receives a
WebSocket upgrade for another worker's session connects there and sends the
request's head and the bytes already read past it, with the client socket
itself attached (``SCM_RIGHTS``). The owner answers ``OK`` once it holds the
socket, serves the request as if it had accepted it, and the sender forgets
its copy of the descriptor. After that the connection is the owner's alone:
no byte of it passes through the sender again.

What a worker accepts from the socket is checked before anything else is
done with it: the peer process must run as the same user
(``SO_PEERCRED``), the message must fit :data:`MAX_MESSAGE` and carry an
HMAC-SHA256 of the deployment's secret over its body, and its timestamp
must be at most :data:`MAX_AGE` seconds old. A refused hand-over is logged
with its reason and the descriptor is closed.

A name nobody listens on refuses the connect at once (the socket of a
process vanishes with it), which is how a dead owner is told from a live one.

Linux only (abstract sockets, ``SO_PEERCRED``); this module imports no Flask.
"""

from __future__ import annotations

import array
import base64
import hashlib
import hmac
import json
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import gevent
import gevent.socket

log = logging.getLogger(__name__)

#: The largest hand-over message: the request head and what was buffered
#: after it. Upgrade requests are a few KiB; the limit keeps a confused or
#: hostile peer from making a worker hold much memory.
MAX_MESSAGE = 256 * 1024
#: How old (seconds) a hand-over message may be, so that one recorded on the
#: socket cannot be replayed later.
MAX_AGE = 10.0
#: How long (seconds) either side waits for the other during a hand-over.
TIMEOUT = 5.0

_LENGTH = struct.Struct("!I")
_MAC_SIZE = hashlib.sha256().digest_size
_UCRED = struct.Struct("3i")

#: Whether this system has what a hand-over needs.
SUPPORTED = sys.platform.startswith("linux") and hasattr(socket, "SO_PEERCRED")


class OwnerGone(Exception):
    """Nobody listens on the owner's name: its process has ended."""


class HandOverFailed(Exception):
    """The owner is there but did not take the connection (its reason is the message)."""


def socket_name(namespace: str, name: str) -> bytes:
    """The abstract socket address of ``name`` in ``namespace``."""
    return b"\0flask-docsync/" + namespace.encode("ascii") + b"/" + name.encode("ascii")


def _sign(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, body, hashlib.sha256).digest()


def hand_over(
    address: bytes, secret: bytes, client: Any, head: Mapping[str, Any], buffered: bytes, timeout: float = TIMEOUT
) -> None:
    """Pass ``client`` (a connected socket) to the worker listening at ``address``.

    :param head: The request as the owner needs it to serve it (JSON-able).
    :param buffered: Bytes read from ``client`` past the request head.
    :raises OwnerGone: nobody listens at ``address``.
    :raises HandOverFailed: the owner refused, or did not answer in time;
        ``client`` is still this process's to answer.
    """
    body = json.dumps({
        "ts": time.time(), "head": dict(head), "buffered": base64.b64encode(buffered).decode("ascii"),
    }).encode("utf-8")
    if len(body) + _MAC_SIZE > MAX_MESSAGE:
        raise HandOverFailed(f"the request is over the hand-over limit of {MAX_MESSAGE} bytes")
    frame = _LENGTH.pack(len(body)) + body + _sign(secret, body)
    conn = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(timeout)
        try:
            conn.connect(address)
        except (ConnectionRefusedError, FileNotFoundError):
            raise OwnerGone() from None
        fds = array.array("i", [client.fileno()])
        sent = conn.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        if sent < len(frame):
            conn.sendall(frame[sent:])
        reply = conn.recv(512)
    except OwnerGone:
        raise
    except (ConnectionResetError, BrokenPipeError) as exc:
        # The owner went away in the middle (killed while this ran): without
        # its OK the socket is still only this process's. Gone for good if
        # nobody listens at the address any more.
        if not _listening(address):
            raise OwnerGone() from None
        raise HandOverFailed(f"the owner dropped the hand-over: {exc!r}") from None
    except (OSError, socket.timeout) as exc:
        raise HandOverFailed(f"the owner did not answer: {exc!r}") from None
    finally:
        conn.close()
    if reply != b"OK":
        raise HandOverFailed(reply.decode("utf-8", "replace") or "the owner closed the connection")


def _listening(address: bytes) -> bool:
    probe = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(address)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def forget(client: Any) -> None:
    """Drop this process's copy of a connection that another process now serves.

    ``close()`` alone would leave the WSGI server's own reference to the
    socket object, which reads on (gunicorn's keep-alive loop), and
    ``shutdown()`` would end the connection for the new owner too. So the
    descriptor number is pointed at one end of a closed socket pair: every
    read of it in this process sees end of file, and closing it closes only
    that end.
    """
    dead, other = socket.socketpair()
    other.close()
    try:
        os.dup2(dead.fileno(), client.fileno())
    finally:
        dead.close()


class Listener:
    """Accepts hand-overs at one address; ``serve(head, client, buffered)`` runs on a greenlet per connection.

    :param address: From :func:`socket_name`.
    :param secret: The deployment's secret; hand-overs signed with another are refused.
    :raises OSError: ``EADDRINUSE`` when another process listens there already.
    """

    def __init__(self, address: bytes, secret: bytes, serve: Callable[[dict[str, Any], Any, bytes], None]) -> None:
        self.address = address
        self._secret = secret
        self._serve = serve
        sock = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(address)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.received = 0
        self.refused = 0
        self._greenlet = gevent.spawn(self._accept_loop)
        self._greenlet.name = f"docsync-handover-listener({address[1:].decode('ascii', 'replace')})"

    def close(self) -> None:
        """Stop listening: from now on a connect to this address is refused."""
        self._greenlet.kill(block=False)
        self._sock.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._sock.fileno() == -1:
                    return
                gevent.sleep(0.1)
                continue
            greenlet = gevent.spawn(self._receive, conn)
            greenlet.name = "docsync-handover-receive"

    def _refuse(self, conn: Any, reason: str, fds: list[int]) -> None:
        self.refused += 1
        log.warning("Refused a connection handed over by another worker: %s", reason)
        for fd in fds:
            os.close(fd)
        try:
            conn.sendall(b"NO " + reason.encode("utf-8")[:400])
        except OSError:
            pass

    def _receive(self, conn: Any) -> None:
        fds: list[int] = []
        try:
            conn.settimeout(TIMEOUT)
            pid, uid, _ = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            data, ancdata, _, _ = conn.recvmsg(MAX_MESSAGE + _LENGTH.size, socket.CMSG_SPACE(array.array("i").itemsize))
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                    fds.extend(got)
            if uid != os.getuid():
                return self._refuse(conn, f"the peer process {pid} runs as user {uid}, not as this worker's", fds)
            if len(fds) != 1:
                return self._refuse(conn, f"expected one socket, got {len(fds)}", fds)
            if len(data) < _LENGTH.size:
                return self._refuse(conn, "the message is truncated", fds)
            (length,) = _LENGTH.unpack_from(data)
            if length + _MAC_SIZE > MAX_MESSAGE:
                return self._refuse(conn, f"the message is over {MAX_MESSAGE} bytes", fds)
            message = bytearray(data[_LENGTH.size:])
            while len(message) < length + _MAC_SIZE:
                chunk = conn.recv(length + _MAC_SIZE - len(message))
                if not chunk:
                    return self._refuse(conn, "the message is truncated", fds)
                message += chunk
            body, mac = bytes(message[:length]), bytes(message[length:length + _MAC_SIZE])
            if not hmac.compare_digest(mac, _sign(self._secret, body)):
                return self._refuse(conn, "the message is not signed with this deployment's secret", fds)
            try:
                decoded = json.loads(body)
                age = time.time() - float(decoded["ts"])
                head = decoded["head"]
                buffered = base64.b64decode(decoded["buffered"])
            except (ValueError, KeyError, TypeError):
                return self._refuse(conn, "the message is malformed", fds)
            if not -MAX_AGE <= age <= MAX_AGE:
                return self._refuse(conn, f"the message is {age:.1f} s old", fds)
            if not isinstance(head, dict):
                return self._refuse(conn, "the message is malformed", fds)
            client = gevent.socket.socket(fileno=fds.pop())
            conn.sendall(b"OK")
        except (OSError, socket.timeout) as exc:
            for fd in fds:
                os.close(fd)
            log.warning("A hand-over from another worker failed: %r", exc)
            return
        finally:
            conn.close()
        self.received += 1
        try:
            self._serve(head, client, buffered)
        except Exception:
            log.exception("Serving a handed-over connection failed")
        finally:
            if client.fileno() != -1:
                client.close()
