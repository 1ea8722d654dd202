"""Broadcast latency app for bench/broadcast.py.

Each session shows the last broadcast it got as ``"<n>|<publish time>"``
in its ``last`` Div. A page opened with ``?publish=C&rate=R`` also
publishes ``C`` broadcasts, ``R`` per second, from a periodic callback.
``BENCH_BCAST=bokeh`` uses the ``bokeh serve`` recipe (bcast_registry.py);
otherwise ``flask_docsync.subscribe``/``broadcast``.
"""

import os
import time
from functools import partial

from bokeh.io import curdoc
from bokeh.models import Div

doc = curdoc()
last = Div(text="-", name="last")
doc.add_root(last)
args = doc.session_context.request.arguments if doc.session_context else {}


def show(payload):
    last.text = f"{payload['n']}|{payload['t']}"


if os.environ.get("BENCH_BCAST") == "bokeh":
    import bcast_registry

    bcast_registry.DOCS[doc] = show

    def publish(payload):
        for other, handler in list(bcast_registry.DOCS.items()):
            other.add_next_tick_callback(partial(handler, payload))
else:
    import flask_docsync

    flask_docsync.subscribe("bench", show)

    def publish(payload):
        flask_docsync.broadcast("bench", payload)


count = int(args["publish"][0]) if "publish" in args else 0
if count:
    rate = float(args["rate"][0]) if "rate" in args else 20.0
    sent = [0]

    def tick():
        publish({"n": sent[0], "t": time.time()})
        sent[0] += 1
        if sent[0] >= count:
            doc.remove_periodic_callback(ticker)

    ticker = doc.add_periodic_callback(tick, 1000 / rate)
