"""``flask-docsync serve``: a drop-in for ``bokeh serve`` on gevent's WSGI server.

Nothing here imports bokeh or Flask at module level: with one process the
command monkey-patches the standard library first, as gevent requires,
and only then loads the apps.
"""

from __future__ import annotations

import argparse
import glob as _glob
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

DEFAULT_PORT = 5006
DEFAULT_LOG_FORMAT = "%(asctime)s %(message)s"
LOG_LEVELS = ("trace", "debug", "info", "warning", "error", "critical")


def _ms(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flask-docsync",
        description="Serve Bokeh applications with Flask on gevent (a drop-in for `bokeh serve`).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="Run a server for one or more Bokeh applications.")
    p.add_argument("files", metavar="DIRECTORY-OR-SCRIPT", nargs="*", help="Bokeh apps to serve (scripts, notebooks or directories).")
    p.add_argument("--glob", action="store_true", help="Expand glob patterns in DIRECTORY-OR-SCRIPT.")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="Port to listen on (0 picks a free one).")
    p.add_argument("--address", default=None, help="Address to listen on (default: all interfaces).")
    p.add_argument("--allow-websocket-origin", metavar="HOST[:PORT]", action="append", default=None,
                   help="Origin allowed to open the WebSocket; repeatable. Default: localhost:<port>."
                        " Pages served under these hosts or the --address may open WebSockets.")
    p.add_argument("--prefix", default="", help="URL prefix for every route.")
    p.add_argument("--session-ids", choices=("unsigned", "signed", "external-signed"), default=None,
                   help="Session id policy (signed needs BOKEH_SECRET_KEY or DOCSYNC_SECRET_KEY).")
    p.add_argument("--session-token-expiration", type=int, default=None, metavar="SECONDS",
                   help="How long a session token may be used to create its session (default 300).")
    p.add_argument("--keep-alive", type=_ms, default=None, metavar="MILLISECONDS",
                   help="Ping interval for WebSockets; 0 turns pings off (default 37000).")
    p.add_argument("--check-unused-sessions", type=_ms, default=None, metavar="MILLISECONDS",
                   help="How often to look for unused sessions (default 17000).")
    p.add_argument("--unused-session-lifetime", type=_ms, default=None, metavar="MILLISECONDS",
                   help="How long an unused session lives (default 15000).")
    p.add_argument("--websocket-max-message-size", type=int, default=None, metavar="BYTES",
                   help="Largest incoming WebSocket message (default 20 MiB).")
    p.add_argument("--include-headers", nargs="+", default=None, help="Request headers carried in the session token.")
    p.add_argument("--exclude-headers", nargs="+", default=None, help="Request headers left out of the session token.")
    p.add_argument("--include-cookies", nargs="+", default=None, help="Cookies carried in the session token.")
    p.add_argument("--exclude-cookies", nargs="+", default=None, help="Cookies left out of the session token.")
    p.add_argument("--index", default=None, metavar="TEMPLATE", help="A Jinja template file for the index page.")
    p.add_argument("--disable-index", action="store_true", help="Do not serve an index at /.")
    p.add_argument("--disable-index-redirect", action="store_true", help="Do not redirect / to the only app.")
    p.add_argument("--ico-path", default="default", help="Path of a .ico for /favicon.ico, or 'none'.")
    p.add_argument("--stats-log-frequency", type=_ms, default=None, metavar="MILLISECONDS",
                   help="How often to log session and connection figures at DEBUG (default 15000; 0 is off).")
    p.add_argument("--redis-url", default=None, metavar="URL",
                   help="Redis joining the workers and hosts of a deployment (DOCSYNC_REDIS_URL):"
                        " broadcasts reach all of them, and WebSockets that reach the wrong host are"
                        " relayed to their session's.")
    p.add_argument("--advertise-url", default=None, metavar="URL",
                   help="Where the other hosts reach this one directly (DOCSYNC_ADVERTISE_URL), such as"
                        " http://10.0.0.5:5006; with --redis-url the default is this server's address and port.")
    p.add_argument("--restore-sessions", action="store_true", default=None,
                   help="Save each session in Redis and rebuild it on a live worker when its own dies"
                        " (DOCSYNC_RESTORE_SESSIONS; needs --redis-url and signed session ids).")
    p.add_argument("--restore-flush", type=_ms, default=None, metavar="MILLISECONDS",
                   help="How often changed sessions are saved: what a kill -9 loses at most (default 300).")
    p.add_argument("--restore-concurrency", type=int, default=None, metavar="N",
                   help="Restores at once per worker; the rest wait (default 2).")
    p.add_argument("--restore-max-bytes", type=int, default=None, metavar="BYTES",
                   help="Largest saved data of one session (default 256 KiB).")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="Log level (default info).")
    p.add_argument("--log-format", default=DEFAULT_LOG_FORMAT, help="Python logging format.")
    p.add_argument("--log-file", default=None, help="Write logs to this file.")
    p.add_argument("--use-xheaders", action="store_true",
                   help="Trust X-Forwarded-For/-Proto/-Host/-Prefix from one proxy in front.")
    p.add_argument("--num-procs", type=int, default=1,
                   help="Worker processes (gunicorn gevent workers); 0 means one per core.")
    # panel serve's options that apply here (Panel apps; --warm for any app).
    p.add_argument("--setup", metavar="SCRIPT", default=None,
                   help="A Python script run in each server process before it serves (e.g. to schedule"
                        " tasks with pn.state.schedule_task), as with panel serve.")
    p.add_argument("--warm", action="store_true",
                   help="Run each app once at start-up, so the first visitor does not wait for its imports.")
    p.add_argument("--static-dirs", nargs="+", default=None, metavar="ROUTE=DIRECTORY",
                   help="Directories to serve files from, each at /ROUTE/ under the prefix.")
    p.add_argument("--index-titles", nargs="+", default=None, metavar="ROUTE=TITLE",
                   help="Titles the index page shows for apps.")
    p.add_argument("--num-threads", type=int, default=None, metavar="N",
                   help="Panel's thread pool for callbacks (pn.config.nthreads; greenlets under gevent).")
    p.add_argument("--global-loading-spinner", action="store_true",
                   help="Panel's loading spinner over each page until it is ready.")
    p.add_argument("--args", nargs=argparse.REMAINDER, default=[], metavar="...",
                   help="Arguments for the apps' sys.argv (must come last).")
    return parser


def _expand(files: Sequence[str], use_glob: bool) -> list[str]:
    if not use_glob:
        return list(files)
    out: list[str] = []
    for pattern in files:
        out.extend(sorted(_glob.glob(pattern)) or [pattern])
    return out


def bind_hosts(address: str | None) -> tuple[str, ...]:
    """The bind address as a trusted ``Host`` pattern, ``host:*``.

    Any port: a page reaching the server through a port forward or a TCP
    proxy on the same address carries the forwarder's port, and what DNS
    rebinding forges is the name, never an address or its port. A wildcard
    address (none, ``0.0.0.0``, ``::``) names no host, so it gives none.
    """
    import ipaddress

    if not address:
        return ()
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return (f"{address.lower()}:*",)
    if ip.is_unspecified:
        return ()
    return (f"[{ip}]:*" if ip.version == 6 else f"{ip}:*",)


def create_app(options: argparse.Namespace, port: int | None = None) -> Any:
    """The Flask app ``flask-docsync serve`` runs, built from parsed options.

    :param port: The port actually listened on, when ``--port 0`` let the
        system pick it; the default allowlist (``localhost:PORT``) carries it.
    """
    from flask import Flask, abort, send_file
    from werkzeug.middleware.proxy_fix import ProxyFix

    from .config import Settings
    from .extension import DocSync

    app = Flask("flask_docsync.serve", static_folder=None)
    # DOCSYNC_* environment variables configure the server like config keys;
    # flags given on the command line win over them.
    app.config.update({k: v for k, v in os.environ.items() if k in Settings.config_keys()})
    files = _expand(options.files, options.glob)
    port = options.port if port is None else port
    origins = options.allow_websocket_origin
    if origins is None and not (
        os.environ.get("BOKEH_ALLOW_WS_ORIGIN") or os.environ.get("DOCSYNC_ALLOW_WEBSOCKET_ORIGIN")
    ):
        origins = [f"localhost:{port}"] if port else []  # bokeh serve's default
    settings: dict[str, Any] = {"url_prefix": options.prefix}
    if origins is not None:
        settings["allow_websocket_origin"] = origins
    if options.session_ids == "unsigned":
        settings["sign_sessions"] = False
    elif options.session_ids in ("signed", "external-signed"):
        settings["sign_sessions"] = True
        settings["generate_session_ids"] = options.session_ids == "signed"
    for flag, key in (
        ("session_token_expiration", "session_token_expiration"),
        ("keep_alive", "keep_alive_ms"),
        ("check_unused_sessions", "check_unused_sessions_ms"),
        ("unused_session_lifetime", "unused_session_lifetime_ms"),
        ("websocket_max_message_size", "websocket_max_message_size"),
        ("stats_log_frequency", "stats_log_ms"),
        ("include_headers", "include_headers"),
        ("exclude_headers", "exclude_headers"),
        ("include_cookies", "include_cookies"),
        ("exclude_cookies", "exclude_cookies"),
        ("redis_url", "redis_url"),
        ("advertise_url", "advertise_url"),
        ("restore_sessions", "restore_sessions"),
        ("restore_flush", "restore_flush_ms"),
        ("restore_concurrency", "restore_concurrency"),
        ("restore_max_bytes", "restore_max_bytes"),
    ):
        value = getattr(options, flag)
        if value is not None:
            settings[key] = value
    if options.redis_url and not options.advertise_url and not os.environ.get("DOCSYNC_ADVERTISE_URL") and port:
        name = _reachable_name(options.address)
        if name is None:
            logging.getLogger("flask_docsync.cli").warning(
                "Other hosts cannot relay WebSockets to this one: no address to advertise was found;"
                " give --advertise-url http://<this host's address>:%d", port,
            )
        else:
            settings["advertise_url"] = f"http://{name}:{port}"
    # Unlike bokeh serve, headers and cookies stay out of the token unless
    # the include flags ask for them: a session made by the page request
    # sees that request in full, one made on WebSocket open sees the
    # upgrade request's own headers and cookies, and the token stays under
    # proxies' header limits.
    settings["index"] = not options.disable_index
    settings["index_redirect"] = not options.disable_index_redirect
    settings["index_template"] = options.index
    if options.index_titles:
        settings["index_titles"] = dict(_pairs(options.index_titles, "--index-titles"))
    if options.warm:
        settings["warm"] = True
    # As config keys, so they win over DOCSYNC_* variables from the environment.
    app.config.update({"DOCSYNC_" + key.upper(): value for key, value in settings.items()})
    docsync = DocSync()
    if not files:
        from bokeh.application import Application

        docsync.add_app("/", Application())
    for path in files:
        docsync.add_app(None, path, argv=options.args)
    docsync.init_app(app)
    # Pages of the allowlist's hosts and of the bind address may open
    # WebSockets to themselves, and no others: an Origin equal to any Host
    # would let a DNS-rebinding page in under the attacker's own name.
    app.extensions["docsync"].same_origin_hosts = bind_hosts(options.address)

    if options.ico_path != "none":
        if options.ico_path == "default":
            import bokeh.server.views as views

            ico = os.path.join(os.path.dirname(views.__file__), "bokeh.ico")
        else:
            ico = os.path.abspath(options.ico_path)

        @app.route("/favicon.ico")
        def favicon() -> Any:
            from .panel import favicon_path

            # panel serve's default icon is Panel's.
            path = (favicon_path() or ico) if options.ico_path == "default" else ico
            if not os.path.exists(path):
                abort(404)
            return send_file(path, mimetype="image/x-icon", max_age=86400)

    for route, directory in _pairs(options.static_dirs or (), "--static-dirs"):
        _serve_directory(app, options.prefix, route, directory)
    _configure_panel(options)
    if options.setup:
        _run_setup(options.setup)

    if options.use_xheaders:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1, x_prefix=1)  # type: ignore[method-assign]
    return app


def _pairs(items: Sequence[str], flag: str) -> list[tuple[str, str]]:
    from .errors import ConfigurationError

    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip("/ ") or not value:
            raise ConfigurationError(f"{flag} takes NAME=VALUE pairs, got {item!r}.")
        pairs.append((key.strip().strip("/"), value))
    return pairs


def _serve_directory(app: Any, prefix: str, route: str, directory: str) -> None:
    from flask import send_from_directory

    from .errors import ConfigurationError

    folder = os.path.abspath(directory)
    if not os.path.isdir(folder):
        raise ConfigurationError(f"--static-dirs {route}={directory}: no such directory.")
    base = "/" + prefix.strip("/") if prefix.strip("/") else ""

    def files(filename: str) -> Any:
        return send_from_directory(folder, filename)  # refuses paths outside the folder

    endpoint = "static_dir_" + "".join(c if c.isalnum() else "_" for c in route)
    app.add_url_rule(f"{base}/{route}/<path:filename>", endpoint, files)


def _configure_panel(options: argparse.Namespace) -> None:
    if options.num_threads is None and not options.global_loading_spinner:
        return
    from .errors import ConfigurationError

    try:
        import panel as pn
    except ImportError:
        raise ConfigurationError(
            "--num-threads and --global-loading-spinner are Panel's; install it: pip install 'flask-docsync[panel]'"
        ) from None
    if options.num_threads is not None:
        pn.config.nthreads = options.num_threads
    if options.global_loading_spinner:
        pn.config.global_loading_spinner = True


def _run_setup(path: str) -> None:
    """Run ``--setup`` as Panel does: its functions belong to a module of its
    own, not to an app (``pn.state.schedule_task`` refuses an app's)."""
    import runpy

    from .errors import ConfigurationError

    if not os.path.isfile(path):
        raise ConfigurationError(f"--setup {path}: no such file.")
    try:
        runpy.run_path(path, run_name="docsync_setup")
    except Exception as exc:
        logging.getLogger("flask_docsync.cli").exception("--setup %s failed", path)
        raise ConfigurationError(f"--setup {path} failed: {exc}") from exc


def _configure_logging(options: argparse.Namespace) -> None:
    level = "DEBUG" if options.log_level == "trace" else options.log_level.upper()
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if options.log_file:
        handlers = [logging.FileHandler(options.log_file)]
    logging.basicConfig(level=level, format=options.log_format, handlers=handlers, force=True)


def _print_urls(routes: Sequence[str], address: str | None, port: int, prefix: str) -> None:
    host = address or "localhost"
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    log = logging.getLogger("flask_docsync.cli")
    for route in routes:
        path = prefix + (route if route != "/" else "/")
        log.info("Bokeh app running at: http://%s:%d%s", host, port, path)


def serve(options: argparse.Namespace) -> int:
    """Run one gevent WSGI server process until SIGINT/SIGTERM."""
    import signal
    import socket

    import gevent
    import gevent.event
    import gevent.socket
    from gevent.baseserver import parse_address
    from gevent.pywsgi import WSGIServer

    _configure_logging(options)
    log = logging.getLogger("flask_docsync.cli")
    from .errors import ConfigurationError

    # Bound before the app is made, so that with --port 0 the app knows the
    # port browsers will use (its default allowlist is localhost:PORT), but
    # listening only once the app is ready: a client that can connect finds
    # the on_server_loaded hooks done. The same steps as WSGIServer's own.
    family, address = parse_address((options.address or "", options.port))
    listener = gevent.socket.socket(family)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
    except OSError as exc:
        listener.close()
        log.error("Cannot listen on %s:%d: %s", options.address or "*", options.port, exc)
        return 1
    port = listener.getsockname()[1]
    try:
        app = create_app(options, port)
    except ConfigurationError as exc:
        listener.close()
        log.error("%s", exc)
        return 1
    docsync_server = app.extensions["docsync"]
    # on_server_loaded hooks run before the first request can arrive.
    docsync_server.start()
    listener.listen(WSGIServer.backlog)
    listener.setblocking(False)
    server = WSGIServer(listener, app, log=None, error_log=logging.getLogger("gevent.pywsgi"))
    server.start()
    _print_urls(docsync_server.routes(), options.address, port, options.prefix)
    stop = gevent.event.Event()

    def _stop(*_: Any) -> None:
        stop.set()

    gevent.signal_handler(signal.SIGTERM, _stop)
    gevent.signal_handler(signal.SIGINT, _stop)
    stop.wait()
    log.info("Shutting down")
    # Stop accepting first, then close WebSockets with 1001 (so browsers
    # reconnect elsewhere) and run the destroy/unload hooks, then end the
    # remaining HTTP requests.
    server.close()
    docsync_server.stop()
    server.stop(timeout=2)
    return 0


def serve_with_gunicorn(options: argparse.Namespace) -> int:
    """Run ``--num-procs`` gunicorn gevent workers on one port."""
    import socket

    from gunicorn.app.base import BaseApplication

    workers = options.num_procs or (os.cpu_count() or 1)
    bind = f"{options.address or '0.0.0.0'}:{options.port}"
    if options.port == 0:
        # Bind here and hand gunicorn the socket, so every worker's app
        # knows the port the system picked (its default allowlist,
        # localhost:PORT, needs it). gunicorn owns and closes the fd.
        host = (options.address or "0.0.0.0").strip("[]")
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((host, 0))
        except OSError as exc:
            listener.close()
            print(f"flask-docsync: cannot listen on {host}:0: {exc}", file=sys.stderr)
            return 1
        options.port = listener.getsockname()[1]
        bind = f"fd://{listener.detach()}"

    class _App(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", bind)
            self.cfg.set("workers", workers)
            self.cfg.set("worker_class", "gevent")
            self.cfg.set("loglevel", "debug" if options.log_level == "trace" else options.log_level)
            self.cfg.set("timeout", 60)
            self.cfg.set("graceful_timeout", 10)
            self.cfg.set("limit_request_field_size", 16384)

        def load(self) -> Any:
            from gunicorn.arbiter import Arbiter

            from .errors import ConfigurationError

            _configure_logging(options)
            try:
                app = create_app(options)
            except ConfigurationError as exc:
                # The same in every worker: say it once per worker, without
                # gunicorn's traceback, and exit as a worker that cannot
                # boot, which stops the arbiter instead of respawning.
                logging.getLogger("flask_docsync.cli").error("%s", exc)
                sys.exit(Arbiter.WORKER_BOOT_ERROR)
            app.extensions["docsync"].start()
            return app

    if not os.environ.get("DOCSYNC_SECRET_KEY") and not os.environ.get("BOKEH_SECRET_KEY"):
        # A page and its WebSocket may land on different workers; the token
        # must be verifiable by all of them.
        print(
            "flask-docsync: --num-procs > 1 needs a shared secret: set DOCSYNC_SECRET_KEY"
            " (or BOKEH_SECRET_KEY; `bokeh secret` makes one).",
            file=sys.stderr,
        )
        return 1
    _configure_logging(options)
    _print_urls([], options.address, options.port, options.prefix)
    from gunicorn.errors import HaltServer

    try:
        _App().run()  # exits with gunicorn's status when a worker cannot boot
    except HaltServer as exc:
        # gunicorn raises it out of its own halt when a second worker fails
        # to boot while the first one's failure stops the arbiter.
        print(f"flask-docsync: {exc.reason}", file=sys.stderr)
        return int(exc.exit_status)
    return 0


def _reachable_name(address: str | None) -> str | None:
    """The address other hosts can use for a server bound to ``address``; ``None`` if there is none to tell."""
    if address and address not in ("0.0.0.0", "::", "[::]"):
        return f"[{address.strip('[]')}]" if ":" in address else address
    # Bound to every interface: the address of the interface that leads
    # elsewhere (a UDP connect sends nothing; it only picks the route).
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))
        found = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if found.startswith("127.") else found


def main(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    if options.command == "serve":
        if options.num_procs != 1:
            return serve_with_gunicorn(options)
        # Before anything imports socket/ssl/threading users (bokeh, Flask,
        # the apps): gevent requires patching to come first.
        from gevent import monkey

        monkey.patch_all()
        return serve(options)
    return 2


if __name__ == "__main__":
    sys.exit(main())
