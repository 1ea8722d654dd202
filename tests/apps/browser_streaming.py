"""Streaming for the browser tests (tests/test_browser.py).

Every 100 ms the server streams ``BATCH`` rows of numpy float64 columns
(x counts 0, 1, 2, ... so the browser can check order and completeness)
into the ColumnDataSource named ``source``, drawn as a line; the Div named
``sent`` says how many rows the server has sent so far.
"""

import numpy as np

from bokeh.io import curdoc
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, Div
from bokeh.plotting import figure

BATCH = 3

doc = curdoc()
source = ColumnDataSource(
    data=dict(x=np.zeros(0, dtype=np.float64), y=np.zeros(0, dtype=np.float64)), name="source"
)
plot = figure(height=250, width=500, name="plot")
plot.line("x", "y", source=source)
sent = Div(text="sent=0", name="sent", css_classes=["sent"])
state = {"rows": 0}


def tick():
    start = state["rows"]
    x = np.arange(start, start + BATCH, dtype=np.float64)
    source.stream(dict(x=x, y=np.sin(x / 5.0)))
    state["rows"] = start + BATCH
    sent.text = f"sent={state['rows']}"


doc.add_periodic_callback(tick, 100)
doc.add_root(column(sent, plot, name="layout"))
doc.title = "Browser streaming"
