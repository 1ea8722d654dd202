"""An app factory for the headless-Chromium "one home per session" test
(tests/test_browser_home.py): `gunicorn -k gevent -w 4 'home_browser_app:create_app()'`.

The Bokeh app at ``/plot`` draws a line and scatter over a ColumnDataSource
(``source``) with numpy float64 columns ``x = 0, 1, ..., N-1`` and
``y = value * x``; numpy columns travel as binary buffers, also in the
PULL-DOC-REPLY BokehJS asks for after a reconnect. Its models, by name:

- ``pid``: the pid of the worker that made the session;
- ``slider``: a Slider, ``INITIAL_VALUE`` in a fresh session;
- ``echo``: ``"value=<v>"``, set by the server's ``on_change`` of the slider,
  which also sets ``y = v * x``;
- ``history``: ``"<old>-><new> pid=<pid>"``, also set by that callback: what
  the *server's* session held before the change and which worker ran it, so
  a test sees the server's state even where the browser's copy of the
  document went stale.

``SIGNAL`` (SIGUSR2) sent to a worker aborts every WebSocket connection
that worker serves (its end shut down at once, no close frame), the worker
and its sessions living on: a server-side connection loss that is not a
worker stop. The worker then stays busy for ``BUSY_S`` seconds (a blocking
sleep, as a long callback would), so it accepts nothing meanwhile: a client
reconnecting at once (BokehJS's first retry) is accepted by one of the
other workers, never by chance by the session's own. Each abort is logged
as ``"aborted <n> connection(s) in <pid>"`` on stdout.

gunicorn's worker (workers/base.py ``Worker.init_signals``) resets USR2 to
its default and installs no handler for it (it handles QUIT, TERM, INT,
WINCH, USR1 and ABRT; USR2 is the arbiter's re-exec signal, sent to the
arbiter only), and it runs before the app is loaded, so the handler
installed here in :func:`create_app` is neither overridden nor competing.

``TEST_SECRET`` in the environment is ``DOCSYNC_SECRET_KEY``.
"""

import os
import signal

import gevent
import gevent.monkey
import numpy as np
from bokeh.application import Application
from bokeh.application.handlers.function import FunctionHandler
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, Div, Slider
from bokeh.plotting import figure
from flask import Flask, jsonify

from flask_docsync import DocSync

#: The slider's value in a fresh session.
INITIAL_VALUE = 1
#: Rows of the numpy columns.
ROWS = 64
#: What a test sends a worker to abort its WebSocket connections.
SIGNAL = signal.SIGUSR2
#: How long (seconds) a worker stays busy after aborting its connections;
#: well under the hand-over timeout (flask_docsync.handover.TIMEOUT, 5 s),
#: so a connection handed to it meanwhile waits for it.
BUSY_S = 1.0

#: time.sleep as it was before gevent patched it: blocks the whole worker.
_blocking_sleep = gevent.monkey.get_original("time", "sleep")

docsync = DocSync(url_prefix="", keep_alive_ms=1000)


def columns(value):
    x = np.arange(ROWS, dtype=np.float64)
    return {"x": x, "y": x * float(value)}


def modify_doc(doc):
    source = ColumnDataSource(data=columns(INITIAL_VALUE), name="source")
    plot = figure(height=250, width=500, name="plot")
    plot.line("x", "y", source=source)
    plot.scatter("x", "y", source=source, size=4)
    pid = Div(text=str(os.getpid()), name="pid", css_classes=["pid"])
    slider = Slider(start=0, end=10_000, step=1, value=INITIAL_VALUE, title="value", name="slider")
    echo = Div(text=f"value={INITIAL_VALUE}", name="echo", css_classes=["echo"])
    history = Div(text="", name="history", css_classes=["history"])

    def changed(attr, old, new):
        source.data = columns(new)
        echo.text = f"value={new}"
        history.text = f"{old}->{new} pid={os.getpid()}"

    slider.on_change("value", changed)
    doc.add_root(column(pid, slider, echo, history, plot, name="layout"))
    doc.title = "Home browser"


def _abort_connections(app):
    connections = list(docsync.server(app).connections)
    for connection in connections:
        connection.ws.abort()
    print(f"aborted {len(connections)} connection(s) in {os.getpid()}", flush=True)
    _blocking_sleep(BUSY_S)


def create_app():
    # BokehJS is served at /static (empty prefix), so the app has no static folder of its own.
    app = Flask(__name__, static_folder=None)
    if os.environ.get("TEST_SECRET"):
        app.config["DOCSYNC_SECRET_KEY"] = os.environ["TEST_SECRET"]
    docsync.init_app(app)
    if "/plot" not in docsync.routes:
        docsync.add_app("/plot", Application(FunctionHandler(modify_doc)))

    # Run in a greenlet of the worker's hub, so aborting is safe there.
    gevent.signal_handler(SIGNAL, _abort_connections, app)

    @app.route("/pid")
    def pid():
        return jsonify(pid=os.getpid())

    @app.route("/favicon.ico")
    def favicon():
        return "", 204  # Chromium asks for one; a 404 would be a console error

    return app
