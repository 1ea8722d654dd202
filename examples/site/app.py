"""A small Flask site with live Bokeh documents in its own pages.

Run it with one command (gevent, monkey-patched first; see run.py)::

    python examples/site/run.py                 # http://127.0.0.1:5000/

or under gunicorn's gevent worker::

    gunicorn -k gevent 'examples.site.app:create_app()'
    gunicorn -k gevent --chdir examples/site 'app:create_app()'

Log in with any user name and the password ``docsync``. What it shows:

* ``DocSync(authorize=...)`` ties the Bokeh sessions to the site's own
  login: the hook returns the user name from ``flask.session``, the apps
  read it as ``session_context.request.user``, and a logged-out browser
  gets no document, no token and no WebSocket.
* ``/dashboard`` embeds two documents among ordinary HTML with
  ``{{ docsync_document(route, arguments=...) }}``.
* ``/report`` creates its document in the view with
  ``docsync.create_session(...)``, changes it under ``session.locked()``,
  then embeds it with ``{{ docsync_session(session) }}``.

This module imports nothing relative, so it works both as
``examples.site.app`` and as a top-level ``app`` (``--chdir``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from urllib.parse import urlsplit

from flask import Flask, abort, flash, redirect, render_template, request, session, url_for
from markupsafe import escape

from flask_docsync import DocSync

HERE = Path(__file__).resolve().parent
BOKEH_APPS = HERE / "bokeh_apps"

#: The demo password; any user name is accepted.
PASSWORD = "docsync"

#: Line colours a user can pick; the sliders app gets the hex value.
COLORS = {
    "blue": "#1f77b4",
    "orange": "#ff7f0e",
    "green": "#2ca02c",
    "red": "#d62728",
    "purple": "#9467bd",
}


def current_user(route: str) -> str | None:
    """The ``authorize`` hook: who may open a document.

    Called by flask-docsync in the request context of every page, embed,
    ``autoload.js``, metadata and WebSocket request. A user name (any truthy
    value) allows, and the Bokeh app sees it as
    ``curdoc().session_context.request.user``; ``None`` refuses (403, and an
    empty placeholder where a template embeds the document).
    """
    return session.get("user")


docsync = DocSync(authorize=current_user)
# Script apps: each session runs the script afresh, as `bokeh serve` does.
docsync.add_app("/sliders", str(BOKEH_APPS / "sliders.py"))
docsync.add_app("/streaming", str(BOKEH_APPS / "streaming.py"))
docsync.add_app("/histogram", str(BOKEH_APPS / "histogram.py"))


def login_required(view):
    """The site's own guard for its pages (flask-docsync guards the documents)."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        if not session.get("user"):
            # Relative to the site root, so it survives a URL prefix.
            return redirect(url_for("login", next=request.full_path.rstrip("?")))
        return view(*args, **kwargs)

    return wrapper


def _safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this site, never another host."""
    if not target:
        return url_for("dashboard")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return url_for("dashboard")
    return request.script_root + target


def create_app(config: dict | None = None) -> Flask:
    """The application factory.

    Settings, lowest to highest priority: the defaults below, ``SECRET_KEY``,
    ``TRUSTED_HOSTS`` (comma-separated, e.g. ``example.com,www.example.com``)
    and any ``DOCSYNC_*`` environment variable (e.g.
    ``DOCSYNC_ALLOW_WEBSOCKET_ORIGIN=partner.example:443``), then ``config``.
    """
    app = Flask(__name__)
    app.config.from_mapping(
        # Both keys are development defaults: set real secrets in production.
        # SECRET_KEY signs Flask's session cookie (the login); DOCSYNC_SECRET_KEY
        # signs Bokeh session ids and tokens, and must be the same in every
        # worker process.
        SECRET_KEY=os.environ.get("SECRET_KEY", "dev only: change me"),
        DOCSYNC_SECRET_KEY="dev only: change me too",
        # Lax cookies still reach the WebSocket of a same-site page.
        SESSION_COOKIE_SAMESITE="Lax",
        # Read by the streaming app through current_app.config.
        STREAM_PERIOD_MS=200,
        STREAM_BATCH=10,
    )
    if os.environ.get("TRUSTED_HOSTS"):
        # The names the site is served under: Flask refuses requests for any
        # other Host, and only pages under these names may open their
        # documents' WebSockets (without it, only those at localhost or
        # 127.0.0.1 may). A DNS-rebinding page's name is never one of them.
        app.config["TRUSTED_HOSTS"] = [h.strip() for h in os.environ["TRUSTED_HOSTS"].split(",") if h.strip()]
    app.config.update({k: v for k, v in os.environ.items() if k.startswith("DOCSYNC_")})
    app.config.update(config or {})
    docsync.init_app(app)

    @app.context_processor
    def site_globals():
        return {"user": session.get("user"), "colors": COLORS}

    @app.route("/")
    def index():
        return render_template("index.html")

    @app.route("/login", methods=["GET", "POST"])
    def login():
        if request.method == "POST":
            name = request.form.get("username", "").strip()
            if name and request.form.get("password") == PASSWORD:
                session.clear()
                session["user"] = name
                session["color"] = request.form.get("color") if request.form.get("color") in COLORS else "blue"
                return redirect(_safe_next(request.args.get("next")))
            flash("Wrong user name or password (the password is “docsync”).")
        return render_template("login.html", next=request.args.get("next", ""))

    @app.route("/logout")
    def logout():
        session.clear()
        return redirect(url_for("index"))

    @app.route("/dashboard")
    @login_required
    def dashboard():
        # ?color=red overrides the preference chosen at login, for this view.
        name = request.args.get("color")
        name = name if name in COLORS else session.get("color", "blue")
        return render_template("dashboard.html", color_name=name, color=COLORS[name])

    @app.route("/report")
    @login_required
    def report():
        bins = request.args.get("bins", "20")
        if not bins.isdigit():
            abort(400)
        # The document is created here, in-process, for this request. The
        # authorize hook runs too; the app sees arguments as lists of bytes.
        doc_session = docsync.create_session("/histogram", arguments={"bins": bins})
        # Change it before the page is sent: under the session's lock, as a
        # callback would. (Div text is HTML, so escape what users typed.)
        with doc_session.locked() as doc:
            doc.get_model_by_name("heading").text = f"<h2>Report for {escape(session['user'])}</h2>"
            doc.get_model_by_name("plot").title.text = f"Sample of {session['user']}"
        return render_template("report.html", doc_session=doc_session)

    return app
