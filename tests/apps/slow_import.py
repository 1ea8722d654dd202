"""A script app whose module body blocks for SLOW_IMPORT_SECONDS (default 3).

Under `flask-docsync serve` the standard library is monkey-patched, so
time.sleep yields to the event loop like any other blocking I/O would.
"""

import os
import time

from bokeh.io import curdoc
from bokeh.models import Div

time.sleep(float(os.environ.get("SLOW_IMPORT_SECONDS", "3")))
curdoc().add_root(Div(text="slow import done", name="slow"))
