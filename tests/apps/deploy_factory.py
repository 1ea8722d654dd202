"""App factory of the deployment tests: ``gunicorn -k gevent 'deploy_factory:create_app()'``.

Configured from the environment, as a deployment would be:

- every ``DOCSYNC_*`` variable becomes the config key of the same name
  (``DOCSYNC_SECRET_KEY``, ``DOCSYNC_SESSION_TOKEN_EXPIRATION``, ...);
- ``DEPLOY_PROXY_FIX=1`` trusts one proxy's ``X-Forwarded-*`` headers,
  including ``X-Forwarded-Prefix`` (werkzeug's ProxyFix);
- ``DEPLOY_TRUSTED_HOSTS=a.example,b.example`` sets Flask's ``TRUSTED_HOSTS``;
- ``DEPLOY_HOOKS_FILE`` names a file that ``on_session_destroyed`` and
  ``on_server_unloaded`` append a line to (``session_destroyed ID PID``,
  ``server_unloaded PID``);
- ``DEPLOY_INSTANCE`` is shown in each document (which gunicorn instance).

Apps: ``/work`` (tests/apps/deploy_app.py) for anyone, and ``/private``, the
same document behind an ``authorize`` hook whose user is the ``X-User``
request header (no header: refused).
"""

import logging
import os

from bokeh.application import Application
from bokeh.application.handlers.function import FunctionHandler
from bokeh.application.handlers.lifecycle import LifecycleHandler
from flask import Flask, request

from deploy_app import make_document
from flask_docsync import DocSync


def _record(line):
    path = os.environ.get("DEPLOY_HOOKS_FILE")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def _application():
    hooks = LifecycleHandler()
    hooks._on_session_destroyed = lambda ctx: _record(f"session_destroyed {ctx.id} {os.getpid()}")
    hooks._on_server_unloaded = lambda ctx: _record(f"server_unloaded {os.getpid()}")
    return Application(FunctionHandler(make_document), hooks)


def authorize(route):
    if route != "/private":
        return True
    return request.headers.get("X-User") or None


def create_app():
    # The app's own log lines (flask_docsync's included) on stderr, as a
    # deployment would configure them; gunicorn only sets up its own loggers.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
    # No static folder of its own: with DocSync's URL prefix "" (the URLs of
    # bokeh serve) Flask's default /static route would shadow BokehJS's.
    app = Flask(__name__, static_folder=None)
    for key, value in os.environ.items():
        if key.startswith("DOCSYNC_") and value:
            app.config[key] = value
    if os.environ.get("DEPLOY_TRUSTED_HOSTS"):
        app.config["TRUSTED_HOSTS"] = os.environ["DEPLOY_TRUSTED_HOSTS"].split(",")
    docsync = DocSync(authorize=authorize, url_prefix="")
    docsync.add_app("/work", _application())
    docsync.add_app("/private", _application())
    docsync.init_app(app)
    if os.environ.get("DEPLOY_PROXY_FIX") == "1":
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1, x_prefix=1)

    @app.route("/health")
    def health():
        return f"ok {os.getpid()}"

    return app
