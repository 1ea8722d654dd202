# gunicorn settings for a flask-docsync app.
#
#   DOCSYNC_SECRET_KEY=... gunicorn -c examples/deploy/gunicorn.conf.py 'myapp:create_app()'
#
# Check what this gives before you deploy (exit status 1 if something would break):
#
#   flask --app 'myapp:create_app()' docsync check-deploy --gunicorn-config examples/deploy/gunicorn.conf.py
#
# Every value here can be overridden on the command line or in
# $GUNICORN_CMD_ARGS (e.g. --bind, -w).

import multiprocessing
import os

# The gevent worker: every open document tab holds a WebSocket for as long as
# the tab is open, so workers must serve thousands of concurrent connections
# on greenlets. gunicorn's sync and gthread workers would tie up a process or
# thread per tab. The worker monkey-patches the standard library before it
# imports the app, so blocking I/O in app code (requests, database drivers,
# time.sleep) yields to the other sessions.
worker_class = "gevent"

# One worker per core; each is one event loop. With more than one worker (or
# more than one host) a page and its WebSocket can land on different
# processes, so every worker needs the same DOCSYNC_SECRET_KEY (or
# BOKEH_SECRET_KEY): without it the app refuses to start.
workers = int(os.environ.get("WEB_CONCURRENCY") or multiprocessing.cpu_count())

# Connections (HTTP requests plus open WebSockets) one worker holds at once.
# Each open document tab is one; size it for your tabs per worker.
worker_connections = 1000

bind = os.environ.get("BIND", "127.0.0.1:8000")

# A worker whose event loop is held this long (a callback computing without
# yielding) is killed by the master, with every session on it. Keep CPU-bound
# work off the loop with flask_docsync.offload(); the app logs a warning long
# before this (DOCSYNC_BLOCKING_WARNING_MS, 1000 ms by default). Long-lived
# WebSockets do not count against it: the worker's heartbeat runs on its own
# greenlet and only stops when the event loop is held.
timeout = 60

# On SIGTERM/SIGHUP (stop, restart, deploy) a worker stops accepting, closes
# its WebSockets with 1012 so browsers reconnect to a live worker, runs
# on_session_destroyed and on_server_unloaded hooks, and exits. This is how
# long those hooks may take before the master kills the worker.
graceful_timeout = 30

# Session tokens travel in the Sec-WebSocket-Protocol header. gunicorn's
# default limit for one header is 8190 bytes; a token that carries cookies or
# headers (DOCSYNC_INCLUDE_COOKIES/_HEADERS) can grow past it. Keep this at or
# below the proxy's large_client_header_buffers size (see nginx.conf).
limit_request_field_size = 16384

# Off: with preload_app the master imports the app (and bokeh) before the
# gevent worker monkey-patches the standard library, and every worker would
# share sockets and state made before the fork. Each worker loads its own.
preload_app = False

# Do not recycle workers by request count (max_requests): a worker that
# retires itself gets no SIGTERM, so its sessions are cut after
# graceful_timeout without their hooks, and browsers get fresh sessions.
max_requests = 0

# HTTP keep-alive for pages and static files behind a proxy (seconds).
keepalive = 5

# Logs to stderr, for systemd or a container runtime.
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")

# If the proxy runs on another machine, trust its X-Forwarded-* headers:
# forwarded_allow_ips = "10.0.0.5"
