"""``flask docsync ...``: commands for the host app's Flask CLI."""

from __future__ import annotations

import os
import shlex
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup

from . import deploy
from .config import TOKEN_SIZE_WARNING

docsync_cli = AppGroup("docsync", help="Inspect the flask-docsync apps of this Flask app.")

#: gunicorn refuses a request header longer than this by default.
GUNICORN_HEADER_LIMIT = 8190


@docsync_cli.command("apps")
def apps_command() -> None:
    """List the registered Bokeh apps and their URLs."""
    server = current_app.extensions["docsync"]
    prefix = server.settings.url_prefix
    for route in server.routes():
        click.echo(f"{route}\t{prefix}{route if route != '/' else '/'}")


def _gunicorn_settings(config_file: str | None) -> dict[str, Any]:
    from gunicorn.config import Config

    cfg = Config()
    if config_file:
        namespace: dict[str, Any] = {"__file__": config_file}
        with open(config_file, encoding="utf-8") as f:
            exec(compile(f.read(), config_file, "exec"), namespace)  # noqa: S102 - the user's own config
        for key, value in namespace.items():
            if key in cfg.settings:
                cfg.set(key, value)
    args = os.environ.get("GUNICORN_CMD_ARGS")
    if args:
        parsed = cfg.parser().parse_args(shlex.split(args))
        for key, value in vars(parsed).items():
            if value is not None and key in cfg.settings:
                cfg.set(key, value)
    return {
        "worker_class": cfg.worker_class_str,
        "workers": cfg.workers,
        "worker_connections": cfg.worker_connections,
        "timeout": cfg.timeout,
        "graceful_timeout": cfg.graceful_timeout,
        "limit_request_field_size": cfg.limit_request_field_size,
        "preload_app": cfg.preload_app,
    }


def _trust_report(hosts: tuple[str, ...]) -> tuple[str, list[str], list[str]]:
    """Which hosts' own pages may open WebSockets: (row text, problems, warnings).

    ``hosts`` are the ``Host`` values browsers will send (``--host``, or
    ``SERVER_NAME``); each must pass both Flask's ``TRUSTED_HOSTS`` and the
    WebSocket origin check, or the site refuses itself.
    """
    from werkzeug.wsgi import host_is_trusted

    from .tokens import origin_refusal

    config = current_app.config
    trusted_hosts = config.get("TRUSTED_HOSTS")
    if isinstance(trusted_hosts, str):
        trusted_hosts = [trusted_hosts]
    server = current_app.extensions["docsync"]
    allowlist = server.settings.allow_websocket_origin
    problems: list[str] = []
    warnings: list[str] = []
    parts = []
    if trusted_hosts:
        parts.append(f"TRUSTED_HOSTS {', '.join(trusted_hosts)}")
    if allowlist:
        parts.append(f"allowlist {', '.join(allowlist)}")
    if server.same_origin_hosts is not None:
        parts.append(f"bind address {', '.join(server.same_origin_hosts) or '(any interface)'}")
    elif not trusted_hosts:  # with TRUSTED_HOSTS, Flask refuses the names it does not list
        parts.append("loopback names")
    row = "; ".join(parts)
    if "*" in allowlist:
        warnings.append(
            "DOCSYNC_ALLOW_WEBSOCKET_ORIGIN is '*': a page on any origin, a DNS-rebinding page"
            " included, may open WebSockets with a token it obtained."
        )
    for host in hosts:
        if trusted_hosts and not host_is_trusted(host, trusted_hosts):
            problems.append(
                f"Flask refuses every request for Host {host!r} (400): add it to TRUSTED_HOSTS."
            )
            continue
        reason = origin_refusal(f"http://{host}", host, "http", allowlist,
                                trusted_hosts=trusted_hosts, same_origin_hosts=server.same_origin_hosts)
        if reason is not None:
            problems.append(f"the site's own pages at {host} would have their WebSockets refused (403): {reason}")
    if not hosts and not trusted_hosts and not allowlist:
        problems.append(
            "no host is trusted but the loopback names (localhost, 127.0.0.1, [::1]): pages served"
            " under any other name get 403 on their WebSockets. Set TRUSTED_HOSTS to the names the"
            " site is served under (e.g. ['example.com']), or check one with --host NAME."
        )
    return row, problems, warnings


@docsync_cli.command("check-deploy")
@click.option("--gunicorn-config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="The gunicorn.conf.py the deployment uses.")
@click.option("--workers", type=int, default=None, help="Worker count, if not in the config.")
@click.option("--worker-class", default=None, help="Worker class, if not in the config.")
@click.option("--host", "hosts", multiple=True, metavar="HOST[:PORT]",
              help="A host name browsers use for the site, as they send it in Host (repeatable;"
                   " default: SERVER_NAME). Flagged if its own pages would be refused.")
def check_deploy_command(config_file: str | None, workers: int | None, worker_class: str | None,
                         hosts: tuple[str, ...]) -> None:
    """Report how this app would be served, and flag what would break."""
    server = current_app.extensions["docsync"]
    settings = server.settings
    g = _gunicorn_settings(config_file)
    if workers is not None:
        g["workers"] = workers
    if worker_class is not None:
        g["worker_class"] = worker_class
    kind = g["worker_class"].lower()
    problems: list[str] = []
    warnings: list[str] = []

    if "geventwebsocket" in kind:
        patched = "yes (the worker monkey-patches before loading the app)"
        warnings.append(
            "gevent-websocket's worker completes the WebSocket handshake before the app runs, so a"
            " refused origin or token gets close 1008 instead of an HTTP 403. Prefer -k gevent."
        )
    elif "gevent" in kind:
        patched = "yes (the worker monkey-patches before loading the app)"
    else:
        patched = "no"
        problems.append(
            f"worker class {g['worker_class']!r} cannot hold WebSockets next to other requests;"
            " run gunicorn with -k gevent."
        )
    if g["preload_app"]:
        warnings.append("preload_app imports the app before gevent patches the standard library; turn it off.")
    problems.extend(deploy.problems(settings, g["workers"]))

    sample = server.tokens.make_token(server.tokens.new_session_id(), {"arg": [b"x" * 32]}, {}, {})
    carried = []
    for kind_name in ("headers", "cookies"):
        include = getattr(settings, f"include_{kind_name}")
        exclude = getattr(settings, f"exclude_{kind_name}")
        if exclude or (include and "*" in include):
            carried.append(f"all {kind_name}" + (f" except {', '.join(exclude)}" if exclude else ""))
        elif include:
            carried.append(f"{kind_name} {', '.join(include)}")
    if carried:
        warnings.append(
            f"tokens carry {'; '.join(carried)}: each browser's token grows with them and must stay"
            f" under {g['limit_request_field_size']} bytes (gunicorn) and nginx's header buffers."
        )
    if len(sample) > min(TOKEN_SIZE_WARNING, g["limit_request_field_size"]):
        problems.append(f"a minimal token is already {len(sample)} bytes.")

    if settings.redis_url and not settings.advertise_url:
        warnings.append(
            "DOCSYNC_REDIS_URL is set without DOCSYNC_ADVERTISE_URL: other hosts cannot relay WebSockets"
            " for this host's sessions here, and make fresh sessions instead. Set DOCSYNC_ADVERTISE_URL to"
            " http://<this host's address>:<its port>."
        )
    if settings.redis_url and not settings.signed:
        problems.append("DOCSYNC_REDIS_URL routes sessions between hosts only with signed session ids;"
                        " set DOCSYNC_SECRET_KEY (the same on every host).")
    origins = ", ".join(settings.allow_websocket_origin) or "none besides the trusted hosts' own pages"
    if not hosts and current_app.config.get("SERVER_NAME"):
        hosts = (current_app.config["SERVER_NAME"],)
    trust, trust_problems, trust_warnings = _trust_report(tuple(h.lower() for h in hosts))
    problems.extend(trust_problems)
    warnings.extend(trust_warnings)
    rows = [
        ("worker class", g["worker_class"]),
        ("workers", str(g["workers"])),
        ("worker connections", f"{g['worker_connections']} (one per open document tab)"),
        ("monkey-patched", patched),
        ("session ids", "signed" if settings.signed else "unsigned"),
        ("hosts", f"routed to each other through Redis; this one at {settings.advertise_url or '(no advertise URL)'}"
         if settings.redis_url else "each on its own (no DOCSYNC_REDIS_URL)"),
        ("allowed origins", origins),
        ("trusted hosts", f"{trust} (their own pages may open WebSockets)"),
        ("token size", f"~{len(sample)} bytes plus carried headers/cookies"),
        ("keep-alive", f"{settings.keep_alive_ms} ms" if settings.keep_alive_ms else "off"),
        ("timeout", f"{g['timeout']} s (a callback holding the loop longer gets the worker killed)"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name.ljust(width)}  {value}")
    for text in warnings:
        click.echo(f"WARNING: {text}")
    for text in problems:
        click.echo(f"PROBLEM: {text}")
    if problems:
        raise SystemExit(1)
    click.echo("OK")


@docsync_cli.command("broadcast")
@click.argument("topic")
@click.argument("payload")
def broadcast_command(topic: str, payload: str) -> None:
    """Broadcast PAYLOAD (JSON) to every session subscribed to TOPIC.

    For scripts and cron: the running server's workers and hosts get it
    through DOCSYNC_REDIS_URL, which this app's config must name too.
    Example: flask docsync broadcast prices '{"eur": 1.08}'
    """
    import json

    from .errors import BroadcastError

    try:
        value = json.loads(payload)
    except ValueError as exc:
        raise click.ClickException(
            f"PAYLOAD must be JSON ({exc}); quote it for the shell, e.g. '{{\"n\": 1}}' or '\"text\"'."
        ) from None
    try:
        entry = current_app.extensions["docsync"].broadcasts.publish_now(topic, value)
    except BroadcastError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"broadcast {entry} on {topic!r}")


@docsync_cli.command("stats")
@click.option("--url", default=None,
              help="Base URL of the running server's DocSync prefix, e.g. http://127.0.0.1:5000/docsync."
                   " Without it, the figures of this (idle) process are shown.")
def stats_command(url: str | None) -> None:
    """Show sessions, connections, queued messages and callback figures.

    The running server must have DOCSYNC_STATS_ENDPOINT on, and answers
    loopback clients that connect to it directly (not through a proxy).
    """
    import html
    import json
    import urllib.error
    import urllib.request

    if url is None:
        data = current_app.extensions["docsync"].stats()
    else:
        # Never through an http_proxy from the environment: the server
        # refuses requests that a proxy forwarded.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(url.rstrip("/") + "/_stats", timeout=10) as response:
                data = json.load(response)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                hint = "set DOCSYNC_STATS_ENDPOINT=True on the server (and check the URL prefix)."
            else:
                # The server's reason says what to do; its text/plain body is HTML-escaped.
                hint = html.unescape(exc.read().decode("utf-8", "replace").strip()) or "ask from the server machine."
            raise click.ClickException(f"{url}/_stats answered {exc.code}: {hint}") from None
        except OSError as exc:
            raise click.ClickException(f"cannot reach {url}: {exc}") from None
    click.echo(json.dumps(data, indent=2, sort_keys=True))
