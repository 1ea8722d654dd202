"""One WebSocket connection to a session: a reader loop and a single writer.

The connection reads Bokeh messages in the greenlet that serves the
WebSocket request and writes from one writer greenlet fed by a bounded
queue, so a message's frames are never interleaved with another's and a
slow client never blocks a callback or another connection. The one
exception is the reply to the client's own request, which the reader
writes itself when nothing is queued or being written (see
:meth:`ServerConnection._reply`); the WebSocket's write lock keeps the two
writers' frames apart.

``ws`` is any :class:`~flask_docsync.transport.Transport`: the RFC 6455
layer of :mod:`flask_docsync.websocket` in production, the test client's
in-memory socket in tests.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import TYPE_CHECKING, Any

import gevent
import gevent.queue

from . import monitor
from .errors import CloseCode, ConnectionClosed, MessageTooBig, ProtocolViolation
from .protocol import (
    MessageDecoder,
    check_content_depth,
    encode,
    protocol,
)

if TYPE_CHECKING:
    from bokeh.protocol.message import Message

    from .session import ServerSession
    from .transport import Transport

log = logging.getLogger(__name__)

#: After a slow client's queue overflows, how long the writer may take to
#: finish its current message and send the close frame before TCP is cut.
OVERFLOW_GRACE = 5.0
#: Frames written together at most, so one batch stays a bounded write.
MAX_BATCH_FRAMES = 256
#: Keep-alive pings that may go unanswered before a peer is taken for dead.
MISSED_PONGS_ALLOWED = 2

_ids = itertools.count(1)


class _Close:
    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


_STOP = object()


def _size(frames: list[str | bytes]) -> int:
    return sum(len(frame) for frame in frames)


class ServerConnection:
    """Serves one WebSocket for one session.

    :param ws: The accepted WebSocket.
    :param session: The session this connection is subscribed to.
    :param max_queue: Whole messages that may wait for a slow client. When
        the queue is full the client is too far behind to catch up: it is
        sent close 1008 (or cut off if it does not read even that) and the
        session stays, so the client can reconnect and pull a fresh copy.
    :param max_queue_bytes: The most message data (bytes, and characters of
        text frames) that may wait for a slow client, so that a queue of large
        messages is bounded as well; a message bigger than the limit still
        goes out when the queue is empty. ``None`` means no limit.
    :param max_message_size: The largest Bokeh message the client may send,
        all its WebSocket messages together (see
        :class:`~flask_docsync.protocol.MessageDecoder`); a larger one
        closes the connection with 1009. ``None`` means no limit.
    """

    def __init__(
        self, ws: Transport, session: ServerSession, max_queue: int, max_message_size: int | None = None,
        max_queue_bytes: int | None = None,
    ) -> None:
        self.id = next(_ids)
        self.ws = ws
        self.session = session
        self._queue: gevent.queue.Queue[Any] = gevent.queue.Queue(maxsize=max_queue)
        self._decoder = MessageDecoder(max_message_size)
        self._max_queue_bytes = max_queue_bytes
        #: The size of the messages in the queue (see ``max_queue_bytes``).
        self._queued_bytes = 0
        self._closing = False
        self._sending = False
        #: When the writer began writing the last ping; ``None`` before the first.
        self._ping_sent_at: float | None = None
        #: Whether a ping waits in the queue, not yet taken by the writer.
        self._ping_queued = False
        self._missed_pongs = 0
        self._ping_count = 0
        self._writer = gevent.spawn(self._write_loop)
        self._writer.name = f"docsync-writer(session={session.id}, connection={self.id})"

    def __repr__(self) -> str:
        return f"<ServerConnection {self.id} session={self.session.id[:12]}...>"

    @property
    def _socket(self) -> ServerConnection:
        """What Bokeh's connection calls its socket: this connection is its own
        (Panel looks up how to write to a connection by this object's type)."""
        return self

    @property
    def protocol(self) -> Any:
        """The Bokeh ``Protocol`` that makes this connection's messages."""
        return protocol

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def send_frames(self, frames: list[str | bytes]) -> None:
        """Queue one whole message; never blocks."""
        if self._closing:
            return
        size = _size(frames)
        limit = self._max_queue_bytes
        if limit is not None and self._queued_bytes + size > limit and not self._queue.empty():
            self._overflow()
            return
        try:
            self._queue.put_nowait(frames)
        except gevent.queue.Full:
            self._overflow()
            return
        self._queued_bytes += size

    def send_message(self, message: Message[Any]) -> None:
        self.send_frames(encode(message))

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close after the messages already queued have been sent."""
        if self._closing:
            return
        self._closing = True
        try:
            self._queue.put_nowait(_Close(code, reason))
        except gevent.queue.Full:
            self._drop_queue_and_close(code, reason)

    def _overflow(self) -> None:
        log.warning(
            "Session %s: connection %d fell %d messages behind; closing it with 1008"
            " (%d bytes were queued; the session stays open for a reconnect)",
            self.session.id, self.id, self._queue.qsize(), self._queued_bytes,
        )
        self._closing = True
        self._drop_queue_and_close(CloseCode.POLICY_VIOLATION, "client too slow: outbound queue full")

    def _drop_queue(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except gevent.queue.Empty:
                break
        self._queued_bytes = 0

    def _drop_queue_and_close(self, code: int, reason: str) -> None:
        self._drop_queue()
        self._queue.put_nowait(_Close(code, reason))
        gevent.spawn_later(OVERFLOW_GRACE, self._abort_if_stuck)

    def _abort_if_stuck(self) -> None:
        if not self._writer.dead:
            log.warning("Session %s: connection %d is not reading; dropping TCP", self.session.id, self.id)
            self._writer.kill(block=False)
            self.ws.abort()

    def keepalive(self) -> None:
        """Ping the peer; close the connection after unanswered pings.

        Called every keep-alive interval by the server's pinger. A ping
        counts as unanswered only when the peer had it and nothing from the
        peer waits unread: a worker too busy to write the ping or to read
        the pong in time (a thousand reconnects at once) must not close
        live clients for its own delay, which would send them all back.
        A ping stuck behind a write the peer does not take does count.
        """
        if self._closing:
            return
        if self._ping_queued and not self._sending:
            # The writer has not run since the last ping was queued: this
            # worker is behind, not the peer. Wait rather than queue more.
            return
        sent = self._ping_sent_at
        last_pong = self.ws.last_pong
        answered = last_pong is not None and sent is not None and last_pong >= sent
        if self._ping_queued or (sent is not None and not answered and not self.ws.unread):
            self._missed_pongs += 1
            if self._missed_pongs >= MISSED_PONGS_ALLOWED:
                log.info(
                    "Session %s: connection %d missed %d keep-alive pongs; closing it",
                    self.session.id, self.id, self._missed_pongs,
                )
                self.close(CloseCode.POLICY_VIOLATION, "keep-alive timeout")
                gevent.spawn_later(OVERFLOW_GRACE, self._abort_if_stuck)
                return
            if self._ping_queued:
                return
        else:
            self._missed_pongs = 0
        self._ping_count += 1
        self._ping_queued = True
        try:
            self._queue.put_nowait(("ping", str(self._ping_count).encode()))
        except gevent.queue.Full:
            self._ping_queued = False
            self._overflow()

    def _write_loop(self) -> None:
        ws = self.ws
        queue = self._queue
        item: Any = None
        try:
            while True:
                if item is None:
                    self._sending = False
                    item = queue.get()
                # Busy from taking an item until the next wait, pings and
                # closes included: a reply must not overtake what the
                # writer has already taken (see _reply).
                self._sending = True
                if item is _STOP:
                    return
                if isinstance(item, _Close):
                    ws.close(item.code, item.reason)
                    return
                if isinstance(item, tuple):
                    # Timed from the write, not the queueing, and before
                    # it: the pong may be read while ping() still runs.
                    self._ping_sent_at = time.monotonic()
                    self._ping_queued = False
                    ws.ping(item[1])
                    item = None
                    continue
                # Whole messages queued meanwhile (a patch and its OK, a
                # callback's several patches) go out in one write.
                frames = list(item)
                item = None
                while len(frames) < MAX_BATCH_FRAMES and not queue.empty():
                    item = queue.get_nowait()
                    if not isinstance(item, list):
                        break
                    frames.extend(item)
                    item = None
                # Counted out when taken: from here the writer holds them.
                self._queued_bytes = max(0, self._queued_bytes - _size(frames))
                ws.send_many(frames)
                # Not kept while waiting: an idle connection would hold its
                # last message (often the whole PULL-DOC-REPLY) for good.
                del frames
        except gevent.GreenletExit:
            raise
        except Exception as exc:
            self._write_failed(exc)

    def _write_failed(self, exc: Exception) -> None:
        """End the connection after a failed write.

        Part of a message may have gone out, so the stream cannot go on.
        Aborting the transport makes the reader's next receive() fail too
        (a broken socket would anyway, an encoding error would not) and the
        writer is told to stop, so the reader's cleanup need not wait for it.
        """
        if isinstance(exc, (OSError, ConnectionClosed)):
            log.debug("Session %s: connection %d write failed: %r", self.session.id, self.id, exc)
        else:
            log.error("Session %s: connection %d: could not send a message; closing it",
                      self.session.id, self.id, exc_info=exc)
        self._closing = True
        self._drop_queue()
        self._queue.put_nowait(_STOP)
        if not self.ws.closed:
            self.ws.abort()

    def run(self) -> None:
        """Serve the connection until it closes; call from the request greenlet."""
        session = self.session
        code, reason = CloseCode.NORMAL, ""
        if not session.subscribe(self):
            # Destroyed between the handshake and now (a server stop): a
            # reconnect gets whatever session the token allows then.
            log.info("Session %s: connection %d refused: the session has ended", session.id, self.id)
            self._finish(CloseCode.TRY_AGAIN_LATER, "the session has ended; reconnect")
            return
        self.send_message(protocol.create("ACK"))
        try:
            while True:
                fragment = self.ws.receive()
                if fragment is None:
                    continue
                message = self._decoder.feed(fragment)
                if message is not None:
                    self._handle(message)
                    if self.ws.buffered:
                        # Parsing what is already buffered never yields to
                        # the event loop: a client that sends requests faster
                        # than they are served would keep every other
                        # greenlet of the worker waiting.
                        gevent.sleep(0)
        except MessageTooBig as exc:
            log.warning("Session %s: connection %d closed 1009: %s", session.id, self.id, exc.reason)
        except ConnectionClosed as exc:
            # 1002/1007: a frame broke RFC 6455 (or the client says ours did).
            level = logging.WARNING if exc.code in (CloseCode.PROTOCOL_ERROR, CloseCode.INVALID_DATA) else logging.DEBUG
            log.log(level, "Session %s: connection %d closed (%s %s)", session.id, self.id, exc.code, exc.reason)
        except ProtocolViolation as exc:
            log.warning(
                "Session %s: connection %d closed with %d: %s", session.id, self.id, exc.code, exc.reason
            )
            code, reason = exc.code, exc.reason
        except gevent.GreenletExit:
            code, reason = CloseCode.NORMAL, "server shutting down"
            raise
        except Exception:
            log.exception("Session %s: connection %d failed", session.id, self.id)
            code, reason = CloseCode.INTERNAL_ERROR, "internal server error"
        finally:
            session.unsubscribe(self)
            self._decoder.close()
            self._finish(code, reason)
            session.notify_connection_lost()

    def _finish(self, code: int, reason: str) -> None:
        if not self._writer.dead:
            self.close(code, reason)
            self._writer.join(timeout=OVERFLOW_GRACE)
            if not self._writer.dead:
                self._writer.kill(block=False)
                self.ws.abort()
                return
        if not self.ws.closed:
            self.ws.close(code, reason)

    def _handle(self, message: Message[Any]) -> None:
        session = self.session
        msgtype = message.msgtype
        msgid = message.header["msgid"]
        try:
            with monitor.running(self._describe, msgtype):
                reply = self._dispatch(message)
        except (gevent.GreenletExit, ProtocolViolation):
            raise
        except (Exception, SystemExit) as exc:  # sys.exit() in app code must not end the server
            log.error(
                "Session %s: %s %s from connection %d failed: %r",
                session.id, msgtype, msgid, self.id, exc, exc_info=True,
            )
            error_text: str | None = f"{type(exc).__name__}: {exc}"[:500]
        else:
            error_text = None
        if error_text is not None:
            # Created outside the except block: Bokeh's ERROR message would
            # otherwise attach the server's traceback for the client to read.
            reply = encode(protocol.create("ERROR", msgid, error_text))
        self._reply(reply)

    def _reply(self, frames: list[str | bytes]) -> None:
        """Send the reply to a request of this client, from the reader.

        Handed to the writer greenlet, a reply would wait until every other
        connection that became ready in this turn of the event loop had
        been served, which on a busy worker doubles the latency of the
        unluckiest requests. So when nothing is queued or being written it
        is written here at once. The reader holds no document lock now, so
        a full socket holds up only this client's own next request; and
        whatever is queued meanwhile waits for the WebSocket's write lock.
        """
        if self._closing or self._sending or not self._queue.empty():
            self.send_frames(frames)
            return
        try:
            self.ws.send_many(frames)
        except Exception as exc:
            self._write_failed(exc)

    def _describe(self, msgtype: str) -> str:
        return f"Session {self.session.id}: {msgtype} from connection {self.id}"

    def _dispatch(self, message: Message[Any]) -> list[str | bytes]:
        """The frames of the reply to ``message``."""
        session = self.session
        msgtype = message.msgtype
        msgid = message.header["msgid"]
        if msgtype == "PULL-DOC-REQ":
            return session.handle_pull(message, self)
        if msgtype in ("PATCH-DOC", "PUSH-DOC"):
            check_content_depth(message)
        if msgtype == "PATCH-DOC":
            return session.handle_patch(message, self)
        if msgtype == "PUSH-DOC":
            return session.handle_push(message, self)
        if msgtype == "SERVER-INFO-REQ":
            return encode(protocol.create("SERVER-INFO-REPLY", msgid))
        # MessageDecoder lets only client message types through.
        raise ProtocolViolation(1002, f"unexpected message type {msgtype!r}")
