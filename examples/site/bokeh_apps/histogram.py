"""A histogram of the user's own sample, re-binned on the server.

The /report view creates this document itself with
``docsync.create_session("/histogram", arguments={"bins": ...})`` and sets
the ``heading`` Div and the plot title under ``session.locked()`` before
the page is sent.
"""

import html
import zlib

import numpy as np
from bokeh.io import curdoc
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, Div, Slider
from bokeh.plotting import figure
from flask import url_for

doc = curdoc()
request = doc.session_context.request
user = request.user

try:
    bins = min(max(int(request.arguments.get("bins", [b"20"])[0]), 5), 100)
except ValueError:
    bins = 20

# The same sample for the same user on every visit.
sample = np.random.default_rng(zlib.crc32(user.encode("utf-8"))).normal(50.0, 12.0, 2000)

source = ColumnDataSource(data=dict(left=[], right=[], top=[]), name="histogram")
plot = figure(height=300, width=600, title="Sample", tools="", name="plot")
plot.quad(left="left", right="right", bottom=0, top="top", source=source,
          fill_color="#9ecae1", line_color="white")

heading = Div(text="", name="heading")  # filled in by the /report view
slider = Slider(title="bins", value=bins, start=5, end=100, step=1, name="bins")
stats = Div(text="", name="stats", css_classes=["stats"])


def rebin(n):
    top, edges = np.histogram(sample, bins=n)
    source.data = dict(left=edges[:-1], right=edges[1:], top=top)
    # url_for works in callbacks: they run in the site's app context.
    link = url_for("report", bins=n, _external=False)
    stats.text = (f"bins={n}, tallest={top.max()}, mean={sample.mean():.1f}"
                  f' · <a class="permalink" href="{html.escape(link)}">link to this view</a>')


slider.on_change("value", lambda attr, old, new: rebin(new))
# Filled after the first render, from a callback, like any later change.
doc.add_next_tick_callback(lambda: rebin(slider.value))

doc.add_root(column(heading, slider, plot, stats))
doc.title = "Histogram"
