"""Fast unit tests of what gives discarded sessions' memory back (no sockets, no Flask).

- A discarded session's document, models, session object and callback
  greenlets are freed by reference counting alone (the garbage collector
  is off while it is checked), and a model that live code still holds
  keeps working.
- A closed connection's message decoder, and a closed callback scheduler,
  leave no reference cycle.
- Bokeh's empty base session hooks are not run through asyncio.
- :class:`flask_docsync.reclaim.Reclaimer`: one reclaim per burst of
  requests, at least one per ``max_wait`` under steady requests, a full
  collection only when predicted within budget, nothing when disabled.

The end-to-end effect on a real server's RSS is in
tests/test_memory_reclaim.py.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Iterator

import gevent
import pytest
from bokeh.application import Application
from bokeh.application.handlers.function import FunctionHandler
from bokeh.application.handlers.handler import Handler
from bokeh.models import Div
from bokeh.server.callbacks import PeriodicCallback

from flask_docsync import compat, reclaim
from flask_docsync.apps import build_application
from flask_docsync.config import Settings
from flask_docsync.context import ApplicationContext, RequestData
from flask_docsync.errors import ConfigurationError
from flask_docsync.protocol import MessageDecoder, encode, protocol
from flask_docsync.scheduler import CallbackScheduler
from serve_util import APPS


@contextlib.contextmanager
def no_garbage_collector() -> Iterator[None]:
    """Only reference counting frees anything inside (earlier garbage collected first)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _session(context: ApplicationContext, session_id: str):
    return context.create_session_if_needed(session_id, RequestData(), "token", {})


# Discarded sessions: freed by reference counting --------------------------

@pytest.mark.parametrize("app", ["churn.py", "ticker.py", "sliders.py"])
def test_a_discarded_session_is_freed_by_reference_counting(contexts, app):
    context = ApplicationContext(build_application(str(APPS / app)), "/t")
    contexts.append(context)
    _session(context, "warm-up")
    context.destroy_all()
    session = _session(context, "s1")
    gevent.sleep(0.6)  # the periodic and timeout callbacks of churn.py and ticker.py run
    refs = [weakref.ref(session), weakref.ref(session.document), weakref.ref(session.scheduler),
            *(weakref.ref(m) for m in session.document.models)]
    greenlets = [weakref.ref(g) for g in session.scheduler._group]
    with no_garbage_collector():
        session.request_expiration()
        assert context.cleanup_unused_sessions(10_000) == 1
        del session
        gevent.sleep(0)  # killed callback greenlets die on the next turn
        alive = [r() for r in refs + greenlets if r() is not None]
    assert alive == [], f"{len(alive)} objects wait for the garbage collector: {alive[:5]}"


def test_a_model_live_code_still_holds_keeps_working_after_the_discard(contexts):
    kept: list[Div] = []

    def app(doc):
        div = Div(text="hello", tags=["a"])
        kept.append(div)
        doc.add_root(div)

    context = ApplicationContext(Application(FunctionHandler(app)), "/t")
    contexts.append(context)
    session = _session(context, "s1")
    session.request_expiration()
    assert context.cleanup_unused_sessions(10_000) == 1
    div = kept[0]
    # As after Bokeh's own Document.destroy: detached, values back to defaults.
    assert div.document is None and div.text == "" and div.tags == []
    div.text = "again"
    div.tags.append("b")
    assert (div.text, div.tags) == ("again", ["b"])
    assert div.references() == {div}


def test_a_closed_scheduler_leaves_no_cycle():
    runs = []
    scheduler = CallbackScheduler(runs.append, "s1")
    callback = PeriodicCallback(callback=lambda: None, period=10, callback_id="c1")
    scheduler.add(callback)
    gevent.sleep(0.05)
    assert runs
    refs = [weakref.ref(scheduler), *(weakref.ref(g) for g in scheduler._group)]
    with no_garbage_collector():
        scheduler.close()
        del scheduler
        gevent.sleep(0)
        alive = [r() for r in refs if r() is not None]
    assert alive == []


def test_a_closed_decoder_lets_go_of_bokehs_receiver():
    decoder = MessageDecoder()
    message = None
    for frame in encode(protocol.create("PULL-DOC-REQ")):
        message = decoder.feed(frame)
    assert message is not None and message.msgtype == "PULL-DOC-REQ"
    receiver = weakref.ref(decoder._receiver)
    with no_garbage_collector():
        decoder.close()
        alive = receiver()
    assert alive is None


def test_bokehs_empty_base_hooks_are_not_run_through_asyncio():
    class Plain(Handler):
        pass

    class Hooked(Handler):
        async def on_session_destroyed(self, session_context):
            return "hooked"

    for name in ("on_session_created", "on_session_destroyed"):
        assert compat.session_hook(Plain(), name)(None) is None  # not a coroutine
    hook = compat.session_hook(Hooked(), "on_session_destroyed")
    coroutine = hook(None)
    try:
        assert coroutine.send(None) is None
    except StopIteration as stop:
        assert stop.value == "hooked"


# The Reclaimer ---------------------------------------------------------------

def _wait_for_runs(reclaimer: reclaim.Reclaimer, runs: int, timeout: float = 2.0) -> None:
    with gevent.Timeout(timeout, AssertionError(f"fewer than {runs} reclaims: {reclaimer.figures}")):
        while reclaimer.figures["runs"] < runs:
            gevent.sleep(0.01)


def test_a_burst_of_requests_costs_one_reclaim():
    reclaimer = reclaim.Reclaimer(settle=0.1, max_wait=None, collect_budget=0)
    try:
        for _ in range(5):
            reclaimer.request()
            gevent.sleep(0.02)
        assert reclaimer.figures["runs"] == 0  # still settling
        _wait_for_runs(reclaimer, 1)
        gevent.sleep(0.2)
        assert reclaimer.figures["runs"] == 1
        assert reclaimer.figures["collections"] == 0 and reclaimer.figures["collections_skipped"] == 1
    finally:
        reclaimer.stop()


def test_steady_requests_are_reclaimed_every_max_wait():
    reclaimer = reclaim.Reclaimer(settle=0.2, max_wait=0.1, collect_budget=0)
    try:
        with gevent.Timeout(2):
            while reclaimer.figures["runs"] < 2:
                reclaimer.request()
                gevent.sleep(0.02)
    finally:
        reclaimer.stop()


def test_a_full_collection_runs_only_when_predicted_within_budget(monkeypatch):
    live = [0]
    reclaimer = reclaim.Reclaimer(lambda: live[0], collect_budget=0.025, trim=False)
    monkeypatch.setattr(reclaim, "_last_full", None)
    assert reclaimer.predicted_collection_s() == 0.0  # nothing live: as cheap as it gets
    live[0] = 5
    assert reclaimer.predicted_collection_s() is None  # unknown: left to Python
    reclaimer.reclaim()
    assert (reclaimer.figures["collections"], reclaimer.figures["collections_skipped"]) == (0, 1)

    monkeypatch.setattr(reclaim, "_last_full", (0.040, 9))  # 40 ms with 9 live sessions
    live[0] = 4
    assert reclaimer.predicted_collection_s() == pytest.approx(0.020)
    done = reclaimer.reclaim()
    assert done["collect"] is not None and reclaimer.figures["collections"] == 1
    monkeypatch.setattr(reclaim, "_last_full", (0.040, 9))  # that collection may have been noted
    live[0] = 40
    assert reclaimer.predicted_collection_s() == pytest.approx(0.164)
    assert reclaimer.reclaim()["collect"] is None

    assert reclaim.Reclaimer(lambda: 40, collect_budget=None, trim=False).reclaim()["collect"] is not None
    assert reclaim.Reclaimer(lambda: 0, collect_budget=0, trim=False).reclaim()["collect"] is None


def test_full_collections_are_timed_with_the_sessions_alive_then(monkeypatch):
    monkeypatch.setattr(reclaim, "_last_full", None)
    monkeypatch.setattr(reclaim, "_count_sessions", lambda: 7)
    reclaim._watch("start", {"generation": 1})
    reclaim._watch("stop", {"generation": 1})
    assert reclaim._last_full is None  # young collections say nothing about a full one
    reclaim._watch("start", {"generation": 2})
    gevent.sleep(0.01)
    reclaim._watch("stop", {"generation": 2})
    took, live = reclaim._last_full
    assert 0.005 < took < 1.0 and live == 7


def test_every_step_is_timed():
    reclaimer = reclaim.Reclaimer(collect_budget=None)
    done = reclaimer.reclaim()
    assert done["collect"] is not None
    assert done["clear_type_cache"] is not None  # CPython has one
    if reclaimer._malloc_trim is None:
        assert done["trim"] is None
    else:
        assert done["trim"] is not None and reclaimer.figures["trims"] == 1
    assert reclaimer.figures["longest_step_s"] == max(v for v in done.values() if v is not None)


def test_a_disabled_reclaimer_does_nothing():
    reclaimer = reclaim.Reclaimer(settle=None, enabled=False)
    reclaimer.request()
    gevent.sleep(0.05)
    assert reclaimer._greenlet is None and reclaimer.figures["runs"] == 0


def test_reclaim_memory_setting():
    assert Settings.load({}, {}).reclaim_memory is True
    assert Settings.load({"DOCSYNC_RECLAIM_MEMORY": "false"}, {}).reclaim_memory is False
    with pytest.raises(ConfigurationError, match="DOCSYNC_RECLAIM_MEMORY"):
        Settings.load({"DOCSYNC_RECLAIM_MEMORY": "sometimes"}, {})
