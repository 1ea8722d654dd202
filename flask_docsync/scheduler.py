"""Greenlet scheduling of a session's next-tick, timeout and periodic callbacks.

When a callback runs is measured on a :class:`Clock`. Production uses
:data:`REAL_CLOCK` (``time.monotonic`` and ``gevent.sleep``);
:mod:`flask_docsync.testing` gives the sessions its test client creates a
virtual clock through :data:`session_clock`, so the same scheduler runs
their callbacks on virtual time.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

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


class Clock(Protocol):
    """The time a :class:`CallbackScheduler` measures delays and periods on.

    The scheduler calls :meth:`start` once per scheduled callback, with the
    greenlet that will run it, and :meth:`sleep` only on a periodic
    callback's greenlet, between two runs. So every wake-up (a start, or
    the end of a sleep) is followed by exactly one run of the callback,
    unless the callback was removed meanwhile.
    """

    def now(self) -> float:
        """Seconds on a monotonic scale; only differences mean anything."""
        ...

    def sleep(self, seconds: float) -> None:
        """Block the calling greenlet for ``seconds`` (``0``: until the next turn of the loop)."""
        ...

    def start(self, greenlet: gevent.Greenlet, seconds: float) -> None:
        """Start ``greenlet`` once ``seconds`` have passed (``0``: on the next turn of the loop).

        A greenlet killed before it started never runs.
        """
        ...


class RealClock:
    """The event loop's time: ``time.monotonic``, ``gevent.sleep`` and gevent timers."""

    __slots__ = ()

    now = staticmethod(time.monotonic)
    sleep = staticmethod(gevent.sleep)

    @staticmethod
    def start(greenlet: gevent.Greenlet, seconds: float) -> None:
        if seconds > 0:
            greenlet.start_later(seconds)
        else:
            greenlet.start()

    def __repr__(self) -> str:
        return "<RealClock>"


#: The clock of every scheduler that is given none.
REAL_CLOCK: Clock = RealClock()

#: Makes the clock of each session created in the current context; ``None``
#: (the default) gives sessions :data:`REAL_CLOCK`. A context variable, so a
#: test client that sets it around its own requests gives a virtual clock to
#: the sessions those requests create and to no others.
session_clock: contextvars.ContextVar[Callable[[], Clock] | None] = contextvars.ContextVar(
    "flask_docsync.session_clock", default=None
)


def new_session_clock() -> Clock:
    """The clock for a session created now: from :data:`session_clock`, or :data:`REAL_CLOCK`."""
    factory = session_clock.get()
    return REAL_CLOCK if factory is None else factory()


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
    :param clock: The time delays and periods are measured on; ``None``
        uses :data:`REAL_CLOCK`.
    """

    def __init__(
        self, invoke: Callable[[SessionCallback], Any], name: str, clock: Clock | None = None
    ) -> None:
        self._invoke = invoke
        self._name = name
        self._clock = REAL_CLOCK if clock is None else clock
        self._entries: dict[SessionCallback, _Entry] = {}
        self._group = gevent.pool.Group()
        self._hub = gevent.get_hub()
        self._thread = _get_ident()
        self._closed = False

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def clock(self) -> Clock:
        """The clock this scheduler runs on."""
        return self._clock

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
            delay = max(callback.period, 1) / 1000.0
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
        self._clock.start(greenlet, delay)

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
        # Started one period after add(); then every period, start to start.
        clock = self._clock
        period = max(callback.period, 1) / 1000.0
        while True:
            if self._entries.get(callback) is not entry:
                return
            started = clock.now()
            entry.running = True
            try:
                self._invoke(callback)
            finally:
                entry.running = False
            if self._entries.get(callback) is not entry:
                return
            # A run longer than the period is followed at once by the next,
            # never by a burst of the runs it overlapped.
            due = max(started + period, clock.now())
            clock.sleep(max(due - clock.now(), 0))
