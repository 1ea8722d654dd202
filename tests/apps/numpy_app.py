"""A document with numpy columns (sent as binary buffers): a slider scales ``y``; the ``pid`` Div names the worker."""

import os
import numpy as np
from bokeh.io import curdoc
from bokeh.models import ColumnDataSource, Div, Slider
from bokeh.plotting import figure

x = np.arange(1000, dtype=np.float64)
source = ColumnDataSource(data={"x": x, "y": np.sin(x / 50.0)}, name="source")
p = figure(width=300, height=200)
p.line("x", "y", source=source)
slider = Slider(start=0, end=10, value=1, name="slider")
div = Div(text=str(os.getpid()), name="pid")
def scale(attr, old, new):
    source.data = {"x": x, "y": np.sin(x / 50.0) * new}
slider.on_change("value", scale)
for root in (div, slider, p):
    curdoc().add_root(root)
