"""Bench app: a line plot fed by a periodic callback, 10 points per tick at 10 Hz.

The periodic callback starts when the client sets the ``run`` Toggle to
active (a PATCH-DOC), so hundreds of sessions can be set up before any of
them streams, and stops when it is set inactive again. Columns are numpy
arrays, so every ColumnsStreamed PATCH-DOC carries binary buffers.
"""
import numpy as np

from bokeh.io import curdoc
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, Toggle
from bokeh.plotting import figure

POINTS_PER_TICK = 10
PERIOD_MS = 100
ROLLOVER = 1000

doc = curdoc()
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
doc.add_root(column(run, plot))
doc.title = "bench streaming"
