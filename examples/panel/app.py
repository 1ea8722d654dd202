"""Panel apps inside a Flask site: one process, one port, the site's own login.

Run it with one command (gevent, monkey-patched first; see run.py)::

    python examples/panel/run.py               # http://127.0.0.1:5000/

or under gunicorn's gevent worker (more workers need DOCSYNC_SECRET_KEY,
which create_app sets for development)::

    gunicorn -k gevent -w 2 --chdir examples/panel 'app:create_app()'

Log in with any user name and the password ``docsync``. What it shows:

* Panel apps written as for ``panel serve`` (``.servable()`` scripts in
  ``panel_apps/``), registered with ``docsync.add_app``;
* the site's login reaching Panel: the ``authorize`` hook returns the user,
  and the apps read it as ``pn.state.user``;
* ``/dashboard``, one of the site's own Jinja pages, embedding two Panel
  apps (a streaming trend indicator and an editable Tabulator) with
  ``{{ docsync_resources() }}`` and ``{{ docsync_document(...) }}``;
* ``/docsync/report/``, a whole Panel template page (FastListTemplate).

Every script, stylesheet and bundle comes from this server, never a CDN.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from urllib.parse import urlsplit

from flask import Flask, redirect, render_template, request, session, url_for

from flask_docsync import DocSync

HERE = Path(__file__).resolve().parent
PANEL_APPS = HERE / "panel_apps"
PASSWORD = "docsync"


def current_user(route: str):
    """The ``authorize`` hook: the signed-in user, or a redirect to the login page."""
    user = session.get("user")
    if user is None:
        return redirect(url_for("login", next=request.full_path.rstrip("?")))
    return user


docsync = DocSync(authorize=current_user)
docsync.add_app("/orders", str(PANEL_APPS / "orders.py"))
docsync.add_app("/ticker", str(PANEL_APPS / "ticker.py"))
docsync.add_app("/report", str(PANEL_APPS / "report.py"))


def login_required(view):
    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        if not session.get("user"):
            return redirect(url_for("login", next=request.full_path.rstrip("?")))
        return view(*args, **kwargs)

    return wrapper


def _safe_next(target: str | None) -> str:
    """A path on this site to go to after logging in, never another host."""
    parts = urlsplit(target or "")
    if not target or parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return url_for("dashboard")
    return request.script_root + target


def create_app(config: dict | None = None) -> Flask:
    """The application factory; ``config`` overrides the development defaults."""
    app = Flask(__name__)
    app.config.from_mapping(
        # Development defaults: set real secrets in production. DOCSYNC_SECRET_KEY
        # signs session ids and tokens and must be the same in every worker.
        SECRET_KEY=os.environ.get("SECRET_KEY", "dev only: change me"),
        DOCSYNC_SECRET_KEY=os.environ.get("DOCSYNC_SECRET_KEY", "dev only: change me too"),
        SESSION_COOKIE_SAMESITE="Lax",
    )
    app.config.update(config or {})
    docsync.init_app(app)

    @app.route("/")
    def index():
        return redirect(url_for("dashboard"))

    @app.route("/login", methods=["GET", "POST"])
    def login():
        error = None
        if request.method == "POST":
            name = request.form.get("user", "").strip()
            if name and request.form.get("password") == PASSWORD:
                session["user"] = name
                return redirect(_safe_next(request.args.get("next")))
            error = "Any user name, and the password docsync."
        return render_template("login.html", error=error)

    @app.route("/logout")
    def logout():
        session.clear()
        return redirect(url_for("login"))

    @app.route("/dashboard")
    @login_required
    def dashboard():
        return render_template("dashboard.html", user=session["user"])

    return app
