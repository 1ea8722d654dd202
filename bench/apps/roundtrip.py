"""Bench app: a slider whose on_change callback rewrites a Div (interaction round trip).

The load client sends PATCH-DOC ``ModelChanged(slider.value = v)`` and waits
for the PATCH-DOC that sets ``result.text`` to ``"value=<v>"``.
"""
from bokeh.io import curdoc
from bokeh.layouts import column
from bokeh.models import Div, Slider

slider = Slider(start=0, end=10**9, value=0, step=1, title="value", name="slider")
result = Div(text="value=0", name="result")


def on_value(attr, old, new):
    result.text = f"value={int(new)}"


slider.on_change("value", on_value)
curdoc().add_root(column(slider, result))
curdoc().title = "bench roundtrip"
