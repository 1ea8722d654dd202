"""Giving the memory of discarded sessions back to the operating system, off the hot path.

Transport-neutral: no Flask and no WebSocket here. The server calls
:meth:`Reclaimer.start` when it starts (which freezes the start-up heap,
see :func:`freeze_startup_heap`) and :meth:`Reclaimer.request` after each
cleanup pass that discarded sessions; the reclaimer's greenlet does the
work a moment later, in short steps.

A discarded session's document is freed by reference counting as it is
discarded (:func:`flask_docsync.compat.destroy_document` and the
connection and scheduler teardown break its reference cycles). Freed is
not yet returned:

- CPython's small-object allocator gives a 1 MiB arena back only when every
  block in it is free. A few blocks per arena are enough to keep nearly
  every arena a session used: the interpreter's free lists (thousands of
  tuples and some dicts, lists and floats, kept for reuse; only a full
  garbage collection empties them) and its type attribute cache, which
  keeps a reference to each of the last few thousand attribute names it
  looked up, some of them built at run time (Bokeh's ``f"{axis}_name"``).
- glibc's ``malloc`` keeps freed pages in the middle of its heap (numpy
  arrays, large dicts) until ``malloc_trim`` is called.

A full collection scans every tracked object that is not frozen, so its
cost grows with the live sessions (a few thousand objects each): on a
2-core VM about 0.7 ms per live session on top of the ~50 ms the start-up
heap takes until it is frozen. It cannot be interrupted, so it runs only
when predicted to fit :data:`COLLECT_BUDGET_S`. With hundreds of sessions
still alive it is skipped: the free lists keep their blocks and most freed
arenas stay mapped (new sessions reuse them) until Python's own next full
collection.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event

log = logging.getLogger(__name__)

#: Wait this long after the last request before reclaiming: one cleanup
#: pass after another (a backlog draining, each pass discarding a few)
#: then costs one reclaim, and the work comes after the discards rather
#: than between them.
SETTLE_S = 1.0
#: But reclaim at least this often while requests keep coming (steady
#: churn, a cleanup pass every half second), so memory is returned anyway.
MAX_WAIT_S = 10.0
#: Run a full collection only when it is predicted to take less than this.
#: The prediction can be off by a factor of two, and the slowest step must
#: stay under the 50 ms that other sessions would notice as a stall.
COLLECT_BUDGET_S = 0.025

_now = time.perf_counter

# The last full (generation 2) collection seen in this process, whoever ran
# it: (seconds it took, live sessions then). None until one has been seen.
_last_full: tuple[float, int] | None = None
_started: float | None = None
_count_sessions: Callable[[], int] = lambda: 0  # noqa: E731
_frozen = False


def _watch(phase: str, info: dict[str, Any]) -> None:
    global _last_full, _started
    if info.get("generation") != 2:
        return
    if phase == "start":
        _started = _now()
    elif _started is not None:
        _last_full = (_now() - _started, _count_sessions())
        _started = None


def freeze_startup_heap() -> bool:
    """Collect once, then freeze every object that exists now (once per process).

    What exists when the server starts (modules, classes, the Flask and
    Bokeh applications) stays until the process ends, yet every full
    collection, Python's own and the reclaimer's, would scan it: ~100,000
    objects, ~50 ms on a 2-core VM, longer than a stall should last.
    Frozen objects are still freed by reference counting; only a cycle
    made of them would never be collected, which is why this collects
    first.

    :return: Whether this call froze the heap (``False`` if already done).
    """
    global _frozen
    if _frozen:
        return False
    _frozen = True
    gc.collect()
    gc.freeze()
    return True


def _find_malloc_trim() -> Callable[[int], int] | None:
    # glibc only; musl, macOS and Windows have no malloc_trim, and nothing
    # to do instead.
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def _find_clear_type_cache() -> Callable[[], None] | None:
    # 3.13 deprecates sys._clear_type_cache in favour of this broader one.
    return getattr(sys, "_clear_internal_caches", None) or getattr(sys, "_clear_type_cache", None)


class Reclaimer:
    """Returns freed memory to the system after sessions are discarded.

    :meth:`request` is cheap and may be called after every cleanup pass;
    the work happens in one greenlet, started on the first request, once
    requests have stopped for ``settle`` seconds (or ``max_wait`` seconds
    after the first one still waiting). Each step runs on its own turn of
    the event loop: a full collection if predicted cheap enough, clearing
    the type attribute cache (microseconds), ``malloc_trim(0)`` (about a
    millisecond per 100 MiB of heap).

    :param live_sessions: Returns how many sessions are alive in the
        process; a full collection costs about as much per live session as
        the last one did. ``None`` counts none, so the prediction is the
        last full collection's duration as it was.
    :param settle: Seconds without a new request before reclaiming, so a
        burst of passes costs one reclaim. ``None`` reclaims right after
        the request, on the next turn of the event loop.
    :param max_wait: Reclaim at least this many seconds after a request
        even if requests keep coming. ``None`` waits for a quiet
        ``settle``, however long that takes.
    :param collect_budget: Run a full collection only when predicted to
        take less than this many seconds. Before any full collection has
        been seen the cost is unknown and one runs only with no live
        session. ``None`` collects every time, whatever it costs; ``0``
        never does.
    :param trim: Call glibc's ``malloc_trim(0)`` (where there is one).
    :param enabled: ``False`` makes :meth:`start` and :meth:`request` do
        nothing, leaving the process's collector and allocator alone.
    """

    def __init__(
        self,
        live_sessions: Callable[[], int] | None = None,
        settle: float | None = SETTLE_S,
        max_wait: float | None = MAX_WAIT_S,
        collect_budget: float | None = COLLECT_BUDGET_S,
        trim: bool = True,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.live_sessions = live_sessions or (lambda: 0)
        self.settle = settle
        self.max_wait = max_wait
        self.collect_budget = collect_budget
        self._malloc_trim = _find_malloc_trim() if trim else None
        self._clear_type_cache = _find_clear_type_cache()
        self._wanted = gevent.event.Event()
        self._first: float | None = None
        self._last = 0.0
        self._greenlet: gevent.Greenlet | None = None
        #: What has been done, for ``server.stats()``: reclaims run, full
        #: collections run and skipped, trims, and the longest step and the
        #: total time spent, in seconds.
        self.figures: dict[str, float] = {
            "runs": 0, "collections": 0, "collections_skipped": 0, "trims": 0,
            "longest_step_s": 0.0, "seconds": 0.0,
        }

    def start(self) -> None:
        """Freeze the start-up heap (once per process) and watch full collections.

        Call it once the applications are loaded, before serving: what
        exists then is frozen. Every full collection's duration is noted
        from then on, for :meth:`predicted_collection_s`.
        """
        global _count_sessions
        if not self.enabled:
            return
        freeze_startup_heap()
        _count_sessions = self.live_sessions
        if _watch not in gc.callbacks:
            gc.callbacks.append(_watch)

    def request(self) -> None:
        """Note that sessions were discarded; reclaim soon."""
        if not self.enabled:
            return
        self.start()
        now = _now()
        if self._first is None:
            self._first = now
        self._last = now
        self._wanted.set()
        if self._greenlet is None or self._greenlet.dead:
            self._greenlet = gevent.spawn(self._loop)
            self._greenlet.name = "docsync-memory-reclaim"

    def stop(self) -> None:
        """Stop the greenlet and drop pending work; a later :meth:`request` starts again."""
        greenlet, self._greenlet = self._greenlet, None
        self._wanted.clear()
        self._first = None
        if greenlet is not None:
            greenlet.kill(block=True, timeout=5)

    def _loop(self) -> None:
        while True:
            self._wanted.wait()
            self._wait_until_settled()
            self._wanted.clear()
            self._first = None
            try:
                self.reclaim()
            except Exception:
                log.exception("Reclaiming memory failed")

    def _wait_until_settled(self) -> None:
        while True:
            now = _now()
            due = now if self.settle is None else self._last + self.settle
            if self.max_wait is not None and self._first is not None:
                due = min(due, self._first + self.max_wait)
            if now >= due:
                return
            gevent.sleep(due - now)

    def predicted_collection_s(self) -> float | None:
        """What a full collection would take now, or ``None`` if unknown."""
        live = self.live_sessions()
        if _last_full is None:
            return 0.0 if live == 0 else None
        took, then = _last_full
        return took * (live + 1) / (then + 1)

    def reclaim(self) -> dict[str, float | None]:
        """Run every step now, with a turn of the event loop between steps.

        :return: Seconds each step took (``None`` for a step skipped).
        """
        done: dict[str, float | None] = {"collect": None, "clear_type_cache": None, "trim": None}
        if self._should_collect():
            done["collect"] = self._step(gc.collect)
            self.figures["collections"] += 1
        else:
            self.figures["collections_skipped"] += 1
        if self._clear_type_cache is not None:
            gevent.sleep(0)
            done["clear_type_cache"] = self._step(self._clear_type_cache)
        if self._malloc_trim is not None:
            gevent.sleep(0)
            trim = self._malloc_trim
            done["trim"] = self._step(lambda: trim(0))
            self.figures["trims"] += 1
        self.figures["runs"] += 1
        log.debug("Reclaimed memory: %s", {k: v for k, v in done.items() if v is not None})
        return done

    def _should_collect(self) -> bool:
        if self.collect_budget is None:
            return True
        predicted = self.predicted_collection_s()
        return predicted is not None and predicted < self.collect_budget

    def _step(self, fn: Callable[[], Any]) -> float:
        started = _now()
        fn()
        took = _now() - started
        self.figures["seconds"] += took
        self.figures["longest_step_s"] = max(self.figures["longest_step_s"], took)
        return took
