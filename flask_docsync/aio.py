"""Run ``async def`` callbacks and hooks from gevent greenlets.

Bokeh lets session callbacks and lifecycle hooks be coroutines. gevent has
no asyncio loop of its own, so one asyncio loop per process runs in a
greenlet on gevent's selector (cooperative without monkey-patching). A
greenlet that needs a coroutine's result hands it to that loop and waits on
a gevent event, so only the waiting greenlet blocks.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from typing import Any

import gevent
import gevent.event
import gevent.selectors

_loop: asyncio.AbstractEventLoop | None = None
_runner: gevent.Greenlet | None = None


class _Selector(gevent.selectors.GeventSelector):
    """Swaps the thread's "running loop" marker when the loop's greenlet waits.

    asyncio keeps the running loop per thread, but greenlets share the
    thread: left set while the loop idles, it would make every other
    greenlet look as if it ran inside the loop (``asyncio.run()`` and
    Playwright's sync API then refuse to start).
    """

    _outside: asyncio.AbstractEventLoop | None = None

    def select(self, timeout: float | None = None) -> Any:
        own = asyncio._get_running_loop()
        asyncio._set_running_loop(self._outside)
        try:
            return super().select(timeout)
        finally:
            self._outside = asyncio._get_running_loop()
            asyncio._set_running_loop(own)


def _ensure_loop() -> asyncio.AbstractEventLoop:
    global _loop, _runner
    if _loop is None or _loop.is_closed() or _runner is None or _runner.dead:
        _loop = asyncio.SelectorEventLoop(_Selector())
        _runner = gevent.spawn(_loop.run_forever)
        _runner.name = "flask_docsync asyncio loop"
    return _loop


def resolve(value: Any) -> Any:
    """Return ``value``, or its result when it is awaitable.

    The coroutine runs in the caller's ``contextvars`` context, so
    ``curdoc()`` and Flask's ``current_app`` stay what they were for the
    caller. Exceptions propagate to the caller.
    """
    if not inspect.isawaitable(value):
        return value
    loop = _ensure_loop()
    result = gevent.event.AsyncResult()
    context = contextvars.copy_context()

    async def _await() -> Any:
        try:
            return await value
        except SystemExit as exc:
            # asyncio re-raises SystemExit out of the loop, which would end
            # the server; the waiting greenlet raises it instead (below).
            return _Exited(exc)

    def _done(task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            result.set_exception(asyncio.CancelledError())
        elif task.exception() is not None:
            result.set_exception(task.exception())
        else:
            result.set(task.result())

    def _start() -> None:
        task = loop.create_task(_await(), context=context)
        task.add_done_callback(_done)

    loop.call_soon_threadsafe(_start)
    value = result.get()
    if isinstance(value, _Exited):
        raise value.exc
    return value


class _Exited:
    """A coroutine's ``SystemExit``, carried out of the asyncio loop."""

    def __init__(self, exc: SystemExit) -> None:
        self.exc = exc


def shutdown() -> None:
    """Stop the loop (used when the last server stops, and by tests)."""
    global _loop, _runner
    if _loop is not None and not _loop.is_closed():
        _loop.call_soon_threadsafe(_loop.stop)
        if _runner is not None:
            _runner.join(timeout=2)
        _loop.close()
    _loop = None
    _runner = None
