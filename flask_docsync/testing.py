"""Drive DocSync sessions from tests, without a browser or a network.

In the spirit of Flask's ``app.test_client()``::

    from flask_docsync.testing import DocSyncTestClient

    def test_slider(app):
        with app.test_client() as http:
            http.post("/login", data={"user": "ann"})
            client = DocSyncTestClient(app, flask_test_client=http)
            with client.open("/sliders", arguments={"start": "3"}) as session:
                session.set("slider", "value", 7)
                assert session.model("result").text == "value=7"

A session is opened the way a browser opens one. The app page is requested
through Flask's test client, so view decorators, the ``authorize`` hook,
cookies, headers and query arguments all apply. Then an in-memory WebSocket
is attached to the new session: the ``authorize`` hook runs again for the
WebSocket URL, the token from the page names the session, and every message
in either direction is encoded with :func:`flask_docsync.protocol.encode`,
read by the server's own :class:`~flask_docsync.connection.ServerConnection`
and :class:`~flask_docsync.protocol.MessageDecoder`, and decoded again for
the test as BokehJS would receive it.

The test client keeps a copy of the document as the browser sees it
(:attr:`TestSession.browser_document`), built from ``PULL-DOC-REPLY`` and
updated by every ``PATCH-DOC`` the server sends, and browser-side changes
are sent as ``PATCH-DOC`` messages, as Bokeh's Python client does.

Session callbacks never run on their own: the sessions a test client opens
get a :class:`VirtualTimeScheduler`, and :meth:`TestSession.run_callbacks`
advances its clock.
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
import gevent.monkey
import gevent.queue
from bokeh.core.serialization import Serializable

from .apps import normalize_route
from .errors import ConfigurationError, ConnectionClosed, DocSyncError, SessionError, UnknownApplication
from .scheduler import _get_ident, from_other_thread

if TYPE_CHECKING:
    from bokeh.document import Document
    from bokeh.events import Event
    from bokeh.model import Model
    from bokeh.server.callbacks import SessionCallback
    from flask import Flask
    from flask.testing import FlaskClient
    from werkzeug.test import TestResponse

    from .connection import ServerConnection
    from .server import DocSyncServer
    from .session import ServerSession

__all__ = [
    "DocSyncTestClient",
    "ErrorReply",
    "InMemoryWebSocket",
    "ReceivedMessage",
    "SessionClosed",
    "SessionRefused",
    "TestSession",
    "VirtualTimeScheduler",
]

log = logging.getLogger(__name__)


#: Callbacks that may run at one virtual instant before
#: :meth:`VirtualTimeScheduler.advance` decides they schedule each other forever.
MAX_RUNS_PER_INSTANT = 10_000

_TOKEN = re.compile(r'\\?"token\\?":\s*\\?"([A-Za-z0-9_.\-]+)\\?"')
_msgids = itertools.count(1)


# Errors ---------------------------------------------------------------------


class SessionRefused(SessionError):
    """The page request that creates a session was not answered with a page.

    :param status: The HTTP status of the answer (a redirect to a login
        page, 401, 403, ...), or of the refused WebSocket.
    :param reason: What happened and what to do about it.
    :param response: The Flask test response of the page request; ``None``
        when the WebSocket step refused.
    """

    def __init__(self, status: int, reason: str, response: TestResponse | None = None) -> None:
        super().__init__(status, reason)
        self.response = response


class ErrorReply(DocSyncError):
    """The server answered a message of the test with ``ERROR``.

    The server log has the traceback; the ``ERROR`` message is also in
    :attr:`TestSession.received`.

    :param reply: The ``ERROR`` message.
    """

    def __init__(self, request_type: str, reply: ReceivedMessage) -> None:
        self.reply = reply
        text = reply.content.get("text", "") if isinstance(reply.content, dict) else ""
        super().__init__(
            f"The server answered {request_type} with ERROR: {text}. The server log has the"
            " traceback; pass check=False to get the reply instead of this exception."
        )


class SessionClosed(DocSyncError):
    """The server closed the session's connection while the test used it.

    :param code: The WebSocket close code the server sent.
    :param reason: The close reason the server sent.
    """

    def __init__(self, code: int | None, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"The server closed the connection with code {code}: {reason or 'no reason'}.")


# Virtual time -----------------------------------------------------------------


class _Entry:
    __slots__ = ("callback", "due", "seq", "period")

    def __init__(self, callback: SessionCallback, due: float, seq: int, period: float | None) -> None:
        self.callback = callback
        self.due = due
        self.seq = seq
        self.period = period


class VirtualTimeScheduler:
    """A session callback scheduler on a virtual clock that moves only when told.

    It has the interface of :class:`~flask_docsync.scheduler.CallbackScheduler`
    and the same timing rules, in virtual milliseconds counted from the
    session's creation: next-tick callbacks are due at once, timeout
    callbacks after their delay, periodic callbacks first after one period
    and then every period, never overlapping. Callbacks run through the
    session's own ``invoke``, so locking, the Flask app context, ``curdoc()``
    and error logging are the real ones: a callback that raises is logged
    with the session id and a periodic one keeps its schedule.

    Nothing runs until :meth:`advance` is called; then the due callbacks run
    one after another in the caller's greenlet, in order of due time, then
    of scheduling.

    :param invoke: Runs one callback object (the session's ``_invoke_callback``).
    :param name: The session id, for log lines.
    """

    def __init__(self, invoke: Callable[[SessionCallback], Any], name: str) -> None:
        self._invoke = invoke
        self._name = name
        self._entries: dict[SessionCallback, _Entry] = {}
        self._seq = itertools.count()
        self._now = 0.0
        self._closed = False
        self._hub = gevent.get_hub()
        self._thread = _get_ident()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<VirtualTimeScheduler session={self._name[:12]}... now={self._now:g}ms pending={len(self)}>"

    @property
    def now(self) -> float:
        """Virtual milliseconds since the session was created."""
        return self._now

    def pending(self) -> list[tuple[float, SessionCallback]]:
        """``(due_in_ms, callback)`` of every scheduled callback, soonest first."""
        entries = sorted(self._entries.values(), key=lambda e: (e.due, e.seq))
        return [(max(e.due - self._now, 0.0), e.callback) for e in entries]

    def _from_other_thread(self, method: Callable[..., Any], *args: Any) -> bool:
        return from_other_thread(self._hub, self._thread, method, *args)

    def add(self, callback: SessionCallback) -> None:
        """Schedule ``callback`` (a Bokeh ``SessionCallback``) from the current virtual time."""
        from bokeh.server.callbacks import NextTickCallback, PeriodicCallback, TimeoutCallback

        if self._from_other_thread(self.add, callback):
            return
        if self._closed or callback in self._entries:
            return
        if isinstance(callback, PeriodicCallback):
            period = float(max(callback.period, 1))
            entry = _Entry(callback, self._now + period, next(self._seq), period)
        elif isinstance(callback, TimeoutCallback):
            entry = _Entry(callback, self._now + max(callback.timeout, 0), next(self._seq), None)
        elif isinstance(callback, NextTickCallback):
            entry = _Entry(callback, self._now, next(self._seq), None)
        else:
            raise TypeError(f"cannot schedule {callback!r}: not a Bokeh session callback")
        self._entries[callback] = entry

    def remove(self, callback: SessionCallback) -> None:
        """Stop scheduling ``callback``; a run in progress finishes."""
        if self._from_other_thread(self.remove, callback):
            return
        self._entries.pop(callback, None)

    def close(self) -> None:
        """Drop every callback; used when the session is destroyed."""
        self._closed = True
        self._entries.clear()

    def advance(self, ms: float = 0) -> int:
        """Move the clock ``ms`` milliseconds on, running every callback that falls due.

        Callbacks due at the same instant run in the order they were
        scheduled; callbacks they schedule run too when they fall due within
        the window (a next-tick callback added by a callback runs in the same
        call).

        :param ms: How far to move the clock; ``0`` runs what is due now.
        :return: How many callbacks ran.
        :raises RuntimeError: when more than :data:`MAX_RUNS_PER_INSTANT`
            callbacks run without the clock moving (callbacks that keep
            scheduling each other).
        """
        if ms < 0:
            raise ValueError(f"The clock only moves forward; got ms={ms!r}.")
        target = self._now + ms
        ran = 0
        at_instant = 0
        while not self._closed:
            due = [e for e in self._entries.values() if e.due <= target]
            if not due:
                break
            entry = min(due, key=lambda e: (e.due, e.seq))
            if entry.due > self._now:
                self._now = entry.due
                at_instant = 0
            at_instant += 1
            if at_instant > MAX_RUNS_PER_INSTANT:
                raise RuntimeError(
                    f"Session {self._name}: more than {MAX_RUNS_PER_INSTANT} callbacks ran at virtual"
                    f" time {self._now:g} ms; callbacks keep scheduling next-tick callbacks forever."
                )
            self._run(entry)
            ran += 1
        self._now = max(self._now, target)
        return ran

    def _run(self, entry: _Entry) -> None:
        callback = entry.callback
        if entry.period is None:
            # Bokeh's one-shot wrapper removes the callback before running it;
            # this covers a callback removed otherwise or that raised first.
            try:
                self._invoke(callback)
            finally:
                if self._entries.get(callback) is entry:
                    del self._entries[callback]
            return
        started = self._now
        self._invoke(callback)
        if self._entries.get(callback) is entry:
            # Start to start, as the real scheduler; a run takes no virtual time.
            entry.due = max(started + entry.period, self._now)
            entry.seq = next(self._seq)


# The in-memory WebSocket -------------------------------------------------------


class _ClientClose:
    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


class InMemoryWebSocket:
    """The server's side of a WebSocket whose other end is a test.

    It has the interface :class:`~flask_docsync.connection.ServerConnection`
    uses (``receive``, ``send_many``, ``ping``, ``close``, ``abort``,
    ``closed``, ``last_pong``). The test feeds frames with :meth:`deliver`;
    what the server sends goes to ``on_frames(frames)``, one call per
    message.

    :param on_frames: Called with the frames of every message the server sends.
    :param on_close: Called once with ``(code, reason)`` when the server
        closes or aborts the connection.
    """

    def __init__(
        self,
        on_frames: Callable[[list[str | bytes]], None],
        on_close: Callable[[int | None, str], None] | None = None,
    ) -> None:
        self._incoming: gevent.queue.Queue[Any] = gevent.queue.Queue()
        self._on_frames = on_frames
        self._on_close = on_close
        self.closed = False
        #: The close code, sent by the server or by the test, whichever came first.
        self.close_code: int | None = None
        self.close_reason = ""
        self.last_pong: float | None = None
        #: Payloads of the keep-alive pings the server sent.
        self.pings: list[bytes] = []

    # The test's end

    def deliver(self, frames: Sequence[str | bytes]) -> None:
        """Queue WebSocket messages for the server to read, in order."""
        if self.closed:
            raise ConnectionClosed(self.close_code or 1006, self.close_reason)
        for frame in frames:
            self._incoming.put(frame)

    def client_close(self, code: int = 1000, reason: str = "") -> None:
        """Close from the browser's side: the server's next ``receive`` raises."""
        if not self.closed:
            self._incoming.put(_ClientClose(code, reason))

    # The server's end

    @property
    def buffered(self) -> bool:
        return not self._incoming.empty()

    def receive(self, timeout: float | None = None) -> str | bytes | None:
        if self.closed:
            raise ConnectionClosed(self.close_code or 1006, self.close_reason)
        try:
            item = self._incoming.get(timeout=timeout)
        except gevent.queue.Empty:
            return None
        if isinstance(item, _ClientClose):
            self._mark_closed(item.code, item.reason, notify=False)
            raise ConnectionClosed(item.code, item.reason)
        if self.closed:
            raise ConnectionClosed(self.close_code or 1006, self.close_reason)
        return item

    def send(self, message: str | bytes) -> None:
        self.send_many([message])

    def send_many(self, messages: Sequence[str | bytes]) -> None:
        if self.closed:
            raise ConnectionClosed(self.close_code or 1006, self.close_reason)
        self._on_frames(list(messages))

    def ping(self, payload: bytes = b"") -> None:
        self.pings.append(payload)
        self.last_pong = time.monotonic()  # the test answers at once

    def close(self, code: int = 1000, reason: str = "") -> None:
        self._mark_closed(code, reason, notify=True)

    def abort(self) -> None:
        self._mark_closed(1006, "aborted", notify=True)

    def _mark_closed(self, code: int, reason: str, notify: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        self.close_reason = reason
        # Wake a reader waiting in receive().
        self._incoming.put(_ClientClose(code, reason))
        if notify and self._on_close is not None:
            self._on_close(code, reason)


# Received messages -------------------------------------------------------------


@dataclass
class ReceivedMessage:
    """A message the server sent, decoded as BokehJS decodes it.

    ``content`` is the JSON content as sent; a binary buffer appears in it
    as ``{"type": "bytes", "data": {"id": ...}}`` and its bytes are in
    ``buffers`` under that id (:meth:`TestSession.patches` puts them in place).
    """

    msgtype: str
    content: Any
    header: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    buffers: dict[str, bytes] = field(default_factory=dict)
    #: The message as Bokeh's ``Receiver`` assembled it.
    message: Any = field(default=None, repr=False)

    @property
    def reqid(self) -> str | None:
        """The ``msgid`` of the request this replies to; ``None`` if it is no reply."""
        return self.header.get("reqid")


def _inline_buffers(value: Any, buffers: Mapping[str, bytes]) -> Any:
    if isinstance(value, dict):
        if value.get("type") == "bytes" and isinstance(value.get("data"), dict):
            ref = value["data"].get("id")
            if ref in buffers:
                return {**value, "data": buffers[ref]}
        return {k: _inline_buffers(v, buffers) for k, v in value.items()}
    if isinstance(value, list):
        return [_inline_buffers(v, buffers) for v in value]
    return value


# Sessions ----------------------------------------------------------------------


class TestSession:
    """One session of an app, connected as a browser through an in-memory WebSocket.

    Made by :meth:`DocSyncTestClient.open`; use it as a context manager or
    call :meth:`close`, which discards the session on the server (its
    ``on_session_destroyed`` hooks run).

    Messages are exchanged synchronously: every method that sends waits for
    the server's reply, so when it returns, everything the server sent in
    answer (the patches of ``on_change`` and ``on_event`` callbacks) is in
    :attr:`received` and applied to :attr:`browser_document`.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        client: DocSyncTestClient,
        server_session: ServerSession,
        route: str,
        timeout: float,
    ) -> None:
        from bokeh.document import Document
        from bokeh.protocol.receiver import Receiver

        from .protocol import protocol

        self._client = client
        self._server_session = server_session
        #: The app's route, e.g. ``"/sliders"``.
        self.route = route
        self._timeout = timeout
        self._receiver = Receiver(protocol)
        self._received: list[ReceivedMessage] = []
        self._waiting: dict[str, gevent.event.AsyncResult] = {}
        self._problems: list[str] = []
        self._outgoing: list[Any] = []
        self._browser_doc = Document()
        self._pulled = False
        self._closed = False
        #: The close code of the connection once it is closed (by the server or by :meth:`close`).
        self.close_code: int | None = None
        self.close_reason = ""
        self._transport = InMemoryWebSocket(self._on_frames, self._on_server_close)
        self._connection: ServerConnection | None = None
        self._greenlet: gevent.Greenlet | None = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<TestSession {self.route} {self.id[:12]}... {state}>"

    def __enter__(self) -> TestSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # Connecting

    def _connect(self, server: DocSyncServer) -> None:
        """Attach the in-memory WebSocket and pull the document, as BokehJS does."""
        from .protocol import protocol

        self._greenlet = gevent.spawn(server.serve_connection, self._transport, self._server_session)
        self._greenlet.name = f"docsync-test-connection(session={self.id})"
        deadline = time.monotonic() + self._timeout
        while not any(m.msgtype == "ACK" for m in self._received):
            if self._greenlet.dead or self._transport.closed:
                raise SessionClosed(self._transport.close_code, self._transport.close_reason or "before the ACK")
            if time.monotonic() > deadline:
                raise TimeoutError(f"Session {self.id}: no ACK from the server within {self._timeout} s.")
            gevent.sleep(0.001)
        self._connection = next((c for c in server.connections if c.ws is self._transport), None)
        self._request(protocol.create("PULL-DOC-REQ"), check=True)

    # Reading the server's document

    @property
    def id(self) -> str:
        """The session id."""
        return self._server_session.id

    @property
    def server_session(self) -> ServerSession:
        """The :class:`~flask_docsync.session.ServerSession` on the server."""
        return self._server_session

    @property
    def document(self) -> Document:
        """The server's Document of this session.

        Read it freely; change it only through :meth:`set`, :meth:`click`,
        :meth:`trigger` (as the browser would) or inside
        ``session.server_session.locked()`` (as a Flask view would).
        """
        return self._server_session.document

    @property
    def browser_document(self) -> Document:
        """The Document as the browser sees it: pulled on open, patched by every ``PATCH-DOC``.

        Changing its models sends a ``PATCH-DOC`` at the next call that
        talks to the server (``set`` does both at once).
        """
        return self._browser_doc

    def get_model(self, name_or_id: Model | str) -> Model:
        """A model of the server's document, by ``name`` or by id.

        :param name_or_id: A model name, a model id, or a model (returned as
            the server's model with the same id).
        :raises LookupError: when no model (or more than one) has that name;
            the message lists the names there are.
        """
        return _find_model(self.document, name_or_id, "server")

    #: Shorter spelling of :meth:`get_model`.
    model = get_model

    def browser_model(self, name_or_id: Model | str) -> Model:
        """Like :meth:`get_model`, in :attr:`browser_document`."""
        return _find_model(self._browser_doc, name_or_id, "browser")

    # Acting as the browser

    def set(self, model: Model | str, attr: str, value: Any, *, check: bool = True) -> ReceivedMessage | None:
        """Change a property as a widget in the browser would, and wait for the server's reply.

        The browser's copy of the model is changed, and the change travels
        as a ``ModelChanged`` event in a ``PATCH-DOC`` through the server's
        protocol path, so ``on_change`` callbacks run. As in a browser,
        setting the value the browser already has sends nothing.

        :param model: The model, its name or its id.
        :param check: Raise :exc:`ErrorReply` if the server answers ``ERROR``.
        :return: The server's reply (``OK`` or ``ERROR``); ``None`` when
            nothing was sent because the value did not change.
        """
        self._ensure_open()
        target = self.browser_model(model)
        setattr(target, attr, value)
        replies = self._flush_outgoing(check)
        return replies[-1] if replies else None

    def click(self, model: Model | str, *, check: bool = True) -> ReceivedMessage:
        """Click a button: send a ``ButtonClick`` event as BokehJS does, and wait for the reply.

        :param model: The button, its name or its id.
        :param check: Raise :exc:`ErrorReply` if the server answers ``ERROR``.
        """
        from bokeh.events import ButtonClick

        return self.trigger(ButtonClick(self.browser_model(model)), check=check)

    def trigger(self, event: Event, *, check: bool = True) -> ReceivedMessage:
        """Send any UI event (a ``bokeh.events.Event``) as BokehJS does, and wait for the reply.

        It travels as a ``MessageSent`` ``bokeh_event`` in a ``PATCH-DOC``,
        so ``on_event`` callbacks run. The event's model may be a model of
        either document; it is sent by id.

        :param check: Raise :exc:`ErrorReply` if the server answers ``ERROR``.
        """
        from bokeh.document.events import MessageSentEvent

        from .protocol import protocol

        self._ensure_open()
        self._flush_outgoing(check)
        wire_event = _WireEvent(event, self.browser_model)
        message = protocol.create("PATCH-DOC", [MessageSentEvent(self._browser_doc, "bokeh_event", wire_event)])
        return self._request(message, check)

    def send_patch(self, events: Sequence[Mapping[str, Any]], *, check: bool = True) -> ReceivedMessage:
        """Send a ``PATCH-DOC`` with events written as JSON, as on the wire.

        For what a well-behaved browser would not send, e.g.
        ``[{"kind": "ModelChanged", "model": {"id": "nope"}, "attr": "value", "new": 1}]``.

        :param check: Raise :exc:`ErrorReply` if the server answers ``ERROR``.
        """
        from .protocol import protocol

        self._ensure_open()
        msgid = f"test{next(_msgids)}"
        message = protocol.assemble(
            json.dumps({"msgid": msgid, "msgtype": "PATCH-DOC"}), "{}", json.dumps({"events": list(events)})
        )
        return self._request(message, check)

    def pull(self) -> Document:
        """Pull the whole document again (``PULL-DOC-REQ``), replacing :attr:`browser_document`."""
        from .protocol import protocol

        self._ensure_open()
        self._flush_outgoing(True)
        self._pulled = False
        self._request(protocol.create("PULL-DOC-REQ"), check=True)
        return self._browser_doc

    # Virtual time

    @property
    def scheduler(self) -> VirtualTimeScheduler:
        """The session's :class:`VirtualTimeScheduler`."""
        scheduler = self._server_session.scheduler
        if not isinstance(scheduler, VirtualTimeScheduler):
            raise RuntimeError(
                f"Session {self.id} was not created by the test client, so its callbacks run on real"
                f" time (its scheduler is {type(scheduler).__name__})."
            )
        return scheduler

    @property
    def now(self) -> float:
        """The session's virtual time: milliseconds since it was created."""
        return self.scheduler.now

    def run_callbacks(self, ms: float = 0) -> int:
        """Advance the session's virtual clock by ``ms`` and run the callbacks that fall due.

        Next-tick callbacks are always due; timeout callbacks run once their
        delay has passed, periodic callbacks at every period boundary within
        the window. No real time passes. When it returns, the patches the
        callbacks made are in :attr:`received` and applied to
        :attr:`browser_document`.

        :param ms: Virtual milliseconds to move the clock; ``0`` runs only
            what is due now.
        :return: How many callbacks ran.
        """
        self._ensure_open()
        self._flush_outgoing(True)
        ran = self.scheduler.advance(ms)
        self._settle()
        return ran

    # What the browser received

    @property
    def received(self) -> list[ReceivedMessage]:
        """Every message the browser received since the session opened or :meth:`clear`."""
        if not self._closed:
            self._settle()
        return list(self._received)

    def clear(self) -> None:
        """Forget the messages received so far."""
        if not self._closed:
            self._settle()
        self._received.clear()

    def patches(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The events of every ``PATCH-DOC`` received, flattened, in order.

        Buffers are in place: ``{"type": "bytes", "data": b"..."}``.

        :param kind: Keep only events of this kind (``"ModelChanged"``,
            ``"ColumnsStreamed"``, ...); ``None`` keeps all.
        """
        events: list[dict[str, Any]] = []
        for message in self.received:
            if message.msgtype != "PATCH-DOC":
                continue
            for event in message.content.get("events", []):
                if kind is None or event.get("kind") == kind:
                    events.append(_inline_buffers(event, message.buffers))
        return events

    # Closing

    @property
    def closed(self) -> bool:
        """Whether the connection is closed (by :meth:`close` or by the server)."""
        return self._closed or self._transport.closed

    def close(self) -> None:
        """Close the connection as a browser tab would, then discard the session.

        ``connection_lost`` callbacks and ``on_session_destroyed`` hooks run.
        Calling it again does nothing.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._transport.client_close(1000, "")
            if self._greenlet is not None:
                self._greenlet.join(timeout=self._timeout)
                if not self._greenlet.dead:
                    log.warning("Session %s: the test connection did not end; killing it", self.id)
                    self._greenlet.kill(block=True, timeout=self._timeout)
            if self.close_code is None:
                self.close_code, self.close_reason = self._transport.close_code, self._transport.close_reason
        finally:
            self._client._discard(self)

    # Internals

    def _ensure_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"Session {self.id} is closed.")
        if self._transport.closed:
            raise SessionClosed(self.close_code, self.close_reason)

    def _on_frames(self, frames: list[str | bytes]) -> None:
        # Runs in the connection's writer greenlet, or its reader for a reply; it must never raise.
        from .protocol import _run_sync

        # One write may carry several whole messages, as on a real socket.
        messages = []
        try:
            message = None
            for frame in frames:
                message = _run_sync(self._receiver.consume(frame))
                if message is not None:
                    messages.append(message)
            if message is None:
                self._problems.append(f"an incomplete message: {frames[:1]!r}")
                return
        except Exception as exc:
            self._problems.append(f"a message the browser cannot decode ({exc!r}): {frames[:3]!r}")
            return
        for message in messages:
            try:
                received = ReceivedMessage(
                    msgtype=message.msgtype,
                    content=json.loads(message.content_json),
                    header=dict(message.header),
                    metadata=dict(message.metadata),
                    buffers={b.id: b.to_bytes() for b in message.buffers},
                    message=message,
                )
                self._received.append(received)
                self._apply(received)
            except Exception as exc:
                self._problems.append(f"a message the browser cannot apply ({exc!r}): {message!r}")
                continue
            reqid = received.reqid
            if reqid is not None and reqid in self._waiting:
                self._waiting.pop(reqid).set(received)

    def _apply(self, received: ReceivedMessage) -> None:
        from . import compat

        message = received.message
        try:
            with compat.curdoc_guard():
                if received.msgtype == "PULL-DOC-REPLY":
                    from bokeh.document import Document

                    doc = Document()
                    message.push_to_document(doc)
                    self._browser_doc = doc
                    doc.callbacks.on_change_dispatch_to(self)
                    self._pulled = True
                elif received.msgtype == "PATCH-DOC" and self._pulled:
                    message.apply_to_document(self._browser_doc, self)
                else:
                    return
            # Every model the browser has came from the server: later
            # messages refer to them by id, as BokehJS does.
            self._browser_doc.models.flush_synced()
        except Exception as exc:
            self._problems.append(f"the browser could not apply {received.msgtype} ({exc!r})")

    def _document_patched(self, event: Any) -> None:
        # Changes to browser_document; those applied from the server carry
        # this session as setter and are not echoed back.
        if event.setter is not self:
            self._outgoing.append(event)

    def _on_server_close(self, code: int | None, reason: str) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        for result in self._waiting.values():
            result.set_exception(SessionClosed(code, reason))
        self._waiting.clear()

    def _flush_outgoing(self, check: bool) -> list[ReceivedMessage]:
        from .protocol import protocol

        replies = []
        while self._outgoing:
            event = self._outgoing.pop(0)
            replies.append(self._request(protocol.create("PATCH-DOC", [event]), check))
        return replies

    def _request(self, message: Any, check: bool) -> ReceivedMessage:
        """Send ``message`` through the server's protocol path and wait for its reply."""
        from .protocol import encode

        msgid = message.header["msgid"]
        result = gevent.event.AsyncResult()
        self._waiting[msgid] = result
        try:
            self._transport.deliver(encode(message))
            reply = result.get(timeout=self._timeout)
        except gevent.Timeout:
            raise TimeoutError(
                f"Session {self.id}: no reply to {message.msgtype} {msgid} within {self._timeout} s."
            ) from None
        finally:
            self._waiting.pop(msgid, None)
        self._settle()
        if check and reply.msgtype == "ERROR":
            raise ErrorReply(message.msgtype, reply)
        return reply

    def _settle(self) -> None:
        """Let the connection deliver everything queued for the browser."""
        deadline = time.monotonic() + self._timeout
        gevent.sleep(0)
        connection = self._connection
        while connection is not None and connection.queued and not self._transport.closed:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Session {self.id}: messages still queued after {self._timeout} s.")
            gevent.sleep(0)
        if self._problems:
            problems, self._problems = self._problems, []
            raise AssertionError(f"Session {self.id}: " + "; ".join(problems))


class _WireEvent(Serializable):
    """A UI event serialized as BokehJS sends it: every constructor argument.

    Bokeh's Python events serialize only what ``event_values()`` returns,
    which for most event classes leaves out their fields (``ValueSubmit``
    would arrive without its ``value``); BokehJS sends them all, and the
    server rebuilds the event with ``cls(**values)``. Models are sent as
    references to the browser's copies.
    """

    def __init__(self, event: Event, browser_model: Callable[[Any], Model]) -> None:
        from bokeh.model import Model

        self.name = event.event_name
        values = {}
        for param in list(inspect.signature(type(event).__init__).parameters)[1:]:
            if hasattr(event, param):
                values[param] = getattr(event, param)
        values.update(event.event_values())
        self.values = {
            k: browser_model(v) if isinstance(v, Model) else v for k, v in values.items()
        }

    def to_serializable(self, serializer: Any) -> dict[str, Any]:
        return {"type": "event", "name": self.name, "values": serializer.encode(self.values)}


def _find_model(doc: Document, name_or_id: Any, which: str) -> Model:
    from bokeh.model import Model

    if isinstance(name_or_id, Model):
        model = doc.get_model_by_id(name_or_id.id)
        if model is None:
            raise LookupError(f"The {which} document has no model with id {name_or_id.id!r} ({name_or_id!r}).")
        return model
    key = str(name_or_id)
    found = doc.models.get_all_by_name(key)
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise LookupError(
            f"The {which} document has {len(found)} models named {key!r}; pass one of their ids:"
            f" {', '.join(m.id for m in found)}."
        )
    model = doc.get_model_by_id(key)
    if model is not None:
        return model
    names = sorted({m.name for m in doc.models if m.name})
    listing = ", ".join(repr(n) for n in names) or "none (give models a name=... to find them)"
    raise LookupError(f"The {which} document has no model named {key!r} and none with that id. Names: {listing}.")


# The client --------------------------------------------------------------------


class DocSyncTestClient:
    """Open sessions of an app's DocSync documents as a browser would, in-process.

    :param app: The Flask app, with :class:`~flask_docsync.DocSync` initialized.
    :param flask_test_client: The Flask test client whose requests open
        sessions, so its cookies (a logged-in user) apply. ``None`` makes a
        new ``app.test_client()``.
    :param timeout: Real seconds to wait for a reply from the server before
        :exc:`TimeoutError`; nothing in a healthy test comes close.

    Close the sessions it opened with :meth:`close` (or use it as a context
    manager); each :class:`TestSession` can also be closed on its own. The
    server's background greenlets (started with the first session) stop
    with ``app.extensions["docsync"].stop()``.
    """

    def __init__(self, app: Flask, flask_test_client: FlaskClient | None = None, *, timeout: float = 10.0) -> None:
        if "docsync" not in app.extensions:
            raise ConfigurationError("DocSync is not initialized on this app; call docsync.init_app(app) first.")
        self.app = app
        self.http = flask_test_client if flask_test_client is not None else app.test_client()
        self.timeout = timeout
        self._sessions: list[TestSession] = []

    def __enter__(self) -> DocSyncTestClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def server(self) -> DocSyncServer:
        """The app's :class:`~flask_docsync.server.DocSyncServer`."""
        return self.app.extensions["docsync"]

    @property
    def sessions(self) -> list[TestSession]:
        """The sessions opened and not closed yet."""
        return list(self._sessions)

    def open(
        self,
        route: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> TestSession:
        """Open a session of the app at ``route`` as a browser would.

        The app page is requested through the Flask test client (with view
        decorators, the ``authorize`` hook and cookies), then an in-memory
        WebSocket is attached to the session the page created and the
        document is pulled.

        :param route: The route as registered, e.g. ``"/sliders"``.
        :param arguments: Query arguments of the page request, seen by the
            app as ``session_context.request.arguments``; a value may be a
            list. ``None`` sends none.
        :param headers: Extra headers of the page request; ``None`` adds none.
        :raises UnknownApplication: when nothing is registered at ``route``;
            the message lists the registered routes.
        :raises SessionRefused: when the page is not served (a view
            decorator redirects to a login page, the ``authorize`` hook
            refuses, ...).
        """
        server = self.server
        route = normalize_route(route)
        if not server.has_route(route):
            raise UnknownApplication(route, server.routes())
        url = server.settings.url_prefix + (route if route != "/" else "/")
        response = self._get_page(url, arguments, headers)
        tokens = _TOKEN.findall(response.get_data(as_text=True))
        if not tokens:
            raise SessionRefused(
                response.status_code, f"The page {url} embeds no session token.", response
            )
        return self._attach(tokens[0], route, response)

    def open_page(
        self,
        path: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> list[TestSession]:
        """Open every document a page of the host app embeds (``docsync_document(...)``).

        :param path: The page's URL path, e.g. ``"/dashboard"``.
        :param arguments: Query arguments of the page request; ``None`` sends none.
        :param headers: Extra headers of the page request; ``None`` adds none.
        :return: One session per embedded document, in page order.
        :raises SessionRefused: when the page is not served, or embeds no
            document (the ``authorize`` hook refused them all).
        """
        response = self._get_page(path, arguments, headers)
        tokens = list(dict.fromkeys(_TOKEN.findall(response.get_data(as_text=True))))
        if not tokens:
            raise SessionRefused(
                403,
                f"The page {path} embeds no DocSync document (the authorize hook refuses"
                " embedded documents with an empty placeholder).",
                response,
            )
        opened: list[TestSession] = []
        try:
            for token in tokens:
                route = self._route_of_token(token)
                opened.append(self._attach(token, route, response))
        except BaseException:
            for session in opened:
                session.close()
            for token in tokens[len(opened):]:
                self._discard_token(token)
            raise
        return opened

    def close(self) -> None:
        """Close every session this client opened."""
        for session in list(self._sessions):
            session.close()

    # Internals

    def _get_page(
        self, url: str, arguments: Mapping[str, Any] | None, headers: Mapping[str, str] | None
    ) -> TestResponse:
        query = {
            str(k): [_text(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
            for k, value in (arguments or {}).items()
        }
        with self._virtual_time():
            response = self.http.get(url, query_string=query, headers=dict(headers or {}))
        if response.status_code != 200:
            where = response.headers.get("Location")
            body = response.get_data(as_text=True).strip()
            detail = f"redirected to {where}" if where else (body[:300] or "no body")
            raise SessionRefused(
                response.status_code,
                f"GET {url} answered {response.status_code} instead of the page ({detail}). A view"
                " decorator or the authorize hook refused the request: log the user in first with"
                " the Flask test client passed as flask_test_client=.",
                response,
            )
        return response

    def _virtual_time(self) -> Any:
        """Sessions created inside get a :class:`VirtualTimeScheduler`."""
        import contextlib

        server = self.server

        @contextlib.contextmanager
        def installed() -> Iterator[None]:
            previous = server.scheduler_factory
            server.scheduler_factory = VirtualTimeScheduler
            try:
                yield
            finally:
                server.scheduler_factory = previous

        return installed()

    def _route_of_token(self, token: str) -> str:
        session_id, _ = self.server.tokens.decode(token)
        for route, context in self.server.contexts.items():
            if context.get_session(session_id) is not None:
                return route
        raise SessionError(404, f"The page embeds session {session_id}, which no app of this server has.")

    def _discard_token(self, token: str) -> None:
        try:
            session_id, _ = self.server.tokens.decode(token)
        except SessionError:
            return
        for context in self.server.contexts.values():
            session = context.get_session(session_id)
            if session is not None and session.connection_count == 0:
                context.discard_session(session)

    def _attach(self, token: str, route: str, page: TestResponse) -> TestSession:
        """Connect to the session ``token`` names the way the ``/ws`` view does."""
        from .blueprint import authorize, request_data

        server = self.server
        page_request = page.request
        ws_path = server.settings.url_prefix + (route if route != "/" else "") + "/ws"
        headers = {
            k: v for k, v in page_request.headers.items()
            if k.lower() not in ("content-length", "content-type")
        }
        headers.update({
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Protocol": f"bokeh, {token}",
        })
        try:
            with self.app.test_request_context(
                ws_path,
                base_url=page_request.url_root,
                headers=headers,
                environ_base={"REMOTE_ADDR": page_request.remote_addr or "127.0.0.1"},
            ), self._virtual_time():
                user, refusal = authorize(route)
                if refusal is not None:
                    raise SessionRefused(
                        refusal.status_code,
                        f"The authorize hook refused the WebSocket {ws_path} ({refusal.status_code})"
                        " although it served the page.",
                    )
                server_session = server.session_for_token(route, token, request_data(user))
        except BaseException:
            self._discard_token(token)
            raise
        session = TestSession(self, server_session, route, self.timeout)
        self._sessions.append(session)
        try:
            session._connect(server)
        except BaseException:
            session.close()
            raise
        return session

    def _discard(self, session: TestSession) -> None:
        if session in self._sessions:
            self._sessions.remove(session)
        server_session = session.server_session
        if server_session.destroyed:
            return
        context = self.server.contexts.get(session.route)
        if context is not None:
            context.discard_session(server_session)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
