"""Session-callback behaviours for the tests, one per ``?mode=`` page argument.

Each mode reports what it saw in Divs (named below) so a test can read the
results by pulling the document:

overlap         an unlocked 30 ms periodic callback that gevent.sleep()s 80 ms; ``runs``
                holds JSON [[start, end], ...] of its first 8 runs.
periodic_raise  a 30 ms periodic callback that bumps ``count`` and then raises;
                it removes itself at 10.
thread          a real OS thread hands a next-tick callback to the session;
                ``thread`` says which thread asked and that it ran.
async           an ``async def`` periodic and an ``async def`` next-tick callback
                that await asyncio.sleep before changing ``async_periodic``/``async_tick``.
nolock          a ``without_document_lock`` callback releases a locked callback
                that waits for it, then updates ``nolock`` via next-tick.
curdoc          a 20 ms periodic callback that checks curdoc() before and after a
                30 ms gevent.sleep; ``curdoc`` says how often it was right and how
                often another session's callback ran meanwhile (first 40 runs).
remove          periodic ``self_removed`` removes itself after 3 runs; periodic
                ``removed`` is removed by a timeout callback after 3 runs.
raise           the slider's on_change sets ``result`` and then raises.
addroot         a button_click adds a new Div root named ``added``.
"""

import asyncio
import json
import time

import gevent
import gevent.event
import gevent.monkey
from bokeh.document import without_document_lock
from bokeh.document.locking import UnlockedDocumentProxy
from bokeh.io import curdoc
from bokeh.models import Button, Div, Slider

doc = curdoc()
context = doc.session_context
mode = context.request.arguments.get("mode", [b""])[0].decode()

slider = Slider(start=0, end=100, value=1, step=1, title="value", name="slider")
button = Button(label="click", name="button")
result = Div(text="", name="result")


def div(name, text=""):
    d = Div(text=text, name=name)
    doc.add_root(d)
    return d


if mode == "overlap":
    runs_div = div("runs", "[]")
    runs = []

    # Unlocked, so only the scheduler keeps runs apart (a locked callback
    # would be serialized by the document lock anyway).
    @without_document_lock
    def slow():
        if len(runs) >= 8:
            return
        start = time.monotonic()
        gevent.sleep(0.08)
        runs.append([start, time.monotonic()])
        snapshot = json.dumps(runs)
        curdoc().add_next_tick_callback(lambda: setattr(runs_div, "text", snapshot))

    doc.add_periodic_callback(slow, 30)

elif mode == "periodic_raise":
    count_div = div("count", "0")

    def explode():
        n = int(count_div.text) + 1
        count_div.text = str(n)
        if n == 10:  # enough to show it survives, without flooding the log
            doc.remove_periodic_callback(explode_cb)
        raise RuntimeError(f"periodic exploded on purpose, run {n}")

    explode_cb = doc.add_periodic_callback(explode, 30)

elif mode == "thread":
    # serve monkey-patches threading, and threading.Thread (even the one
    # get_original returns) then starts greenlets; the original
    # _thread.start_new_thread starts a real OS thread.
    start_new_thread = gevent.monkey.get_original("_thread", "start_new_thread")
    real_sleep = gevent.monkey.get_original("time", "sleep")
    get_ident = gevent.monkey.get_original("_thread", "get_ident")
    thread_div = div("thread", "waiting")
    hub_thread = get_ident()

    def from_thread_done(asker):
        thread_div.text = f"ran asker_is_other_thread={asker != hub_thread} runner_is_hub={get_ident() == hub_thread}"

    def worker():
        real_sleep(0.05)  # blocking work, off the hub
        asker = get_ident()
        doc.add_next_tick_callback(lambda: from_thread_done(asker))

    def start_thread():
        start_new_thread(worker, ())

    doc.add_next_tick_callback(start_thread)

elif mode == "async":
    periodic_div = div("async_periodic", "0")
    tick_div = div("async_tick", "waiting")

    async def async_periodic():
        await asyncio.sleep(0.02)
        n = int(periodic_div.text) + 1
        periodic_div.text = str(n)
        if n == 3:
            curdoc().remove_periodic_callback(periodic_cb)

    async def async_tick():
        await asyncio.sleep(0.02)
        tick_div.text = f"done curdoc_ok={curdoc() is doc}"

    periodic_cb = doc.add_periodic_callback(async_periodic, 30)
    doc.add_next_tick_callback(async_tick)

elif mode == "nolock":
    nolock_div = div("nolock", "waiting")
    released = gevent.event.Event()
    seen = {}

    def hog():
        # Locked: holds the document lock until the unlocked callback runs.
        seen["hog_released"] = released.wait(timeout=10)

    @without_document_lock
    def unlocked():
        proxy = curdoc()
        seen["proxy"] = isinstance(proxy, UnlockedDocumentProxy)
        released.set()

        def apply():
            nolock_div.text = f"done proxy={seen['proxy']} hog_released={seen.get('hog_released')}"

        proxy.add_next_tick_callback(apply)

    doc.add_next_tick_callback(hog)
    doc.add_next_tick_callback(unlocked)

elif mode == "curdoc":
    curdoc_div = div("curdoc", "runs=0 ok=0 interleaved=0")
    # Per-application state shared by all sessions of this app.
    shared = context.server_context
    if not hasattr(shared, "curdoc_running"):
        shared.curdoc_running = set()
    stats = {"runs": 0, "ok": 0, "interleaved": 0}

    def check():
        if stats["runs"] >= 40:
            return
        before = curdoc()
        others_before = set(shared.curdoc_running)
        shared.curdoc_running.add(context.id)
        try:
            gevent.sleep(0.03)
        finally:
            shared.curdoc_running.discard(context.id)
        after = curdoc()
        stats["runs"] += 1
        stats["ok"] += before is doc and after is doc
        stats["interleaved"] += bool(others_before or shared.curdoc_running)
        curdoc_div.text = "runs={runs} ok={ok} interleaved={interleaved}".format(**stats)

    doc.add_periodic_callback(check, 20)

elif mode == "remove":
    self_div = div("self_removed", "0")
    removed_div = div("removed", "0")

    def self_removing():
        n = int(self_div.text) + 1
        self_div.text = str(n)
        if n == 3:
            doc.remove_periodic_callback(self_cb)

    def victim():
        n = int(removed_div.text) + 1
        removed_div.text = str(n)
        if n == 3:
            # Removed from another callback, not from itself.
            doc.add_timeout_callback(lambda: doc.remove_periodic_callback(victim_cb), 1)

    self_cb = doc.add_periodic_callback(self_removing, 20)
    victim_cb = doc.add_periodic_callback(victim, 20)

elif mode == "raise":

    def set_then_raise(attr, old, new):
        result.text = f"set before raise {new}"
        raise ValueError("on_change exploded on purpose")

    slider.on_change("value", set_then_raise)

elif mode == "addroot":

    def add_root(event):
        doc.add_root(Div(text="added by a callback", name="added"))

    button.on_event("button_click", add_root)

# Added last: Bokeh subscribes a model's on_event callbacks to the document
# only when the model joins it, so on_event must come first.
doc.add_root(slider)
doc.add_root(button)
doc.add_root(result)
