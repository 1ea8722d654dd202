"""Application and session contexts: which sessions exist, and how they are born and die.

Transport-neutral: request data arrives as a :class:`RequestData`, built by
the Flask adapter from the request that created the session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import urllib.parse
import weakref
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import gevent.lock
from bokeh.application import Application
from bokeh.application.application import ServerContext as _BokehServerContext
from bokeh.application.application import SessionContext as _BokehSessionContext
from bokeh.application.handlers.code import CodeHandler
from bokeh.application.handlers.directory import DirectoryHandler
from bokeh.application.handlers.document_lifecycle import DocumentLifecycleHandler
from bokeh.document import Document
from bokeh.server.contexts import _RequestProxy as _BokehRequestProxy

from . import aio, compat, panel
from .errors import SessionError
from .session import CallbackStats, ServerSession

log = logging.getLogger(__name__)

# Script and directory apps run with process-global sys.path, sys.argv, cwd
# and bokeh.io output patched (bokeh's CodeRunner); a greenlet switch during
# one script run would expose that state to another, so runs take turns.
_script_lock = gevent.lock.RLock()


@dataclasses.dataclass
class RequestData:
    """What a session keeps of the HTTP request that created it.

    ``arguments`` maps each query argument to a list of ``bytes`` values,
    as ``bokeh serve`` gives them. ``user`` is whatever the host app's
    authorization hook returned, or ``None``.
    """

    arguments: dict[str, list[bytes]] = dataclasses.field(default_factory=dict)
    cookies: dict[str, str] = dataclasses.field(default_factory=dict)
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    method: str = "GET"
    path: str = "/"
    query: str = ""
    uri: str = "/"
    host: str = ""
    protocol: str = "http"
    remote_ip: str | None = None
    #: Where the app is mounted (WSGI ``SCRIPT_NAME``), for building URLs.
    script_root: str = ""
    user: Any = None


class RequestProxy(_BokehRequestProxy):
    """``session_context.request``: the creating request, as Bokeh apps expect it.

    Bokeh's own proxy class, so code that checks for it (Panel's
    ``pn.state.location``) sees the request.
    """

    def __init__(self, data: RequestData) -> None:
        self._data = data
        super().__init__(data, arguments=dict(data.arguments), cookies=data.cookies, headers=data.headers)

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("_"):
            try:
                return getattr(self._data, name)
            except AttributeError:
                pass
        raise AttributeError(f"session_context.request has no attribute {name!r}")


class ServerContext(_BokehServerContext):
    """The ``server_context`` of one application; apps may keep shared state on it."""

    def __init__(self, application_context: ApplicationContext) -> None:
        self._application_context = weakref.ref(application_context)
        self._session_contexts: dict[str, SessionContext] = {}

    @property
    def application_context(self) -> ApplicationContext | None:
        return self._application_context()

    @property
    def sessions(self) -> list[ServerSession]:  # type: ignore[override]
        """The live sessions of this application, as Bokeh's server context gives them."""
        return [c._session for c in list(self._session_contexts.values()) if c._session is not None]


class SessionContext(_BokehSessionContext):
    """``curdoc().session_context`` of a session served by flask-docsync."""

    def __init__(
        self,
        server_context: ServerContext,
        session_id: str,
        request: RequestData,
        token_payload: dict[str, Any],
        document: Document,
        logout_url: str | None = None,
    ) -> None:
        super().__init__(server_context, session_id)
        self._request = RequestProxy(request)
        self._token_payload = token_payload
        self._document: Document | None = document
        self._session: ServerSession | None = None
        self._destroyed = False
        self._logout_url = logout_url

    @property
    def destroyed(self) -> bool:
        return self._destroyed

    @property
    def document(self) -> Document | None:
        """The session's document; ``None`` once the session is destroyed."""
        return self._document

    @property
    def session(self) -> ServerSession | None:
        """The session; ``None`` while ``on_session_created`` hooks run."""
        return self._session

    @property
    def request(self) -> RequestProxy:
        return self._request

    @property
    def token_payload(self) -> dict[str, Any]:
        return self._token_payload

    @property
    def logout_url(self) -> str | None:
        return self._logout_url

    async def with_locked_document(self, func: Callable[[Document], Any]) -> Any:
        """Run ``func(document)`` with the document locked, awaiting it if it
        is a coroutine function, and return its result.

        For callbacks decorated with ``without_document_lock``: changes made
        by ``func`` reach the clients when it returns. Returns ``None``
        without calling ``func`` once the session is destroyed.
        """
        session = self._session
        if session is None:
            # Before the session exists (on_session_created) nothing else can
            # reach the document, so no lock is needed.
            result = func(self._document)
            return (await result) if inspect.isawaitable(result) else result
        # Waiting for the lock, and for a coroutine func under it, must not
        # happen on the asyncio loop's own greenlet: that would stall every
        # coroutine of the worker, or wait for itself for good.
        return await aio.in_greenlet(session.with_document_locked, func, session.document)


def _no_scope(request: RequestData | None) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext()


def _needs_script_lock(application: Application) -> bool:
    return any(isinstance(h, (CodeHandler, DirectoryHandler)) for h in application.handlers)


class ApplicationContext:
    """Sessions of one application at one route.

    :param application: The Bokeh ``Application``.
    :param url: The route, e.g. ``"/sliders"``.
    :param app_scope: ``app_scope(request)`` returns a context manager
        entered around app code (hooks, document creation, callbacks): the
        Flask app context, set up for the session's request; ``request`` is
        ``None`` for server-wide hooks.
    :param logout_url: Exposed as ``session_context.logout_url``.
    :param scheduler_factory: Makes each new session's callback scheduler
        (see :class:`~flask_docsync.session.ServerSession`); ``None`` uses
        the real-time greenlet scheduler.
    """

    def __init__(
        self,
        application: Application,
        url: str,
        app_scope: Callable[[RequestData | None], contextlib.AbstractContextManager[Any]] | None = None,
        logout_url: str | None = None,
        scheduler_factory: Callable[..., Any] | None = None,
        on_session_created: Callable[[ServerSession], None] | None = None,
        url_root: str | None = None,
    ) -> None:
        compat.install()
        if not any(isinstance(h, DocumentLifecycleHandler) for h in application.handlers):
            # As bokeh serve does, so Document.on_session_destroyed callbacks run.
            application.add(DocumentLifecycleHandler())
        self.application = application
        self.url = url
        #: Bokeh's name for :attr:`url`, which Panel's ``Application`` reads.
        self._url = url
        self.app_scope = app_scope or _no_scope
        self.logout_url = logout_url
        self.scheduler_factory = scheduler_factory
        self._on_session_created = on_session_created
        #: Where the server's routes are, below the request's script root
        #: (``""`` or a URL prefix such as ``"/docsync"``; its static files
        #: are under ``<url_root>/static/``). ``None``: not served over HTTP
        #: (unit tests), so no URL is given to the app's document.
        self.url_root = url_root
        #: The callbacks run by this app's sessions.
        self.callback_stats = CallbackStats()
        #: The server's :class:`~flask_docsync.pubsub.Hub`, through which
        #: the app's scripts subscribe and broadcast; ``None`` outside a server.
        self.broadcasts: Any = None
        #: Saves this app's sessions for a restore after their worker dies
        #: (:class:`flask_docsync.restore.Restorer`); ``None``: restore is
        #: off for this app.
        self.restorer: Any = None
        self._app_fingerprint: str | None = None
        self.server_context = ServerContext(self)
        self._sessions: dict[str, ServerSession] = {}
        self._pending: dict[str, gevent.event.AsyncResult] = {}
        self._loaded = False
        self._script_lock = _script_lock if _needs_script_lock(application) else None

    def __repr__(self) -> str:
        return f"<ApplicationContext {self.url} sessions={len(self._sessions)}>"

    @property
    def sessions(self) -> list[ServerSession]:
        return list(self._sessions.values())

    def get_session(self, session_id: str) -> ServerSession | None:
        """The live session ``session_id``; ``None`` if there is none, or it is being discarded."""
        return self._sessions.get(session_id)

    @property
    def app_fingerprint(self) -> str:
        """A hash of the app's source (see :func:`flask_docsync.restore.app_fingerprint`)."""
        if self._app_fingerprint is None:
            from .restore import app_fingerprint

            self._app_fingerprint = app_fingerprint(self.application)
        return self._app_fingerprint

    def session_user(self, session_id: str) -> Any:
        """The user of the request that created the session (``None`` if unknown)."""
        context = self.server_context._session_contexts.get(session_id)
        return context.request.user if context is not None else None

    def run_load_hook(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            with self.app_scope(None):
                self.application.on_server_loaded(self.server_context)
        except (Exception, SystemExit):
            log.exception("App %s: error in on_server_loaded", self.url)

    def run_unload_hook(self) -> None:
        if not self._loaded:
            return
        self._loaded = False
        try:
            with self.app_scope(None):
                self.application.on_server_unloaded(self.server_context)
        except (Exception, SystemExit):
            log.exception("App %s: error in on_server_unloaded", self.url)

    def create_session_if_needed(
        self, session_id: str, request: RequestData, token: str, token_payload: dict[str, Any],
        saved: Any = None,
    ) -> ServerSession:
        """Return the session ``session_id``, creating it on first use.

        Concurrent callers for one new id share a single creation. When
        creation fails every caller gets the error and the id is free again.

        :param saved: What was saved of this session before its worker died
            (:class:`flask_docsync.restore.Saved`): a new session is rebuilt
            from it, or made fresh when it cannot be rebuilt faithfully
            (``saved.failure`` then says why). ``None``: a fresh session.

        :raises SessionError: for an empty id.
        """
        if not session_id:
            raise SessionError(400, "A session id is required.")
        while True:
            session = self._sessions.get(session_id)
            if session is not None:
                return session
            pending = self._pending.get(session_id)
            if pending is None:
                break
            # Another request is creating this session (its result is the
            # session or the error), or it is being discarded (None): then
            # it is made anew once the old one is gone.
            session = pending.get()
            if session is not None:
                return session
        result = self._pending[session_id] = gevent.event.AsyncResult()
        try:
            session = self._create(session_id, request, token, token_payload, saved)
        except BaseException as exc:
            result.set_exception(exc)
            raise
        else:
            self._sessions[session_id] = session
            result.set(session)
        finally:
            del self._pending[session_id]
        if self._on_session_created is not None:
            self._on_session_created(session)
        return session

    def _create(
        self, session_id: str, request: RequestData, token: str, token_payload: dict[str, Any],
        saved: Any = None,
    ) -> ServerSession:
        doc = Document()
        context = SessionContext(
            self.server_context, session_id, request, token_payload, doc, self.logout_url
        )
        compat.set_session_context(doc, context)
        if saved is not None:
            # restore.restorable() hands it to the app script as it runs.
            context._docsync_saved_state = saved.state if isinstance(saved.state, dict) else {}

        def scope() -> contextlib.AbstractContextManager[Any]:
            return self.app_scope(request)

        try:
            with scope():
                panel.prepare(doc, self._root_for(request))
                self._run_session_hooks("on_session_created", context)
                lock = self._script_lock or contextlib.nullcontext()
                with lock, compat.curdoc_as(doc):
                    # Bokeh's FunctionHandler does not patch curdoc; this does.
                    self.application.initialize_document(doc)
                panel.adopt(doc, self.application)
        except (Exception, SystemExit) as exc:
            compat.set_session_context(doc, None)
            log.exception("App %s: session %s could not be created", self.url, session_id)
            if isinstance(exc, SystemExit):
                # Left as is, it would end the server (gevent re-raises
                # SystemExit in the main greenlet); fail this session only.
                raise RuntimeError(f"the app called sys.exit({exc.code!r})") from None
            raise
        for handler in self.application.handlers:
            if handler.failed:
                log.error(
                    "App %s: session %s got an incomplete document: %s %s",
                    self.url, session_id, handler.error, handler.error_detail,
                )
        session = ServerSession(
            session_id, doc, token, scope, route=self.url, scheduler_factory=self.scheduler_factory,
            callback_stats=self.callback_stats,
        )
        context._session = session
        if self.restorer is not None:
            self.restorer.attach(session, self)
            if saved is not None and not self._rebuild(session, context, saved):
                # Never half-restored: this document had the saved state and
                # some of the changes; a fresh one gets neither.
                return self._create(session_id, request, token, token_payload)
        self.server_context._session_contexts[session_id] = context
        return session

    def _rebuild(self, session: ServerSession, context: SessionContext, saved: Any) -> bool:
        """Replay ``saved`` into the new ``session``; on failure destroy it
        (running its destroy hooks) and return ``False``."""
        from .restore import NotFaithful

        try:
            count = saved.rebuild(session)
        except NotFaithful as exc:
            saved.failure = str(exc)
        except Exception as exc:  # a bug of ours or of the app's: still a fresh session, not a dead page
            log.exception("App %s: session %s: restore failed", self.url, session.id)
            saved.failure = f"{type(exc).__name__}: {exc}"
        else:
            # From now on the session is live again: restoring() says so.
            context._docsync_saved_state = None
            self.restorer.figures["replayed"] += count
            return True
        self.restorer.mismatch(self.url, session.id, saved.failure)
        self.restorer.forget(session)
        if self.broadcasts is not None:
            self.broadcasts.forget(session.document)
        session.destroy()
        context._destroyed = True
        with self.app_scope(context.request._data):
            self._run_session_hooks("on_session_destroyed", context)
        context._document = None
        context._session = None
        return False

    def warm(self) -> None:
        """Run the app once into a document that is thrown away (``--warm``).

        The document has a session context and a request without
        arguments, as a page view would; no session exists, no session
        hook runs and no callback it adds is ever called. An app that
        fails this way is logged and served as usual.
        """
        doc = Document()
        context = SessionContext(self.server_context, "warm-up", RequestData(), {}, doc, self.logout_url)
        compat.set_session_context(doc, context)

        def nobody(event: Any) -> None:
            pass  # Document.destroy() removes the session's change receiver; this stands for it

        doc.on_change(nobody)
        try:
            with self.app_scope(None):
                panel.prepare(doc, None)
                lock = self._script_lock or contextlib.nullcontext()
                with lock, compat.curdoc_as(doc):
                    self.application.initialize_document(doc)
        except (Exception, SystemExit):
            log.warning("App %s: warming up failed; its sessions are made as usual", self.url, exc_info=True)
        finally:
            compat.set_session_context(doc, None)
            compat.destroy_document(doc, nobody)

    def _root_for(self, request: RequestData) -> str | None:
        """The URL of the server's root as the page of this session reaches it.

        A path (script root and URL prefix), or with scheme and host when
        the page is on another site and loads the app through
        ``autoload.js`` (which sends ``bokeh-absolute-url``). ``None``
        when :attr:`url_root` is.
        """
        if self.url_root is None:
            return None
        origin = ""
        absolute = request.arguments.get("bokeh-absolute-url")
        if absolute:
            parsed = urllib.parse.urlsplit(absolute[0].decode("utf-8", "replace"))
            if parsed.scheme in ("http", "https") and parsed.netloc:
                origin = f"{parsed.scheme}://{parsed.netloc}"
        return origin + request.script_root + self.url_root

    def _run_session_hooks(self, name: str, context: SessionContext) -> None:
        # Called per handler rather than through Application so that an
        # ``async def`` hook in app_hooks.py is really awaited (Bokeh 3.9
        # drops the coroutine).
        for handler in self.application.handlers:
            try:
                aio.resolve(aio.resolve(compat.session_hook(handler, name)(context)))
            except (Exception, SystemExit):
                log.exception("App %s: session %s: error in %s", self.url, context.id, name)

    def discard_session(self, session: ServerSession, check: Callable[[], bool] | None = None) -> bool:
        """Destroy ``session`` and run ``on_session_destroyed`` hooks.

        Once the discard is decided the session can no longer be found: a
        request for its id made meanwhile waits until the discard is over
        and then gets a new session (as the token rules allow), never the
        destroyed one.

        :param check: Re-checked with the document lock held; the session
            is kept when it returns false (e.g. a client connected meanwhile).
        :return: Whether the session was discarded. Called from a locked
            callback of the session itself, it returns ``False`` and the
            discard happens as soon as that callback has released the lock
            (taking the lock there would wait forever).
        """
        if session.destroyed:
            return False
        if session.lock_held_here:
            gevent.spawn(self.discard_session, session, check)
            return False
        session_id = session.id
        discarding: gevent.event.AsyncResult | None = None
        try:
            # Through the same bookkeeping as every locked section (lock
            # owner, pending patches, curdoc, expiration block).
            with session._locked():
                if session.destroyed or (check is not None and not check()):
                    return False
                if session.connection_count > 0:
                    return False
                if self._sessions.get(session_id) is session:
                    del self._sessions[session_id]
                discarding = self._pending[session_id] = gevent.event.AsyncResult()
                # Stopping callbacks may take seconds; the session is already
                # out of reach.
                if self.broadcasts is not None:
                    # Its handlers close over the document: drop them first.
                    self.broadcasts.forget(session.document)
                if self.restorer is not None:
                    self.restorer.forget(session)
                session.destroy()
            context = self.server_context._session_contexts.pop(session_id, None)
            if context is not None:
                context._destroyed = True
                with self.app_scope(context.request._data):
                    self._run_session_hooks("on_session_destroyed", context)
                context._document = None
                context._session = None
        finally:
            if discarding is not None:
                if self._pending.get(session_id) is discarding:
                    del self._pending[session_id]
                discarding.set(None)
        log.debug("App %s: discarded session %s", self.url, session_id)
        return True

    def cleanup_unused_sessions(self, unused_lifetime_ms: int) -> int:
        """Discard sessions nobody has been connected to for ``unused_lifetime_ms``."""

        def unused(session: ServerSession) -> bool:
            return (
                session.connection_count == 0
                and not session.expiration_blocked
                and (
                    session.expiration_requested
                    or session.milliseconds_since_last_unsubscribe > unused_lifetime_ms
                )
            )

        count = 0
        for session in [s for s in self.sessions if unused(s)]:
            if self.discard_session(session, lambda s=session: unused_after_lock(s)):
                count += 1
            # One session at a time: a sweep of many sessions must not hold
            # the event loop for all of them at once.
            gevent.sleep(0)
        return count

    def destroy_all(self, force: bool = False) -> None:
        """Discard every session that has no connection left (server shutdown).

        :param force: Unsubscribe remaining connections first, so every
            session goes (their sockets are the caller's to close).
        """
        for session in self.sessions:
            if force:
                for connection in list(session._connections):
                    session.unsubscribe(connection)
            try:
                self.discard_session(session)
            except Exception:
                log.exception("App %s: error discarding session %s", self.url, session.id)


def unused_after_lock(session: ServerSession) -> bool:
    # Re-checked under the lock: a client may have connected, or a callback
    # may be waiting for the document (it blocks expiration while it waits).
    return session.connection_count == 0 and not session.expiration_blocked_by_others
