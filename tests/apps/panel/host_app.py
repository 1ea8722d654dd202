"""A Flask site that imports Panel at the top, as a site using Panel elsewhere would.

``HOST_URL_PREFIX`` sets ``DOCSYNC_URL_PREFIX`` (default ``/docsync``).
``/site/dashboard`` is one of the site's own pages with both apps embedded.
``/state`` needs a login (``/site/login?name=...``); the authorize hook gives
the app the site's user, which Panel shows as ``pn.state.user``. The task of
docsync_tasks.py is scheduled with ``pn.state.schedule_task`` here, in the
factory, as a Flask site would.
"""

import os
import sys
from pathlib import Path

import panel  # noqa: F401  (imported before flask_docsync builds the apps)
from flask import Flask, redirect, render_template_string, request, session, url_for

from flask_docsync import DocSync

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import docsync_tasks  # noqa: E402

DASHBOARD = """<!doctype html>
<html><head><title>Dashboard</title>{{ docsync_resources() }}</head>
<body><h1>Our dashboard</h1>
<section class="onload">{{ docsync_document("/onload") }}</section>
<section class="assets">{{ docsync_document("/assets") }}</section>
</body></html>"""


def authorize(route: str):
    if route != "/state":
        return True
    user = session.get("user")
    if user is None:
        return redirect(url_for("login", next=request.full_path))
    return {"username": user, "email": f"{user}@example.org"}


def create_app() -> Flask:
    app = Flask(__name__)
    app.secret_key = "not a secret: tests only"
    app.config["DOCSYNC_URL_PREFIX"] = os.environ.get("HOST_URL_PREFIX", "/docsync")
    docsync = DocSync(authorize=authorize)
    docsync.add_app("/onload", str(HERE / "onload_app.py"))
    docsync.add_app("/assets", str(HERE / "assets_app.py"))
    docsync.add_app("/state", str(HERE / "state_app.py"))
    docsync.add_app("/template", str(HERE / "template_app.py"))
    docsync.add_app("/notebook", str(HERE / "notebook_cells.ipynb"))
    docsync.add_app("/notes", str(HERE / "notes_app.md"))
    # pn.serve's other targets: a function without arguments, and a Panel object.
    docsync.add_app("/function", lambda: panel.Column(panel.pane.Markdown("made by a function")))
    docsync.add_app("/object", panel.pane.Markdown("one object, a copy per session"))
    docsync.init_app(app)
    docsync_tasks.schedule()

    @app.route("/site/login")
    def login():
        session["user"] = request.args["name"]
        return redirect(request.args.get("next") or "/site/dashboard")

    @app.route("/site/dashboard")
    def dashboard() -> str:
        return render_template_string(DASHBOARD)

    return app
