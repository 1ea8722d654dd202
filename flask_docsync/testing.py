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
cookies, headers and query arguments all apply; the server's
:data:`~flask_docsync.signals.session_created` signal tells which sessions
that request created. Then the WebSocket upgrade request a browser would
send goes through the same test client to the real ``/ws`` view, with an
:class:`InMemoryWebSocket` in the WSGI environ under
:data:`~flask_docsync.transport.ENVIRON_KEY` where production has the
client socket. View decorators, the origin check, the ``authorize`` hook,
the subprotocol and token checks and the mapping of refusals to statuses
all run as in production, and the view serves the connection until it
closes. Every message in either direction is encoded with
:func:`flask_docsync.protocol.encode`, read by the server's own
:class:`~flask_docsync.connection.ServerConnection` and
:class:`~flask_docsync.protocol.MessageDecoder`, and decoded again for the
test as BokehJS would receive it.

The test client keeps a copy of the document as the browser sees it
(:attr:`TestSession.browser_document`), built from ``PULL-DOC-REPLY`` and
updated by every ``PATCH-DOC`` the server sends, and browser-side changes
are sent as ``PATCH-DOC`` messages, as Bokeh's Python client does.

Session callbacks never run on their own: the sessions a test client
creates get the production :class:`~flask_docsync.scheduler.CallbackScheduler`
on a :class:`VirtualClock`, and :meth:`TestSession.run_callbacks` advances
that clock.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import html
import inspect
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
import gevent.monkey
import gevent.queue
from bokeh.core.serialization import Serializable
from bokeh.document import Document
from bokeh.document.events import MessageSentEvent
from bokeh.events import ButtonClick
from bokeh.model import Model
from bokeh.protocol.receiver import Receiver
from flask.testing import EnvironBuilder
from werkzeug.test import Client

from . import compat, signals
from .apps import normalize_route
from .errors import ConfigurationError, ConnectionClosed, DocSyncError, SessionError, UnknownApplication
from .protocol import encode, protocol, run_sync
from .scheduler import CallbackScheduler, session_clock
from .transport import ENVIRON_KEY

if TYPE_CHECKING:
    from bokeh.events import Event
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
    "VirtualClock",
    "VirtualTime",
    "VirtualTimeScheduler",
]

log = logging.getLogger(__name__)


#: Callbacks that may run at one virtual instant before
#: :meth:`VirtualClock.advance` decides they schedule each other forever.
MAX_RUNS_PER_INSTANT = 10_000

_msgids = itertools.count(1)

#: The list collecting the sessions created by the test client's request in
#: progress in this context; ``None`` outside the client's requests.
_created_here: contextvars.ContextVar[list[tuple[ServerSession, str]] | None] = contextvars.ContextVar(
    "flask_docsync.testing.created_here", default=None
)


# Errors ---------------------------------------------------------------------


class SessionRefused(SessionError):
    """A request that opens a session was refused: the page, or the WebSocket upgrade.

    :param status: The HTTP status of the answer (a redirect to a login
        page, 401, 403, ...), or of the refused WebSocket upgrade request.
    :param reason: What happened and what to do about it.
    :param response: The Flask test response of the page request, or of the
        WebSocket upgrade request when that was refused; ``None`` when
        there is none.
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


class _Sleeper:
    __slots__ = ("due", "seq", "greenlet", "wake")

    def __init__(self, due: int, seq: int, greenlet: Any, wake: gevent.event.Event | None) -> None:
        self.due = due  # virtual nanoseconds
        self.seq = seq
        self.greenlet = greenlet
        # Set to end a sleep; None for a greenlet that has not started yet.
        self.wake = wake


class VirtualClock:
    """A :class:`~flask_docsync.scheduler.Clock` whose time moves only in :meth:`advance`.

    Give it to a :class:`~flask_docsync.scheduler.CallbackScheduler` and the
    scheduler runs unchanged on virtual time: its greenlets start and sleep
    on this clock, and nothing they wait for happens until :meth:`advance`
    moves the clock past it. The test client gives one to every session it
    creates. Time starts at ``0`` and is kept in whole nanoseconds, so
    millisecond figures add up exactly.
    """

    def __init__(self) -> None:
        self._ns = 0
        self._seq = itertools.count()
        self._sleepers: dict[Any, _Sleeper] = {}
        self._woken: Any = None
        self._settled = gevent.event.Event()

    def __repr__(self) -> str:
        return f"<VirtualClock {self.now_ms:g} ms, {len(self._sleepers)} waiting>"

    # The Clock protocol

    def now(self) -> float:
        """Virtual seconds since the clock was made."""
        return self._ns / 1e9

    def sleep(self, seconds: float) -> None:
        """Block the calling greenlet until :meth:`advance` reaches ``seconds`` from now."""
        current = gevent.getcurrent()
        sleeper = _Sleeper(self._due(seconds), next(self._seq), current, gevent.event.Event())
        self._sleepers[current] = sleeper
        if current is self._woken:
            self._settled.set()
        try:
            sleeper.wake.wait()  # type: ignore[union-attr]
        finally:
            if self._sleepers.get(current) is sleeper:
                del self._sleepers[current]

    def start(self, greenlet: gevent.Greenlet, seconds: float) -> None:
        """Start ``greenlet`` when :meth:`advance` reaches ``seconds`` from now (``0``: the next advance)."""
        self._sleepers[greenlet] = _Sleeper(self._due(seconds), next(self._seq), greenlet, None)
        greenlet.rawlink(self._ended)

    # Driving it

    @property
    def now_ms(self) -> float:
        """Virtual milliseconds since the clock was made."""
        return self._ns / 1e6

    def waiting(self) -> list[tuple[float, Any]]:
        """``(due_in_ms, greenlet)`` of every greenlet waiting on the clock, soonest first."""
        sleepers = sorted(
            (s for s in self._sleepers.values() if not s.greenlet.dead), key=lambda s: (s.due, s.seq)
        )
        return [(max(s.due - self._ns, 0) / 1e6, s.greenlet) for s in sleepers]

    def advance(self, ms: float = 0, timeout: float | None = None) -> int:
        """Move the clock ``ms`` milliseconds on, waking every greenlet that falls due.

        Greenlets are woken one at a time, in order of due time, then of
        when they started waiting; the next is woken only once the last one
        waits on the clock again or has ended. A greenlet a woken one starts
        or that sleeps again is woken in the same call if it falls due
        within the window. A scheduler's greenlet runs one callback per
        wake-up.

        :param ms: How far to move the clock; ``0`` wakes what is due now.
        :param timeout: Real seconds to wait for one woken greenlet;
            ``None`` waits as long as it takes.
        :return: How many greenlets were woken (for a scheduler: how many
            callbacks ran).
        :raises ValueError: for a negative ``ms``.
        :raises RuntimeError: when more than :data:`MAX_RUNS_PER_INSTANT`
            wake-ups happen without the clock moving (callbacks that keep
            scheduling next-tick callbacks), or while another call of
            ``advance`` is running.
        :raises TimeoutError: when a woken greenlet neither waits on the
            clock again nor ends within ``timeout``.
        """
        if ms < 0:
            raise ValueError(f"The clock only moves forward; got ms={ms!r}.")
        if self._woken is not None:
            raise RuntimeError("VirtualClock.advance() is already running.")
        target = self._ns + round(ms * 1e6)
        woken = 0
        at_instant = 0
        # Kills and starts already asked for land first.
        gevent.sleep(0)
        while True:
            due = [s for s in self._sleepers.values() if s.due <= target and not s.greenlet.dead]
            if not due:
                break
            sleeper = min(due, key=lambda s: (s.due, s.seq))
            if sleeper.due > self._ns:
                self._ns = sleeper.due
                at_instant = 0
            at_instant += 1
            if at_instant > MAX_RUNS_PER_INSTANT:
                raise RuntimeError(
                    f"More than {MAX_RUNS_PER_INSTANT} callbacks ran at virtual time {self.now_ms:g} ms;"
                    " callbacks keep scheduling next-tick callbacks forever."
                )
            self._wake(sleeper, timeout)
            woken += 1
        self._ns = max(self._ns, target)
        return woken

    # Internals

    def _due(self, seconds: float) -> int:
        return self._ns + max(round(seconds * 1e9), 0)

    def _wake(self, sleeper: _Sleeper, timeout: float | None) -> None:
        greenlet = sleeper.greenlet
        del self._sleepers[greenlet]
        self._woken = greenlet
        self._settled.clear()
        try:
            if sleeper.wake is None:
                greenlet.start()
            else:
                sleeper.wake.set()
            while not greenlet.dead and greenlet not in self._sleepers:
                if not self._settled.wait(timeout):
                    raise TimeoutError(
                        f"{getattr(greenlet, 'name', greenlet)} neither ended nor waited on the virtual"
                        f" clock again within {timeout} s."
                    )
                self._settled.clear()
        finally:
            self._woken = None

    def _ended(self, greenlet: Any) -> None:
        self._sleepers.pop(greenlet, None)
        if greenlet is self._woken:
            self._settled.set()


class VirtualTime:
    """A session's callback scheduler seen on its :class:`VirtualClock`.

    What :attr:`TestSession.scheduler` returns. The scheduler is the real
    :class:`~flask_docsync.scheduler.CallbackScheduler`, with the same
    timing rules as in production, in virtual milliseconds counted from
    the session's creation: next-tick callbacks are due at once, timeout
    callbacks after their delay, periodic callbacks first after one period
    and then every period, never overlapping. They run on the scheduler's
    own greenlets through the session's own ``invoke``, so locking, the
    Flask app context, ``curdoc()`` and error logging are the real ones.

    :param scheduler: A scheduler made with ``clock=VirtualClock()``.
    :raises TypeError: when the scheduler runs on another clock.
    """

    def __init__(self, scheduler: CallbackScheduler) -> None:
        clock = scheduler.clock
        if not isinstance(clock, VirtualClock):
            raise TypeError(f"{scheduler!r} runs on {clock!r}, not on a VirtualClock.")
        #: The scheduler.
        self.scheduler = scheduler
        #: Its clock.
        self.clock: VirtualClock = clock

    def __len__(self) -> int:
        return len(self.scheduler)

    def __repr__(self) -> str:
        return f"<VirtualTime now={self.now:g}ms pending={len(self)}>"

    @property
    def now(self) -> float:
        """Virtual milliseconds since the session was created."""
        return self.clock.now_ms

    def pending(self) -> list[tuple[float, SessionCallback]]:
        """``(due_in_ms, callback)`` of every scheduled callback waiting on the clock, soonest first."""
        # The scheduler's own record of which greenlet runs which callback.
        callbacks = {e.greenlet: cb for cb, e in self.scheduler._entries.items() if e.greenlet is not None}
        return [(ms, callbacks[g]) for ms, g in self.clock.waiting() if g in callbacks]

    def advance(self, ms: float = 0, timeout: float | None = None) -> int:
        """Move the clock ``ms`` milliseconds on and run the callbacks that fall due.

        Callbacks due at the same instant run in the order they were
        scheduled; callbacks they schedule run too when they fall due within
        the window (a next-tick callback added by a callback runs in the same
        call). See :meth:`VirtualClock.advance`.

        :return: How many callbacks ran.
        """
        return self.clock.advance(ms, timeout)


#: The former name of :class:`VirtualTime`, from when the test client had a
#: scheduler of its own for virtual time; kept so imports keep working.
VirtualTimeScheduler = VirtualTime


# The in-memory WebSocket -------------------------------------------------------


class _ClientClose:
    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


class InMemoryWebSocket:
    """The server's side of a WebSocket whose other end is a test.

    A :class:`~flask_docsync.transport.Transport`: the test client puts it
    in the upgrade request's environ under
    :data:`~flask_docsync.transport.ENVIRON_KEY`, and the ``/ws`` view gets
    it from :meth:`~flask_docsync.websocket.WebSocket.accept` in place of
    the client socket. The test feeds frames with :meth:`deliver`; what the
    server sends goes to ``on_frames(frames)``, one call per write.

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

    @property
    def unread(self) -> bool:
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
        self._acked = gevent.event.Event()
        # Runs the WebSocket upgrade request, whose view serves the
        # connection until it closes.
        self._greenlet: gevent.Greenlet | None = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<TestSession {self.route} {self.id[:12]}... {state}>"

    def __enter__(self) -> TestSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # Connecting

    def _connect(self, page: TestResponse, headers: Mapping[str, str] | None) -> None:
        """Send the browser's WebSocket upgrade request to the ``/ws`` view and pull the document.

        :param page: The response of the page that created the session; the
            WebSocket goes to the same host, with that page as ``Origin``.
        :param headers: Extra headers of the page request, sent again here
            (as a proxy in front of the app would add them); ``None`` adds none.
        :raises SessionRefused: when the view answers anything but ``101``.
        """

        client = self._client
        server = client.server
        page_request = page.request
        path = server.settings.url_prefix + (self.route if self.route != "/" else "") + "/ws"
        ws_headers = {
            "Origin": f"{page_request.scheme}://{page_request.host}",
            **dict(headers or {}),
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode("ascii"),
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Protocol": f"bokeh, {self._server_session.token}",
        }
        self._greenlet = client._spawn_request(path, page_request.root_url, ws_headers, self._transport)
        self._greenlet.name = f"docsync-test-websocket(session={self.id})"
        gevent.wait([self._acked, self._greenlet], timeout=self._timeout, count=1)
        if not self._acked.is_set():
            if not self._greenlet.dead:
                raise TimeoutError(f"Session {self.id}: no ACK from the server within {self._timeout} s.")
            response = client._request_result(self._greenlet)
            if response.status_code != 101:
                raise _websocket_refusal(path, response)
            raise SessionClosed(self._transport.close_code, self._transport.close_reason or "before the ACK")
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

        return self.trigger(ButtonClick(self.browser_model(model)), check=check)

    def trigger(self, event: Event, *, check: bool = True) -> ReceivedMessage:
        """Send any UI event (a ``bokeh.events.Event``) as BokehJS does, and wait for the reply.

        It travels as a ``MessageSent`` ``bokeh_event`` in a ``PATCH-DOC``,
        so ``on_event`` callbacks run. The event's model may be a model of
        either document; it is sent by id.

        :param check: Raise :exc:`ErrorReply` if the server answers ``ERROR``.
        """


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

        self._ensure_open()
        msgid = f"test{next(_msgids)}"
        message = protocol.assemble(
            json.dumps({"msgid": msgid, "msgtype": "PATCH-DOC"}), "{}", json.dumps({"events": list(events)})
        )
        return self._request(message, check)

    def pull(self) -> Document:
        """Pull the whole document again (``PULL-DOC-REQ``), replacing :attr:`browser_document`."""

        self._ensure_open()
        self._flush_outgoing(True)
        self._pulled = False
        self._request(protocol.create("PULL-DOC-REQ"), check=True)
        return self._browser_doc

    # Virtual time

    @property
    def scheduler(self) -> VirtualTime:
        """The session's callback scheduler on its virtual clock, as a :class:`VirtualTime`.

        :raises RuntimeError: when the session was not created by the test
            client, so its scheduler runs on real time.
        """
        scheduler = self._server_session.scheduler
        if not isinstance(getattr(scheduler, "clock", None), VirtualClock):
            raise RuntimeError(
                f"Session {self.id} was not created by the test client, so its callbacks run on real"
                f" time (its scheduler runs on {getattr(scheduler, 'clock', scheduler)!r})."
            )
        return VirtualTime(scheduler)

    @property
    def now(self) -> float:
        """The session's virtual time: milliseconds since it was created."""
        return self.scheduler.now

    def run_callbacks(self, ms: float = 0) -> int:
        """Advance the session's virtual clock by ``ms`` and run the callbacks that fall due.

        Next-tick callbacks are always due; timeout callbacks run once their
        delay has passed, periodic callbacks at every period boundary within
        the window. No real time passes. They run one at a time on the
        scheduler's own greenlets, as in production. When it returns, the
        patches the callbacks made are in :attr:`received` and applied to
        :attr:`browser_document`.

        :param ms: Virtual milliseconds to move the clock; ``0`` runs only
            what is due now.
        :return: How many callbacks ran.
        :raises TimeoutError: when one callback takes longer than the
            client's ``timeout`` in real seconds.
        """
        self._ensure_open()
        self._flush_outgoing(True)
        ran = self.scheduler.advance(ms, timeout=self._timeout)
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

        The ``/ws`` view returns, ``connection_lost`` callbacks and
        ``on_session_destroyed`` hooks run. Calling it again does nothing.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._transport.client_close(1000, "")
            if self._greenlet is not None:
                self._greenlet.join(timeout=self._timeout)
                if not self._greenlet.dead:
                    log.warning("Session %s: the WebSocket view did not return; killing it", self.id)
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

        # One write may carry several whole messages, as on a real socket.
        messages = []
        try:
            message = None
            for frame in frames:
                message = run_sync(self._receiver.consume(frame))
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
            if received.msgtype == "ACK":
                self._acked.set()
            reqid = received.reqid
            if reqid is not None and reqid in self._waiting:
                self._waiting.pop(reqid).set(received)

    def _apply(self, received: ReceivedMessage) -> None:
        message = received.message
        try:
            with compat.curdoc_guard():
                if received.msgtype == "PULL-DOC-REPLY":

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
        replies = []
        while self._outgoing:
            event = self._outgoing.pop(0)
            replies.append(self._request(protocol.create("PATCH-DOC", [event]), check))
        return replies

    def _request(self, message: Any, check: bool) -> ReceivedMessage:
        """Send ``message`` through the server's protocol path and wait for its reply."""

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
        sessions (the page and the WebSocket upgrade), so its cookies (a
        logged-in user) apply. ``None`` makes a new ``app.test_client()``.
    :param timeout: Real seconds to wait for a reply from the server, or for
        one session callback, before :exc:`TimeoutError`; nothing in a
        healthy test comes close.

    Each open session's WebSocket request runs on a greenlet of its own
    while the ``/ws`` view serves the connection; closing the session ends
    it. Close the sessions it opened with :meth:`close` (or use it as a context
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
        decorators, the ``authorize`` hook and cookies), then the WebSocket
        upgrade request goes to the app's ``/ws`` view with an in-memory
        socket, for the session the page created, and the document is
        pulled.

        :param route: The route as registered, e.g. ``"/sliders"``.
        :param arguments: Query arguments of the page request, seen by the
            app as ``session_context.request.arguments``; a value may be a
            list. ``None`` sends none.
        :param headers: Extra headers of the page request, sent with the
            WebSocket upgrade request too; ``None`` adds none.
        :raises UnknownApplication: when nothing is registered at ``route``;
            the message lists the registered routes.
        :raises SessionRefused: when the page is not served (a view
            decorator redirects to a login page, the ``authorize`` hook
            refuses, ...), creates no session, or the WebSocket is refused
            (then the session the page created is discarded).
        """
        server = self.server
        route = normalize_route(route)
        if not server.has_route(route):
            raise UnknownApplication(route, server.routes())
        url = server.settings.url_prefix + (route if route != "/" else "/")
        response, created = self._get_page(url, arguments, headers)
        ours = next((s for s, r in created if r == route), None)
        for session, session_route in created:
            if session is not ours:
                self._discard_created(session, session_route)
        if ours is None:
            raise SessionRefused(
                response.status_code,
                f"GET {url} answered {response.status_code} but created no session of {route}"
                " (a page that joins an existing session cannot be opened here).",
                response,
            )
        return self._connect(ours, route, response, headers)

    def open_page(
        self,
        path: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> list[TestSession]:
        """Open every document a page of the host app embeds (``docsync_document(...)``).

        These are the sessions the page request created (with
        ``docsync_document`` or ``docsync.create_session``), each connected
        through the ``/ws`` view as :meth:`open` does.

        :param path: The page's URL path, e.g. ``"/dashboard"``.
        :param arguments: Query arguments of the page request; ``None`` sends none.
        :param headers: Extra headers of the page request, sent with the
            WebSocket upgrade requests too; ``None`` adds none.
        :return: One session per session created, in the order the page
            created them.
        :raises SessionRefused: when the page is not served, creates no
            session (the ``authorize`` hook refused them all), or a
            WebSocket is refused.
        """
        response, created = self._get_page(path, arguments, headers)
        if not created:
            raise SessionRefused(
                403,
                f"The page {path} created no DocSync session (the authorize hook refuses"
                " embedded documents with an empty placeholder).",
                response,
            )
        opened: list[TestSession] = []
        try:
            for server_session, route in created:
                opened.append(self._connect(server_session, route, response, headers))
        except BaseException:
            for session in opened:
                session.close()
            for server_session, route in created[len(opened):]:
                self._discard_created(server_session, route)
            raise
        return opened

    def close(self) -> None:
        """Close every session this client opened."""
        for session in list(self._sessions):
            session.close()

    # Internals

    @contextlib.contextmanager
    def _requests(self) -> Iterator[list[tuple[ServerSession, str]]]:
        """Around the client's own requests: what they create gets a virtual clock and is collected.

        Both go by context variables, so sessions created meanwhile by other
        greenlets (other requests, other test clients) are left alone.
        """
        created: list[tuple[ServerSession, str]] = []

        def collect(sender: Any, session: ServerSession, route: str, **extra: Any) -> None:
            if _created_here.get() is created:
                created.append((session, route))

        clock_token = session_clock.set(VirtualClock)
        created_token = _created_here.set(created)
        try:
            with signals.session_created.connected_to(collect, sender=self.server):
                yield created
        finally:
            _created_here.reset(created_token)
            session_clock.reset(clock_token)

    def _get_page(
        self, url: str, arguments: Mapping[str, Any] | None, headers: Mapping[str, str] | None
    ) -> tuple[TestResponse, list[tuple[ServerSession, str]]]:
        """GET a page; its response and the ``(session, route)`` it created, in order."""
        query = {
            str(k): [_text(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
            for k, value in (arguments or {}).items()
        }
        with self._requests() as created:
            try:
                response = self.http.get(url, query_string=query, headers=dict(headers or {}))
            except BaseException:
                for session, route in created:
                    self._discard_created(session, route)
                raise
        if response.status_code != 200:
            for session, route in created:
                self._discard_created(session, route)
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
        return response, list(created)

    def _spawn_request(
        self, path: str, base_url: str, headers: Mapping[str, str], transport: InMemoryWebSocket
    ) -> gevent.Greenlet:
        """Start the WebSocket upgrade request for ``path`` on its own greenlet.

        The greenlet's value is ``(response, None)``, or ``(None, exc)``
        when the request raised.
        """

        http = self.http
        builder = EnvironBuilder(
            self.app,
            path,
            base_url=base_url,
            headers=dict(headers),
            environ_base=dict(getattr(http, "environ_base", None) or {}),
            environ_overrides={ENVIRON_KEY: transport},
        )
        try:
            request = builder.get_request()
        finally:
            builder.close()

        def run() -> tuple[TestResponse | None, BaseException | None]:
            try:
                # Werkzeug's Client.open, which adds and keeps the client's
                # cookies: FlaskClient.open would pop, from this greenlet,
                # the contexts a `with client:` block keeps in the test's.
                return Client.open(http, request, buffered=True), None
            except Exception as exc:
                return None, exc

        # The request sees the test's context variables, as the page
        # request did: sessions it creates get a virtual clock too.
        with self._requests():
            context = contextvars.copy_context()
        return gevent.spawn(context.run, run)

    def _request_result(self, greenlet: gevent.Greenlet) -> TestResponse:
        """The response of a finished :meth:`_spawn_request`; re-raises what the request raised."""
        response, exc = greenlet.get()
        if exc is not None:
            raise exc
        return response

    def _connect(
        self, server_session: ServerSession, route: str, page: TestResponse, headers: Mapping[str, str] | None
    ) -> TestSession:
        session = TestSession(self, server_session, route, self.timeout)
        self._sessions.append(session)
        try:
            session._connect(page, headers)
        except BaseException:
            session.close()
            raise
        return session

    def _discard_created(self, server_session: ServerSession, route: str) -> None:
        """Discard a session a page created and no WebSocket uses."""
        context = self.server.contexts.get(route)
        if context is not None and not server_session.destroyed and server_session.connection_count == 0:
            context.discard_session(server_session)

    def _discard(self, session: TestSession) -> None:
        if session in self._sessions:
            self._sessions.remove(session)
        server_session = session.server_session
        if server_session.destroyed:
            return
        context = self.server.contexts.get(session.route)
        if context is not None:
            context.discard_session(server_session)


def _websocket_refusal(path: str, response: TestResponse) -> SessionRefused:
    status = response.status_code
    where = response.headers.get("Location")
    # The view's refusals are text/plain with the reason HTML-escaped.
    body = html.unescape(response.get_data(as_text=True).strip())
    detail = f"redirected to {where}" if where else (body[:500] or "no body")
    return SessionRefused(
        status,
        f"The WebSocket upgrade GET {path} answered {status} instead of 101 ({detail}): a view"
        " decorator, the origin check, the authorize hook or the session token refused the"
        " WebSocket although the page was served.",
        response,
    )


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
