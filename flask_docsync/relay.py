"""Relaying a WebSocket to the host that holds its session.

A worker that receives a WebSocket for a session of another host (the host
is part of the owner tag in the session id; where it is comes from the
registry, :mod:`flask_docsync.registry`) opens a TCP connection to that
host's advertise URL, sends it the client's upgrade request with an
``X-DocSync-Relay`` header, and copies bytes both ways until either side
closes. The other host serves the request as if the client had sent it
there, handing it to the owning worker as for any arrival; the ``101``
and every frame pass through the relay unchanged.

The header is ``<time>.<hops>.<host>.<scheme>.<mac>``: an HMAC-SHA256 of
the deployment's secret over the time, the hop count, the id of the host it
is meant for (a relay that reaches another host, through a wrong advertise
URL, is refused there), the scheme the client used, the method, the path
with its query and a digest of every header forwarded (cookies, origin and
the session token in ``Sec-WebSocket-Protocol`` among them, and
``X-DocSync-Relay-For``, the client's address, which the receiving host
takes in place of the relay's, as it takes the scheme). A relayed request is never relayed again (a hop limit
of one: a stale registry cannot send a connection round in circles); a
header that is older than :data:`MAX_AGE` seconds, or does not check out,
is refused.

Copying costs a few system calls per message, paid only by connections that
arrived at the wrong host; relays are bounded by :data:`CHUNK` bytes in
flight per direction. This module imports no Flask.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import logging
import socket
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

import gevent
import gevent.socket

log = logging.getLogger(__name__)

#: The request header a relay adds; its WSGI environ key.
HEADER = "X-DocSync-Relay"
ENVIRON_HEADER = "HTTP_X_DOCSYNC_RELAY"
#: The client's address as the relaying host saw it, covered by the MAC.
FOR_HEADER = "X-DocSync-Relay-For"
ENVIRON_FOR_HEADER = "HTTP_X_DOCSYNC_RELAY_FOR"
#: Relays a request may have been through: one, host to host.
MAX_HOPS = 1
#: How old (seconds) a relay header may be, so a recorded one cannot be replayed later.
MAX_AGE = 10.0
#: Seconds the connection to the other host may take to open.
CONNECT_TIMEOUT = 3.0
#: Bytes read at a time per direction: what one relay holds in memory.
CHUNK = 64 * 1024
#: Seconds one direction may go on after the other has ended.
LINGER = 10.0


class HostGone(Exception):
    """The other host refused the connection or cannot be reached."""


class RelayRefused(Exception):
    """A relay header that does not check out; the message says why."""


@dataclasses.dataclass(frozen=True)
class Relayed:
    """What a verified ``X-DocSync-Relay`` header says."""

    #: Relays the request has been through.
    hops: int
    #: The id of the host it was meant for.
    host: str
    #: The scheme the client used (``http`` or ``https``) where it arrived.
    scheme: str


def headers_digest(environ: Mapping[str, Any]) -> str:
    """A digest of a request's headers as a relay forwards them: every one but the relay header."""
    lines = sorted(
        f"{key}:{value}" for key, value in environ.items()
        if key.startswith("HTTP_") and key != ENVIRON_HEADER and isinstance(value, str)
    )
    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


def _mac(secret: bytes, when: str, hops: int, host: str, scheme: str, method: str, path: str, digest: str) -> str:
    text = "\n".join((when, str(hops), host, scheme, method, path, digest)).encode("utf-8", "surrogateescape")
    return base64.urlsafe_b64encode(hmac.new(secret, text, hashlib.sha256).digest()).decode("ascii").rstrip("=")


def sign(secret: bytes, hops: int, host: str, scheme: str, method: str, path: str, digest: str) -> str:
    """The ``X-DocSync-Relay`` value for a request relayed for the ``hops``-th time to ``host``.

    :param path: The request's path and query string.
    :param digest: :func:`headers_digest` of the headers as forwarded
        (the client's, the ``X-DocSync-Relay-For`` added): the MAC covers
        every one of them, cookies, origin and token included.
    """
    when = f"{time.time():.3f}"
    return f"{when}.{hops}.{host}.{scheme}.{_mac(secret, when, hops, host, scheme, method, path, digest)}"


def verify(value: str, secret: bytes, method: str, path: str, digest: str) -> Relayed:
    """What the relay header ``value`` of a request says, once it checks out.

    :raises RelayRefused: the header is malformed, too old, over the hop
        limit or not signed with ``secret`` over this request.
    """
    try:
        seconds, fraction, hops_text, host, scheme, mac = value.split(".", 5)
        when = f"{seconds}.{fraction}"
        sent, hops = float(when), int(hops_text)
    except ValueError:
        raise RelayRefused("the relay header is malformed") from None
    if not hmac.compare_digest(mac, _mac(secret, when, hops, host, scheme, method, path, digest)):
        raise RelayRefused("the relay header is not signed with this deployment's secret over this request")
    age = time.time() - sent
    if not -MAX_AGE <= age <= MAX_AGE:
        raise RelayRefused(f"the relay header is {age:.1f} s old (at most {MAX_AGE:.0f} s; are the hosts' clocks set?)")
    if not 1 <= hops <= MAX_HOPS:
        raise RelayRefused(f"the request has been relayed {hops} times (at most {MAX_HOPS})")
    if scheme not in ("http", "https"):
        raise RelayRefused(f"the relay header names the scheme {scheme!r}")
    return Relayed(hops, host, scheme)


def address_of(url: str) -> tuple[str, int]:
    """``(host, port)`` of an advertise URL (``http://host:port``)."""
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "", parts.port or 80


def request_head(method: str, target: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """An HTTP/1.1 request head; header values with line breaks are dropped."""
    lines = [f"{method} {target} HTTP/1.1"]
    lines.extend(f"{name}: {value}" for name, value in headers if "\r" not in value and "\n" not in value)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")


#: TCP keep-alive of the connection to the other host: idle seconds, then
#: probes every so many seconds, so many times. A host that vanished
#: without a word (power, network) ends its relays within about a minute
#: instead of holding them until the balancer's timeout.
KEEPALIVE = (30, 10, 3)


def _keep_alive(sock: Any) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle, interval, count = KEEPALIVE
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count),
                        ("TCP_USER_TIMEOUT", (idle + interval * count) * 1000)):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


class Relay:
    """One relayed connection: the client's socket and the one to the other host.

    :param client: The client's socket (the request head already read from it).
    :param upstream: The connection to the host holding the session.
    """

    def __init__(self, client: Any, upstream: Any) -> None:
        self.client = client
        self.upstream = upstream
        #: Bytes copied: to the other host, and back to the client.
        self.sent = 0
        self.received = 0

    @classmethod
    def open(cls, client: Any, url: str, head: bytes, buffered: bytes) -> Relay:
        """Connect to ``url`` and send it ``head`` and the bytes read past it.

        :raises HostGone: the host refused or did not answer.
        """
        try:
            upstream = gevent.socket.create_connection(address_of(url), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            raise HostGone(f"{url}: {exc}") from None
        try:
            client.settimeout(None)  # an idle WebSocket is not a timed-out request
            upstream.settimeout(None)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _keep_alive(upstream)
            upstream.sendall(head + buffered)
        except OSError as exc:
            upstream.close()
            raise HostGone(f"{url}: {exc}") from None
        return cls(client, upstream)

    def run(self) -> None:
        """Copy both ways until both directions have ended; then close the upstream side.

        Once one side has closed, the other gets :data:`LINGER` seconds to
        finish (a close frame, its FIN) before the relay ends anyway.
        """
        forward = gevent.spawn(self._copy, self.client, self.upstream, "sent")
        forward.name = "docsync-relay-forward"
        back = gevent.spawn(self._copy, self.upstream, self.client, "received")
        back.name = "docsync-relay-back"
        try:
            finished = gevent.wait([forward, back], count=1)
            (back if forward in finished else forward).join(timeout=LINGER)
        finally:
            gevent.killall([forward, back])
            self.upstream.close()

    def close(self) -> None:
        """End the relay from outside (a stopping server): both directions see end of file."""
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _copy(self, source: Any, target: Any, counter: str) -> None:
        try:
            while True:
                data = source.recv(CHUNK)
                if not data:
                    break
                target.sendall(data)
                setattr(self, counter, getattr(self, counter) + len(data))
        except OSError:
            pass
        # Only this direction ends: the other may still carry a close frame.
        try:
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass
