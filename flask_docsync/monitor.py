"""Warn when app code holds the gevent event loop.

One hub runs every session of a worker: a callback that computes for
seconds without yielding freezes all of them (and, past gunicorn's
``--timeout``, gets the worker killed). gevent's monitor thread notices a
hub that has not switched for ``max_blocking_time``; this turns its report
into one log line naming the session and the callback or message that was
running, and a hint to move the work off the loop with :func:`offload`.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import gevent
import gevent.events

log = logging.getLogger(__name__)

T = TypeVar("T")

_labels: weakref.WeakKeyDictionary[Any, tuple[Any, tuple[Any, ...]]] = weakref.WeakKeyDictionary()
_last_report: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
_subscribed = False


class running:
    """``with running(describe, *args):`` names what the current greenlet runs.

    For blocking reports. ``describe`` is the name, or a function called
    with ``args`` to make it, so nothing is formatted unless a report needs
    it. A class rather than a generator: this wraps every callback.
    """

    __slots__ = ("_entry", "_greenlet", "_previous")

    def __init__(self, describe: Callable[..., str] | str, *args: Any) -> None:
        self._entry = (describe, args)

    def __enter__(self) -> None:
        self._greenlet = current = gevent.getcurrent()
        self._previous = _labels.get(current)
        _labels[current] = self._entry

    def __exit__(self, *exc: Any) -> None:
        if self._previous is None:
            _labels.pop(self._greenlet, None)
        else:
            _labels[self._greenlet] = self._previous


def _blocked_at(info: list[str]) -> str:
    """The innermost frame of the blocked greenlet, from gevent's report."""
    lines = iter(info or [])
    for line in lines:
        if line.startswith("Blocked Stack"):
            break
    frames = []
    for line in lines:
        if not line.strip():
            break
        if line.strip().startswith("File"):
            frames.append(line.strip())
    return frames[-1] if frames else ""


def _on_event(event: Any) -> None:
    if not isinstance(event, gevent.events.EventLoopBlocked):
        return
    # gevent reports again every period while the loop stays blocked; one
    # block gets one warning.
    now = time.monotonic()
    last = _last_report.get(event.greenlet)
    _last_report[event.greenlet] = now
    if last is not None and now - last < 2.5 * event.blocking_time:
        return
    entry = _labels.get(event.greenlet)
    if entry is None:
        # Not app code run for a session (e.g. the host's own startup or a
        # test driving the app): nothing of ours to name.
        return
    describe, args = entry
    label = describe(*args) if callable(describe) else describe
    where = _blocked_at(event.info)
    log.warning(
        "%s blocked the event loop for more than %.1f s, stalling every other session of"
        " this worker. Move CPU-bound or blocking work off the loop with"
        " flask_docsync.offload(...). %s",
        label, event.blocking_time, where,
    )


def enable(threshold_ms: int) -> bool:
    """Start watching the hub of this thread; ``threshold_ms <= 0`` does nothing."""
    global _subscribed
    if threshold_ms <= 0:
        return False
    gevent.config.max_blocking_time = threshold_ms / 1000.0
    gevent.config.monitor_thread = True
    # Our log line replaces gevent's multi-page report on stderr.
    gevent.config.print_blocking_reports = False
    if not _subscribed:
        gevent.events.subscribers.append(_on_event)
        _subscribed = True
    return gevent.get_hub().start_periodic_monitoring_thread() is not None


def offload(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` in gevent's thread pool and return its result.

    Only the calling greenlet waits; the event loop and every other session
    keep running. Use it in callbacks for blocking calls without a gevent
    equivalent and for CPU-bound work (numpy, pandas and most C extensions
    release the GIL; pure-Python loops still share it, so for those pass a
    function to a ``concurrent.futures.ProcessPoolExecutor`` through
    ``offload(pool.submit(fn, ...).result)``).

    Inside a locked callback the session's document stays locked while the
    work runs; to let the session respond meanwhile, decorate the callback
    with ``bokeh.document.without_document_lock`` and apply the result with
    ``doc.add_next_tick_callback``.
    """
    return gevent.get_hub().threadpool.apply(fn, args, kwargs)
