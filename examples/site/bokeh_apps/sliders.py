"""A sine wave the server recomputes when a slider moves.

Embedded by /dashboard with ``docsync_document("/sliders", arguments={"color": ...})``;
also served alone at /docsync/sliders. Reads:

* ``request.user``: what the site's ``authorize`` hook returned (the user name);
* ``request.arguments["color"]``: the line colour, as a list of bytes.

The callback builds a link with ``url_for``: callbacks run in the Flask app
context of the site, bound to the URL (and prefix) the page was served under.
"""

import html
import re

import numpy as np
from bokeh.io import curdoc
from bokeh.layouts import column, row
from bokeh.models import ColumnDataSource, Div, Slider
from bokeh.plotting import figure
from flask import url_for

doc = curdoc()
request = doc.session_context.request
user = request.user

# Arguments come from the page (and so maybe from a user): check them.
color = request.arguments.get("color", [b""])[0].decode("utf-8", "replace")
if not re.fullmatch(r"#[0-9a-fA-F]{6}", color):
    color = "#1f77b4"

N = 200
x = np.linspace(0, 4 * np.pi, N)
source = ColumnDataSource(data=dict(x=x, y=np.sin(x)), name="wave")

plot = figure(height=300, width=500, title=f"{user}'s sine wave", x_range=(0, 4 * np.pi),
              y_range=(-5.5, 5.5), tools="pan,wheel_zoom,reset,save", name="wave_plot")
plot.line("x", "y", source=source, line_width=3, line_color=color, name="line")

amplitude = Slider(title="amplitude", value=1.0, start=0.1, end=5.0, step=0.1, width=240, name="amplitude")
frequency = Slider(title="frequency", value=1.0, start=0.1, end=5.0, step=0.1, width=240, name="frequency")
summary = Div(text="Move a slider.", name="summary", css_classes=["summary"])


def update(attr, old, new):
    a, k = amplitude.value, frequency.value
    y = a * np.sin(k * x)
    source.data = dict(x=x, y=y)
    # A link to this app on its own page, with the same colour: url_for
    # knows the site's routes, the docsync blueprint and any URL prefix
    # (outside a request, Flask makes URLs external unless told otherwise).
    own_page = url_for("docsync.page", app_path="sliders", color=color, _external=False)
    summary.text = (
        f"{html.escape(user)}: amplitude {a:.1f}, frequency {k:.1f}, peak {np.abs(y).max():.2f}."
        f' <a class="own-page" href="{html.escape(own_page)}">Open on its own page</a>'
    )


amplitude.on_change("value", update)
frequency.on_change("value", update)

doc.add_root(row(column(amplitude, frequency, summary, width=260), plot))
doc.title = "Sliders"
