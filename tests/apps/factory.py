"""An app factory for gunicorn tests: `gunicorn -k gevent 'factory:create_app()'`."""

import os

from bokeh.models import Div, Slider
from flask import Flask

from flask_docsync import DocSync
from flask_docsync.sock import Sock

docsync = DocSync(url_prefix="", keep_alive_ms=1000)

HERE = os.path.dirname(os.path.abspath(__file__))


@docsync.app("/fn")
def fn_app(doc):
    slider = Slider(start=0, end=10, value=1, name="slider")
    result = Div(text="value=1", name="result")
    slider.on_change("value", lambda attr, old, new: setattr(result, "text", f"value={new}"))
    doc.add_root(slider)
    doc.add_root(result)


def create_app():
    # BokehJS is served at /static (empty prefix), so the app has no static folder of its own.
    app = Flask(__name__, static_folder=None)
    if os.environ.get("TEST_SECRET"):
        app.config["DOCSYNC_SECRET_KEY"] = os.environ["TEST_SECRET"]
    if "/sliders" not in docsync.routes:
        docsync.add_app("/sliders", os.path.join(HERE, "sliders.py"))
    docsync.init_app(app)

    @app.route("/")
    def home():
        return "host app home"

    sock = Sock(app)

    @sock.route("/echo")
    def echo(ws):
        while True:
            message = ws.receive()
            ws.send(message)

    return app
