"""Trust: which pages may drive a session, and who may read ``/_stats``.

Real servers and raw clients, as in tests/test_hostile.py:

* ``flask-docsync serve`` subprocesses, and the extension in a Flask app
  under ``gunicorn -k gevent`` (tests/apps/deploy_factory.py) with Flask's
  ``TRUSTED_HOSTS``, with ``DOCSYNC_ALLOW_WEBSOCKET_ORIGIN``, or with
  neither;
* a DNS-rebinding page, written by hand. Once the attacker's name
  ``evil.example`` resolves to the server's address, the victim's browser
  sends the server ``Host: evil.example:PORT`` and ``Origin:
  http://evil.example:PORT``: the same origin, as far as those two headers
  tell. The page can read the app page and take its token, so the
  WebSocket's origin check is all that stands between it and the session;
* ``/_stats`` requests as a proxy on the same machine forwards them: from
  127.0.0.1 with ``X-Forwarded-For`` and the like, and through a real nginx
  running examples/deploy/nginx.conf.

Each refusal is checked for its status, the reason in its body and in the
server log, and that another session kept completing round trips while it
was repeated (:func:`reliability_util.under_attack`).
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import websocket
from reliability_util import raw_request, under_attack
from serve_util import APPS, log_has_line, start_server, wait_until
from wire import WireClient

from conftest import ROOT, RunningServer, free_port

SLIDERS = APPS / "sliders.py"
EVIL = "evil.example"
STATS_ON = {"DOCSYNC_STATS_ENDPOINT": "true"}
TOKEN = re.compile(r'"token":\s*"([A-Za-z0-9_.\-]+)"|\\"token\\":\s*\\"([A-Za-z0-9_.\-]+)\\"')
SECRET = "trust-test-secret-" + "x" * 32


def clean_env(**env: str) -> dict[str, str]:
    """No allowlist, secret or gunicorn options inherited from the test run."""
    inherited = ("BOKEH_ALLOW_WS_ORIGIN", "DOCSYNC_ALLOW_WEBSOCKET_ORIGIN", "DOCSYNC_SECRET_KEY",
                 "BOKEH_SECRET_KEY", "BOKEH_SIGN_SESSIONS", "GUNICORN_CMD_ARGS", "DOCSYNC_STATS_ENDPOINT")
    return {**{key: "" for key in inherited if key in os.environ}, **env}


def page_token(server: RunningServer, route: str, host: str) -> str:
    """Load the app page as a browser does under ``host``; return its session token."""
    status, _, body = server.get(route, headers={"Host": host})
    assert status == 200, (host, status, body[:500])
    match = TOKEN.search(body.decode("utf-8"))
    assert match, body[:2000]
    return match.group(1) or match.group(2)


def upgrade(server: RunningServer, route: str, token: str, host: str,
            origin: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """A browser's WebSocket handshake for ``route`` from a page at ``host``."""
    lines = [
        f"GET {route}/ws HTTP/1.1",
        f"Host: {host}",
        f"Origin: {origin or 'http://' + host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
        "Sec-WebSocket-Version: 13",
        f"Sec-WebSocket-Protocol: bokeh, {token}",
    ]
    return raw_request(server, lines)


class PageClient(WireClient):
    """tests/wire.py's client, connecting as a page at ``host`` would (its Host and Origin)."""

    def __init__(self, server: RunningServer, route: str, token: str, host: str) -> None:
        self.ws = websocket.create_connection(f"{server.ws_url}{route}/ws", subprotocols=["bokeh", token],
                                              host=host, origin=f"http://{host}", timeout=20)


def joins(server: RunningServer, route: str, host: str) -> None:
    """A page at ``host`` gets its token, a 101 and its document."""
    token = page_token(server, route, host)
    with PageClient(server, route, token, host) as client:
        assert client.ws.subprotocol == "bokeh"
        assert client.handshake().msgtype == "PULL-DOC-REPLY"


def rebinding_refused(server: RunningServer, route: str, host: str, *fix: str) -> None:
    """The DNS-rebinding page reads the app page and its token, and its WebSocket gets 403."""
    token = page_token(server, route, host)
    status, headers, body = upgrade(server, route, token, host)
    assert status == 403, (status, headers, body)
    assert "sec-websocket-accept" not in headers
    text = html.unescape(body.decode("utf-8"))  # _refuse escapes the reason
    assert f"host '{host}' is not a trusted host" in text and "DNS-rebinding" in text, text
    for part in fix:
        assert part in text, (part, text)
    log_has_line(server, "refused (403)", f"Origin 'http://{host}'", "DNS-rebinding", *fix)


# --------------------------------------------------------------------------
# flask-docsync serve: the allowlist's hosts and the bind address only
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_server() -> Iterator[RunningServer]:
    """``serve sliders.py --address 127.0.0.1 --port P``: allowlist localhost:P, as bokeh serve's."""
    s = start_server(SLIDERS, "--keep-alive", "0", env=clean_env(**STATS_ON))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def allowlist_server() -> Iterator[RunningServer]:
    """``serve ... --allow-websocket-origin app.example``: an explicit allowlist not naming evil.example."""
    s = start_server(SLIDERS, "--keep-alive", "0", "--allow-websocket-origin", "app.example", env=clean_env())
    yield s
    s.stop()


class PortZeroServer(RunningServer):
    """``flask-docsync serve --port 0``: the port is read from the startup line.

    One process prints ``Bokeh app running at: ...``, gunicorn's master
    (``--num-procs``) ``Listening at: ...``.
    """

    STARTUP = re.compile(r"(?:Bokeh app running|Listening) at: http://127\.0\.0\.1:(\d+)")

    def _wait_ready(self, path: str) -> None:
        line = wait_until(lambda: self.STARTUP.search(self.log()) or self.proc.poll() is not None,
                          timeout=30, message="the startup line")
        assert self.proc.poll() is None, self.log()
        self.port = int(line.group(1))
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"


def test_dns_rebinding_page_is_refused_by_flask_docsync_serve(default_server):
    server = default_server
    evil = f"{EVIL}:{server.port}"
    under_attack(server, lambda: rebinding_refused(server, "/sliders", evil, f"--allow-websocket-origin={evil}"))
    # The bind address and the default allowlist's localhost:PORT keep working.
    joins(server, "/sliders", f"127.0.0.1:{server.port}")
    joins(server, "/sliders", f"localhost:{server.port}")
    # The bind address on another port: a page served through a port forward
    # (what DNS rebinding forges is a name, never this address).
    joins(server, "/sliders", "127.0.0.1:8443")


def test_dns_rebinding_page_is_refused_with_an_explicit_allowlist(allowlist_server):
    server = allowlist_server
    evil = f"{EVIL}:{server.port}"
    under_attack(server, lambda: rebinding_refused(server, "/sliders", evil, "app.example:80"))
    joins(server, "/sliders", "app.example")  # the allowlisted host (behind a proxy on port 80)
    joins(server, "/sliders", f"127.0.0.1:{server.port}")  # the bind address
    # The explicit allowlist replaces bokeh serve's default, localhost:PORT
    # included: only what the command line names is trusted.
    rebinding_refused(server, "/sliders", f"localhost:{server.port}")


@pytest.mark.parametrize("procs", ["1", "2"])
def test_dns_rebinding_page_is_refused_after_port_0(procs):
    cmd = [sys.executable, "-m", "flask_docsync", "serve", str(SLIDERS), "--keep-alive", "0",
           "--port", "0", "--address", "127.0.0.1", "--num-procs", procs]
    # Two gunicorn workers share one secret, so either can take the WebSocket.
    server = PortZeroServer(cmd, 0, env=clean_env(DOCSYNC_SECRET_KEY=SECRET))
    try:
        wait_until(lambda: server.get("/sliders")[0] == 200, timeout=30, message="the workers answering")
        evil = f"{EVIL}:{server.port}"
        under_attack(server, lambda: rebinding_refused(server, "/sliders", evil))
        # The default allowlist carries the port the system picked.
        joins(server, "/sliders", f"localhost:{server.port}")
        joins(server, "/sliders", f"127.0.0.1:{server.port}")
        rebinding_refused(server, "/sliders", "localhost:1")  # not the port it listens on
    finally:
        server.stop()


# --------------------------------------------------------------------------
# The extension in a Flask app: TRUSTED_HOSTS, the allowlist, or loopback names
# --------------------------------------------------------------------------


def flask_app(port: int, **env: str) -> RunningServer:
    """tests/apps/deploy_factory.py under ``gunicorn -k gevent -w 1``, configured by ``env``."""
    cmd = [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "1", "--bind", f"127.0.0.1:{port}",
           "--chdir", str(APPS), "--graceful-timeout", "5", "deploy_factory:create_app()"]
    server = RunningServer(cmd, port, env=clean_env(DOCSYNC_KEEP_ALIVE_MS="0", **env))
    wait_until(lambda: server.get("/health")[0] == 200, timeout=30, message="gunicorn answering")
    return server


@pytest.fixture
def flask_apps() -> Iterator:
    servers: list[RunningServer] = []

    def start(port: int | None = None, **env: str) -> RunningServer:
        server = flask_app(port or free_port(), **env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_dns_rebinding_page_is_refused_by_a_flask_app_that_sets_no_trusted_hosts(flask_apps):
    """Neither TRUSTED_HOSTS nor an allowlist: the loopback names alone are trusted."""
    server = flask_apps()
    evil = f"{EVIL}:{server.port}"
    under_attack(server, lambda: rebinding_refused(server, "/work", evil, "TRUSTED_HOSTS", f"'{EVIL}'",
                                                   "neither TRUSTED_HOSTS nor DOCSYNC_ALLOW_WEBSOCKET_ORIGIN"),
                 route="/work")
    joins(server, "/work", f"127.0.0.1:{server.port}")
    joins(server, "/work", f"localhost:{server.port}")
    joins(server, "/work", f"[::1]:{server.port}")


def test_dns_rebinding_page_is_refused_by_a_flask_app_with_trusted_hosts(flask_apps):
    """TRUSTED_HOSTS: Flask itself answers 400 for other hosts (the page too), and the refusal is logged."""
    server = flask_apps(DEPLOY_TRUSTED_HOSTS="app.example,127.0.0.1")
    evil = f"{EVIL}:{server.port}"

    def attack() -> None:
        assert server.get("/work", headers={"Host": evil})[0] == 400  # no page, so no token either
        token = page_token(server, "/work", f"127.0.0.1:{server.port}")
        status, headers, body = upgrade(server, "/work", token, evil)
        assert status == 400 and "sec-websocket-accept" not in headers, (status, headers, body)
        log_has_line(server, "Refused GET /work/ws (400)", f"Host '{evil}' is not trusted", "TRUSTED_HOSTS")

    under_attack(server, attack, route="/work")
    joins(server, "/work", f"app.example:{server.port}")
    joins(server, "/work", f"127.0.0.1:{server.port}")
    assert server.get("/work", headers={"Host": f"localhost:{server.port}"})[0] == 400  # not listed


def test_dns_rebinding_page_is_refused_by_a_flask_app_with_an_allowlist(flask_apps):
    """DOCSYNC_ALLOW_WEBSOCKET_ORIGIN's hosts are trusted as the site's own, and the loopback names still are."""
    port = free_port()
    server = flask_apps(port, DOCSYNC_ALLOW_WEBSOCKET_ORIGIN=f"app.example:{port}")
    evil = f"{EVIL}:{port}"
    under_attack(server, lambda: rebinding_refused(server, "/work", evil, f"app.example:{port}"), route="/work")
    joins(server, "/work", f"app.example:{port}")
    joins(server, "/work", f"127.0.0.1:{port}")
    # A page of the allowlisted origin embedding the document from here.
    token = page_token(server, "/work", f"127.0.0.1:{port}")
    status, _, body = upgrade(server, "/work", token, f"127.0.0.1:{port}", origin=f"http://app.example:{port}")
    assert status == 101, body


def check_deploy(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                **clean_env(DOCSYNC_SECRET_KEY=SECRET, WEB_CONCURRENCY="2", **env))
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "tests/apps/deploy_factory.py:create_app()", "docsync",
         "check-deploy", "--gunicorn-config", "examples/deploy/gunicorn.conf.py", *args],
        capture_output=True, text=True, timeout=90, env=full, cwd=str(ROOT))


def problems(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("PROBLEM:")]


def test_check_deploy_flags_a_site_that_trusts_no_host_or_would_refuse_its_own_pages():
    nothing = check_deploy()
    assert nothing.returncode == 1, nothing.stdout + nothing.stderr
    assert re.search(r"trusted hosts\s+loopback names", nothing.stdout), nothing.stdout
    (problem,) = problems(nothing)
    assert "no host is trusted but the loopback names" in problem and "TRUSTED_HOSTS" in problem, problem

    trusted = check_deploy("--host", "example.com", DEPLOY_TRUSTED_HOSTS="example.com")
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    assert re.search(r"trusted hosts\s+TRUSTED_HOSTS example\.com", trusted.stdout), trusted.stdout
    assert trusted.stdout.rstrip().endswith("OK"), trusted.stdout

    other = check_deploy("--host", "www.example.com", DEPLOY_TRUSTED_HOSTS="example.com")
    assert other.returncode == 1, other.stdout
    (problem,) = problems(other)
    assert "Flask refuses every request for Host 'www.example.com' (400)" in problem, problem

    # An allowlist for an embedding partner does not make the site's own name trusted.
    embedded = check_deploy("--host", "example.com", DOCSYNC_ALLOW_WEBSOCKET_ORIGIN="partner.example:443")
    assert embedded.returncode == 1, embedded.stdout
    (problem,) = problems(embedded)
    assert "own pages at example.com would have their WebSockets refused (403)" in problem, problem
    assert "add 'example.com' to the app's TRUSTED_HOSTS" in problem, problem

    anyone = check_deploy("--host", "example.com", DEPLOY_TRUSTED_HOSTS="example.com",
                          DOCSYNC_ALLOW_WEBSOCKET_ORIGIN="*")
    assert anyone.returncode == 0, anyone.stdout
    assert any(line.startswith("WARNING:") and "DNS-rebinding" in line for line in anyone.stdout.splitlines())


# --------------------------------------------------------------------------
# /_stats: loopback means nothing behind a proxy on the same machine
# --------------------------------------------------------------------------

FORWARDED = [
    "X-Forwarded-For: 203.0.113.9",
    "X-Real-IP: 203.0.113.9",
    "Forwarded: for=203.0.113.9",
    "Via: 1.1 proxy",
    "X-Forwarded-Proto: https",
]


def stats_request(server: RunningServer, *headers: str) -> tuple[int, dict[str, str], bytes]:
    return raw_request(server, ["GET /_stats HTTP/1.1", f"Host: 127.0.0.1:{server.port}",
                                "Connection: close", *headers])


@pytest.mark.parametrize("header", FORWARDED)
def test_stats_loopback_check_passes_every_client_of_a_same_host_proxy(default_server, header):
    server = default_server

    def attack() -> None:
        status, _, body = stats_request(server, header)
        assert status == 403, (status, body)
        text = html.unescape(body.decode("utf-8"))
        assert "not served through a proxy" in text and header.split(":")[0] in text, text
        assert "flask docsync stats --url http://127.0.0.1:" in text, text
        assert b"sessions" not in body
        log_has_line(server, "Refused /_stats from 127.0.0.1 (403)", header.split(":")[0])

    under_attack(server, attack)
    status, _, body = stats_request(server)  # the operator on the machine, asking the app directly
    assert status == 200 and "sessions" in json.loads(body)


def test_stats_loopback_check_with_proxyfix_judges_the_connection_not_the_header(serve):
    """``--use-xheaders`` (ProxyFix): a forwarded "127.0.0.1" is refused, the operator's own request is not."""
    server = serve(SLIDERS, "--keep-alive", "0", "--use-xheaders", env=clean_env(**STATS_ON))
    status, _, body = stats_request(server, "X-Forwarded-For: 127.0.0.1")
    assert status == 403 and b"X-Forwarded-For" in body, (status, body)
    log_has_line(server, "Refused /_stats from 127.0.0.1 (403)", "X-Forwarded-For")
    status, _, body = stats_request(server)
    assert status == 200 and "sessions" in json.loads(body)


def test_stats_endpoint_is_off_unless_enabled(allowlist_server):
    status, _, _ = stats_request(allowlist_server)
    assert status == 404


NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (scripts/test.sh installs Debian's nginx)")
def test_stats_through_nginx_without_proxyfix_are_refused(default_server, tmp_path):
    """examples/deploy/nginx.conf keeps /_stats off the proxy; without that block the app refuses it."""
    from test_deploy import Nginx, nginx_site

    server = default_server
    for blocked in (True, False):
        port = free_port()
        site = nginx_site(port, (server.port, server.port))
        if not blocked:
            site, removed = re.subn(r"\n    location ~ [^\n]*_stats[^\n]*\{[^}]*\}\n", "\n", site)
            assert removed == 1, site
        nginx = Nginx(tmp_path / f"nginx-{blocked}", site, port)
        proxy = SimpleNamespace(port=port)  # what raw_request needs of a server
        try:
            status, _, body = raw_request(proxy, ["GET /dash/sliders HTTP/1.1", f"Host: 127.0.0.1:{port}",
                                                  "Connection: close"])
            assert status == 200 and b"token" in body, (status, body[:300])  # the proxy passes the site
            before = len(server.log())
            status, _, body = raw_request(proxy, ["GET /dash/_stats HTTP/1.1", f"Host: 127.0.0.1:{port}",
                                                  "Connection: close"])
            assert b"sessions" not in body, body
            if blocked:
                assert status == 404, (status, body)
                time.sleep(0.5)
                assert "/_stats" not in server.log()[before:]  # nginx answered; the app never saw it
            else:
                assert status == 403 and b"X-Forwarded-For" in body, (status, body)
                log_has_line(server, "Refused /_stats from 127.0.0.1 (403)", "X-Forwarded-For")
        finally:
            nginx.stop()

