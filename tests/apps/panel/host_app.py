"""A Flask site that imports Panel at the top, as a site using Panel elsewhere would."""

from pathlib import Path

import panel  # noqa: F401  (imported before flask_docsync builds the apps)
from flask import Flask

from flask_docsync import DocSync

HERE = Path(__file__).resolve().parent


def create_app() -> Flask:
    app = Flask(__name__)
    DocSync(app).add_app("/onload", str(HERE / "onload_app.py"))
    return app
