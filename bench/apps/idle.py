"""Bench app: a typical small dashboard that does nothing once served.

Used for the session lifecycle, page GET, memory per idle session and
session discard scenarios: a figure with a line and a scatter over 200
points, a slider and a Div, no callbacks.
"""
import numpy as np

from bokeh.io import curdoc
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, Div, Slider
from bokeh.plotting import figure

x = np.linspace(0, 10, 200)
source = ColumnDataSource(data=dict(x=x, y=np.sin(x)))
plot = figure(title="idle", width=500, height=300, name="plot")
plot.line("x", "y", source=source)
plot.scatter("x", "y", source=source, size=4)
slider = Slider(start=0, end=10, value=1, step=0.1, title="amplitude", name="slider")
info = Div(text="idle", name="info")
curdoc().add_root(column(slider, plot, info))
curdoc().title = "bench idle"
