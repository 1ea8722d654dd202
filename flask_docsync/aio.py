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
from collections.abc import Callable
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


#: Seconds a killed greenlet waits for the coroutine it was waiting for to
#: finish after cancelling it, so its ``finally`` blocks have run before the
#: session's destroy hooks; bounded because a coroutine may ignore the
#: cancellation.
CANCEL_TIMEOUT = 2.0


def on_loop() -> bool:
    """Whether the caller runs on the asyncio loop's own greenlet (inside a coroutine)."""
    return _runner is not None and gevent.getcurrent() is _runner


def resolve(value: Any) -> Any:
    """Return ``value``, or its result when it is awaitable.

    The coroutine runs in the caller's ``contextvars`` context, so
    ``curdoc()`` and Flask's ``current_app`` stay what they were for the
    caller. Exceptions propagate to the caller. When the waiting greenlet
    is killed (its session is destroyed) or times out, the coroutine is
    cancelled too, and the greenlet waits up to :data:`CANCEL_TIMEOUT` for
    it to end.

    :raises RuntimeError: when called from a coroutine, which would wait
        for the loop it is blocking; ``await`` the value there instead.
    """
    if not inspect.isawaitable(value):
        return value
    if on_loop():
        if inspect.iscoroutine(value):
            value.close()
        raise RuntimeError(
            "A coroutine's result cannot be waited for on the asyncio loop itself;"
            " use 'await' inside async code."
        )
    loop = _ensure_loop()
    result = gevent.event.AsyncResult()
    context = contextvars.copy_context()
    state: dict[str, Any] = {"task": None, "cancelled": False}

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
        if state["cancelled"]:
            # The waiter went away before the loop got to it.
            if inspect.iscoroutine(value):
                value.close()
            result.set_exception(asyncio.CancelledError())
            return
        task = state["task"] = loop.create_task(_await(), context=context)
        task.add_done_callback(_done)

    def _cancel() -> None:
        state["cancelled"] = True
        task = state["task"]
        if task is not None:
            task.cancel()

    loop.call_soon_threadsafe(_start)
    try:
        value = result.get()
    except BaseException:
        if not result.ready():
            loop.call_soon_threadsafe(_cancel)
            result.wait(CANCEL_TIMEOUT)
        raise
    if isinstance(value, _Exited):
        raise value.exc
    return value


async def in_greenlet(fn: Callable[..., Any], *args: Any) -> Any:
    """Await ``fn(*args)`` run in a new greenlet, from a coroutine.

    For gevent code that may block (taking a session's document lock,
    waiting for another coroutine with :func:`resolve`): run on the loop's
    own greenlet it would stall every coroutine of the process, or wait
    for the loop forever. The greenlet runs in the coroutine's
    ``contextvars`` context; cancelling the coroutine kills it.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def _settle(ok: bool, outcome: Any) -> None:
        if future.done():
            return
        if ok:
            future.set_result(outcome)
        else:
            future.set_exception(outcome)

    def _run() -> None:
        try:
            outcome = context.run(fn, *args)
        except gevent.GreenletExit:
            return
        except BaseException as exc:
            loop.call_soon_threadsafe(_settle, False, exc)
        else:
            loop.call_soon_threadsafe(_settle, True, outcome)

    greenlet = gevent.spawn(_run)
    try:
        return await future
    finally:
        if not greenlet.dead:
            greenlet.kill(block=False)


class _Exited:
    """A coroutine's ``SystemExit``, carried out of the asyncio loop."""

    def __init__(self, exc: SystemExit) -> None:
        self.exc = exc
