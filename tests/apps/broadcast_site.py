"""A Flask site for the broadcast tests: `gunicorn -k gevent 'broadcast_site:create_app()'`.

Apps: ``/numbers`` (tests/apps/broadcast_app.py, topic ``numbers``) and
``/other`` (the same script on topic ``other``). Views: ``POST
/publish?start=S&count=C&rate=R`` broadcasts ``{"n": S}`` ... ``{"n": S+C-1}``
on ``numbers``, ``R`` per second (0: as fast as it can), and answers once
all are sent (queued in the outbox if Redis is down); ``GET /pid``.

Environment: ``TEST_SECRET``, ``BROADCAST_REDIS_URL``.
"""

import os
import time
from pathlib import Path

from flask import Flask, request

from flask_docsync import DocSync

HERE = Path(__file__).resolve().parent


def create_app():
    app = Flask(__name__, static_folder=None)
    app.config.update(
        DOCSYNC_SECRET_KEY=os.environ["TEST_SECRET"],
        DOCSYNC_REDIS_URL=os.environ.get("BROADCAST_REDIS_URL"),
        DOCSYNC_URL_PREFIX="",
        DOCSYNC_KEEP_ALIVE_MS=5000,
        # Sessions without a connection, made by page views, live as long as a test needs.
        DOCSYNC_UNUSED_SESSION_LIFETIME_MS=int(os.environ.get("BROADCAST_UNUSED_LIFETIME_MS", 15000)),
    )
    docsync = DocSync()
    docsync.add_app("/numbers", str(HERE / "broadcast_app.py"), argv=["numbers"])
    docsync.add_app("/other", str(HERE / "broadcast_app.py"), argv=["other"])
    docsync.init_app(app)

    @app.post("/publish")
    def publish():
        start = int(request.args.get("start", 0))
        count = int(request.args.get("count", 1))
        rate = float(request.args.get("rate", 0))
        began = time.monotonic()
        for i in range(count):
            if rate:
                delay = began + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            docsync.broadcast("numbers", {"n": start + i})
        return {"sent": count, "pid": os.getpid()}

    @app.get("/pid")
    def pid():
        return str(os.getpid())

    return app
