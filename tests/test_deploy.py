"""Production deployment: real gunicorn gevent workers (and a real nginx) on 127.0.0.1.

Every server here is a subprocess on a free port, started the way the
README's "Deploying" section says (``python -m gunicorn -k gevent ...
'deploy_factory:create_app()'``, ``flask-docsync serve``, ``nginx -p ...``).
The tests assert behaviour (which worker served what, close codes, hook
records, the order replies arrive in, log lines), never how long anything
took; waits are generous.

The app is tests/apps/deploy_app.py, served by tests/apps/deploy_factory.py
(configured from ``DOCSYNC_*`` environment variables).
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import serve_util
import websocket
from bokeh.util.token import get_session_id, get_token_payload

from conftest import APPS, ROOT, RunningServer, free_port
from wire import WireClient, fetch_token, find_model

SECRET = "deploy-test-secret-" + "x" * 32
EXAMPLES = ROOT / "examples" / "deploy"
GUNICORN_CONF = EXAMPLES / "gunicorn.conf.py"
NGINX_CONF = EXAMPLES / "nginx.conf"
#: gunicorn's graceful timeout in these tests; a stopping worker must be gone by then.
GRACEFUL_TIMEOUT = 10
WAIT = 30.0

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def clean_env(**env: str) -> dict[str, str]:
    """Environment for a server: no secret or signing inherited from the test run."""
    inherited = ("DOCSYNC_SECRET_KEY", "BOKEH_SECRET_KEY", "BOKEH_SIGN_SESSIONS", "BOKEH_ALLOW_WS_ORIGIN",
                 "GUNICORN_CMD_ARGS")
    base = {key: "" for key in inherited if key in os.environ}
    base.update(env)
    return base


def gunicorn_cmd(port: int, workers: int, *extra: str) -> list[str]:
    """The README's command line (with a test port and a short graceful timeout)."""
    return [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", str(workers),
            "--bind", f"127.0.0.1:{port}", "--chdir", str(APPS),
            "--graceful-timeout", str(GRACEFUL_TIMEOUT), *extra, "deploy_factory:create_app()"]


def gunicorn(workers: int, *extra: str, **env: str) -> RunningServer:
    port = free_port()
    server = RunningServer(gunicorn_cmd(port, workers, *extra), port, env=clean_env(**env))
    wait_until(lambda: server.get("/health")[0] == 200, message="gunicorn answering")
    return server


def wait_until(probe: Callable[[], Any], timeout: float = WAIT, interval: float = 0.05,
               message: str = "condition") -> Any:
    return serve_util.wait_until(probe, timeout, interval, message)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def hook_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


class HeaderWireClient(WireClient):
    """tests/wire.py's client, with extra request headers (e.g. the user for ``authorize``)."""

    def __init__(self, ws_url: str, token: str, headers: list[str]) -> None:
        self.ws = websocket.create_connection(ws_url, subprotocols=["bokeh", token], timeout=WAIT,
                                              suppress_origin=True, header=headers)


class Session:
    """One wire-protocol connection to a deploy_app document, with its model ids."""

    def __init__(self, ws_url: str, token: str, headers: list[str] | None = None) -> None:
        self.token = token
        self.id = get_session_id(token)
        self.client = HeaderWireClient(ws_url, token, headers or [])
        self.doc = self.client.handshake().content["doc"]
        self.ids = {name: find_model(self.doc, name)["id"]
                    for name in ("pid", "instance", "slider", "result", "command", "status")}

    @classmethod
    def open(cls, base_url: str, route: str = "/work", headers: dict[str, str] | None = None) -> Session:
        token = page_token(base_url + route, headers)
        return cls(base_url.replace("http://", "ws://", 1) + route + "/ws", token,
                   [f"{k}: {v}" for k, v in (headers or {}).items()] or None)

    def attr(self, name: str, attribute: str = "text") -> Any:
        return find_model(self.doc, name)["attributes"].get(attribute)

    @property
    def pid(self) -> int:
        return int(self.attr("pid"))

    def set(self, name: str, attribute: str, value: Any) -> str:
        """Send a PATCH-DOC as BokehJS would; return its msgid (the reply is not read)."""
        return self.client.send("PATCH-DOC", {"events": [
            {"kind": "ModelChanged", "model": {"id": self.ids[name]}, "attr": attribute, "new": value}]})

    def round_trip(self, value: int) -> None:
        """Set the slider to a new ``value``; the server's callback must answer in ``result`` before the OK."""
        msgid = self.set("slider", "value", value)
        _, before = self.client.recv_until("OK", msgid)
        assert self.changes(before, "result") == [f"value={value}"], before

    def changes(self, messages: list[Any], name: str, attribute: str = "text") -> list[Any]:
        return [e["new"] for m in messages if m.msgtype == "PATCH-DOC" for e in m.content["events"]
                if e.get("kind") == "ModelChanged" and e["model"]["id"] == self.ids[name]
                and e["attr"] == attribute]

    def wait_status(self, text: str) -> list[Any]:
        """Read messages until the server sets ``status`` to ``text``; return them."""
        seen: list[Any] = []
        while True:
            msg = self.client.recv()
            seen.append(msg)
            if text in self.changes([msg], "status"):
                return seen

    def readable(self) -> bool:
        """Whether the server has sent anything not yet read (never blocks)."""
        sock = self.client.ws.sock
        if hasattr(sock, "pending") and sock.pending():
            return True
        return bool(select.select([sock], [], [], 0)[0])

    def close(self) -> None:
        self.client.close()


def token_in(html: str) -> str:
    """The session token a Bokeh app page embeds."""
    match = re.search(r'"token":\s*"([A-Za-z0-9_.\-]+)"', html) or re.search(
        r'\\"token\\":\s*\\"([A-Za-z0-9_.\-]+)\\"', html)
    assert match, html[:2000]
    return match.group(1)


def page_token(url: str, headers: dict[str, str] | None = None) -> str:
    if not headers:
        return fetch_token(url)
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=WAIT) as response:
        return token_in(response.read().decode("utf-8"))


def refused_status(ws_url: str, token: str, headers: list[str] | None = None) -> int:
    """The HTTP status of a WebSocket handshake the server must refuse."""
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(ws_url, subprotocols=["bokeh", token], timeout=WAIT,
                                    suppress_origin=True, header=headers or [])
    return info.value.status_code


def token_expired(token: str) -> bool:
    return time.time() > get_token_payload(token)["session_expiry"] + 0.5


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("deploy")


@pytest.fixture(scope="module")
def pair(tmp_module: Path) -> Iterator[tuple[RunningServer, Path]]:
    """``gunicorn -k gevent -w 2`` with a shared secret; hooks recorded to a file."""
    hooks = tmp_module / "pair-hooks.txt"
    server = gunicorn(2, DOCSYNC_SECRET_KEY=SECRET, DEPLOY_HOOKS_FILE=str(hooks))
    yield server, hooks
    server.stop()


@pytest.fixture(scope="module")
def signed_one(tmp_module: Path) -> Iterator[tuple[RunningServer, Path]]:
    """``-w 1``, signed, tokens valid for 2 s, unused sessions kept 6 s."""
    hooks = tmp_module / "signed-hooks.txt"
    server = gunicorn(1, DOCSYNC_SECRET_KEY=SECRET, DEPLOY_HOOKS_FILE=str(hooks),
                      DOCSYNC_SESSION_TOKEN_EXPIRATION="2", DOCSYNC_UNUSED_SESSION_LIFETIME_MS="6000",
                      DOCSYNC_CHECK_UNUSED_SESSIONS_MS="250")
    yield server, hooks
    server.stop()


@pytest.fixture(scope="module")
def unsigned_one(tmp_module: Path) -> Iterator[tuple[RunningServer, Path]]:
    """``-w 1`` without a secret, short token and session lifetimes, blocking warnings at 300 ms.

    No keep-alive pings, so "nothing arrived" on a connection means no reply.
    """
    hooks = tmp_module / "unsigned-hooks.txt"
    server = gunicorn(1, DEPLOY_HOOKS_FILE=str(hooks), DOCSYNC_BLOCKING_WARNING_MS="300", DOCSYNC_KEEP_ALIVE_MS="0",
                      DOCSYNC_SESSION_TOKEN_EXPIRATION="2", DOCSYNC_UNUSED_SESSION_LIFETIME_MS="1000",
                      DOCSYNC_CHECK_UNUSED_SESSIONS_MS="250")
    yield server, hooks
    server.stop()


# --------------------------------------------------------------------------
# a. Two workers, one port: sessions land on both and all work
# --------------------------------------------------------------------------


def test_sessions_land_on_both_workers_and_work(pair):
    server, _ = pair
    sessions: list[Session] = []
    try:
        # Held open together, so both workers have connections to accept.
        # Which worker accepts is the kernel's choice: open 20, and more (up
        # to 80) in the unlikely case one worker won every accept so far.
        while len(sessions) < 20 or (len({s.pid for s in sessions}) < 2 and len(sessions) < 80):
            session = Session.open(server.url)
            session.round_trip(40 + len(sessions) % 50)
            sessions.append(session)
        wire_pids = {s.pid for s in sessions}
        for session in sessions:
            session.round_trip(7)  # still working with every connection open
    finally:
        for session in sessions:
            session.close()

    # bokeh.client signs its own session ids with the shared secret.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOKEH_")}
    env.update(BOKEH_SECRET_KEY=SECRET, BOKEH_SIGN_SESSIONS="true")
    result = subprocess.run([sys.executable, str(APPS / "deploy_client.py"), server.url + "/work", "4"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    client_pids = {int(p) for p in json.loads(result.stdout)}

    assert len(wire_pids | client_pids) >= 2, (wire_pids, client_pids)
    assert "Traceback" not in server.log(), server.log()


# --------------------------------------------------------------------------
# b. Several workers without a secret: gunicorn does not start
# --------------------------------------------------------------------------


def test_two_workers_without_a_secret_fail_to_start():
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               **clean_env())
    result = subprocess.run(gunicorn_cmd(port, 2), capture_output=True, text=True, timeout=90, env=env,
                            cwd=str(ROOT))
    log = result.stdout + result.stderr
    assert result.returncode != 0, log  # the master gave up (gunicorn exits 3)
    assert "DOCSYNC_SECRET_KEY" in log, log
    assert "Worker failed to boot" in log or "App failed to load" in log, log


# --------------------------------------------------------------------------
# c. Graceful stop of one worker: 1012, every hook, a clean exit, still serving
# --------------------------------------------------------------------------


def test_sigterm_closes_websockets_with_1012_runs_hooks_and_the_master_keeps_serving(pair):
    server, hooks = pair
    session = Session.open(server.url)
    session.round_trip(3)
    victim = session.pid
    log_before = len(server.log())

    os.kill(victim, signal.SIGTERM)
    code, reason = session.client.expect_close()
    session.close()
    assert code == 1012, (code, reason)  # "service restart": browsers reconnect

    wait_until(lambda: f"session_destroyed {session.id} {victim}" in hook_lines(hooks),
               message="on_session_destroyed of the open session")
    wait_until(lambda: f"server_unloaded {victim}" in hook_lines(hooks), message="on_server_unloaded")
    wait_until(lambda: not alive(victim), timeout=GRACEFUL_TIMEOUT + 5, message="the worker exiting")
    log = server.log()[log_before:]
    assert "Traceback" not in log, log
    assert "graceful timeout" not in log.lower(), log  # it left on its own, not killed

    # The master replaced the worker and the port still serves sessions.
    fresh = wait_until(lambda: Session.open(server.url), message="a fresh session")
    try:
        fresh.round_trip(11)
        assert fresh.pid != victim
    finally:
        fresh.close()
    assert server.proc.poll() is None


# --------------------------------------------------------------------------
# d. Reconnect after the token window; a fresh session when the session is gone
# --------------------------------------------------------------------------


def test_reconnect_after_the_token_window_reattaches_and_a_discarded_session_is_refused(signed_one):
    server, hooks = signed_one
    first = Session.open(server.url)
    first.round_trip(42)
    pid = first.pid
    first.close()

    wait_until(lambda: token_expired(first.token), timeout=10, message="the token expiring")
    # Same token, same worker, session still alive: it reattaches, state intact.
    again = Session(server.ws_url + "/work/ws", first.token)
    try:
        assert again.attr("slider", "value") == 42 and again.attr("result") == "value=42"
        assert again.pid == pid
        again.round_trip(43)
    finally:
        again.close()

    # Now let the session expire (unused for 6 s): on_session_destroyed runs.
    wait_until(lambda: f"session_destroyed {first.id} {pid}" in hook_lines(hooks), message="the session going")
    # Discarded normally by the worker that made it (which is alive): the
    # expired token is refused, as Bokeh refuses it. (A session whose worker
    # is gone is made anew from its expired token: tests/test_one_home.py.)
    assert refused_status(server.ws_url + "/work/ws", first.token) == 403
    assert "recreating session" not in server.log()


def test_an_expired_unsigned_token_for_a_gone_session_is_refused(unsigned_one):
    server, hooks = unsigned_one
    session = Session.open(server.url)
    session.round_trip(9)
    session.close()
    wait_until(lambda: token_expired(session.token), timeout=10, message="the token expiring")
    wait_until(lambda: any(line.startswith(f"session_destroyed {session.id} ") for line in hook_lines(hooks)),
               message="the session going")
    # Anybody could have made an unsigned token: no session from it.
    assert refused_status(server.ws_url + "/work/ws", session.token) == 403


# --------------------------------------------------------------------------
# e. Identity gate: a reattach must come back as the session's user
# --------------------------------------------------------------------------


def test_reattach_by_another_user_is_refused(signed_one):
    server, _ = signed_one
    ws_url = server.ws_url + "/private/ws"
    alice = Session.open(server.url, "/private", headers={"X-User": "alice"})
    try:
        alice.round_trip(21)
        # The live session's token, from someone else: 403 before the upgrade.
        assert refused_status(ws_url, alice.token, ["X-User: bob"]) == 403
        assert refused_status(ws_url, alice.token) == 403  # and from nobody
    finally:
        alice.close()
    # Alice herself may come back to it.
    back = Session(ws_url, alice.token, ["X-User: alice"])
    try:
        assert back.attr("result") == "value=21"
    finally:
        back.close()
    assert "belongs to another user" in server.log()


# --------------------------------------------------------------------------
# f. Blocking I/O in one session's callback does not stall the others
# --------------------------------------------------------------------------


def check_blocking_io_yields(base_url: str, route: str) -> None:
    blocked = Session.open(base_url, route)
    other = Session.open(base_url, route)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT)
    try:
        # 1. A blocking socket read, released only by the test.
        blocked.set("command", "value", f"read:{listener.getsockname()[1]}")
        conn, _ = listener.accept()  # the callback is now waiting in recv()
        with conn:
            for value in range(10, 16):
                other.round_trip(value)  # six round trips while it waits
            assert not blocked.readable()  # still waiting: nothing came back
            conn.sendall(b"go\n")
            blocked.wait_status("read=go")
        blocked.client.recv_until("OK")

        # 2. time.sleep(2) inside the callback.
        msgid = blocked.set("command", "value", "sleep")
        for value in range(20, 26):
            other.round_trip(value)
        assert not blocked.readable()  # every other reply came first
        seen = blocked.wait_status("slept")
        assert not any(m.header.get("reqid") == msgid for m in seen)
        blocked.client.recv_until("OK", msgid)
    finally:
        listener.close()
        blocked.close()
        other.close()


def test_blocking_io_yields_under_flask_docsync_serve(serve):
    server = serve(APPS / "deploy_app.py", "--keep-alive", "0")
    check_blocking_io_yields(server.url, "/deploy_app")
    assert "Traceback" not in server.log()


def test_blocking_io_yields_under_gunicorn(unsigned_one):
    server, _ = unsigned_one
    check_blocking_io_yields(server.url, "/work")


# --------------------------------------------------------------------------
# g. A CPU-bound callback is reported; the same work through offload() is not
# --------------------------------------------------------------------------


def test_cpu_hog_is_reported_and_offload_is_not(unsigned_one):
    server, _ = unsigned_one
    worker = Session.open(server.url)
    other = Session.open(server.url)
    try:
        # offload(): both sessions round-trip while the work runs (the
        # callback runs without the document lock, as the README shows).
        log_before = len(server.log())
        worker.client.recv_until("OK", worker.set("command", "value", "offload"))
        trips, done = 0, False
        while not done:
            other.round_trip(trips % 100)
            msgid = worker.set("slider", "value", trips % 100)
            _, before = worker.client.recv_until("OK", msgid)
            done = "offload done" in worker.changes(before, "status")
            trips += 1
        assert trips >= 5, trips
        time.sleep(1.0)  # several monitor periods, had anything been blocked
        assert "blocked the event loop" not in server.log()[log_before:], server.log()[log_before:]

        # The same work on the loop: a warning naming the session and callback.
        worker.set("command", "value", "busy")
        worker.wait_status("busy done")
        line = wait_until(lambda: next((l for l in server.log().splitlines()
                                        if "blocked the event loop" in l and worker.id in l), None),
                          message="the blocking warning")
        assert "busy_cpu" in line and "offload" in line, line
        other.round_trip(100)  # and the worker carries on
    finally:
        worker.close()
        other.close()


# --------------------------------------------------------------------------
# h. flask docsync check-deploy
# --------------------------------------------------------------------------


def check_deploy(**env: str) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                **clean_env(WEB_CONCURRENCY="2", **env))
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "tests/apps/deploy_factory.py:create_app()",
         "docsync", "check-deploy", "--gunicorn-config", str(GUNICORN_CONF.relative_to(ROOT))],
        capture_output=True, text=True, timeout=90, env=full, cwd=str(ROOT))


def test_check_deploy_flags_a_missing_secret_and_passes_with_one():
    unsafe = check_deploy()
    assert unsafe.returncode == 1, unsafe.stdout + unsafe.stderr
    report = unsafe.stdout
    for row in (r"worker class\s+gevent", r"workers\s+2\b", r"monkey-patched\s+yes", r"session ids\s+unsigned",
                r"allowed origins\s+none besides the trusted hosts' own pages", r"trusted hosts\s+loopback names",
                r"token size\s+~\d+ bytes"):
        assert re.search(row, report), (row, report)
    secret, loopback = [line for line in report.splitlines() if line.startswith("PROBLEM:")]
    assert "DOCSYNC_SECRET_KEY" in secret and "2 workers" in secret, report
    assert "no host is trusted but the loopback names" in loopback, report  # tests/test_trust.py has more

    safe = check_deploy(DOCSYNC_SECRET_KEY=SECRET, DEPLOY_TRUSTED_HOSTS="example.com")
    assert safe.returncode == 0, safe.stdout + safe.stderr
    assert re.search(r"session ids\s+signed", safe.stdout) and "PROBLEM" not in safe.stdout, safe.stdout
    assert safe.stdout.rstrip().endswith("OK"), safe.stdout
    assert re.search(r"hosts\s+each on its own", safe.stdout), safe.stdout


def test_check_deploy_reports_hosts_joined_through_redis():
    # Nothing connects to Redis here: the report reads the settings.
    joined = check_deploy(DOCSYNC_SECRET_KEY=SECRET, DEPLOY_TRUSTED_HOSTS="example.com",
                          DOCSYNC_REDIS_URL="redis://10.0.0.9:6379/0", DOCSYNC_ADVERTISE_URL="http://10.0.0.5:8000")
    assert joined.returncode == 0, joined.stdout + joined.stderr
    assert re.search(r"hosts\s+routed to each other through Redis; this one at http://10.0.0.5:8000", joined.stdout)
    unreachable = check_deploy(DOCSYNC_SECRET_KEY=SECRET, DEPLOY_TRUSTED_HOSTS="example.com",
                               DOCSYNC_REDIS_URL="redis://10.0.0.9:6379/0")
    assert unreachable.returncode == 0, unreachable.stdout + unreachable.stderr
    assert "WARNING: DOCSYNC_REDIS_URL is set without DOCSYNC_ADVERTISE_URL" in unreachable.stdout


# --------------------------------------------------------------------------
# i. nginx in front of two gunicorn instances (two "hosts"), with Chromium
# --------------------------------------------------------------------------

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
TIMEOUT_MS = 30_000
#: Records the close code of every WebSocket the page opens.
RECORD_CLOSES = """
(() => {
  const Native = window.WebSocket;
  window.__closes = [];
  window.WebSocket = class extends Native {
    constructor(url, protocols) {
      super(url, protocols);
      this.addEventListener("close", (event) => window.__closes.push(event.code));
    }
  };
})();
"""


def nginx_site(listen_port: int, upstream_ports: tuple[int, int]) -> str:
    """examples/deploy/nginx.conf with the test's ports (and nothing else) changed."""
    site = NGINX_CONF.read_text()
    for old, new in (("listen 80;", f"listen 127.0.0.1:{listen_port};"),
                     ("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream_ports[0]};"),
                     ("server 127.0.0.1:8001;", f"server 127.0.0.1:{upstream_ports[1]};")):
        assert site.count(old) == 1, f"{old!r} not once in {NGINX_CONF}"
        site = site.replace(old, new)
    assert not re.search(r"^\s*(ip_hash|hash)\b", site, re.M), "sticky routing must be off for this test"
    return site


class Nginx:
    def __init__(self, folder: Path, site: str, port: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "site.conf").write_text(site)
        temp = "\n".join(f"    {name}_temp_path {folder / name};"
                         for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        user = "user root;\n" if os.geteuid() == 0 else ""
        (folder / "nginx.conf").write_text(
            f"{user}worker_processes 1;\nevents {{ worker_connections 256; }}\n"
            f"http {{\n    access_log off;\n{temp}\n    include {folder / 'site.conf'};\n}}\n")
        self.log_path = folder / "nginx.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(folder), "-c", str(folder / "nginx.conf"),
             "-g", f"daemon off; error_log stderr; pid {folder / 'nginx.pid'};"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + WAIT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not listen:\n{self.log()}") from None
                time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self._log.close()


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (scripts/test.sh installs Debian's nginx)")
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"needs Debian's chromium at {CHROMIUM}")
def test_nginx_prefix_two_hosts_and_a_browser_moving_to_the_survivor(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")
    expect = sync_api.expect

    # Two "hosts": gunicorn instances from examples/deploy/gunicorn.conf.py
    # on two ports, one secret, trusting the proxy's X-Forwarded-Prefix.
    hosts: dict[str, RunningServer] = {}
    nginx = None
    try:
        for name in ("A", "B"):
            port = free_port()
            cmd = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "--bind", f"127.0.0.1:{port}",
                   "--chdir", str(APPS), "--graceful-timeout", str(GRACEFUL_TIMEOUT), "deploy_factory:create_app()"]
            hosts[name] = RunningServer(cmd, port, env=clean_env(
                WEB_CONCURRENCY="1", DOCSYNC_SECRET_KEY=SECRET, DEPLOY_PROXY_FIX="1", DEPLOY_INSTANCE=name,
                DOCSYNC_SESSION_TOKEN_EXPIRATION="3"))
        for host in hosts.values():
            wait_until(lambda host=host: host.get("/health")[0] == 200, message="gunicorn answering")
        port = free_port()
        nginx = Nginx(tmp_path / "nginx", nginx_site(port, (hosts["A"].port, hosts["B"].port)), port)

        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_context().new_page()
                page.set_default_timeout(TIMEOUT_MS)
                page.add_init_script(RECORD_CLOSES)
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                sockets: list[str] = []
                page.on("websocket", lambda ws: sockets.append(ws.url))
                page.goto(nginx.url + "/dash/work")
                page.wait_for_function(
                    "() => window.Bokeh !== undefined && Bokeh.documents.length > 0"
                    " && Bokeh.documents[0].get_model_by_name('instance') !== null", timeout=TIMEOUT_MS)
                # Everything went through the prefix: BokehJS, and the WebSocket.
                assert sockets and all(url.startswith(nginx.url.replace("http", "ws") + "/dash/work/ws")
                                       for url in sockets), sockets
                scripts = page.evaluate("Array.from(document.scripts).map(s => s.src).filter(s => s)")
                assert scripts and all("/dash/static/" in s for s in scripts), scripts

                def model(name: str, attribute: str = "text") -> Any:
                    return page.evaluate(f"Bokeh.documents[0].get_model_by_name('{name}').{attribute}")

                first = model("instance")
                assert first in hosts, first
                page.evaluate("Bokeh.documents[0].get_model_by_name('slider').value = 42")
                expect(page.locator(".result")).to_have_text("value=42", timeout=TIMEOUT_MS)

                # Let the token's creation window pass, then stop the host
                # serving this page: its worker closes the WebSocket with
                # 1012 and BokehJS reconnects, through nginx, to the other.
                token = token_in(page.content())
                wait_until(lambda: token_expired(token), timeout=10, message="the token expiring")
                survivor = "B" if first == "A" else "A"
                stopped = hosts[first]
                os.kill(stopped.proc.pid, signal.SIGTERM)  # the master: graceful stop of the instance
                stopped.proc.wait(timeout=GRACEFUL_TIMEOUT + 10)

                page.wait_for_function(
                    f"() => Bokeh.documents[0].get_model_by_name('instance').text === '{survivor}'",
                    timeout=TIMEOUT_MS)
                # A fresh session made from the signed (expired) token: state reset, and it works.
                assert model("slider", "value") == 1
                assert page.evaluate("window.__closes")[0] == 1012  # "service restart" sent it away
                page.evaluate("Bokeh.documents[0].get_model_by_name('slider').value = 7")
                expect(page.locator(".result")).to_have_text("value=7", timeout=TIMEOUT_MS)
                assert len(sockets) >= 2, sockets
                assert errors == [], errors
            finally:
                browser.close()
        assert "recreating session" in hosts[survivor].log(), hosts[survivor].log()
        assert "Traceback" not in stopped.log(), stopped.log()
    finally:
        if nginx is not None:
            nginx.stop()
        for host in hosts.values():
            host.stop()
