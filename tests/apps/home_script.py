"""A script app for `flask-docsync serve --num-procs N`: says which worker made its session.

Each run (one per session) appends "<pid> <session id>" to $HOME_LOG.
"""

import os

from bokeh.io import curdoc
from bokeh.models import Div, Slider

doc = curdoc()
doc.add_root(Div(text=str(os.getpid()), name="pid"))
doc.add_root(Slider(start=0, end=100, value=1, name="slider"))
if os.environ.get("HOME_LOG"):
    with open(os.environ["HOME_LOG"], "a", encoding="utf-8") as f:
        f.write(f"{os.getpid()} {doc.session_context.id}\n")
