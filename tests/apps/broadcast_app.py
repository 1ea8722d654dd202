"""A subscriber of broadcasts, for tests/test_broadcast.py.

It subscribes to the topic given as its argument (``add_app(..., argv=[topic])``),
else ``numbers``. Each payload is
``{"n": <int>}``; the document keeps how many arrived (``count``), the last
``n`` (``last``) and a running hash of the ``n`` in arrival order
(``order``): sessions that got the same broadcasts in the same order show
the same three values, without the document growing with each one. The
``pid`` Div names the worker; the ``send`` button broadcasts ``{"n": -1}``
from the session's own callback. With page arguments ``publish_from=S``,
``publish_count=C`` and ``publish_rate=R`` the session also broadcasts
``{"n": S}`` ... ``{"n": S+C-1}`` from a periodic callback, R per second.
"""

import os
import sys

from bokeh.io import curdoc
from bokeh.models import Button, Div

import flask_docsync

TOPIC = sys.argv[1] if len(sys.argv) > 1 else "numbers"
MODULUS = 2**61 - 1

doc = curdoc()
count = Div(text="0", name="count")
last = Div(text="-", name="last")
order = Div(text="0", name="order")
send = Button(label="send", name="send")
# Before the button joins the document, which subscribes it to its events.
send.on_click(lambda: flask_docsync.broadcast(TOPIC, {"n": -1}))
doc.add_root(Div(text=str(os.getpid()), name="pid"))
for model in (count, last, order, send):
    doc.add_root(model)


def got(payload):
    count.text = str(int(count.text) + 1)
    last.text = str(payload["n"])
    order.text = str((int(order.text) * 1_000_003 + payload["n"] + 7) % MODULUS)


flask_docsync.subscribe(TOPIC, got)


def _argument(name, default):
    values = doc.session_context.request.arguments.get(name) if doc.session_context else None
    return int(values[0]) if values else default


_first, _count, _rate = _argument("publish_from", 0), _argument("publish_count", 0), _argument("publish_rate", 10)
if _count:
    _next = [_first]

    def _tick():
        flask_docsync.broadcast(TOPIC, {"n": _next[0]})
        _next[0] += 1
        if _next[0] >= _first + _count:
            doc.remove_periodic_callback(_ticker)

    _ticker = doc.add_periodic_callback(_tick, 1000 / _rate)
