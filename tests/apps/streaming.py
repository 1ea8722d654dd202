"""A streaming app for the tests: numpy float64 columns, streamed every 50 ms.

The initial columns are ``x = 0..4`` and ``y = x / 2``; every tick appends
the next ``x`` (and its ``y``) with numpy arrays, so the wire carries them
as binary buffers both in PULL-DOC-REPLY and in ColumnsStreamed events.
"""

import numpy as np
from bokeh.io import curdoc
from bokeh.models import ColumnDataSource
from bokeh.plotting import figure

doc = curdoc()
x = np.arange(5, dtype="float64")
source = ColumnDataSource(data={"x": x, "y": x / 2}, name="source")
plot = figure(name="plot", width=300, height=200)
plot.line("x", "y", source=source)

state = {"next": 5}


def tick():
    n = state["next"]
    state["next"] = n + 1
    source.stream({"x": np.array([n], dtype="float64"), "y": np.array([n / 2], dtype="float64")}, rollover=1000)


doc.add_periodic_callback(tick, 50)
doc.add_root(plot)
