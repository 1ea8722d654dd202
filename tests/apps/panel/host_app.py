"""A Flask site that imports Panel at the top, as a site using Panel elsewhere would.

``HOST_URL_PREFIX`` sets ``DOCSYNC_URL_PREFIX`` (default ``/docsync``).
``/site/dashboard`` is one of the site's own pages with both apps embedded.
"""

import os
from pathlib import Path

import panel  # noqa: F401  (imported before flask_docsync builds the apps)
from flask import Flask, render_template_string

from flask_docsync import DocSync

HERE = Path(__file__).resolve().parent

DASHBOARD = """<!doctype html>
<html><head><title>Dashboard</title>{{ docsync_resources() }}</head>
<body><h1>Our dashboard</h1>
<section class="onload">{{ docsync_document("/onload") }}</section>
<section class="assets">{{ docsync_document("/assets") }}</section>
</body></html>"""


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["DOCSYNC_URL_PREFIX"] = os.environ.get("HOST_URL_PREFIX", "/docsync")
    docsync = DocSync()
    docsync.add_app("/onload", str(HERE / "onload_app.py"))
    docsync.add_app("/assets", str(HERE / "assets_app.py"))
    docsync.init_app(app)

    @app.route("/site/dashboard")
    def dashboard() -> str:
        return render_template_string(DASHBOARD)

    return app
