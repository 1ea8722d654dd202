"""What flask-docsync knows about the process it is deployed in.

gunicorn installs its worker's signal handlers before it loads the app, so
the worker (its class and config) can be found from the SIGTERM handler.
That lets the app refuse an unsafe multi-worker setup at start-up and close
its WebSockets cleanly when the worker is told to stop.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import os
import signal
import sys
import weakref
from collections.abc import Callable
from typing import Any

import gevent

log = logging.getLogger(__name__)

_STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT")


def gunicorn_worker() -> Any | None:
    """The gunicorn worker running this process, or ``None`` outside one.

    Remembered once found: :func:`on_stop_signal` replaces the handler it is
    found by.
    """
    found = _found_worker.get(os.getpid())
    if found is not None:
        return found
    if "gunicorn" not in sys.modules:
        return None
    try:
        from gunicorn.workers.base import Worker
    except ImportError:
        return None
    handler = signal.getsignal(signal.SIGTERM)
    owner = getattr(handler, "__self__", None)
    if not isinstance(owner, Worker):
        return None
    _found_worker.clear()
    _found_worker[os.getpid()] = owner
    return owner


_found_worker: dict[int, Any] = {}


def worker_count() -> int:
    """How many gunicorn workers share the port; 1 outside gunicorn."""
    worker = gunicorn_worker()
    if worker is None:
        return 1
    return int(getattr(worker.cfg, "workers", 1) or 1)


def on_stop_signal(callback: Callable[[str], None]) -> bool:
    """Call ``callback(signal_name)`` on a greenlet when the worker is told to stop.

    The previous handler (gunicorn's) still runs, so the worker stops
    accepting and waits out its graceful timeout as usual; the callback
    uses that time to close WebSockets and run the session hooks.

    The signal handlers are installed once per process, however many apps
    ask. A bound method is held weakly, so an app that is dropped is not
    kept alive by its stop hook.

    :return: Whether a gunicorn worker was found to hook into.
    """
    worker = gunicorn_worker()
    if worker is None:
        return False
    ref: Callable[[], Callable[[str], None] | None]
    ref = weakref.WeakMethod(callback) if inspect.ismethod(callback) else (lambda: callback)  # type: ignore[arg-type]
    _stop_callbacks.append(ref)
    if _installed:
        return True
    _installed.append(True)
    # gunicorn ends the worker as soon as its last request is done, which can
    # be before the callbacks have run every hook (sessions need no open
    # request); the worker's exit waits for them, at most for the graceful
    # timeout.
    wait = float(getattr(worker.cfg, "graceful_timeout", 30) or 30)
    atexit.register(_join_stopping, wait)
    for name in _STOP_SIGNALS:
        signum = getattr(signal, name)
        previous = signal.getsignal(signum)

        def handler(sig: int, frame: Any, previous: Any = previous, name: str = name) -> None:
            for ref in list(_stop_callbacks):
                callback = ref()
                if callback is None:
                    _stop_callbacks.remove(ref)
                else:
                    _stopping.append(gevent.spawn(callback, name))
            if callable(previous):
                previous(sig, frame)

        signal.signal(signum, handler)
    return True


_stop_callbacks: list[Callable[[], Callable[[str], None] | None]] = []
_installed: list[bool] = []
_stopping: list[gevent.Greenlet] = []


def _join_stopping(timeout: float) -> None:
    if _stopping:
        gevent.joinall(_stopping, timeout=timeout)


def uses_gevent_websocket() -> bool:
    """Whether gevent-websocket's handler may answer this process's WebSocket handshakes.

    True once ``geventwebsocket`` is imported: its gunicorn worker class is
    imported before the app is loaded, and a ``WSGIServer`` with its
    ``WebSocketHandler`` needs the import too.
    """
    return "geventwebsocket" in sys.modules


def problems(settings: Any, workers: int) -> list[str]:
    """What is wrong with a deployment of ``workers`` processes with ``settings``."""
    found = []
    if workers > 1 and not settings.signed:
        found.append(
            f"{workers} workers share the port but session ids are not signed: a page and its"
            " WebSocket can land on different workers, which must be able to trust each other's"
            " tokens. Set DOCSYNC_SECRET_KEY (or BOKEH_SECRET_KEY) to the same value for all."
        )
    return found
