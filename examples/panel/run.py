"""Run the Panel example site on gevent's WSGI server: ``python examples/panel/run.py``.

``PORT`` (default 5000) and ``HOST`` (default 127.0.0.1) choose where.
"""

# gevent first: monkey-patching must happen before Flask, Panel or bokeh
# import socket, ssl or threading.
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

try:
    import flask_docsync  # noqa: F401
except ImportError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app import create_app, docsync  # noqa: E402


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "5000"))
    app = create_app()
    server = WSGIServer((host, port), app, log=None)
    server.start()
    print(f"Panel site running at http://{host}:{server.server_port}/ (log in with password 'docsync')", flush=True)
    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    stop.wait()
    server.close()
    docsync.stop(app)
    server.stop(timeout=2)


if __name__ == "__main__":
    main()
