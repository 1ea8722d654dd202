"""Server side WebSocket connections (RFC 6455) for WSGI servers running on
gevent.

The handshake is answered by writing the ``101 Switching Protocols``
response straight to the client socket, which every gevent based WSGI
server exposes in some way: ``gunicorn -k gevent`` puts it in
``environ['gunicorn.socket']``, :class:`gevent.pywsgi.WSGIServer` hands
out the buffered reader over it as ``wsgi.input``. After the handshake
the connection is a plain byte stream that this module parses and writes
itself:

-   Frames are read in the greenlet that calls :meth:`WebSocket.receive`.
    There is no reader thread or greenlet, so a connection costs one
    greenlet and works with or without :func:`gevent.monkey.patch_all`.
-   Every write happens under one lock per connection, with
    ``sendall``, so the frames of one :meth:`WebSocket.send_many` call are
    never interleaved with a ping, a pong, a close frame or another send.
-   permessage-deflate is never negotiated. Compressing every message
    costs several times the CPU of sending it, on the single gevent hub.

When gevent-websocket's ``WebSocketHandler`` (or its gunicorn worker)
already answered the handshake, :meth:`WebSocket.accept` returns a
:class:`GeventWebSocketBackend` that takes over the connection it set up.

This module does not import Flask; the WSGI environ is all it needs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import select
import socket
import struct
import time
import typing as t

import gevent
import gevent.lock
import gevent.monkey
import gevent.socket

from . import handover
from .errors import CloseCode, ConnectionClosed, HandshakeError, MessageTooBig
from .transport import ENVIRON_KEY, Transport

__all__ = [
    "HandshakeError",
    "ConnectionClosed",
    "MessageTooBig",
    "is_websocket_request",
    "requested_subprotocols",
    "validate_upgrade",
    "WebSocket",
    "GeventWebSocketBackend",
]

log = logging.getLogger(__name__)

_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_OP_CONTINUATION = 0x0
_OP_TEXT = 0x1
_OP_BINARY = 0x2
_OP_CLOSE = 0x8
_OP_PING = 0x9
_OP_PONG = 0xA
_DATA_OPCODES = frozenset((_OP_CONTINUATION, _OP_TEXT, _OP_BINARY))
_CONTROL_OPCODES = frozenset((_OP_CLOSE, _OP_PING, _OP_PONG))

_READ_SIZE = 64 * 1024
# The payload of a frame that is not all buffered yet is read in chunks of
# at most this size; each recv() allocates its full size for a moment.
_PAYLOAD_READ_SIZE = 256 * 1024

# Reading data that has already arrived never yields to the event loop, so
# receive() gives other greenlets a turn after this many frames or bytes:
# otherwise a client streaming control frames, empty continuation frames or
# large messages faster than they are parsed would hold the whole worker.
_YIELD_FRAMES = 64
_YIELD_BYTES = 1024 * 1024
# Payloads up to this size are joined with their header into one buffer;
# copying them is cheaper than an extra sendall call. Larger ones are
# written by themselves so they are never copied.
_JOIN_LIMIT = 16 * 1024
# The blocking-module poll, used only with a zero timeout: gevent's patched
# select has no poll, and this check must never wait or switch greenlets.
_poll = gevent.monkey.get_original("select", "poll")

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")
_NO_MASK = b"\x00\x00\x00\x00"

_T = t.TypeVar("_T")

try:
    from tornado.speedups import websocket_mask as _c_mask
except ImportError:  # pragma: no cover - tornado ships with bokeh
    _c_mask = None


def _unmask(mask: bytes, data: bytes | bytearray) -> bytes:
    if mask == _NO_MASK:
        return bytes(data)

    if _c_mask is not None:
        # The C function only accepts read-only buffers.
        return _c_mask(mask, data if type(data) is bytes else bytes(data))

    # XOR as one big integer: about 4 ms per MiB, against several hundred
    # for a Python loop over the bytes.
    n = len(data)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(data, "little") ^ key).to_bytes(n, "little")


def _frame_header(opcode: int, length: int) -> bytes:
    # Server frames are never masked (RFC 6455 section 5.1) and always final.
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, length))
    if length < 0x10000:
        return _HEADER_16.pack(first, 126, length)
    return _HEADER_64.pack(first, 127, length)


def _valid_close_code(code: int) -> bool:
    # 1004 is reserved, 1005 and 1006 only exist in APIs, 1015 is TLS
    # only, 1016-2999 are reserved for future RFCs.
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def _truncate_reason(reason: str) -> str:
    # A control frame carries at most 125 bytes, 2 of which are the code.
    data = reason.encode("utf-8")
    if len(data) <= 123:
        return reason
    return data[:123].decode("utf-8", "ignore")


def _close_payload(code: int, reason: str = "") -> bytes:
    return _U16.pack(code) + reason.encode("utf-8")


class _Fail(Exception):
    """Internal: the peer broke the protocol; close with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class _Gone(Exception):
    """Internal: the TCP stream ended or failed."""


def _header_tokens(environ: t.Mapping[str, t.Any], key: str) -> list[str]:
    return [v.strip().lower() for v in environ.get(key, "").split(",")]


def is_websocket_request(environ: t.Mapping[str, t.Any]) -> bool:
    """Whether the request asks for a WebSocket upgrade: a ``GET`` with
    ``Upgrade: websocket`` and a ``Connection`` header that lists
    ``upgrade``, compared case-insensitively.

    This does not check that the upgrade is valid; see
    :func:`validate_upgrade`.
    """
    return (
        environ.get("REQUEST_METHOD") == "GET"
        and "websocket" in _header_tokens(environ, "HTTP_UPGRADE")
        and "upgrade" in _header_tokens(environ, "HTTP_CONNECTION")
    )


def requested_subprotocols(environ: t.Mapping[str, t.Any]) -> list[str]:
    """The subprotocols the client offered in ``Sec-WebSocket-Protocol``,
    in order, or an empty list if it offered none.

    BokehJS offers ``["bokeh", <session token>]``, so the token is the
    second entry.
    """
    value = environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "")
    return [p.strip() for p in value.split(",") if p.strip()]


def validate_upgrade(environ: t.Mapping[str, t.Any]) -> None:
    """Check that the request is a WebSocket upgrade this module can
    accept, and raise :exc:`HandshakeError` with a status to answer with
    if it is not.

    When gevent-websocket already answered the handshake (the environ has
    ``wsgi.websocket``) it has done these checks itself, and there is
    nothing left to check.
    """
    if environ.get("wsgi.websocket") is not None:
        return

    method = environ.get("REQUEST_METHOD", "")
    if method != "GET":
        raise HandshakeError(
            400, f"A WebSocket handshake must be a GET request, not {method}."
        )

    protocol = environ.get("SERVER_PROTOCOL", "HTTP/1.1")
    if protocol in ("HTTP/0.9", "HTTP/1.0"):
        raise HandshakeError(
            400, f"A WebSocket handshake needs HTTP/1.1 or later, not {protocol}."
        )

    if "websocket" not in _header_tokens(environ, "HTTP_UPGRADE"):
        raise HandshakeError(
            400,
            "This URL only accepts WebSocket connections; the request needs an"
            " 'Upgrade: websocket' header.",
        )

    if "upgrade" not in _header_tokens(environ, "HTTP_CONNECTION"):
        raise HandshakeError(
            400,
            "The WebSocket handshake needs a 'Connection: Upgrade' header. If a"
            " proxy is in front of this server, configure it to pass the"
            " Upgrade and Connection headers on.",
        )

    version = environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip()
    if version != "13":
        got = f"version {version!r}" if version else "no Sec-WebSocket-Version"
        raise HandshakeError(
            426,
            f"Unsupported WebSocket version: the client sent {got}; this"
            " server only speaks 'Sec-WebSocket-Version: 13' (RFC 6455).",
            [("Sec-WebSocket-Version", "13")],
        )

    key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
    if not key:
        raise HandshakeError(
            400, "The WebSocket handshake needs a Sec-WebSocket-Key header."
        )

    try:
        decoded = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""

    if len(decoded) != 16:
        raise HandshakeError(
            400,
            f"Invalid Sec-WebSocket-Key {key!r}: it must be 16 random bytes,"
            " base64 encoded (RFC 6455 section 4.1).",
        )


def _check_limit(max_message_size: int | None) -> None:
    if max_message_size is not None and max_message_size < 1:
        raise ValueError(
            "max_message_size must be a positive number of bytes, or None for"
            " no limit."
        )


def _accept_key(key: str) -> str:
    digest = hashlib.sha1((key + _GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


def _take_buffered(rfile: t.Any, sock: t.Any) -> bytes:
    """Bytes the server's buffered reader already took off the socket
    beyond the request headers. A client may send its first frames right
    behind the handshake; they would be lost if the reader were skipped.
    """
    read1 = getattr(rfile, "read1", None)
    if read1 is None or getattr(rfile, "closed", False):
        return b""

    # read1() returns what is buffered without touching the socket, but
    # with an empty buffer it reads the socket once, which would block
    # until the client sends something. A zero timeout turns that read
    # into an immediate "nothing there".
    previous = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        return read1(_READ_SIZE) or b""
    except (OSError, ValueError):
        return b""
    finally:
        sock.settimeout(previous)


def _take_gunicorn_buffered(wsgi_input: t.Any) -> bytes:
    # gunicorn parses requests through an "unreader" that keeps whatever
    # it read past the headers; the request body wraps it.
    unreader = getattr(getattr(wsgi_input, "reader", None), "unreader", None)
    if unreader is None:
        return b""

    take = getattr(unreader, "take_buffered", None)
    if take is not None:
        return take()

    buf = getattr(unreader, "buf", None)  # gunicorn before take_buffered()
    if buf is None:
        return b""
    data = buf.getvalue()
    buf.seek(0)
    buf.truncate()
    return data


#: WSGI environ key of a connection another worker handed over to this one:
#: ``(socket, bytes read past the request head)`` (see
#: :mod:`flask_docsync.handover`).
HANDOVER_KEY = "flask_docsync.handover"
#: WSGI environ key of the bytes past the request head that
#: :class:`Detached` has taken from the server's reader already.
_BUFFERED_KEY = "flask_docsync.buffered"


def _take_all_buffered(environ: t.Mapping[str, t.Any], sock: t.Any, rfile: t.Any, server: str) -> bytes:
    """The bytes read from the client past the request head, taken from wherever they wait."""
    if _BUFFERED_KEY in environ:
        return environ[_BUFFERED_KEY]  # type: ignore[no-any-return]
    if server == "handover":
        return environ[HANDOVER_KEY][1]  # type: ignore[no-any-return]
    if server == "gunicorn":
        return _take_gunicorn_buffered(environ.get("wsgi.input"))
    return _take_buffered(rfile, sock)


def _find_socket(environ: t.Mapping[str, t.Any]) -> tuple[t.Any, t.Any, str]:
    """Return ``(socket, buffered reader or None, server kind)``."""
    handed = environ.get(HANDOVER_KEY)
    if handed is not None:
        return handed[0], None, "handover"

    sock = environ.get("gunicorn.socket")
    if sock is not None:
        return sock, None, "gunicorn"

    # Werkzeug also passes a reader over the socket as wsgi.input, so check
    # for it first: it needs its own way of ending the request.
    sock = environ.get("werkzeug.socket")
    if sock is not None:
        return sock, environ.get("wsgi.input"), "werkzeug"

    # gevent.pywsgi passes its buffered reader over the socket itself as
    # wsgi.input for upgrade requests, and a pywsgi.Input wrapping that
    # reader for others.
    rfile = environ.get("wsgi.input")
    rfile = getattr(rfile, "rfile", rfile)
    sock = getattr(getattr(rfile, "raw", None), "_sock", None)
    if sock is not None:
        return sock, rfile, "pywsgi"

    raise HandshakeError(
        500,
        "Cannot find the client socket in the WSGI environ; run under"
        " gevent.pywsgi.WSGIServer, 'gunicorn -k gevent', or gevent-websocket's"
        " WebSocketHandler / GeventWebSocketWorker.",
    )


class WebSocket:
    """An accepted WebSocket connection. Create it with :meth:`accept`.

    One greenlet at a time may call :meth:`receive`. Any greenlet may call
    :meth:`send`, :meth:`send_many`, :meth:`ping`, :meth:`close` and
    :meth:`abort` at any time; writes are serialised by a lock.
    """

    #: Seconds :meth:`close` waits for the client to answer with its own
    #: close frame, and for a writer blocked on a slow client to finish,
    #: before it drops the TCP connection. The bound exists so a client
    #: that stops reading cannot keep a closed connection alive.
    close_timeout: float = 2.0

    #: The subprotocol sent back in the handshake, or ``None`` if none was.
    subprotocol: str | None

    #: The WSGI environ of the upgrade request.
    environ: dict[str, t.Any]

    #: Whether a close frame was sent or received, or the TCP connection
    #: was lost. Nothing can be sent once this is true.
    closed: bool

    #: The close code received, or sent if the server closed first;
    #: ``None`` while the connection is open.
    close_code: int | None

    #: The reason that came with :attr:`close_code`.
    close_reason: str | None

    #: :func:`time.monotonic` time at which the last pong arrived, or
    #: ``None`` if none has. A keepalive loop compares it with the time of
    #: its last :meth:`ping` to find dead connections.
    last_pong: float | None

    def __init__(
        self,
        environ: dict[str, t.Any],
        sock: t.Any,
        *,
        subprotocol: str | None = None,
        max_message_size: int | None = 20 * 1024 * 1024,
        buffered: bytes = b"",
        server: str = "pywsgi",
        rfile: t.Any = None,
    ) -> None:
        """Wrap a socket on which the handshake is already done. Use
        :meth:`accept` to do the handshake; this is for tests and for
        servers that upgrade the connection themselves.

        :param sock: A gevent socket.
        :param buffered: Bytes already read from the socket past the
            handshake, parsed before anything else.
        :param server: How :meth:`wsgi_response` ends the request:
            ``"gunicorn"``, ``"pywsgi"``, ``"werkzeug"`` or
            ``"geventwebsocket"``.
        :param rfile: The server's buffered reader over ``sock``, closed by
            :meth:`wsgi_response` under pywsgi.
        """
        _check_limit(max_message_size)
        self.environ = environ
        self.subprotocol = subprotocol
        self.max_message_size = max_message_size
        self.closed = False
        self.close_code = None
        self.close_reason = None
        self.last_pong = None

        self._sock = sock
        self._rfile = rfile
        self._server = server
        self._write_lock = gevent.lock.RLock()
        self._shut = False
        self._reader: t.Any = None
        self._close_timer: t.Any = None

        self._buf = bytearray(buffered)
        self._pos = 0
        self._turn_frames = 0
        self._turn_bytes = 0
        # A frame whose payload is only partly read, kept here so that a
        # receive() timeout never loses data: (fin, opcode, mask, length).
        self._frame: tuple[bool, int, bytes, int] | None = None
        self._payload: bytearray | None = None
        # Fragments of the data message being reassembled.
        self._msg_opcode: int | None = None
        # One buffer, not a list of frames: a message sent as many tiny
        # frames must not cost a Python object per frame.
        self._msg_data = bytearray()

    @classmethod
    def accept(
        cls,
        environ: dict[str, t.Any],
        subprotocol: str | None = None,
        max_message_size: int | None = 20 * 1024 * 1024,
    ) -> Transport:
        """Complete the WebSocket handshake for this request and return the
        connection.

        :param environ: The WSGI environ of the upgrade request.
        :param subprotocol: The subprotocol to select, which must be one the
            client offered (see :func:`requested_subprotocols`). ``None``
            sends no ``Sec-WebSocket-Protocol`` header; a browser that offered
            subprotocols then fails the connection.
        :param max_message_size: The largest message, in bytes, a client may
            send, counted over all fragments. The limit exists so that one
            client cannot make the server buffer arbitrary amounts of memory;
            it is checked from each frame header before the payload is read.
            A larger message closes the connection with 1009 and
            :meth:`receive` raises :exc:`MessageTooBig`. ``None`` means no
            limit.
        :raises HandshakeError: The request is not a valid upgrade, or the
            server does not expose the client socket.
        :raises ConnectionClosed: The client went away during the handshake.

        If gevent-websocket already answered the handshake, this returns a
        :class:`GeventWebSocketBackend` instead, and ``subprotocol`` only
        serves to warn when gevent-websocket selected a different one. A
        transport in ``environ[ENVIRON_KEY]`` (see
        :mod:`flask_docsync.transport`) is returned as it is, once the
        request has been validated.
        """
        _check_limit(max_message_size)

        injected = environ.get(ENVIRON_KEY)
        if injected is not None:
            # A transport handed in by the test client: the request passes
            # the same checks, only the socket is another.
            validate_upgrade(environ)
            return injected

        gws = environ.get("wsgi.websocket")
        if gws is not None:
            return GeventWebSocketBackend.from_environ(
                environ, subprotocol=subprotocol, max_message_size=max_message_size
            )

        validate_upgrade(environ)

        if subprotocol is not None and (
            not subprotocol or any(c in subprotocol for c in ',; \t\r\n"')
        ):
            raise ValueError(
                f"Invalid subprotocol {subprotocol!r}: pick one of the names the"
                " client offered, see requested_subprotocols(environ)."
            )

        sock, rfile, server = _find_socket(environ)

        if not isinstance(sock, gevent.socket.socket):
            raise HandshakeError(
                500,
                "The client socket is a blocking socket, not a gevent socket."
                " WebSocket connections need gevent: run under"
                " gevent.pywsgi.WSGIServer or 'gunicorn -k gevent', or call"
                " gevent.monkey.patch_all() before the server starts.",
            )

        buffered = _take_all_buffered(environ, sock, rfile, server)

        try:
            # Frames are already batched per send_many() call; Nagle's
            # algorithm would only hold back a pong or the next message
            # until the client's delayed ACK, up to 40 ms.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass

        lines = [
            "HTTP/1.1 101 Switching Protocols",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Accept: {_accept_key(environ['HTTP_SEC_WEBSOCKET_KEY'].strip())}",
        ]
        if subprotocol is not None:
            lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")

        try:
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        except OSError as exc:
            raise ConnectionClosed(
                CloseCode.ABNORMAL, f"the client went away during the handshake: {exc}"
            ) from exc

        return cls(
            environ,
            sock,
            subprotocol=subprotocol,
            max_message_size=max_message_size,
            buffered=buffered,
            server=server,
            rfile=rfile,
        )

    @property
    def buffered(self) -> bool:
        """Whether received bytes are waiting to be parsed, so the next
        :meth:`receive` may return without waiting for (or yielding to)
        the network.
        """
        return len(self._buf) > self._pos

    @property
    def unread(self) -> bool:
        """Whether the client has sent bytes not parsed yet: in our buffer,
        in the TLS layer, or waiting in the kernel. Never waits.
        """
        if self.closed:
            return False
        if self.buffered:
            return True
        sock = self._sock
        pending = getattr(sock, "pending", None)
        try:
            if pending is not None and pending():
                return True
            poller = _poll()
            poller.register(sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return False

    def receive(self, timeout: float | None = None) -> str | bytes | None:
        """Wait for the next whole message from the client: ``str`` for a
        text message, ``bytes`` for a binary one.

        Pings are answered and pongs recorded (:attr:`last_pong`) while
        waiting. When the client closes, its close frame is answered, the
        TCP connection is shut down, and :exc:`ConnectionClosed` is raised
        with the client's code (or :data:`CloseCode.NO_STATUS` if it sent none).

        :param timeout: Seconds to wait, after which ``None`` is returned;
            a partly received message is kept for the next call. ``None``
            waits as long as it takes.
        :raises ConnectionClosed: The connection is closed, by either side
            or by a protocol violation of the client (code 1002, or 1007 for
            a text message that is not UTF-8), or the TCP connection ended
            without a close frame (1006).
        :raises MessageTooBig: The client sent a message larger than
            ``max_message_size``.
        """
        if self.closed:
            raise ConnectionClosed(self.close_code or CloseCode.ABNORMAL, self.close_reason or "")

        current = gevent.getcurrent()
        if self._reader is not None and self._reader is not current:
            raise RuntimeError(
                "receive() is already waiting in another greenlet; only one"
                " greenlet at a time may read a WebSocket."
            )

        deadline = None if timeout is None else time.monotonic() + timeout
        self._reader = current
        try:
            while True:
                frame = self._read_frame(deadline)
                if frame is None:
                    if self.closed:
                        # close() was called while waiting; the handshake is
                        # left to its timer.
                        raise ConnectionClosed(
                            self.close_code or CloseCode.ABNORMAL, self.close_reason or ""
                        )
                    return None

                fin, opcode, payload = frame
                self._turn_frames += 1
                self._turn_bytes += len(payload)
                if self._turn_frames >= _YIELD_FRAMES or self._turn_bytes >= _YIELD_BYTES:
                    self._turn_frames = self._turn_bytes = 0
                    gevent.sleep(0)

                if self.closed:
                    # close() was called by another greenlet while this one
                    # waited. Data still in flight is discarded until the
                    # client answers with its close frame.
                    if opcode == _OP_CLOSE:
                        self._shutdown()
                        raise ConnectionClosed(
                            self.close_code or CloseCode.ABNORMAL, self.close_reason or ""
                        )
                    continue

                if opcode >= _OP_CLOSE:
                    self._handle_control(opcode, payload)
                    continue

                message = self._add_fragment(fin, opcode, payload)
                if message is not None:
                    return message
        except _Fail as exc:
            self._fail(exc.code, exc.reason)
        except _Gone as exc:
            self._lost(str(exc))
        finally:
            self._reader = None

    def _fill(self, need: int, deadline: float | None) -> bool:
        """Make at least ``need`` unparsed bytes available in the buffer.
        Return ``False`` on timeout.
        """
        buf = self._buf
        if self._pos:
            del buf[: self._pos]
            self._pos = 0
        while len(buf) < need:
            data = self._recv(_READ_SIZE, deadline)
            if data is None:
                return False
            buf += data
        return True

    def _recv(self, size: int, deadline: float | None) -> bytes | None:
        def recv() -> bytes:
            try:
                data = self._sock.recv(size)
            except OSError as exc:
                raise _Gone(f"the connection failed: {exc}") from exc
            if not data:
                raise _Gone("the client dropped the connection without a close frame")
            return data

        return self._until(deadline, recv)

    @staticmethod
    def _until(deadline: float | None, read: t.Callable[[], _T]) -> _T | None:
        """Call ``read``, or return ``None`` if it is still waiting for data
        at ``deadline``.
        """
        if deadline is None:
            return read()

        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None

        # Only the wait for data is interrupted, never the parsing or a
        # pong being written, so a timeout cannot corrupt the stream.
        timer = gevent.Timeout(remaining)
        timer.start()
        try:
            return read()
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            return None
        finally:
            timer.close()

    def _read_frame(self, deadline: float | None) -> tuple[bool, int, bytes] | None:
        """Read one frame: ``(fin, opcode, unmasked payload)``, or ``None``
        on timeout. Raises :exc:`_Fail` or :exc:`_Gone`.
        """
        if self._frame is None:
            if len(self._buf) - self._pos < 2 and not self._fill(2, deadline):
                return None

            buf = self._buf
            pos = self._pos
            b0 = buf[pos]
            b1 = buf[pos + 1]
            fin = bool(b0 & 0x80)
            opcode = b0 & 0x0F
            length = b1 & 0x7F

            if b0 & 0x70:
                raise _Fail(
                    CloseCode.PROTOCOL_ERROR, "reserved bits set but no extension was negotiated"
                )
            if not b1 & 0x80:
                raise _Fail(CloseCode.PROTOCOL_ERROR, "client frames must be masked")
            if opcode in _CONTROL_OPCODES:
                if not fin:
                    raise _Fail(CloseCode.PROTOCOL_ERROR, "fragmented control frame")
                if length > 125:
                    raise _Fail(CloseCode.PROTOCOL_ERROR, "control frame payload over 125 bytes")
            elif opcode not in _DATA_OPCODES:
                raise _Fail(CloseCode.PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")

            size = 6 + (2 if length == 126 else 8 if length == 127 else 0)
            if len(buf) - pos < size:
                if not self._fill(size, deadline):
                    return None
                buf = self._buf
                pos = self._pos

            if length == 126:
                length = _U16.unpack_from(buf, pos + 2)[0]
            elif length == 127:
                length = _U64.unpack_from(buf, pos + 2)[0]
                if length >> 63:
                    raise _Fail(CloseCode.PROTOCOL_ERROR, "frame length has the top bit set")
            mask = bytes(buf[pos + size - 4 : pos + size])

            if opcode == _OP_CONTINUATION:
                if self._msg_opcode is None:
                    raise _Fail(CloseCode.PROTOCOL_ERROR, "continuation frame without a message")
            elif opcode in (_OP_TEXT, _OP_BINARY) and self._msg_opcode is not None:
                raise _Fail(
                    CloseCode.PROTOCOL_ERROR, "new message before the fragmented one finished"
                )

            # Checked from the header, before any of the payload is read,
            # so an oversized message is never buffered.
            if (
                opcode < _OP_CLOSE
                and self.max_message_size is not None
                and len(self._msg_data) + length > self.max_message_size
            ):
                raise _Fail(
                    CloseCode.MESSAGE_TOO_BIG,
                    f"message over the limit of {self.max_message_size} bytes",
                )

            pos += size
            available = len(buf) - pos
            if available >= length:
                # The usual case for small frames: the payload is already
                # buffered.
                payload = bytes(buf[pos : pos + length])
                self._pos = pos + length
                return fin, opcode, _unmask(mask, payload)

            self._frame = (fin, opcode, mask, length)
            # The payload grows as its bytes arrive and is never allocated
            # from the declared length: a header announcing megabytes must
            # not commit megabytes before they are sent.
            self._payload = bytearray(buf[pos:])
            del buf[:]
            self._pos = 0

        fin, opcode, mask, length = self._frame
        payload = self._payload
        assert payload is not None
        while len(payload) < length:
            data = self._recv(min(length - len(payload), _PAYLOAD_READ_SIZE), deadline)
            if data is None:
                return None
            payload += data

        self._frame = None
        self._payload = None
        return fin, opcode, _unmask(mask, payload)

    def _add_fragment(self, fin: bool, opcode: int, payload: bytes) -> str | bytes | None:
        if opcode != _OP_CONTINUATION:
            if fin:
                return self._decode(opcode, payload)
            self._msg_opcode = opcode

        self._msg_data += payload
        if not fin:
            return None

        opcode = self._msg_opcode
        data = bytes(self._msg_data)
        self._msg_opcode = None
        self._msg_data = bytearray()
        assert opcode is not None
        return self._decode(opcode, data)

    @staticmethod
    def _decode(opcode: int, data: bytes) -> str | bytes:
        if opcode == _OP_BINARY:
            return data
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise _Fail(CloseCode.INVALID_DATA, "text message is not valid UTF-8") from None

    def _handle_control(self, opcode: int, payload: bytes) -> None:
        if opcode == _OP_PING:
            self._write_control(_OP_PONG, payload)
        elif opcode == _OP_PONG:
            self.last_pong = time.monotonic()
        else:
            code, reason = self._parse_close(payload)
            self.closed = True
            self.close_code = code
            self.close_reason = reason
            # Echo the code alone (RFC 6455 section 5.5.1); the reason was
            # the client's to give.
            self._send_close_frame(CloseCode.NORMAL if code == CloseCode.NO_STATUS else code, "")
            self._shutdown()
            raise ConnectionClosed(code, reason)

    @staticmethod
    def _parse_close(payload: bytes) -> tuple[int, str]:
        if not payload:
            return CloseCode.NO_STATUS, ""
        if len(payload) == 1:
            raise _Fail(CloseCode.PROTOCOL_ERROR, "close frame with a 1 byte payload")
        code = _U16.unpack_from(payload)[0]
        if not _valid_close_code(code):
            raise _Fail(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise _Fail(CloseCode.INVALID_DATA, "close reason is not valid UTF-8") from None
        return code, reason

    def _write_control(self, opcode: int, payload: bytes) -> None:
        frame = _frame_header(opcode, len(payload)) + payload
        with self._write_lock:
            # A pong must not follow our close frame (RFC 6455 section 5.5.1).
            if self.closed:
                return
            self._sendall_locked((frame,))

    def _sendall_locked(self, chunks: t.Iterable[bytes | bytearray | memoryview]) -> None:
        try:
            for chunk in chunks:
                self._sock.sendall(chunk)
        except OSError as exc:
            self._mark_lost(f"the connection failed while sending: {exc}")
            self._shutdown()
            raise ConnectionClosed(self.close_code or CloseCode.ABNORMAL, self.close_reason or "") from exc
        except BaseException:
            # A gevent.Timeout or a kill interrupted sendall; part of a frame
            # may be on the wire and the stream cannot be resumed.
            self._mark_lost("a send was interrupted in the middle of a frame")
            self.abort()
            raise

    def _mark_lost(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.close_code = CloseCode.ABNORMAL
            self.close_reason = reason

    def send(self, message: str | bytes) -> None:
        """Send one message as one frame: text for ``str``, binary for
        ``bytes``.

        :raises ConnectionClosed: The connection is closed, or the socket
            failed (then it is closed with 1006).
        """
        self.send_many((message,))

    def send_many(self, messages: t.Iterable[str | bytes]) -> None:
        """Send several messages back to back, each as one frame: text for
        ``str``, binary for ``bytes``.

        No other frame, from any greenlet, is written between them. Bokeh
        relies on this: one protocol message is several frames that must
        arrive together.

        :raises ConnectionClosed: The connection is closed, or the socket
            failed (then it is closed with 1006).
        """
        chunks: list[bytes | bytearray | memoryview] = []
        small: list[bytes | bytearray | memoryview] = []

        for message in messages:
            if isinstance(message, str):
                opcode = _OP_TEXT
                data: bytes | bytearray | memoryview = message.encode("utf-8")
            elif isinstance(message, (bytes, bytearray, memoryview)):
                opcode = _OP_BINARY
                data = message
                if isinstance(data, memoryview) and (data.ndim != 1 or data.itemsize != 1):
                    data = data.cast("B")
            else:
                raise TypeError(
                    "A WebSocket message must be str (text) or bytes (binary),"
                    f" not {type(message).__name__}."
                )

            header = _frame_header(opcode, len(data))
            if len(data) <= _JOIN_LIMIT:
                small.append(header)
                small.append(data)
            else:
                small.append(header)
                chunks.append(b"".join(small))
                chunks.append(data)
                small = []

        if small:
            chunks.append(b"".join(small))

        with self._write_lock:
            if self.closed:
                raise ConnectionClosed(self.close_code or CloseCode.ABNORMAL, self.close_reason or "")
            self._sendall_locked(chunks)

    def ping(self, payload: bytes = b"") -> None:
        """Send a ping. The client answers with a pong, which a later
        :meth:`receive` records in :attr:`last_pong`.

        :param payload: At most 125 bytes to be echoed in the pong.
        :raises ConnectionClosed: The connection is closed.
        """
        payload = bytes(payload)
        if len(payload) > 125:
            raise ValueError("A ping payload is limited to 125 bytes.")
        frame = _frame_header(_OP_PING, len(payload)) + payload
        with self._write_lock:
            if self.closed:
                raise ConnectionClosed(self.close_code or CloseCode.ABNORMAL, self.close_reason or "")
            self._sendall_locked((frame,))

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the closing handshake: send a close frame, wait for the
        client's close frame, then shut the TCP connection down.

        Calling it again, or on a closed connection, does nothing.

        If another greenlet is blocked in :meth:`receive`, this returns
        right after sending the close frame; that :meth:`receive` raises
        :exc:`ConnectionClosed` when the client answers, or after
        :attr:`close_timeout` seconds. Otherwise this waits for the answer
        itself, at most :attr:`close_timeout` seconds.

        :param code: A close code that may appear on the wire: 1000-1003,
            1007-1014, or 3000-4999 for applications.
        :param reason: Cut to the 123 bytes of UTF-8 a close frame can hold.
        """
        if not _valid_close_code(code):
            raise ValueError(
                f"Close code {code} cannot be sent; use 1000-1003, 1007-1014, or"
                " 3000-4999 for application codes."
            )
        if self.closed:
            return

        reason = _truncate_reason(reason)
        self.closed = True
        self.close_code = code
        self.close_reason = reason

        if not self._send_close_frame(code, reason):
            self._shutdown()
            return

        reader = self._reader
        if reader is not None and reader is not gevent.getcurrent():
            # Two greenlets must not read one socket, so the blocked reader
            # waits for the answer. The timer bounds that wait.
            if self._close_timer is None:
                self._close_timer = gevent.spawn_later(self.close_timeout, self._shutdown)
            return

        self._drain(time.monotonic() + self.close_timeout)
        self._shutdown()

    def _send_close_frame(self, code: int, reason: str) -> bool:
        payload = _close_payload(code, reason)
        frame = _frame_header(_OP_CLOSE, len(payload)) + payload

        # A writer stuck on a client that does not read would hold the lock
        # forever, and a close frame cannot be slipped in behind it.
        if not self._write_lock.acquire(timeout=self.close_timeout):
            self.abort()
            return False
        try:
            if self._shut:
                return False
            self._sock.sendall(frame)
            return True
        except OSError:
            return False
        finally:
            self._write_lock.release()

    def _drain(self, deadline: float) -> None:
        """Discard what the client sends until its close frame, EOF or the
        deadline. Closing the socket with unread data would reset the
        connection, and the client could then lose our close frame.
        """
        self._reader = gevent.getcurrent()
        try:
            while True:
                frame = self._read_frame(deadline)
                if frame is None or frame[1] == _OP_CLOSE:
                    return
        except (_Fail, _Gone):
            return
        finally:
            self._reader = None

    def _fail(self, code: int, reason: str) -> t.NoReturn:
        if not self.closed:
            self.closed = True
            self.close_code = code
            self.close_reason = reason
            self._send_close_frame(code, reason)
        self._shutdown()
        if code == CloseCode.MESSAGE_TOO_BIG and self.close_code == CloseCode.MESSAGE_TOO_BIG:
            raise MessageTooBig(code, reason)
        raise ConnectionClosed(self.close_code or code, self.close_reason or "")

    def _lost(self, reason: str) -> t.NoReturn:
        self._mark_lost(reason)
        self._shutdown()
        raise ConnectionClosed(self.close_code or CloseCode.ABNORMAL, self.close_reason or "")

    def _shutdown(self) -> None:
        """End the TCP connection, and wake any greenlet blocked reading or
        writing it.

        The socket is shut down, not closed: the WSGI server owns the file
        descriptor and closes it after the application returns. gunicorn
        would log a "Bad file descriptor" traceback if it were closed
        under it.
        """
        timer = self._close_timer
        if timer is not None and timer is not gevent.getcurrent():
            self._close_timer = None
            timer.kill(block=False)

        if self._shut:
            return
        self._shut = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def abort(self) -> None:
        """Drop the TCP connection at once, without a close frame, for
        example for a client that stopped reading and has a send blocked.

        Blocked :meth:`receive` and send calls raise
        :exc:`ConnectionClosed` (1006). The server then resets the
        connection instead of waiting to deliver unsent data.
        """
        self._mark_lost("the server aborted the connection")
        try:
            self._sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        except OSError:
            pass
        self._shutdown()

    def wsgi_response(self) -> t.Any:
        """Return this from the WSGI application once the connection is
        finished (closing it first if it is still open), so the WSGI server
        neither writes an HTTP response into the finished stream nor keeps
        the connection for another request.

        -   gunicorn's gevent worker skips its response for
            ``ALREADY_HANDLED``. Its keep-alive loop then reads the shut
            down socket, gets EOF, and closes the connection with only a
            debug message.
        -   gevent.pywsgi writes nothing when the application returns an
            empty iterable without calling ``start_response``. It serves
            another request on the connection unless its reader is closed,
            so the reader (``wsgi.input``, which pywsgi hands out as is for
            upgrade requests) is closed here. pywsgi then sees the closed
            reader, stops without parsing anything more, and closes the
            socket. The access log shows status ``000``, since no status
            went through ``start_response``.
        -   Werkzeug treats a ``ConnectionError`` from the response iterable
            as a dropped connection and logs nothing.
        -   gevent-websocket ignores the result; its handler closes the
            connection.
        """
        if not self.closed:
            self.close()
        self._shutdown()
        return _end_request(self._server, self._rfile)


def _end_request(server: str, rfile: t.Any) -> t.Any:
    """What the WSGI app returns so that ``server`` ends a request whose stream it no longer owns."""
    if server == "gunicorn":
        try:
            from gunicorn.workers.base_async import ALREADY_HANDLED
        except ImportError:  # pragma: no cover - gunicorn set gunicorn.socket
            return []
        return ALREADY_HANDLED
    if server == "werkzeug":
        return _werkzeug_dropped()
    if server == "pywsgi" and rfile is not None:
        try:
            rfile.close()
        except (OSError, ValueError):
            pass
    return []  # also a handed-over connection: its owner's serve() closes it


class Detached:
    """The client socket of an upgrade request, for handing it to another process.

    Made after :func:`validate_upgrade`; it takes the bytes already read past
    the request head (:attr:`buffered`). If the connection is served here
    after all, :meth:`WebSocket.accept` finds those bytes again.

    :raises HandshakeError: when gevent-websocket has already answered the
        handshake or the server speaks TLS on the socket itself (either way
        the connection's state lives in this process and cannot be passed
        on), or the socket cannot be found.
    """

    def __init__(self, environ: dict[str, t.Any]) -> None:
        if "wsgi.websocket" in environ:
            raise HandshakeError(500, "gevent-websocket has answered the handshake already")
        self._environ = environ
        self.sock, self._rfile, self._server = _find_socket(environ)
        if callable(getattr(self.sock, "getpeercert", None)):
            # The session keys and record counters are in this process's
            # SSL object: another process holding the descriptor would see
            # ciphertext it cannot read.
            raise HandshakeError(
                500,
                "the server speaks TLS on the client socket itself (gunicorn --certfile), and a TLS"
                " connection cannot be passed to another process; terminate TLS at a proxy such as"
                " nginx in front of gunicorn so that WebSockets can reach their session's worker",
            )
        self.buffered = _take_all_buffered(environ, self.sock, self._rfile, self._server)
        environ[_BUFFERED_KEY] = self.buffered

    def release(self) -> t.Any:
        """Forget the socket that another process now serves; return what ends the WSGI request.

        See :meth:`WebSocket.wsgi_response` for what each server needs; every
        read of the descriptor here now sees end of file.
        """
        handover.forget(self.sock)
        return _end_request(self._server, self._rfile)


def _werkzeug_dropped() -> t.Iterator[bytes]:
    raise ConnectionError("WebSocket connection finished")
    yield b""  # pragma: no cover - makes this a generator


class GeventWebSocketBackend(WebSocket):
    """A connection whose handshake gevent-websocket already answered.

    Under gevent-websocket's ``WebSocketHandler`` (and the gunicorn
    ``GeventWebSocketWorker``), the handler sends the ``101`` before the
    application runs and puts its own object in ``environ['wsgi.websocket']``.
    Doing the handshake again would write a second ``101`` into the stream,
    so :meth:`WebSocket.accept` returns this class instead.

    It takes over the socket and buffered reader that gevent-websocket set
    up and speaks the protocol with the same code as :class:`WebSocket`.
    gevent-websocket's own reading and writing are not used: its close
    frames carry the reason bytes where the code belongs, its reader has no
    size limit and sizes its buffer from the length the client declares,
    and it unmasks in pure Python. Its object is marked closed so its
    handler sends no close frame of its own afterwards.

    gevent-websocket only selects a subprotocol if the WSGI application
    object has an ``app_protocol(path)`` method returning it; otherwise the
    ``101`` carries no ``Sec-WebSocket-Protocol`` and browsers that offered
    one (BokehJS offers ``bokeh``) fail the connection. The application
    must therefore set, for example::

        app.app_protocol = lambda path: "bokeh"

    :attr:`subprotocol` is what gevent-websocket actually sent.
    """

    @classmethod
    def from_environ(
        cls,
        environ: dict[str, t.Any],
        subprotocol: str | None = None,
        max_message_size: int | None = 20 * 1024 * 1024,
    ) -> GeventWebSocketBackend:
        """Take over ``environ['wsgi.websocket']``. See
        :meth:`WebSocket.accept` for the arguments.
        """
        gws = environ["wsgi.websocket"]
        handler = getattr(gws, "handler", None)
        sock = getattr(handler, "socket", None)
        rfile = getattr(handler, "rfile", None)
        if sock is None:
            sock, rfile, _ = _find_socket(environ)

        sent = None
        for name, value in getattr(handler, "response_headers", None) or ():
            if isinstance(name, bytes):
                name = name.decode("latin-1")
                value = value.decode("latin-1")
            if name.lower() == "sec-websocket-protocol":
                sent = value
                break

        if subprotocol is not None and sent != subprotocol:
            log.warning(
                "gevent-websocket answered the WebSocket handshake with"
                " subprotocol %r instead of %r; browsers will fail the"
                " connection. Give the WSGI application object an"
                " app_protocol(path) method that returns %r.",
                sent,
                subprotocol,
                subprotocol,
            )

        buffered = _take_buffered(rfile, sock) if rfile is not None else b""

        # From here on this object owns the stream; gevent-websocket must
        # not write its own (malformed) close frame when the handler ends.
        try:
            gws.closed = True
        except AttributeError:  # pragma: no cover
            pass

        return cls(
            environ,
            sock,
            subprotocol=sent,
            max_message_size=max_message_size,
            buffered=buffered,
            server="geventwebsocket",
            rfile=rfile,
        )
