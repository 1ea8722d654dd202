"""Broadcast: one publish reaches every session subscribed to its topic, in
every worker of every host.

With Redis (``DOCSYNC_REDIS_URL``) a broadcast is an entry of a Redis
Stream per topic, ``<DOCSYNC_REDIS_PREFIX>:broadcast:<topic>``, trimmed to
about ``DOCSYNC_BROADCAST_HISTORY`` entries. Each server runs one reader
greenlet that follows the streams of the topics its sessions subscribe to
(``XREAD BLOCK`` from the last entry it delivered), so:

- every worker sees a topic's broadcasts in the stream's one order, its own
  included (they are read back rather than delivered first locally, which
  would let two workers' broadcasts arrive in different orders);
- a reader that loses its connection (Redis restarted, ``CLIENT KILL``, a
  network cut) carries on from where it stopped, missing nothing that
  Redis still holds;
- a broadcast made while Redis is unreachable waits in a bounded outbox
  and is sent, in order, once Redis is back.

Without Redis, broadcasts go through an in-process queue to this process's
sessions only.

Each broadcast is decoded once per worker. Its handlers run one session at
a time, each under its session's document lock with ``curdoc()`` set, as a
callback of that session (its changes go out as any callback's), with a
yield to other greenlets between sessions.

This module imports no Flask and no WebSocket code.
"""

from __future__ import annotations

import collections
import json
import logging
import secrets
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
import gevent.monkey
import gevent.lock
import gevent.queue

from .errors import BroadcastError, ConfigurationError

if TYPE_CHECKING:
    from bokeh.document import Document

    from .session import ServerSession

log = logging.getLogger(__name__)

#: Entries one XREAD returns at most, so a reader far behind catches up in
#: bounded steps between which the worker serves everything else.
READ_COUNT = 256
#: How long one XREAD waits for new entries. A topic first subscribed while
#: the reader waits is followed from its next read (nothing is missed: the
#: reader starts it from the entry the subscriber saw last).
READ_BLOCK_MS = 1000
#: Longest wait between attempts to reach Redis again.
MAX_BACKOFF = 5.0
#: How long this hub keeps what it broadcast, to send it again after a
#: Redis restart, and at most how many: a reader fetches an entry within
#: milliseconds unless its worker is very busy.
RESEND_WINDOW = 5.0
RESEND_LIMIT = 1000
#: Bytes of broadcasts (their JSON) that may wait in each of a hub's two
#: queues, the outbox (Redis unreachable) and the inbox (read, not yet
#: delivered), besides DOCSYNC_BROADCAST_HISTORY of them: with payloads near
#: DOCSYNC_BROADCAST_MAX_BYTES the count alone would allow gigabytes.
MAX_WAITING_BYTES = 64 * 1024 * 1024
#: Longest topic name, so keys stay small.
MAX_TOPIC_LENGTH = 200

Handler = Callable[[Any], Any]


@dataclass(frozen=True)
class Broadcast:
    """One broadcast as delivered: its topic, its id (the stream entry's,
    ``<milliseconds>-<sequence>``; ordered), and the decoded payload."""

    topic: str
    id: str
    payload: Any
    #: Bytes of its JSON, counted against MAX_WAITING_BYTES while it waits.
    size: int = 0

    @property
    def published_ms(self) -> int:
        return int(self.id.split("-", 1)[0])


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def check_topic(topic: Any) -> str:
    if not isinstance(topic, str) or not topic or len(topic) > MAX_TOPIC_LENGTH or not topic.isprintable():
        raise BroadcastError(
            f"A broadcast topic must be a non-empty printable string of at most {MAX_TOPIC_LENGTH}"
            f" characters, such as 'prices' or 'orders/eu'; got {topic!r}."
        )
    return topic


def encode_payload(payload: Any, max_bytes: int) -> str:
    """``payload`` as compact JSON, refused if it is not JSON or is too big.

    :raises BroadcastError: saying what to do instead.
    """
    try:
        data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BroadcastError(
            f"A broadcast payload must be a JSON value (dict, list, str, int, float, bool or None;"
            f" no NaN): {exc}. Convert it first, e.g. frame.to_dict('list') or str(timestamp)."
        ) from None
    size = len(data.encode("utf-8"))
    if size > max_bytes:
        raise BroadcastError(
            f"A broadcast payload of {size} bytes is over DOCSYNC_BROADCAST_MAX_BYTES ({max_bytes}):"
            " every session of the topic gets a copy. Broadcast a key or a version instead and let"
            " each session load the data, or raise the limit."
        )
    return data


class _Subscription:
    __slots__ = ("handler", "seen")

    def __init__(self, handler: Handler, seen: str | None) -> None:
        self.handler = handler
        #: The id of the last broadcast this subscriber got (or saw as the
        #: latest when it subscribed); older ones are not given to it.
        self.seen = seen


class _Topic:
    def __init__(self, name: str, key: str) -> None:
        self.name = name
        self.key = key
        #: Where the reader goes on from: the last entry delivered here.
        self.last_id = "0-0"
        #: The last broadcast delivered here, for subscribers that join later.
        self.latest: Broadcast | None = None
        self.subscribers: weakref.WeakKeyDictionary[Document, list[_Subscription]] = weakref.WeakKeyDictionary()
        #: Whether this topic's latest entry in Redis is known (so the
        #: reader may follow it from there).
        self.primed = False
        #: Set while one greenlet asks Redis for it; others wait on it.
        self.priming: gevent.event.Event | None = None


class Hub:
    """The broadcasts of one server (one Flask app's DocSync in one process).

    :param redis_url: ``None`` for in-process broadcasts only.
    :param prefix: Of every Redis key, so deployments can share a Redis.
    :param max_bytes: Largest JSON payload accepted.
    :param history: Entries each topic's stream keeps (about): how far a
        worker may fall behind, and how many broadcasts wait in the outbox
        while Redis is unreachable, before some are lost (or refused).
    :param client_factory: ``client_factory(url, timeout, on_connect=None)``
        returns a ``redis.Redis`` that calls ``on_connect(connection)`` for
        each new connection; tests may pass another. ``None``: redis-py's.
    """

    def __init__(
        self,
        redis_url: str | None,
        prefix: str = "docsync",
        max_bytes: int = 256 * 1024,
        history: int = 10_000,
        client_factory: Callable[..., Any] | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.history = history
        self._client_factory = client_factory or redis_client
        self._topics: dict[str, _Topic] = {}
        self._by_key: dict[bytes, _Topic] = {}
        self._wake = gevent.event.Event()
        #: Broadcasts read (or published here, without Redis) and not yet
        #: delivered. The reader takes entries off Redis as soon as they are
        #: there, so that a Redis restart cannot lose what this worker has
        #: not delivered yet; when this many wait, it stops reading (Redis
        #: keeps the rest, up to ``history``).
        self._inbox: gevent.queue.Queue[Broadcast | None] = gevent.queue.Queue(maxsize=history)
        self._local_seq = 0
        self._local_ms = 0
        #: Who publishes from this hub, and its count: readers drop a
        #: broadcast they already have (one re-sent after a lost reply).
        self._publisher_id = secrets.token_hex(6)
        self._sequence = 0
        self._last_seen: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._dispatcher: gevent.Greenlet | None = None
        self._thread = _os_thread_id()
        #: What this hub broadcast in the last RESEND_WINDOW seconds, sent
        #: again if Redis turns out to have restarted (see _connect_publisher).
        self._recent: collections.deque[tuple[float, str, str, str]] = collections.deque(maxlen=RESEND_LIMIT)
        self._run_id: str | None = None
        self._outbox: collections.deque[tuple[str, str, str]] = collections.deque()
        self._outbox_bytes = 0
        self._inbox_bytes = 0
        #: Set when the dispatcher takes from the inbox: room for the reader.
        self._room = gevent.event.Event()
        self._outbox_flusher: gevent.Greenlet | None = None
        self._publish_lock = gevent.lock.RLock()
        self._publisher: Any = None
        self._reader: gevent.Greenlet | None = None
        self._stopped = False
        self.figures = collections.Counter()  # type: ignore[var-annotated]
        self.connected: bool | None = None
        self.reader_alive_at: float | None = None
        self.lag_ms: float | None = None
        self.max_lag_ms = 0.0

    # -- publishing --------------------------------------------------------

    def key(self, topic: str) -> str:
        return f"{self.prefix}:broadcast:{topic}"

    def publish(self, topic: str, payload: Any) -> None:
        """Broadcast ``payload`` to every subscriber of ``topic``.

        Returns once the broadcast is in Redis, or queued in the outbox when
        Redis cannot be reached (it is sent, in order, when Redis is back).

        :raises BroadcastError: for a bad topic or payload, or when the
            outbox is full because Redis has been unreachable for long.
        """
        check_topic(topic)
        self._check_thread()
        self._check_gevent()
        data = encode_payload(payload, self.max_bytes)
        self._stopped = False  # as any use after DocSync.stop(), this starts it again
        if self.redis_url is None:
            self._publish_locally(topic, data)
            return
        with self._publish_lock:
            if self._outbox:
                self._sequence += 1
                self._queue(topic, data, f"{self._publisher_id}:{self._sequence}")
                return
            self._sequence += 1
            unique = f"{self._publisher_id}:{self._sequence}"
            try:
                self._xadd(topic, data, unique)
            except Exception as exc:
                if not is_connection_error(exc):
                    raise _refused(self.redis_url, exc) from exc
                # The entry may have been added before the connection broke;
                # then readers drop the copy the outbox sends (same unique id).
                log.warning("Broadcast on %r waits for Redis (%s); it is sent when Redis is back", topic, exc)
                self._drop_publisher()
                self._queue(topic, data, unique)
                return
        self.figures["published"] += 1

    def _check_thread(self) -> None:
        # The outbox, the inbox and the Redis connections belong to the
        # event loop's thread; from a worker thread (offload(), a pool) they
        # would be used by two threads at once.
        if _os_thread_id() != self._thread:
            raise BroadcastError(
                "broadcast() was called from a thread other than the server's event loop (offload(),"
                " a thread pool): return the payload from the thread and broadcast it from the"
                " callback or view that started the work."
            )

    def publish_now(self, topic: str, payload: Any) -> str:
        """Broadcast through Redis at once, without the outbox; return the entry id.

        For a process that serves no sessions (``flask docsync broadcast``).

        :raises BroadcastError: as :meth:`publish`, and when there is no
            Redis or it cannot be reached.
        """
        check_topic(topic)
        data = encode_payload(payload, self.max_bytes)
        if self.redis_url is None:
            raise BroadcastError(
                "Broadcasting from outside the server needs Redis: set DOCSYNC_REDIS_URL (such as"
                " redis://localhost:6379/0) in the app's config, for the server and this command."
            )
        try:
            return self._xadd(topic, data)
        except Exception as exc:
            if not is_connection_error(exc):
                raise _refused(self.redis_url, exc) from exc
            raise BroadcastError(
                f"Redis at {safe_url(self.redis_url)} cannot be reached ({exc}): start it, or make"
                " DOCSYNC_REDIS_URL name the Redis the server uses."
            ) from None

    def _publish_locally(self, topic: str, data: str) -> None:
        ms = int(time.time() * 1000)
        self._local_seq = self._local_seq + 1 if ms <= self._local_ms else 0
        self._local_ms = max(ms, self._local_ms)
        broadcast = Broadcast(topic, f"{self._local_ms}-{self._local_seq}", json.loads(data), len(data))
        try:
            if self._inbox_bytes + broadcast.size > MAX_WAITING_BYTES:
                raise gevent.queue.Full
            self._inbox.put_nowait(broadcast)
            self._inbox_bytes += broadcast.size
        except gevent.queue.Full:
            self.figures["refused"] += 1
            raise BroadcastError(
                f"{self._inbox.qsize()} broadcasts wait to be delivered; this one is refused"
                " (DOCSYNC_BROADCAST_HISTORY bounds them). Broadcast less often, or make the"
                " subscribers' handlers faster."
            ) from None
        self.figures["published"] += 1
        self._ensure_reader()

    def _xadd(self, topic: str, data: str, unique: str | None = None) -> str:
        if self._publisher is None:
            self._connect_publisher()
        if unique is None:
            self._sequence += 1
            unique = f"{self._publisher_id}:{self._sequence}"
        entry_id = self._publisher.xadd(self.key(topic), {"p": data, "u": unique}, maxlen=self.history,
                                        approximate=True)
        now = time.monotonic()
        recent = self._recent
        recent.append((now, topic, data, unique))
        while recent and now - recent[0][0] > RESEND_WINDOW:
            recent.popleft()
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    def _connect_publisher(self) -> None:
        self._publisher = self._client_factory(self.redis_url, 5.0, self._on_publisher_connect)  # type: ignore[arg-type]

    def _on_publisher_connect(self, connection: Any) -> None:
        """On each new connection of the publisher (redis-py reconnects by
        itself): if Redis restarted since the last one, send again what this
        hub broadcast just before, ahead of anything new.

        A Redis without persistence restarts empty, and a reader busy at
        that instant may not have fetched the last entries yet. Readers
        drop the copies they already had (same publisher sequence).
        """
        connection.on_connect()
        connection.send_command("INFO", "server")
        info = connection.read_response()
        text = info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)
        run_id = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("run_id:")), None)
        restarted = self._run_id is not None and run_id != self._run_id
        self._run_id = run_id
        if restarted and self._recent:
            log.warning("Redis restarted: sending the last %d broadcast(s) again for readers that missed them",
                        len(self._recent))
            for _, topic, data, unique in list(self._recent):
                connection.send_command("XADD", self.key(topic), "MAXLEN", "~", self.history, "*",
                                        "p", data, "u", unique)
                connection.read_response()

    def _drop_publisher(self) -> None:
        _close(self._publisher)
        self._publisher = None

    def _check_gevent(self) -> None:
        # redis-py blocks on its sockets; only gevent's patched sockets let
        # the rest of the worker run meanwhile.
        if self.redis_url is not None and not gevent.monkey.is_module_patched("socket"):
            raise ConfigurationError(
                "DOCSYNC_REDIS_URL needs gevent's monkey-patching in the serving process, or Redis calls"
                " would stop every session: gunicorn -k gevent and flask-docsync serve do it; with"
                " gevent.pywsgi, call gevent.monkey.patch_all() before anything else is imported."
            )

    def _queue(self, topic: str, data: str, unique: str) -> None:
        if len(self._outbox) >= self.history or self._outbox_bytes + len(data) > MAX_WAITING_BYTES:
            self.figures["refused"] += 1
            raise BroadcastError(
                f"Redis at {safe_url(self.redis_url)} has been unreachable for {len(self._outbox)}"
                f" broadcasts ({self._outbox_bytes} bytes); this one is refused (the outbox holds at most"
                f" DOCSYNC_BROADCAST_HISTORY broadcasts and {MAX_WAITING_BYTES} bytes). Start Redis again."
            )
        self._outbox.append((topic, data, unique))
        self._outbox_bytes += len(data)
        if self._outbox_flusher is None or self._outbox_flusher.dead:
            self._outbox_flusher = gevent.spawn(self._flush_outbox)
            self._outbox_flusher.name = "docsync-broadcast-outbox"

    def _flush_outbox(self) -> None:
        backoff = 0.1
        while self._outbox and not self._stopped:
            with self._publish_lock:
                try:
                    while self._outbox:
                        topic, data, unique = self._outbox[0]
                        self._xadd(topic, data, unique)
                        self._outbox.popleft()
                        self._outbox_bytes -= len(data)
                        self.figures["published"] += 1
                except Exception as exc:
                    if not is_connection_error(exc):
                        topic, dropped, _ = self._outbox.popleft()
                        self._outbox_bytes -= len(dropped)
                        log.error("Broadcast on %r was refused by Redis (%s); dropped", topic, exc)
                        continue
                    self._drop_publisher()
            if self._outbox:
                gevent.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
        if not self._outbox:
            log.info("Broadcasts sent after Redis came back")

    # -- subscribing -------------------------------------------------------

    def subscribe(self, doc: Document, topic: str, handler: Handler) -> None:
        """Call ``handler(payload)`` for each broadcast on ``topic`` while ``doc``'s session lives.

        If the topic has had a broadcast, ``handler`` is called with the
        latest one at once (the caller is building or changing the
        document), so a session that joins late starts from it.
        """
        check_topic(topic)
        self._check_thread()
        if not callable(handler):
            raise BroadcastError(f"subscribe({topic!r}, handler) needs a callable handler, got {handler!r}.")
        self._check_gevent()
        state = self._topic(topic)
        if not state.subscribers:
            # Nobody here followed it: what this worker knew of it is stale.
            state.primed = False
        if not state.primed:
            self._prime(state)
        latest = state.latest
        state.subscribers.setdefault(doc, []).append(_Subscription(handler, latest.id if latest else None))
        self._ensure_reader()
        self._wake.set()
        if latest is not None:
            try:
                handler(latest.payload)
            except Exception:
                # The session goes on, as after a failing callback.
                self.figures["handler_errors"] += 1
                log.exception("Error in broadcast handler for %r with its latest broadcast; the session goes on",
                              topic)

    def _topic(self, name: str) -> _Topic:
        state = self._topics.get(name)
        if state is None:
            state = self._topics[name] = _Topic(name, self.key(name))
            self._by_key[state.key.encode()] = state
        return state

    def _prime(self, state: _Topic, force: bool = False) -> bool:
        """Learn the topic's latest broadcast, and follow it from there.

        Until then the reader does not follow the topic: from the start of
        its stream it would deliver old broadcasts as new. Concurrent callers
        wait for the one asking Redis. Returns whether the topic is primed.
        """
        if self.redis_url is None:
            state.primed = True
            return True
        if state.priming is not None:
            state.priming.wait(10.0)
            return state.primed
        if self.connected is False and not force:
            # Known to be down: do not make every new session wait for a
            # connect timeout; the reader primes the topic once Redis is back.
            return False
        state.priming = gevent.event.Event()
        try:
            if self._publisher is None:
                self._connect_publisher()
            entries = self._publisher.xrevrange(state.key, count=1)
        except Exception as exc:
            if not is_connection_error(exc):
                log.error("Topic %r: Redis refused to read its latest broadcast: %s", state.name, exc)
            else:
                self.connected = False
                log.warning("Topic %r: its latest broadcast is not known (Redis: %s)", state.name, exc)
            self._drop_publisher()
            return False
        finally:
            event, state.priming = state.priming, None
            event.set()
        if entries:
            entry_id, fields = entries[0]
            broadcast = self._decode(state, entry_id, fields, dedupe=False)
            if broadcast is not None:
                state.latest = broadcast
        state.primed = True
        return True

    def attach(self, session: ServerSession) -> None:
        """The session of a subscribed document is live: give it what came meanwhile.

        Broadcasts that arrive while the session is still being made are
        delivered only to live sessions; a subscriber then gets the latest
        of them here (the latest value, not every one).
        """
        doc = session.document
        for state in self._topics.values():
            latest = state.latest
            for sub in state.subscribers.get(doc, ()):
                if latest is not None and (sub.seen is None or _id_key(latest.id) > _id_key(sub.seen)):
                    self._deliver(session, sub, latest)

    # -- reading and delivering ---------------------------------------------

    def start(self) -> None:
        self._stopped = False
        if any(state.subscribers for state in self._topics.values()) or not self._inbox.empty():
            self._ensure_reader()

    def stop(self) -> None:
        if self._outbox:
            log.warning("%d broadcast(s) waiting for Redis are dropped: the server stops", len(self._outbox))
            self._outbox.clear()
            self._outbox_bytes = 0
        self._stopped = True
        self._wake.set()
        while not self._inbox.empty():
            self._inbox.get_nowait()  # for sessions that are gone
        self._inbox_bytes = 0
        for greenlet in (self._reader, self._dispatcher, self._outbox_flusher):
            if greenlet is not None:
                greenlet.kill(block=True, timeout=5)
        self._reader = self._dispatcher = self._outbox_flusher = None
        self._drop_publisher()

    def _ensure_reader(self) -> None:
        if self._stopped:
            return
        if self._dispatcher is None or self._dispatcher.dead:
            self._dispatcher = gevent.spawn(self._dispatch_loop)
            self._dispatcher.name = "docsync-broadcast-dispatcher"
        if self.redis_url is not None and (self._reader is None or self._reader.dead):
            self._reader = gevent.spawn(self._read_redis)
            self._reader.name = "docsync-broadcast-reader"

    def _dispatch_loop(self) -> None:
        while not self._stopped:
            broadcast = self._inbox.get()
            if broadcast is None or self._stopped:
                continue
            self._inbox_bytes = max(0, self._inbox_bytes - broadcast.size)
            self._room.set()
            if self.redis_url is None:
                self.reader_alive_at = time.monotonic()
            state = self._topics.get(broadcast.topic)
            if state is not None:
                self._dispatch(state, broadcast)

    def _read_redis(self) -> None:
        client = None
        backoff = 0.1
        down_since: float | None = None
        try:
            while not self._stopped:
                wanted = []
                for state in self._topics.values():
                    if state.subscribers:
                        wanted.append(state)
                    else:
                        state.primed = False  # followed again only after a fresh look
                if not wanted:
                    self._wake.clear()
                    self._wake.wait(READ_BLOCK_MS / 1000)
                    self.reader_alive_at = time.monotonic()
                    continue
                try:
                    if client is None:
                        client = self._client_factory(self.redis_url, READ_BLOCK_MS / 1000 + 5.0)  # type: ignore[arg-type]
                    for state in wanted:
                        if not state.primed and state.priming is None and self._prime(state, force=True):
                            if state.latest is not None:
                                # Subscribers that joined while it was unknown
                                # get it now (the dispatcher skips the others).
                                self._wait_and_put(state.latest)
                    streams = {state.key: state.last_id for state in wanted if state.primed}
                    if not streams:
                        raise ConnectionError("the topics' latest entries could not be read")
                    reply = client.xread(streams, count=READ_COUNT, block=READ_BLOCK_MS)
                    self.reader_alive_at = time.monotonic()
                    self.connected = True
                    backoff = 0.1
                    if down_since is not None:
                        log.info("Broadcast reader reached Redis again after %.1f s", time.monotonic() - down_since)
                        down_since = None
                    for key, entries in reply or ():
                        state = self._by_key.get(key if isinstance(key, bytes) else str(key).encode())
                        if state is None:
                            continue
                        for entry_id, fields in entries:
                            broadcast = self._decode(state, entry_id, fields)
                            if broadcast is not None:
                                self._wait_and_put(broadcast)
                except Exception as exc:
                    if is_connection_error(exc):
                        self.connected = False
                        if down_since is None:
                            down_since = time.monotonic()
                            log.warning("Broadcast reader lost Redis at %s (%s); retrying",
                                        safe_url(self.redis_url), exc)
                    else:
                        log.exception("Broadcast reader: unexpected error; it goes on")
                    _close(client)
                    client = None
                    gevent.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
        finally:
            _close(client)

    def _wait_and_put(self, broadcast: Broadcast) -> None:
        """Into the inbox; waits while the dispatcher is ``history`` broadcasts
        or MAX_WAITING_BYTES behind (Redis keeps the rest meanwhile)."""
        while self._inbox_bytes and self._inbox_bytes + broadcast.size > MAX_WAITING_BYTES and not self._stopped:
            self._room.clear()
            self._room.wait(1.0)
        self._inbox.put(broadcast)
        self._inbox_bytes += broadcast.size

    def _decode(self, state: _Topic, entry_id: Any, fields: Any, dedupe: bool = True) -> Broadcast | None:
        entry = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        state.last_id = entry
        raw = fields.get(b"p", fields.get("p")) if isinstance(fields, dict) else None
        unique = fields.get(b"u", fields.get("u")) if isinstance(fields, dict) else None
        if unique is not None and dedupe:
            try:
                publisher, _, number = (unique.decode() if isinstance(unique, bytes) else str(unique)).rpartition(":")
                sequence = int(number)
            except (UnicodeDecodeError, ValueError):
                sequence = None
            if sequence is not None:
                # Per topic: one XREAD lists its streams one after another, so
                # a publisher's sequence is in order within a topic only.
                source = f"{state.name}\0{publisher}"
                if self._last_seen.get(source, -1) >= sequence:
                    self.figures["duplicates"] += 1
                    return None
                self._last_seen[source] = sequence
                self._last_seen.move_to_end(source)
                if len(self._last_seen) > 10_000:
                    self._last_seen.popitem(last=False)
        try:
            return Broadcast(state.name, entry, json.loads(raw), len(raw))
        except (TypeError, ValueError):
            # Someone else's entry (a shared Redis, a hand-made XADD).
            self.figures["malformed"] += 1
            log.warning("Topic %r: entry %s is not a broadcast of ours; skipped", state.name, entry)
            return None

    def _dispatch(self, state: _Topic, broadcast: Broadcast) -> None:
        state.latest = broadcast
        lag = max(0.0, time.time() * 1000 - broadcast.published_ms)
        self.lag_ms = lag
        self.max_lag_ms = max(self.max_lag_ms, lag)
        self.figures["received"] += 1
        key = _id_key(broadcast.id)
        for doc, subs in list(state.subscribers.items()):
            context = doc.session_context
            session = getattr(context, "_session", None)
            if context is None or getattr(context, "_destroyed", False) or (session is not None and session.destroyed):
                state.subscribers.pop(doc, None)
                continue
            if session is None:
                continue  # still being made: attach() gives it the latest
            for sub in list(subs):
                if sub.seen is not None and _id_key(sub.seen) >= key:
                    continue
                self._deliver(session, sub, broadcast)
            gevent.sleep(0)  # one session at a time: let the rest of the worker run

    def _deliver(self, session: ServerSession, sub: _Subscription, broadcast: Broadcast) -> None:
        sub.seen = broadcast.id
        if session.run_as_callback(sub.handler, broadcast.payload, what=f"broadcast handler for {broadcast.topic!r}"):
            self.figures["delivered"] += 1
        else:
            self.figures["handler_errors"] += 1

    def forget(self, doc: Document) -> None:
        """Drop the subscriptions of a session's document (it is being destroyed).

        A topic nobody here subscribes to any more is forgotten with its
        latest broadcast, so per-user topics do not pile up.
        """
        for name, state in list(self._topics.items()):
            if state.subscribers.pop(doc, None) is not None and not state.subscribers and state.priming is None:
                del self._topics[name]
                self._by_key.pop(state.key.encode(), None)

    def stats(self) -> dict[str, Any]:
        alive = self.reader_alive_at
        return {
            "redis": safe_url(self.redis_url) if self.redis_url else None,
            "connected": self.connected,
            "topics": sorted(name for name, state in self._topics.items() if state.subscribers),
            "subscriptions": sum(len(subs) for state in self._topics.values() for subs in state.subscribers.values()),
            "published": self.figures["published"],
            "received": self.figures["received"],
            "delivered": self.figures["delivered"],
            "handler_errors": self.figures["handler_errors"],
            "refused": self.figures["refused"],
            "outbox": len(self._outbox),
            "outbox_bytes": self._outbox_bytes,
            "waiting": self._inbox.qsize(),
            "waiting_bytes": self._inbox_bytes,
            "duplicates": self.figures["duplicates"],
            "reader_seconds_since_alive": None if alive is None else round(time.monotonic() - alive, 3),
            "lag_ms": None if self.lag_ms is None else round(self.lag_ms, 1),
            "max_lag_ms": round(self.max_lag_ms, 1),
        }


#: The OS thread's id even where threading is monkey-patched (there
#: ``threading.get_ident`` names the greenlet).
_os_thread_id = gevent.monkey.get_original("_thread", "get_ident")


def redis_client(
    url: str, timeout: float, on_connect: Callable[[Any], None] | None = None, connect_timeout: float = 2.0
) -> Any:
    try:
        import redis
    except ImportError:
        raise ConfigurationError(
            "DOCSYNC_REDIS_URL is set and the redis package is missing: pip install 'flask-docsync[redis]'."
        ) from None
    # Keepalive and health checks: a connection Redis or a middlebox closed
    # silently must fail, not hang the reader.
    return redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=connect_timeout, socket_keepalive=True,
        health_check_interval=15, retry_on_timeout=False, redis_connect_func=on_connect,
    )


def is_connection_error(exc: BaseException) -> bool:
    """Whether Redis could not be reached (worth waiting for), not refused us."""
    try:
        import redis
    except ImportError:  # pragma: no cover - a client from elsewhere
        return isinstance(exc, (ConnectionError, TimeoutError, OSError))
    # A wrong password is a ConnectionError to redis-py, but waiting fixes nothing.
    if isinstance(exc, (redis.AuthenticationError, redis.exceptions.AuthorizationError)):
        return False
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError, OSError))


def _refused(url: str | None, exc: BaseException) -> BroadcastError:
    return BroadcastError(
        f"Redis at {safe_url(url)} refused the broadcast ({type(exc).__name__}: {exc}): check the password"
        " and database in DOCSYNC_REDIS_URL, and that DOCSYNC_REDIS_PREFIX keys are not used by anything else."
    )


def _close(client: Any) -> None:
    if client is not None:
        try:
            client.close()
        except Exception:
            pass


def safe_url(url: str | None) -> str:
    """``url`` without its password, for logs and stats."""
    if not url:
        return ""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


# -- the API of app scripts ---------------------------------------------------


def _hub_and_doc() -> tuple[Hub, Document]:
    from bokeh.io import curdoc

    doc = curdoc()
    context = doc.session_context
    app_context = getattr(getattr(context, "server_context", None), "application_context", None)
    hub = getattr(app_context, "broadcasts", None)
    if hub is None:
        raise BroadcastError(
            "subscribe() and broadcast() work in an app served by flask-docsync: call them while the"
            " app builds its document or from one of its callbacks. In a Flask view use"
            " docsync.broadcast(topic, payload)."
        )
    return hub, doc


def subscribe(topic: str, handler: Handler) -> None:
    """In an app script: call ``handler(payload)`` for every broadcast on ``topic``.

    It runs under the session's document lock, with ``curdoc()`` the
    session's document, so it may change the document as any callback
    does. The subscription ends with the session. If the topic has had a
    broadcast, ``handler`` is called with the latest one at once. The
    payload is shared by the sessions of a worker: do not modify it.
    """
    hub, doc = _hub_and_doc()
    hub.subscribe(doc, topic, handler)


def broadcast(topic: str, payload: Any) -> None:
    """In an app script: broadcast ``payload`` (a JSON value) to every
    subscriber of ``topic``, this session's included.

    :raises BroadcastError: for a payload that is not JSON or is over
        ``DOCSYNC_BROADCAST_MAX_BYTES``.
    """
    hub, _ = _hub_and_doc()
    hub.publish(topic, payload)
