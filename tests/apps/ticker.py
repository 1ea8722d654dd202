"""Session callbacks of every kind, for tests/test_leaks.py.

A 10 ms periodic callback streams numpy rows into ``source`` (binary
buffers on the wire) and counts its runs in ``count``; a next-tick and a
20 ms timeout callback set ``once``; an on_change callback and a
``connection_lost`` handler are registered too. Sessions of this app are
opened, watched until the periodic callback has run, and left to be reaped.
"""

import numpy as np
from bokeh.io import curdoc
from bokeh.models import ColumnDataSource, Div, Slider

doc = curdoc()
count = Div(text="0", name="count")
once = Div(text="", name="once")
slider = Slider(start=0, end=10, value=1, name="slider")
source = ColumnDataSource(data={"x": np.zeros(0), "y": np.zeros(0)}, name="source")
state = {"n": 0}


def tick():
    state["n"] += 1
    count.text = str(state["n"])
    x = np.arange(state["n"], state["n"] + 2, dtype="float64")
    source.stream({"x": x, "y": x * 2}, rollover=50)


doc.add_periodic_callback(tick, 10)
doc.add_next_tick_callback(lambda: setattr(once, "text", once.text + "tick "))
doc.add_timeout_callback(lambda: setattr(once, "text", once.text + "timeout "), 20)
slider.on_change("value", lambda attr, old, new: setattr(once, "text", f"value={new}"))
doc.on_event("connection_lost", lambda event: None)
for root in (count, once, slider, source):
    doc.add_root(root)
