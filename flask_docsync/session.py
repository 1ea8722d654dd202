"""A server session: one Document, its lock, its callbacks and its connections.

Transport-neutral: a connection is any object with ``send_frames(frames)``
(an atomic, non-blocking enqueue of one whole message).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol as TypingProtocol

import gevent
import gevent.lock
from bokeh.document.locking import UnlockedDocumentProxy
from bokeh.events import ConnectionLost

from . import aio, compat, monitor
from .fastpatch import encode_patch, ok_frames
from .protocol import encode, protocol
from .scheduler import CallbackScheduler

if TYPE_CHECKING:
    from bokeh.document import Document
    from bokeh.document.events import DocumentPatchedEvent
    from bokeh.protocol.message import Message
    from bokeh.server.callbacks import SessionCallback

log = logging.getLogger(__name__)


class Subscriber(TypingProtocol):
    def send_frames(self, frames: list[str | bytes]) -> None: ...


_live: weakref.WeakSet[ServerSession] = weakref.WeakSet()

class CallbackStats:
    """Session callbacks run for one app: how many, how many raised, and the seconds they took."""

    __slots__ = ("runs", "errors", "seconds")

    def __init__(self) -> None:
        self.runs = 0
        self.errors = 0
        self.seconds = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"runs": self.runs, "errors": self.errors, "seconds": self.seconds}


def live_sessions() -> list[ServerSession]:
    """Sessions of this process that are not destroyed (for stats and leak checks)."""
    return [s for s in list(_live) if not s.destroyed]


def _now_ms() -> float:
    return time.monotonic() * 1000


def describe_callback(callback: Any) -> str:
    fn = getattr(callback, "callback", callback)
    fn = getattr(fn, "__wrapped__", fn)
    return getattr(fn, "__qualname__", None) or repr(fn)


class _DocumentLock:
    """``with session._locked():`` holds the document lock.

    On entry it blocks expiration and takes the lock; on exit it sends the
    patches collected meanwhile (also when the body raised: Bokeh 3.9 drops
    them), restores this greenlet's curdoc stack and releases. A class
    rather than a generator: this runs for every callback and message.
    """

    __slots__ = ("_session", "_curdoc")

    def __init__(self, session: ServerSession) -> None:
        self._session = session

    def __enter__(self) -> None:
        session = self._session
        current = gevent.getcurrent()
        if session._lock_owner is current:
            raise RuntimeError(
                f"Session {session._id}: the document lock is already held by this code;"
                " call the function directly instead of through with_document_locked."
            )
        session.block_expiration()
        try:
            session._lock.acquire()
        except BaseException:
            session.unblock_expiration()
            raise
        session._lock_owner = current
        if session._pending is not None:
            session._lock_owner = None
            session._lock.release()
            session.unblock_expiration()
            raise RuntimeError(
                "internal class invariant violated: pending writes should be None"
                " when the lock is not held"
            )
        session._pending = []
        self._curdoc = compat.save_curdoc()

    def __exit__(self, *exc: Any) -> None:
        session = self._session
        try:
            pending, session._pending = session._pending, None
            session._lock_owner = None
            compat.restore_curdoc(self._curdoc)
            session._flush(pending)
            recorder = session.recorder
            if recorder is not None:
                # App code ran: its restorable state may have changed.
                recorder.touched()
        finally:
            session._lock.release()
            session.unblock_expiration()


class ServerSession:
    """Hosts one Document for one or more connections.

    All changes to the document happen under the session's lock: client
    patches, pulls and pushes, locked callbacks, and
    :meth:`with_document_locked`. Changes made under the lock are collected
    and, when the lock is released, serialized once per event and sent to
    every subscribed connection, also when the code holding the lock raised.

    :param session_id: The session id (possibly signed).
    :param document: The Document, already initialized by the application.
    :param token: The token the session was created with; served to the
        page that embeds the session.
    :param app_scope: Returns a context manager entered around every
        callback (the Flask app context); ``None`` enters nothing.
    :param route: The app's route, kept for embedding.
    :param scheduler_factory: ``scheduler_factory(invoke, name)`` makes the
        session's callback scheduler; ``None`` uses
        :class:`~flask_docsync.scheduler.CallbackScheduler` (greenlets on
        real time). :mod:`flask_docsync.testing` passes a virtual clock.
    :param callback_stats: Where the session counts its callbacks (its
        app's figures); ``None`` counts them for this session alone.
    """

    def __init__(
        self,
        session_id: str,
        document: Document,
        token: str,
        app_scope: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
        route: str | None = None,
        scheduler_factory: Callable[[Callable[[SessionCallback], Any], str], Any] | None = None,
        callback_stats: CallbackStats | None = None,
    ) -> None:
        #: The route of the app the session belongs to, e.g. ``"/sliders"``.
        self.route = route
        self._id = session_id
        self._token = token
        self._document = document
        self._app_scope = app_scope or contextlib.nullcontext
        self._lock = gevent.lock.Semaphore()
        self._lock_owner: Any = None
        self._pending: list[tuple[DocumentPatchedEvent, Subscriber | None]] | None = None
        self._connections: set[Subscriber] = set()
        self._current_patch_connection: Subscriber | None = None
        self._last_unsubscribe = _now_ms()
        self._callback_stats = callback_stats if callback_stats is not None else CallbackStats()
        self._destroyed = False
        self._expiration_requested = False
        self._expiration_blocked = 0
        self._scheduler = (scheduler_factory or CallbackScheduler)(self._invoke_callback, session_id)
        #: Records what the browser changes, for a restore after this
        #: worker dies (:class:`flask_docsync.restore.Recorder`); ``None``
        #: when restore is off for the app.
        self.recorder: Any = None
        #: Whether the session was made when a WebSocket arrived rather than
        #: for a page (its worker was gone, or the page was served elsewhere):
        #: the browser may already show a document (see :meth:`handle_pull`).
        self.made_for_websocket = False
        self._pulled = False
        _live.add(self)
        document.callbacks.on_change_dispatch_to(self)
        for callback in document.session_callbacks:
            self._scheduler.add(callback)

    def __repr__(self) -> str:
        return f"<ServerSession {self._id[:12]}... connections={len(self._connections)}>"

    @property
    def id(self) -> str:
        return self._id

    @property
    def token(self) -> str:
        return self._token

    @property
    def document(self) -> Document:
        return self._document

    @property
    def destroyed(self) -> bool:
        return self._destroyed

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def callback_count(self) -> int:
        return len(self._scheduler)

    @property
    def scheduler(self) -> Any:
        """The object that runs this session's next-tick, timeout and periodic callbacks."""
        return self._scheduler

    @property
    def milliseconds_since_last_unsubscribe(self) -> float:
        return _now_ms() - self._last_unsubscribe

    @property
    def expiration_requested(self) -> bool:
        return self._expiration_requested

    @property
    def expiration_blocked(self) -> bool:
        return self._expiration_blocked > 0

    @property
    def expiration_blocked_by_others(self) -> bool:
        """Whether expiration is blocked by anyone but the current greenlet's
        hold of the document lock (which blocks it too, while held)."""
        own = 1 if self._lock_owner is gevent.getcurrent() else 0
        return self._expiration_blocked > own

    @property
    def lock_held_here(self) -> bool:
        """Whether the current greenlet holds the document lock."""
        return self._lock_owner is gevent.getcurrent()

    def request_expiration(self) -> None:
        """Let the next cleanup pass discard the session once it has no connections."""
        self._expiration_requested = True

    def block_expiration(self) -> None:
        self._expiration_blocked += 1

    def unblock_expiration(self) -> None:
        if self._expiration_blocked <= 0:
            raise RuntimeError("mismatched block_expiration / unblock_expiration")
        self._expiration_blocked -= 1

    @property
    def _subscribed_connections(self) -> list[Subscriber]:
        """The connections, under the name Bokeh's session gives them (Panel reads it)."""
        return list(self._connections)

    def subscribe(self, connection: Subscriber) -> bool:
        """Send this session's changes to ``connection`` from now on.

        :return: ``False``, subscribing nothing, once the session is destroyed.
        """
        if self._destroyed:
            return False
        self._connections.add(connection)
        return True

    def unsubscribe(self, connection: Subscriber) -> None:
        self._connections.discard(connection)
        self._last_unsubscribe = _now_ms()

    def _locked(self) -> _DocumentLock:
        return _DocumentLock(self)

    @contextlib.contextmanager
    def locked(self) -> Iterator[Document]:
        """``with session.locked() as doc:`` change the document from a view.

        Changes are sent to connected clients when the block ends.
        """
        with self._app_scope(), self._locked():
            yield self._document

    def with_document_locked(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``func(*args, **kwargs)`` with the document locked; return its result.

        A coroutine result is awaited with the lock still held. Returns
        ``None`` without calling ``func`` once the session is destroyed.
        """
        if self._destroyed:
            log.debug("Session %s: ignoring locked call on a destroyed session", self._id)
            return None
        with self._locked():
            result = func(*args, **kwargs)
            if inspect.isawaitable(result):
                # The coroutine runs on the asyncio loop in a copy of this
                # context: make it carry the right curdoc.
                with compat.curdoc_as(self._document):
                    result = aio.resolve(result)
            return result

    def _flush(self, pending: list[tuple[DocumentPatchedEvent, Subscriber | None]]) -> None:
        for event, skip in pending:
            targets = [c for c in self._connections if c is not skip]
            if not targets:
                # Nobody to tell: a connection that subscribes later pulls
                # the whole document, so there is nothing to serialize now.
                continue
            try:
                frames = encode_patch(event) or encode(protocol.create("PATCH-DOC", [event]))
            except Exception:
                log.exception("Session %s: could not serialize %r", self._id, event)
                continue
            # Serialized once for all connections, so each receives the full
            # definition of any model the event introduces.
            for connection in targets:
                connection.send_frames(frames)

    # Receivers of Document events (called by bokeh's on_change_dispatch_to).

    def _document_patched(self, event: DocumentPatchedEvent) -> None:
        if self._pending is None:
            raise RuntimeError(
                "_pending_writes should be non-None when we have a document lock, and we"
                " should have the lock when the document changes. Change a served document"
                " only from its callbacks, or from doc.add_next_tick_callback(...)."
            )
        skip = self._current_patch_connection if event.setter is self else None
        self._pending.append((event, skip))

    def _session_callback_added(self, event: Any) -> None:
        self._scheduler.add(event.callback)

    def _session_callback_removed(self, event: Any) -> None:
        self._scheduler.remove(event.callback)

    def _invoke_callback(self, callback: SessionCallback) -> None:
        fn = callback.callback
        nolock = getattr(fn, "nolock", False)
        if self._destroyed:
            return
        started = time.perf_counter()
        try:
            with monitor.running(self._describe, callback), self._app_scope():
                if nolock:
                    with compat.curdoc_as(UnlockedDocumentProxy(self._document)):
                        aio.resolve(fn())
                else:
                    # Bokeh's own wrapper of fn sets curdoc; the lock restores
                    # the curdoc stack if fn raises.
                    self.with_document_locked(fn)
        except gevent.GreenletExit:
            raise
        except (Exception, SystemExit):
            # SystemExit too: raised in a greenlet, gevent would re-raise it in
            # the main greenlet and end the whole server.
            self._callback_stats.errors += 1
            log.exception(
                "Session %s: error in %s %s; the session goes on",
                self._id, type(callback).__name__, describe_callback(callback),
            )
        finally:
            stats = self._callback_stats
            stats.runs += 1
            stats.seconds += time.perf_counter() - started

    def run_as_callback(self, func: Callable[..., Any], *args: Any, what: str = "call") -> bool:
        """Run ``func(*args)`` as a callback of this session: in the app's
        scope, the document locked, ``curdoc()`` its document; what it
        changes goes out when it returns, and a coroutine result is awaited.

        An exception is logged and counted with the session's callback
        errors. Returns whether ``func`` ran and returned; a destroyed
        session runs nothing.
        """
        if self._destroyed:
            return False
        started = time.perf_counter()
        try:
            with monitor.running(lambda: f"Session {self._id}: {what}"), self._app_scope(), \
                    compat.curdoc_as(self._document):
                self.with_document_locked(func, *args)
            return True
        except gevent.GreenletExit:
            raise
        except (Exception, SystemExit):
            self._callback_stats.errors += 1
            log.exception("Session %s: error in %s %s; the session goes on", self._id, what, describe_callback(func))
            return False
        finally:
            self._callback_stats.runs += 1
            self._callback_stats.seconds += time.perf_counter() - started

    def _describe(self, callback: SessionCallback) -> str:
        return f"Session {self._id}: {type(callback).__name__} {describe_callback(callback)}"

    # Message handlers; each returns the frames of the reply to send.

    def handle_pull(self, message: Message[Any], connection: Subscriber) -> list[str | bytes]:
        # A second pull, or the first of a session made for a WebSocket (a
        # reconnect whose session was gone), may come from a BokehJS that
        # already shows a document and loads this one into it.
        inline = compat.REPULL_DROPS_BUFFERS and (self._pulled or self.made_for_websocket)
        with self._locked():
            reply = compat.pull_reply(message.header["msgid"], self._document, inline)
        self._pulled = True
        return encode(reply)

    def handle_push(self, message: Any, connection: Subscriber) -> list[str | bytes]:
        with self._app_scope(), self._locked():
            message.push_to_document(self._document)
        return ok_frames(message.header["msgid"])

    def handle_patch(self, message: Any, connection: Subscriber) -> list[str | bytes]:
        with self._app_scope(), self._locked():
            recorder = self.recorder
            # Ranks are taken before the patch applies: its callbacks may
            # add and remove models.
            recorded = recorder.prepare(message.content, self._document) if recorder is not None else None
            self._current_patch_connection = connection
            try:
                message.apply_to_document(self._document, self)
            finally:
                self._current_patch_connection = None
            if recorded is not None:
                recorder.commit(recorded, self._document)
        return ok_frames(message.header["msgid"])

    def notify_connection_lost(self) -> None:
        """Trigger the document's ``connection_lost`` event."""
        if self._destroyed:
            return
        try:
            with self._app_scope():
                self.with_document_locked(
                    lambda: self._document.callbacks.trigger_event(ConnectionLost())
                )
        except (Exception, SystemExit):
            log.exception("Session %s: error in a connection_lost callback", self._id)

    def destroy(self) -> None:
        """Stop all callbacks and release the document.

        The caller runs ``on_session_destroyed`` hooks afterwards.
        """
        if self._destroyed:
            return
        self._destroyed = True
        self._scheduler.close()
        self._connections.clear()
        compat.destroy_document(self._document, self)
        # A destroyed session may still be referenced (a late connection, a
        # log record); it must not keep the whole document alive.
        self._document = None  # type: ignore[assignment]
