"""Streams big patches for tests/test_slow_clients.py.

Once a client has set the Div ``marker`` to some text (which also lets it
recognise its session when it reconnects), every 50 ms (20 Hz) the Div
``blob`` gets a new text of ``?kb=`` kilobytes (default 50), so each
connected client is sent one PATCH-DOC of that size per tick; ``ticks``
counts them.
"""

from bokeh.io import curdoc
from bokeh.models import Div

doc = curdoc()
args = doc.session_context.request.arguments
size = int(args.get("kb", [b"50"])[0]) * 1000

blob = Div(text="", name="blob")
ticks = Div(text="0", name="ticks")
marker = Div(text="", name="marker")
filler = "x" * size


def tick():
    if not marker.text:
        return
    n = int(ticks.text) + 1
    ticks.text = str(n)
    blob.text = f"{n:012d}" + filler[12:]


doc.add_periodic_callback(tick, 50)
for root in (ticks, marker, blob):
    doc.add_root(root)
