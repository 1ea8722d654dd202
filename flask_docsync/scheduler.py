"""Greenlet scheduling of a session's next-tick, timeout and periodic callbacks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.monkey
import gevent.pool
from bokeh.server.callbacks import NextTickCallback, PeriodicCallback, SessionCallback, TimeoutCallback

log = logging.getLogger(__name__)

# The real OS thread id, even when threading is monkey-patched; used to tell
# a call from another thread, which must be handed to the hub thread-safely.
_get_ident = gevent.monkey.get_original("_thread", "get_ident")

#: How long destroy() waits for callback greenlets to die before giving up.
KILL_TIMEOUT = 5.0


def from_other_thread(hub: Any, thread: int, method: Callable[..., Any], *args: Any) -> bool:
    """Queue ``method(*args)`` to ``hub`` when called from an OS thread other than ``thread``.

    A real thread may hand work to a session with ``add_next_tick_callback``;
    gevent objects are not thread-safe, so the work runs in the hub's thread.

    :return: Whether the call was queued (the caller then returns at once).
    """
    if _get_ident() == thread:
        return False
    hub.loop.run_callback_threadsafe(method, *args)
    return True


def _closed(callback: SessionCallback) -> None:
    """What a closed scheduler has instead of its session's invoke method."""


class _Entry:
    __slots__ = ("greenlet", "running")

    def __init__(self) -> None:
        self.greenlet: gevent.Greenlet | None = None
        self.running = False


class CallbackScheduler:
    """Runs one session's Bokeh session callbacks, each on its own greenlet.

    Next-tick callbacks run on the next turn of the event loop, timeout
    callbacks once after their delay, and periodic callbacks every period
    measured start to start. A periodic run never overlaps the previous one;
    when a run takes longer than the period the next starts right after it,
    without a burst of catch-up runs.

    :param invoke: Runs one callback object; it owns locking, the Flask app
        context and error logging, so the scheduler only decides *when*.
    :param name: Shown in greenlet names and log lines (the session id).
    """

    def __init__(self, invoke: Callable[[SessionCallback], Any], name: str) -> None:
        self._invoke = invoke
        self._name = name
        self._entries: dict[SessionCallback, _Entry] = {}
        self._group = gevent.pool.Group()
        self._hub = gevent.get_hub()
        self._thread = _get_ident()
        self._closed = False

    def __len__(self) -> int:
        return len(self._entries)

    def _from_other_thread(self, method: Callable[..., Any], *args: Any) -> bool:
        return from_other_thread(self._hub, self._thread, method, *args)

    def add(self, callback: SessionCallback) -> None:
        """Start scheduling ``callback`` (a Bokeh ``SessionCallback``)."""
        if self._from_other_thread(self.add, callback):
            return
        if self._closed or callback in self._entries:
            return
        entry = _Entry()
        self._entries[callback] = entry
        if isinstance(callback, PeriodicCallback):
            greenlet = gevent.Greenlet(self._run_periodic, callback, entry)
            delay = 0.0
        elif isinstance(callback, TimeoutCallback):
            greenlet = gevent.Greenlet(self._run_once, callback, entry)
            delay = max(callback.timeout, 0) / 1000.0
        elif isinstance(callback, NextTickCallback):
            greenlet = gevent.Greenlet(self._run_once, callback, entry)
            delay = 0.0
        else:
            del self._entries[callback]
            raise TypeError(f"cannot schedule {callback!r}: not a Bokeh session callback")
        greenlet.name = f"{type(callback).__name__}(session={self._name}, id={callback.id})"
        entry.greenlet = greenlet
        self._group.add(greenlet)
        if delay:
            greenlet.start_later(delay)
        else:
            greenlet.start()

    def remove(self, callback: SessionCallback) -> None:
        """Stop scheduling ``callback``. A run in progress finishes first."""
        if self._from_other_thread(self.remove, callback):
            return
        entry = self._entries.pop(callback, None)
        if entry is None or entry.greenlet is None:
            return
        # Dropped so a killed greenlet's traceback (frame -> entry) does not
        # lead back to the greenlet: see close().
        greenlet, entry.greenlet = entry.greenlet, None
        if not entry.running and greenlet is not gevent.getcurrent():
            greenlet.kill(block=False)

    def close(self) -> None:
        """Stop every callback; used when the session is destroyed.

        A callback that destroys its own session keeps running to its end;
        the others are killed, waiting at most :data:`KILL_TIMEOUT`.
        """
        self._closed = True
        entries = list(self._entries.values())
        self._entries.clear()
        current = gevent.getcurrent()
        others = [g for g in self._group if g is not current]
        for greenlet in others:
            greenlet.kill(block=False)
        if others:
            gevent.joinall(others, timeout=KILL_TIMEOUT)
            stuck = [g for g in others if not g.dead]
            if stuck:
                log.warning("Session %s: %d callback greenlet(s) ignored kill", self._name, len(stuck))
        # A killed greenlet keeps its GreenletExit, whose traceback holds the
        # frame that holds the entry that holds the greenlet; and the session
        # holds this scheduler, which holds the session's method. Cut both
        # cycles so the session and its callbacks are freed by reference
        # counting (the closed scheduler never invokes anything again).
        for entry in entries:
            entry.greenlet = None
        self._invoke = _closed

    def _run_once(self, callback: SessionCallback, entry: _Entry) -> None:
        if self._entries.get(callback) is not entry:
            return
        entry.running = True
        try:
            self._invoke(callback)
        finally:
            entry.running = False
            # Bokeh's one-shot wrapper removes the callback from the document,
            # which removes it here too; this covers a callback that raised first.
            if self._entries.get(callback) is entry:
                del self._entries[callback]

    def _run_periodic(self, callback: PeriodicCallback, entry: _Entry) -> None:
        period = max(callback.period, 1) / 1000.0
        due = time.monotonic() + period
        while True:
            delay = due - time.monotonic()
            gevent.sleep(max(delay, 0))
            if self._entries.get(callback) is not entry:
                return
            started = time.monotonic()
            entry.running = True
            try:
                self._invoke(callback)
            finally:
                entry.running = False
            if self._entries.get(callback) is not entry:
                return
            due = max(started + period, time.monotonic())
