"""The restore tests' app: `gunicorn -k gevent 'restore_app:create_app()'`, and ``full_app`` for unit tests.

``full_app`` has what the issue asks a restore to bring back: a slider whose
callback derives a text, a select that rebuilds a figure, the figure's
ranges (a zoom), a table whose cells the browser edits, and app-declared
state that a button's click changes. A ``pid`` Div names the worker that
built the document.

Settings from the environment, read by :func:`create_app`: ``TEST_SECRET``
(``DOCSYNC_SECRET_KEY``), ``TEST_REDIS_URL`` (``DOCSYNC_REDIS_URL``),
``RESTORE_FLUSH_MS`` (``DOCSYNC_RESTORE_FLUSH_MS``), ``RESTORE_UNUSED_LIFETIME_MS``
(``DOCSYNC_UNUSED_SESSION_LIFETIME_MS``), ``RESTORE_ADVERTISE_URL``
(``DOCSYNC_ADVERTISE_URL``: one of several hosts).
"""

from __future__ import annotations

import os

from bokeh.layouts import column
from bokeh.models import Button, ColumnDataSource, DataTable, Div, IntEditor, Range1d, Select, Slider, TableColumn
from bokeh.plotting import figure

from flask_docsync import restorable


def _figure(kind: str):
    p = figure(name="plot", title=kind, x_range=Range1d(0, 10, name="xr"), y_range=Range1d(0, 10, name="yr"), width=300, height=200)
    if kind == "line":
        p.line([1, 2, 3], [3, 1, 2], name="glyph")
    else:
        p.scatter([1, 2, 3], [3, 1, 2], name="glyph")
    return p


def full_app(doc):
    state = restorable(clicks=0)
    slider = Slider(start=0, end=100, step=1, value=1, title="value", name="slider")
    derived = Div(text="double: 2", name="derived")
    select = Select(options=["line", "scatter"], value="line", name="select")
    source = ColumnDataSource(data={"name": ["a", "b", "c"], "score": [1, 2, 3]}, name="source")
    table = DataTable(source=source, columns=[TableColumn(field="name"), TableColumn(field="score", editor=IntEditor())],
                      editable=True, name="table")
    clicks = Div(text=f"clicks: {state['clicks']}", name="clicks")
    pid = Div(text=str(os.getpid()), name="pid")
    button = Button(label="click", name="button")
    layout = column(slider, derived, select, _figure("line"), table, clicks, button, pid, name="layout")

    def on_slider(attr, old, new):
        derived.text = f"double: {new * 2}"

    def on_select(attr, old, new):
        layout.children[3] = _figure(new)

    def on_click():
        state["clicks"] += 1
        clicks.text = f"clicks: {state['clicks']}"

    slider.on_change("value", on_slider)
    select.on_change("value", on_select)
    button.on_click(on_click)
    doc.add_root(layout)


def create_app():
    import logging

    from flask import Flask, jsonify

    # The tests read what restore logs (restored, fresh because ...) in the server's output.
    logging.basicConfig(level=logging.INFO, format="%(process)d %(name)s %(levelname)s %(message)s")

    from flask_docsync import DocSync

    app = Flask(__name__, static_folder=None)
    app.config.update(
        DOCSYNC_SECRET_KEY=os.environ["TEST_SECRET"],
        DOCSYNC_REDIS_URL=os.environ["TEST_REDIS_URL"],
        DOCSYNC_RESTORE_SESSIONS=True,
        DOCSYNC_RESTORE_FLUSH_MS=int(os.environ.get("RESTORE_FLUSH_MS", "200")),
        DOCSYNC_KEEP_ALIVE_MS=1000,
        # Unused sessions are discarded (and their saved data deleted) after
        # this; the stampede test's pages wait longer than the default 15 s.
        DOCSYNC_UNUSED_SESSION_LIFETIME_MS=int(os.environ.get("RESTORE_UNUSED_LIFETIME_MS", "15000")),
    )
    if os.environ.get("RESTORE_ADVERTISE_URL"):
        app.config["DOCSYNC_ADVERTISE_URL"] = os.environ["RESTORE_ADVERTISE_URL"]
    docsync = DocSync(app, url_prefix="")
    docsync.add_app("/restore", full_app)

    @app.route("/pid")
    def pid():
        return jsonify(pid=os.getpid())

    @app.route("/restore-stats")
    def stats():
        return jsonify(app.extensions["docsync"].stats()["restore"])

    return app
