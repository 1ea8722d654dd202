"""Run the example site on gevent's WSGI server: ``python examples/site/run.py``.

Environment:

* ``PORT`` (default 5000) and ``HOST`` (default 127.0.0.1);
* ``SCRIPT_NAME``, e.g. ``/corp``: serve the whole site under that URL
  prefix (what a reverse proxy forwarding ``/corp/`` to this server needs);
* ``SECRET_KEY``, ``TRUSTED_HOSTS`` (e.g. ``example.com``: needed for
  pages served under any name but localhost's), ``DOCSYNC_*`` (e.g.
  ``DOCSYNC_SECRET_KEY``, ``DOCSYNC_ALLOW_WEBSOCKET_ORIGIN=partner.example:443``):
  read by create_app().
"""

# gevent first: monkey-patching must happen before Flask, bokeh or anything
# else imports socket, ssl or threading.
from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402
from werkzeug.exceptions import NotFound  # noqa: E402
from werkzeug.middleware.dispatcher import DispatcherMiddleware  # noqa: E402
from werkzeug.utils import redirect  # noqa: E402

try:
    import flask_docsync  # noqa: F401
except ImportError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

if __package__:  # python -m examples.site.run
    from .app import create_app, docsync
else:  # python examples/site/run.py: this folder is on sys.path
    from app import create_app, docsync


def mount(app, prefix: str):
    """Serve ``app`` under ``prefix`` (``SCRIPT_NAME``); ``/`` redirects there."""

    def outside(environ, start_response):
        if environ.get("PATH_INFO", "/") in ("", "/"):
            return redirect(prefix + "/")(environ, start_response)
        return NotFound()(environ, start_response)

    return DispatcherMiddleware(outside, {prefix: app})


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "5000"))
    prefix = "/" + os.environ.get("SCRIPT_NAME", "").strip("/")
    prefix = "" if prefix == "/" else prefix

    app = create_app()
    server = WSGIServer((host, port), mount(app, prefix) if prefix else app, log=None)
    server.start()
    print(f"Site running at http://{host}:{server.server_port}{prefix}/ (log in with password 'docsync')",
          flush=True)

    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    stop.wait()
    # Stop accepting, close the WebSockets (1001) and sessions, then the rest.
    server.close()
    docsync.stop(app)
    server.stop(timeout=2)


if __name__ == "__main__":
    main()
