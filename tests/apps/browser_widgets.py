"""Widgets for the browser tests (tests/test_browser.py).

Every model the tests locate has a ``name`` (for BokehJS's
``doc.get_model_by_name``) and a CSS class (for DOM locators): the slider's
value is echoed by the server into ``.result``, button clicks are counted
into ``.clicks``, and the connection events the server sees (a WebSocket
that went away, a client that came back) are counted into ``.connection``.
"""

from bokeh.io import curdoc
from bokeh.layouts import column
from bokeh.models import Button, Div, Slider

doc = curdoc()

slider = Slider(start=0, end=100, value=1, step=1, title="value", name="slider", css_classes=["slider"])
button = Button(label="click", name="button", css_classes=["button"])
result = Div(text="value=1", name="result", css_classes=["result"])
clicks = Div(text="clicks=0", name="clicks", css_classes=["clicks"])
connection = Div(text="lost=0 reconnected=0", name="connection", css_classes=["connection"])
counts = {"clicks": 0, "lost": 0, "reconnected": 0}


def on_value(attr, old, new):
    result.text = f"value={new}"


def on_click(event):
    counts["clicks"] += 1
    clicks.text = f"clicks={counts['clicks']}"


def on_connection(event):
    key = "lost" if event.event_name == "connection_lost" else "reconnected"
    counts[key] += 1
    connection.text = f"lost={counts['lost']} reconnected={counts['reconnected']}"


slider.on_change("value", on_value)
button.on_event("button_click", on_click)
doc.on_event("connection_lost", on_connection)
doc.on_event("client_reconnected", on_connection)
doc.add_root(column(slider, button, result, clicks, connection, name="layout"))
doc.title = "Browser widgets"
