"""The document of the deployment tests (tests/test_deploy.py).

Served as a script (``flask-docsync serve tests/apps/deploy_app.py``) and as
a function by ``tests/apps/deploy_factory.py`` under gunicorn. Every model a
test looks at has a ``name``:

- ``pid``/``instance``: which worker process (and which gunicorn instance,
  ``$DEPLOY_INSTANCE``) made this session's document;
- ``slider`` -> ``result``: the patch round trip (``value=N``);
- ``command``: setting its value runs a command on the server, reported in
  ``status`` when done:

  ``sleep``        ``time.sleep(2)`` inside the PATCH-DOC (blocking I/O);
  ``read:PORT``    a blocking socket read from 127.0.0.1:PORT until the
                   test sends a line (blocking I/O, ended by the test);
  ``busy``         a next-tick callback ``busy_cpu`` that computes for 2 s
                   without yielding (must be reported as blocking the loop);
  ``offload``      a next-tick callback ``offload_cpu`` doing the same work
                   through ``flask_docsync.offload``, without the document
                   lock (must not be reported; the session stays responsive).
"""

import os
import socket
import time

from bokeh.document import without_document_lock
from bokeh.io import curdoc
from bokeh.layouts import column
from bokeh.models import Div, Slider, TextInput

from flask_docsync import offload

CPU_SECONDS = 2.0


def spin(seconds):
    """Pure-Python CPU work that never yields to gevent."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def make_document(doc):
    pid = Div(text=str(os.getpid()), name="pid", css_classes=["pid"])
    instance = Div(text=os.environ.get("DEPLOY_INSTANCE", ""), name="instance", css_classes=["instance"])
    slider = Slider(start=0, end=100, value=1, step=1, title="value", name="slider")
    result = Div(text="value=1", name="result", css_classes=["result"])
    command = TextInput(value="", name="command")
    status = Div(text="idle", name="status", css_classes=["status"])

    def on_value(attr, old, new):
        result.text = f"value={new}"

    def busy_cpu():
        spin(CPU_SECONDS)
        status.text = "busy done"

    @without_document_lock  # the README's pattern: the session keeps answering meanwhile
    def offload_cpu():
        offload(spin, CPU_SECONDS)
        doc.add_next_tick_callback(lambda: setattr(status, "text", "offload done"))

    def on_command(attr, old, new):
        if new == "sleep":
            time.sleep(2)  # gevent-patched: yields to every other session
            status.text = "slept"
        elif new.startswith("read:"):
            with socket.create_connection(("127.0.0.1", int(new.split(":")[1])), timeout=60) as s:
                data = s.makefile("rb").readline()  # blocks until the test writes
            status.text = "read=" + data.decode().strip()
        elif new == "busy":
            doc.add_next_tick_callback(busy_cpu)
        elif new == "offload":
            doc.add_next_tick_callback(offload_cpu)

    slider.on_change("value", on_value)
    command.on_change("value", on_command)
    doc.add_root(column(pid, instance, slider, result, command, status, name="layout"))
    doc.title = "Deploy test"


if __name__.startswith("bokeh_app_"):  # run as a script by flask-docsync serve
    make_document(curdoc())
