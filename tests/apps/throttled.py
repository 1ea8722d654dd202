"""A slider whose ``value_throttled`` (a readonly property that BokehJS sets) drives a Div.

``slider.on_change("value_throttled", ...)`` is how Bokeh apps react only
when the user lets go of a slider, so patches to this readonly property
must reach Python.
"""

from bokeh.io import curdoc
from bokeh.layouts import column
from bokeh.models import Div, Slider

slider = Slider(start=0, end=100, value=1, step=1, title="value", name="slider")
throttled = Div(text="throttled=None", name="throttled")


def on_throttled(attr, old, new):
    throttled.text = f"throttled={new}"


slider.on_change("value_throttled", on_throttled)
curdoc().add_root(column(slider, throttled, name="layout"))
