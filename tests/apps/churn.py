"""A session that holds memory of its own and runs callbacks, for tests/test_memory_reclaim.py.

64 KiB of numpy data in a ColumnDataSource drawn by a figure (~0.3 MB of
Bokeh models in all), a slider whose ``on_change`` writes the Div
``result``, and a 2 Hz periodic callback counting into the Div ``ticks``:
the kinds of objects a discarded session leaves behind.
"""
import numpy as np

from bokeh.io import curdoc
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, Div, Slider
from bokeh.plotting import figure

N = 4096
source = ColumnDataSource(data=dict(x=np.arange(N, dtype=np.float64), y=np.random.random(N)), name="source")
plot = figure(width=400, height=200, name="plot")
plot.line("x", "y", source=source)
slider = Slider(start=0, end=100, value=1, step=1, title="value", name="slider")
result = Div(text="value=1", name="result")
ticks = Div(text="0", name="ticks")


def on_value(attr, old, new):
    result.text = f"value={new}"


def tick():
    ticks.text = str(int(ticks.text) + 1)


slider.on_change("value", on_value)
curdoc().add_periodic_callback(tick, 500)
curdoc().add_root(column(slider, plot, result, ticks))
