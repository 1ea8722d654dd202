"""A widget app for the tests: a slider and a button whose callbacks update a Div."""

from bokeh.io import curdoc
from bokeh.layouts import column
from bokeh.models import Button, Div, Slider

doc = curdoc()
args = doc.session_context.request.arguments if doc.session_context else {}
start = int(args.get("start", [b"1"])[0])

slider = Slider(start=0, end=100, value=start, step=1, title="value", name="slider")
button = Button(label="click", name="button")
result = Div(text=f"value={start}", name="result")
clicks = Div(text="clicks=0", name="clicks")


def on_value(attr, old, new):
    result.text = f"value={new}"


def on_click(event):
    n = int(clicks.text.split("=")[1]) + 1
    clicks.text = f"clicks={n}"


slider.on_change("value", on_value)
button.on_event("button_click", on_click)
doc.add_root(column(slider, button, result, clicks, name="layout"))
doc.title = "Sliders test"
