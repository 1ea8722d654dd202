"""An app factory for the "one home per session" tests: `gunicorn -k gevent 'home_app:create_app()'`.

The Bokeh app at ``/home`` says which worker made its session (the ``pid``
Div) and has a ``slider`` whose value tests set and read back. Its
``on_session_created`` hook appends ``"<pid> <session_id>\\n"`` to the file
named by ``$HOME_LOG`` (append mode: one small write, atomic across the
workers), ``on_session_destroyed`` the same line to ``$HOME_DESTROYED_LOG``,
so a test sees every session any worker made or discarded.

Settings come from the environment, read by :func:`create_app`:

- ``TEST_SECRET``: ``DOCSYNC_SECRET_KEY`` (signed session ids and tokens);
- ``HOME_TOKEN_EXPIRATION``: ``DOCSYNC_SESSION_TOKEN_EXPIRATION`` (seconds);
- ``HOME_UNUSED_LIFETIME_MS``: ``DOCSYNC_UNUSED_SESSION_LIFETIME_MS``;
- ``HOME_CHECK_UNUSED_MS``: ``DOCSYNC_CHECK_UNUSED_SESSIONS_MS``;
- ``HOME_KEEP_ALIVE_MS``: ``DOCSYNC_KEEP_ALIVE_MS`` (default 1000);
- ``HOME_REDIS_URL``, ``HOME_ADVERTISE_URL``: ``DOCSYNC_REDIS_URL`` and
  ``DOCSYNC_ADVERTISE_URL`` (hosts that route to each other), with the
  stats endpoint on.
"""

import os

from bokeh.application import Application
from bokeh.application.handlers.function import FunctionHandler
from bokeh.application.handlers.handler import Handler
from bokeh.models import Div, Slider
from flask import Flask, jsonify

from flask_docsync import DocSync

#: The slider's value in a fresh session.
INITIAL_VALUE = 1

docsync = DocSync(url_prefix="", keep_alive_ms=int(os.environ.get("HOME_KEEP_ALIVE_MS", "1000")))


def _append(variable, session_id):
    path = os.environ.get(variable)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {session_id}\n")


def modify_doc(doc):
    doc.add_root(Div(text=str(os.getpid()), name="pid"))
    slider = Slider(start=0, end=10_000, step=1, value=INITIAL_VALUE, title="value", name="slider")
    echo = Div(text="", name="echo")
    # A Python callback whose change the browser sees: a round trip.
    slider.on_change("value", lambda attr, old, new: setattr(echo, "text", f"echo {new}"))
    doc.add_root(slider)
    doc.add_root(echo)


class _Hooks(Handler):
    """Session lifecycle hooks that record which worker made or discarded which session."""

    def modify_document(self, doc):
        pass

    async def on_session_created(self, session_context):
        _append("HOME_LOG", session_context.id)

    async def on_session_destroyed(self, session_context):
        _append("HOME_DESTROYED_LOG", session_context.id)


def create_app():
    # BokehJS is served at /static (empty prefix), so the app has no static folder of its own.
    app = Flask(__name__, static_folder=None)
    if os.environ.get("TEST_SECRET"):
        app.config["DOCSYNC_SECRET_KEY"] = os.environ["TEST_SECRET"]
    for variable, key in (("HOME_TOKEN_EXPIRATION", "DOCSYNC_SESSION_TOKEN_EXPIRATION"),
                          ("HOME_UNUSED_LIFETIME_MS", "DOCSYNC_UNUSED_SESSION_LIFETIME_MS"),
                          ("HOME_CHECK_UNUSED_MS", "DOCSYNC_CHECK_UNUSED_SESSIONS_MS")):
        if os.environ.get(variable):
            app.config[key] = int(os.environ[variable])
    for variable, key in (("HOME_REDIS_URL", "DOCSYNC_REDIS_URL"), ("HOME_ADVERTISE_URL", "DOCSYNC_ADVERTISE_URL")):
        if os.environ.get(variable):
            app.config[key] = os.environ[variable]
            app.config["DOCSYNC_STATS_ENDPOINT"] = True
    docsync.init_app(app)
    if "/home" not in docsync.routes:
        docsync.add_app("/home", Application(FunctionHandler(modify_doc), _Hooks()))

    @app.route("/pid")
    def pid():
        return jsonify(pid=os.getpid())

    return app
