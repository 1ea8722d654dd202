"""A document of ``?kb=`` kilobytes (default 500), for tests of clients that do not read.

Every PULL-DOC-REPLY carries the Div ``blob`` whole. The slider's
callback sets the Div ``result`` to ``value=<v>``, as in sliders.py.
"""

from bokeh.io import curdoc
from bokeh.layouts import column
from bokeh.models import Div, Slider

doc = curdoc()
args = doc.session_context.request.arguments if doc.session_context else {}
size = int(args.get("kb", [b"500"])[0]) * 1000

slider = Slider(start=0, end=100, value=1, step=1, title="value", name="slider")
result = Div(text="value=1", name="result")
blob = Div(text="x" * size, name="blob")


def on_value(attr, old, new):
    result.text = f"value={new}"


slider.on_change("value", on_value)
doc.add_root(column(slider, result, blob))
