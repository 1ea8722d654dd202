"""A live chart: a random walk streamed from the server every 100 ms.

Serve it with::

    flask-docsync serve examples/apps/streaming.py

and open http://localhost:5006/streaming. A periodic callback appends a
numpy batch of points to the ColumnDataSource with ``stream`` (keeping the
last ``ROLLOVER`` points), so only the new points cross the WebSocket, as
binary float64 buffers. The button pauses and resumes the stream; the Div
counts the ticks.
"""

import numpy as np

from bokeh.io import curdoc
from bokeh.layouts import column, row
from bokeh.models import Button, ColumnDataSource, Div
from bokeh.plotting import figure

PERIOD_MS = 100
BATCH = 5  # points per tick
ROLLOVER = 500  # points kept in the browser and in the document

rng = np.random.default_rng()
state = {"t": 0, "y": 0.0, "ticks": 0, "running": True}

source = ColumnDataSource(
    data=dict(x=np.zeros(0, dtype=np.float64), y=np.zeros(0, dtype=np.float64)),
    name="source",
)

plot = figure(
    height=350, width=800, title="Random walk",
    tools="xpan,xwheel_zoom,reset,save", x_axis_label="sample", y_axis_label="value",
    name="plot",
)
plot.x_range.follow = "end"
plot.x_range.follow_interval = ROLLOVER
plot.x_range.range_padding = 0
plot.line("x", "y", source=source, line_width=2, color="#1f77b4")

button = Button(label="Pause", button_type="warning", width=120, name="toggle")
ticks = Div(text="ticks: 0", name="ticks", css_classes=["ticks"])


def tick():
    t0 = state["t"]
    x = np.arange(t0, t0 + BATCH, dtype=np.float64)
    y = state["y"] + np.cumsum(rng.normal(0.0, 1.0, BATCH))
    state["t"] = t0 + BATCH
    state["y"] = float(y[-1])
    state["ticks"] += 1
    source.stream(dict(x=x, y=y), rollover=ROLLOVER)
    ticks.text = f"ticks: {state['ticks']}"


doc = curdoc()
callback = doc.add_periodic_callback(tick, PERIOD_MS)


def toggle(event):
    global callback
    if state["running"]:
        doc.remove_periodic_callback(callback)
        button.label, button.button_type = "Resume", "success"
    else:
        callback = doc.add_periodic_callback(tick, PERIOD_MS)
        button.label, button.button_type = "Pause", "warning"
    state["running"] = not state["running"]


button.on_event("button_click", toggle)

doc.add_root(column(row(button, ticks), plot))
doc.title = "Streaming"
