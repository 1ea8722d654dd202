"""A live chart: a periodic callback streams numpy batches of a random walk.

Embedded by /dashboard with ``docsync_document("/streaming")``. Only the new
points cross the WebSocket (``source.stream``), as binary float64 buffers.
The tick reads its batch size from the site's config through
``current_app``: periodic callbacks run in the site's Flask app context.
"""

import html

import numpy as np
from bokeh.io import curdoc
from bokeh.layouts import column, row
from bokeh.models import Button, ColumnDataSource, Div
from bokeh.plotting import figure
from flask import current_app

ROLLOVER = 1000  # points kept in the document and in the browser

doc = curdoc()
user = doc.session_context.request.user
rng = np.random.default_rng()
state = {"t": 0, "y": 0.0, "rows": 0, "callback": None}

source = ColumnDataSource(data=dict(x=np.zeros(0), y=np.zeros(0)), name="stream")
plot = figure(height=250, width=760, title="Random walk", tools="xpan,xwheel_zoom,reset",
              name="stream_plot")
plot.x_range.follow = "end"
plot.x_range.follow_interval = ROLLOVER
plot.line("x", "y", source=source, line_width=2)

button = Button(label="Pause", button_type="warning", width=100, name="toggle")
rows = Div(text="rows: 0", name="rows", css_classes=["rows"])
status = Div(text=f"Streaming for {html.escape(user)}.", name="status", css_classes=["status"])


def tick():
    batch = current_app.config["STREAM_BATCH"]
    t0 = state["t"]
    x = np.arange(t0, t0 + batch, dtype=np.float64)
    y = state["y"] + np.cumsum(rng.normal(0.0, 1.0, batch))
    state["t"], state["y"] = t0 + batch, float(y[-1])
    state["rows"] = min(state["rows"] + batch, ROLLOVER)
    source.stream(dict(x=x, y=y), rollover=ROLLOVER)
    rows.text = f"rows: {state['rows']}"


def start():
    state["callback"] = doc.add_periodic_callback(tick, current_app.config["STREAM_PERIOD_MS"])


def toggle(event):
    if state["callback"] is not None:
        doc.remove_periodic_callback(state["callback"])
        state["callback"] = None
        button.label, button.button_type = "Resume", "success"
        status.text = f"Paused by {html.escape(user)}."
    else:
        start()
        button.label, button.button_type = "Pause", "warning"
        status.text = f"Streaming for {html.escape(user)}."
    current_app.logger.info("%s pressed %s", user, "resume" if state["callback"] else "pause")


button.on_event("button_click", toggle)
start()

doc.add_root(column(row(button, rows, status), plot))
doc.title = "Streaming"
