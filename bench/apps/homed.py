"""Bench app for ``bench/cluster.py``: which worker holds the session, and what its router did.

The document is the roundtrip app (a ``slider`` whose callback sets the
``result`` Div to ``"value=<v>"``) and the streaming app (a ``run`` Toggle
starting a 10 Hz periodic callback that streams 10 points into ``source``)
in one, plus a ``who`` Div holding JSON: the pid of the process that made
the session and that process's routing figures (``handed_over``,
``received``, ``adopted``; see ``flask_docsync/routing.py``), stamped when
the session is made and again whenever the client sets the ``probe``
slider. A WebSocket was handed over iff its owner's ``received`` went up
between the page GET and the probe (when connects are made one at a time).

Only meaningful under ``flask-docsync serve`` (it reads the Flask app's
DocSync server); elsewhere ``who`` has the pid alone.
"""
import json
import os

import numpy as np

from bokeh.io import curdoc
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, Div, Slider, Toggle
from bokeh.plotting import figure

POINTS_PER_TICK = 10
PERIOD_MS = 100
ROLLOVER = 1000

doc = curdoc()


def routing_figures():
    try:
        from flask import current_app

        server = current_app.extensions["docsync"]
        router = getattr(server, "router", None)
        figures = router.stats() if router is not None else server.stats()["routing"]
    except Exception as exc:  # not under flask-docsync, or no app context
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}
    return {k: figures.get(k) for k in ("tag", "active", "handed_over", "handover_failed", "received", "adopted")}


def stamp(probe):
    return json.dumps({"pid": os.getpid(), "probe": probe, **routing_figures()}, separators=(",", ":"))


# roundtrip
slider = Slider(start=0, end=10**9, value=0, step=1, title="value", name="slider")
result = Div(text="value=0", name="result")


def on_value(attr, old, new):
    result.text = f"value={int(new)}"


slider.on_change("value", on_value)

# streaming
source = ColumnDataSource(data=dict(x=np.zeros(0), y=np.zeros(0)), name="source")
plot = figure(width=600, height=250, tools="", toolbar_location=None, name="plot")
plot.line("x", "y", source=source)
run = Toggle(label="run", active=False, name="run")
state = {"t": 0, "callback": None}


def tick():
    t = state["t"]
    x = np.arange(t, t + POINTS_PER_TICK, dtype=np.float64)
    source.stream(dict(x=x, y=np.sin(x / 50.0)), rollover=ROLLOVER)
    state["t"] = t + POINTS_PER_TICK


def on_run(attr, old, new):
    if new and state["callback"] is None:
        state["callback"] = doc.add_periodic_callback(tick, PERIOD_MS)
    elif not new and state["callback"] is not None:
        doc.remove_periodic_callback(state["callback"])
        state["callback"] = None


run.on_change("active", on_run)

# who
probe = Slider(start=0, end=10**9, value=0, step=1, title="probe", name="probe")
who = Div(text=stamp(0), name="who")


def on_probe(attr, old, new):
    who.text = stamp(int(new))


probe.on_change("value", on_probe)

doc.add_root(column(slider, result, run, plot, probe, who))
doc.title = "bench homed"
