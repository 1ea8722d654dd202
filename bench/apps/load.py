"""Bench app for bench/load.py: a numbered stream and a slider round trip in one document.

Streaming: setting the ``run`` Toggle active starts a 10 Hz periodic callback
that streams ``POINTS_PER_TICK`` points per tick into ``source``: ``x`` and
``y`` are numpy arrays (binary buffers, as in ``streaming.py``) and ``seq`` is
a plain list holding the tick number (0, 1, 2, ... per session), so each
ColumnsStreamed PATCH-DOC carries its sequence number in its JSON content.
Setting ``run`` inactive stops the callback and sets ``status.text`` to
``"stopped after <n>"`` (``n`` ticks streamed), so the client can check it
received every batch up to the last one.

Interaction: the ``slider``'s on_change sets ``result.text`` to
``"value=<v>"``, as in ``roundtrip.py``.

No figure: the load test is about holding and feeding 1,000 sessions, and a
plot would make each session's creation cost ~30 ms more of app script.
"""
import numpy as np

from bokeh.io import curdoc
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, Div, Slider, Toggle

POINTS_PER_TICK = 4
PERIOD_MS = 100
ROLLOVER = 200

doc = curdoc()
source = ColumnDataSource(data=dict(x=np.zeros(0), y=np.zeros(0), seq=[]), name="source")
run = Toggle(label="run", active=False, name="run")
status = Div(text="idle", name="status")
slider = Slider(start=0, end=10**9, value=0, step=1, title="value", name="slider")
result = Div(text="value=0", name="result")
state = {"tick": 0, "callback": None}


def tick():
    n = state["tick"]
    x = np.arange(n * POINTS_PER_TICK, (n + 1) * POINTS_PER_TICK, dtype=np.float64)
    source.stream(dict(x=x, y=np.sin(x / 50.0), seq=[n] * POINTS_PER_TICK), rollover=ROLLOVER)
    state["tick"] = n + 1


def on_run(attr, old, new):
    if new and state["callback"] is None:
        state["callback"] = doc.add_periodic_callback(tick, PERIOD_MS)
    elif not new and state["callback"] is not None:
        doc.remove_periodic_callback(state["callback"])
        state["callback"] = None
        status.text = f"stopped after {state['tick']}"


def on_value(attr, old, new):
    result.text = f"value={int(new)}"


run.on_change("active", on_run)
slider.on_change("value", on_value)
doc.add_root(column(run, status, slider, result))
doc.add_root(source)
doc.title = "bench load"
