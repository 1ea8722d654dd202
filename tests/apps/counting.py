"""Counts its own runs: appends the session id to $COUNT_FILE each time a session is created.

The gevent.sleep keeps the creation in flight for a while, so concurrent
WebSocket opens for one new session id really overlap it.
"""

import os

import gevent
from bokeh.io import curdoc
from bokeh.models import Div

doc = curdoc()
with open(os.environ["COUNT_FILE"], "a", encoding="utf-8") as f:
    f.write(doc.session_context.id + "\n")
gevent.sleep(0.3)
doc.add_root(Div(text="counted", name="counted"))
