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
import gevent.monkey
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


def _wake() -> None:
    pass


class _Loop(asyncio.SelectorEventLoop):
    """The process's asyncio loop, which any greenlet may schedule on.

    asyncio expects ``call_soon``/``call_later`` from the loop's own thread,
    where the loop is not waiting meanwhile. Another greenlet of that thread
    can call them while the loop's greenlet waits in ``select`` with a
    timeout computed before: the new callback would wait for the next
    unrelated event. Scheduling from elsewhere therefore also wakes the
    loop, as ``call_soon_threadsafe`` does.
    """

    def call_soon(self, callback: Any, *args: Any, context: Any = None) -> asyncio.Handle:
        if on_loop():
            return super().call_soon(callback, *args, context=context)
        return self.call_soon_threadsafe(callback, *args, context=context)

    def call_at(self, when: float, callback: Any, *args: Any, context: Any = None) -> asyncio.TimerHandle:
        handle = super().call_at(when, callback, *args, context=context)
        if not on_loop():
            self.call_soon_threadsafe(_wake)
        return handle


def _ensure_loop() -> asyncio.AbstractEventLoop:
    global _loop, _runner
    if _loop is None or _loop.is_closed() or _runner is None or _runner.dead:
        _loop = _Loop(_Selector())
        _runner = gevent.spawn(_loop.run_forever)
        _runner.name = "flask_docsync asyncio loop"
        global _loop_thread
        _loop_thread = _os_thread_ident()
        _install_policy()
    return _loop


#: The OS thread the loop runs on (its greenlets share it).
_loop_thread: int | None = None
_os_thread_ident = gevent.monkey.get_original("_thread", "get_ident")


def _install_policy() -> None:
    """Make the running loop the default one of its OS thread.

    ``asyncio.get_event_loop()`` outside a coroutine, and so Tornado's
    ``IOLoop.current()``, then give the loop that runs in every greenlet,
    as they do inside a Tornado server: Panel schedules its tasks on
    ``IOLoop.current()``, and apps written for Bokeh's server use it too.
    Without this they got a loop that nobody runs, and their callbacks
    never ran. Under gevent's monkey-patching the default policy keeps its
    loop per greenlet, so setting it once would not do. Other OS threads
    (``--num-threads``) keep asyncio's usual behaviour.
    """
    current = asyncio.get_event_loop_policy()
    if isinstance(current, _GreenletsShareTheLoop):
        return
    asyncio.set_event_loop_policy(_GreenletsShareTheLoop())


class _GreenletsShareTheLoop(asyncio.DefaultEventLoopPolicy):  # type: ignore[misc,valid-type]
    def get_event_loop(self) -> asyncio.AbstractEventLoop:
        if _loop is not None and not _loop.is_closed() and _os_thread_ident() == _loop_thread:
            return _loop
        return super().get_event_loop()


def loop() -> asyncio.AbstractEventLoop:
    """The process's asyncio loop, started if it is not running."""
    return _ensure_loop()


def tornado_loop() -> Any:
    """Tornado's ``IOLoop`` on :func:`loop` (what ``IOLoop.current()`` gives here)."""
    from tornado.ioloop import IOLoop

    _ensure_loop()
    return IOLoop.current()


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
