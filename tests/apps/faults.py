"""Callback faults for tests/test_faults.py, one per ``?mode=`` page argument.

Every session has a slider (``slider``), a button (``button``) and a Div
``result``; each mode adds Divs that report what happened, so a test reads
the outcome by pulling the document. Every session logs
``faults: session <id> destroyed`` from ``on_session_destroyed``.

raise         next-tick, 50 ms timeout, 30 ms periodic (counts its runs in ``periodic`` and removes
              itself after PERIODIC_RUNS), slider on_change and button on_event callbacks that all
              raise RuntimeError("<kind> exploded on purpose").
exit          the same five callbacks call sys.exit(<n>) instead (the periodic one after counting),
              plus an ``async def`` next-tick callback that calls sys.exit(16) after an await.
busy          a timeout callback 300 ms after creation busy-loops for BUSY_SECONDS without yielding
              (``busy`` says "running"/"done").
remove        periodic ``killer`` (20 ms) removes periodic ``victim`` on its first run and
              itself on its third, then removes the victim again (ValueError: logged);
              a next-tick removes the 150 ms timeout ``late`` before it fires;
              periodic ``purger`` removes every session callback of the document, itself
              included, after 5 runs; ``left`` then reports how many remain.
quit          a button click clears the document's roots, removes every session callback and
              requests the session's expiration: the next cleanup pass destroys it once the
              client has gone.
selfdestruct  when the connection is lost, a timeout callback discards its own session
              through the application context (server-side discard from inside the session).
"""

import asyncio
import logging
import sys
import time

from bokeh.io import curdoc
from bokeh.models import Button, Div, Slider

BUSY_SECONDS = 1.5
#: The raising periodic callbacks remove themselves after this many runs.
PERIODIC_RUNS = 10

log = logging.getLogger("faults")

doc = curdoc()
context = doc.session_context
mode = context.request.arguments.get("mode", [b""])[0].decode()

slider = Slider(start=0, end=100, value=1, step=1, title="value", name="slider")
button = Button(label="click", name="button")
result = Div(text="", name="result")
roots = [slider, button, result]


def div(name, text=""):
    d = Div(text=text, name=name)
    roots.append(d)
    return d


def on_destroyed(session_context, log=log):
    # Names are bound as defaults: Bokeh clears the app module's globals when
    # the document is destroyed, before on_session_destroyed callbacks run.
    log.warning("faults: session %s destroyed", session_context.id)


doc.on_session_destroyed(on_destroyed)


if mode == "raise":
    periodic_div = div("periodic", "0")

    def next_tick_raises():
        raise RuntimeError("next-tick exploded on purpose")

    def timeout_raises():
        raise RuntimeError("timeout exploded on purpose")

    def periodic_raises():
        n = int(periodic_div.text) + 1
        periodic_div.text = str(n)
        if n == PERIODIC_RUNS:
            doc.remove_periodic_callback(periodic_cb)
        raise RuntimeError(f"periodic exploded on purpose, run {n}")

    def on_change_raises(attr, old, new):
        result.text = f"value={new}"
        raise RuntimeError("on_change exploded on purpose")

    def on_event_raises(event):
        raise RuntimeError("on_event exploded on purpose")

    doc.add_next_tick_callback(next_tick_raises)
    doc.add_timeout_callback(timeout_raises, 50)
    periodic_cb = doc.add_periodic_callback(periodic_raises, 30)
    slider.on_change("value", on_change_raises)
    button.on_event("button_click", on_event_raises)

elif mode == "exit":
    periodic_div = div("periodic", "0")

    def next_tick_exits():
        sys.exit(11)

    def timeout_exits():
        sys.exit(12)

    def periodic_exits():
        n = int(periodic_div.text) + 1
        periodic_div.text = str(n)
        if n == PERIODIC_RUNS:
            doc.remove_periodic_callback(periodic_cb)
        sys.exit(13)

    def on_change_exits(attr, old, new):
        result.text = f"value={new}"
        sys.exit(14)

    def on_event_exits(event):
        sys.exit(15)

    async def async_exits():
        await asyncio.sleep(0.01)
        sys.exit(16)

    doc.add_next_tick_callback(next_tick_exits)
    doc.add_next_tick_callback(async_exits)
    doc.add_timeout_callback(timeout_exits, 50)
    periodic_cb = doc.add_periodic_callback(periodic_exits, 30)
    slider.on_change("value", on_change_exits)
    button.on_event("button_click", on_event_exits)

elif mode == "busy":
    busy_div = div("busy", "waiting")

    def busy_loop():
        # No gevent.sleep, no I/O: the hub cannot run anything else meanwhile.
        busy_div.text = "running"
        end = time.perf_counter() + BUSY_SECONDS
        while time.perf_counter() < end:
            pass
        busy_div.text = "done"

    doc.add_timeout_callback(busy_loop, 300)

elif mode == "remove":
    killer_div = div("killer", "0")
    victim_div = div("victim", "0")
    late_div = div("late", "pending")
    purger_div = div("purger", "0")
    left_div = div("left", "")
    errors_div = div("errors", "")

    def victim():
        victim_div.text = str(int(victim_div.text) + 1)

    def killer():
        n = int(killer_div.text) + 1
        killer_div.text = str(n)
        if n == 1:
            doc.remove_periodic_callback(victim_cb)
        elif n == 3:
            doc.remove_periodic_callback(killer_cb)
            try:
                doc.remove_periodic_callback(victim_cb)
            except ValueError as exc:
                errors_div.text = f"ValueError: {exc}"
                raise

    def late():
        late_div.text = "fired"

    def cancel_late():
        doc.remove_timeout_callback(late_cb)

    def purger():
        n = int(purger_div.text) + 1
        purger_div.text = str(n)
        if n == 5:
            for callback in list(doc.session_callbacks):
                doc.callbacks.remove_session_callback(callback)
            left_div.text = f"left={len(doc.session_callbacks)}"

    # Periodic callbacks that the purger will find still scheduled.
    doc.add_periodic_callback(lambda: None, 25)
    doc.add_timeout_callback(lambda: setattr(result, "text", "timeout survived the purge"), 60_000)
    victim_cb = doc.add_periodic_callback(victim, 20)
    killer_cb = doc.add_periodic_callback(killer, 20)
    late_cb = doc.add_timeout_callback(late, 150)
    doc.add_next_tick_callback(cancel_late)
    doc.add_periodic_callback(purger, 20)

elif mode == "quit":
    ticks_div = div("ticks", "0")

    def tick():
        ticks_div.text = str(int(ticks_div.text) + 1)

    def quit_session(event):
        for callback in list(doc.session_callbacks):
            doc.callbacks.remove_session_callback(callback)
        doc.clear()
        # flask-docsync's session_context.session is the ServerSession
        # (bokeh serve keeps it private as session_context._session).
        context.session.request_expiration()
        log.warning("faults: session %s asked to expire", context.id)

    doc.add_periodic_callback(tick, 20)
    button.on_event("button_click", quit_session)

elif mode == "selfdestruct":

    def destroy_own_session():
        session = context.session
        discarded = context.server_context.application_context.discard_session(session)
        log.warning("faults: session %s discarded itself: %s", context.id, discarded)

    def on_lost(event):
        doc.add_timeout_callback(destroy_own_session, 50)

    doc.add_periodic_callback(lambda: None, 20)
    doc.on_event("connection_lost", on_lost)


# Last: Bokeh subscribes a model to its on_event callbacks when the model
# joins the document, so the roots go in after every callback is set up.
for root in roots:
    doc.add_root(root)
