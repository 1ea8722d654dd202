"""Bench app: a session that allocates ~64 KiB of its own and has callbacks.

Used by ``bench/churn.py`` for memory after many connect / pull / close
cycles: a ColumnDataSource of two columns of 4,096 float64 values (64 KiB
of numpy data per session), a slider whose ``on_change`` writes a Div, and
a 4 Hz periodic callback that counts ticks into the Div, so every
discarded session leaves the kinds of reference cycles a real app leaves.
"""
import numpy as np

from bokeh.io import curdoc
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, Div, Slider
from bokeh.plotting import figure

N = 4096

source = ColumnDataSource(data=dict(x=np.arange(N, dtype=np.float64), y=np.random.random(N)), name="source")
plot = figure(title="churn", width=400, height=200, name="plot")
plot.line("x", "y", source=source)
slider = Slider(start=0, end=10, value=1, step=1, title="scale", name="slider")
info = Div(text="ticks=0", name="info")
ticks = 0


def on_scale(attr, old, new):
    info.text = f"scale={new}"


def tick():
    global ticks
    ticks += 1
    info.text = f"ticks={ticks}"


slider.on_change("value", on_scale)
curdoc().add_periodic_callback(tick, 250)
curdoc().add_root(column(slider, plot, info))
curdoc().title = "bench churn"
