"""Integration: hosts that route to each other through a real redis-server.

Two gunicorn instances of two gevent workers stand for two hosts (distinct
masters, so distinct host ids; each advertises its own port) behind a real
nginx doing plain round-robin. A page's session lives on the worker that
served the page; its WebSocket and every reconnect reach whichever host
nginx picks, and a worker there relays a session of the other host to it,
where it is handed to the owner. nginx's access log says where each
WebSocket arrived, so the test knows which arrivals crossed hosts.

tests/apps/home_app.py records the sessions every worker makes ($HOME_LOG).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from unittest import mock

import pytest
from bokeh.util.token import get_session_id

from conftest import APPS, RunningServer, free_port
from redis_util import redis_server  # noqa: F401  (fixture)
from test_deploy import NGINX, Nginx
from reliability_util import raw_request
from test_one_home import _read_log
from wire import WireClient, fetch_token, find_model

pytest.importorskip("redis")

SECRET = "cross-host-secret-" + "x" * 32
WORKERS = 2
INITIAL_VALUE = 1  # home_app.INITIAL_VALUE

#: The issue's proof: 200 sessions, each dropped and reconnected 5 times.
SESSIONS = 200
RECONNECTS = 5

SITE = """
log_format docsync_ws '$upstream_addr $http_sec_websocket_protocol';
map $http_upgrade $connection_upgrade {{
    default upgrade;
    ''      close;
}}
upstream hosts {{
    server 127.0.0.1:{a};
    server 127.0.0.1:{b};
}}
server {{
    listen 127.0.0.1:{port};
    location / {{
        access_log {log} docsync_ws if=$http_upgrade;
        proxy_pass http://hosts;
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $connection_upgrade;
        proxy_set_header Host $host:$server_port;
        proxy_read_timeout 300s;
        proxy_next_upstream off;
    }}
}}
"""


class Host:
    """One gunicorn "host" of WORKERS gevent workers, joined to the others through Redis."""

    def __init__(self, redis_url: str, created_log: Path, **env: str) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", str(WORKERS),
               "--bind", f"127.0.0.1:{self.port}", "--chdir", str(APPS), "--graceful-timeout", "5",
               "home_app:create_app()"]
        self.server = RunningServer(cmd, self.port, env={
            "TEST_SECRET": SECRET, "HOME_LOG": str(created_log), "HOME_REDIS_URL": redis_url,
            "HOME_ADVERTISE_URL": f"http://127.0.0.1:{self.port}", "HOME_UNUSED_LIFETIME_MS": "60000", **env,
        })
        self.server.wait_for_workers(WORKERS, "/pid")

    def worker_stats(self, timeout: float = 20) -> dict[int, dict]:
        """The stats of every worker (each request reaches one the kernel picks)."""
        pids = self.server.child_pids()
        seen: dict[int, dict] = {}
        deadline = time.monotonic() + timeout
        while set(seen) != pids and time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_stats", timeout=10) as resp:
                stats = json.load(resp)
            seen[stats["pid"]] = stats
        assert set(seen) == pids, f"stats of workers {pids - set(seen)} not reached"
        return seen

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def cluster(tmp_path, redis_server):  # noqa: F811
    if NGINX is None:
        pytest.skip("nginx is not installed (scripts/test.sh installs Debian's nginx)")
    created = tmp_path / "created.log"
    created.touch()
    hosts = [Host(redis_server.url, created), Host(redis_server.url, created)]
    port = free_port()
    access = tmp_path / "ws-access.log"
    nginx = Nginx(tmp_path / "nginx", SITE.format(a=hosts[0].port, b=hosts[1].port, port=port, log=access), port)
    try:
        yield hosts, nginx, created, access
    finally:
        nginx.stop()
        for host in hosts:
            host.stop()


def slider_state(client: WireClient) -> tuple[int, str, object]:
    doc = client.handshake().content["doc"]
    slider = find_model(doc, "slider")
    return int(find_model(doc, "pid")["attributes"]["text"]), slider["id"], slider["attributes"].get("value")


def drop(client: WireClient) -> None:
    """Cut the TCP connection with a RST: no close frame."""
    sock = client.ws.sock
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.ws.shutdown()


@pytest.mark.timeout(240)
def test_sessions_reattach_across_two_hosts_and_relays_are_only_for_cross_host_arrivals(cluster):
    hosts, nginx, created_log, access_log = cluster
    ws_url = nginx.url.replace("http", "ws") + "/home/ws"
    sessions: dict[str, tuple[str, int, int]] = {}  # session id -> (token, owner pid, value set)
    for n in range(SESSIONS):
        if n % 2:
            # One more request moves nginx's round robin on: pages (and so
            # sessions) are made on both hosts.
            urllib.request.urlopen(nginx.url + "/pid", timeout=10).close()
        token = fetch_token(nginx.url + "/home")
        with WireClient(ws_url, token, timeout=20) as client:
            pid, slider_id, value = slider_state(client)
            assert value == INITIAL_VALUE
            wanted = 1000 + n
            msgid = client.send("PATCH-DOC", {"events": [
                {"kind": "ModelChanged", "model": {"id": slider_id}, "attr": "value", "new": wanted}]})
            client.recv_until("OK", msgid)
            drop(client)
        sessions[get_session_id(token)] = (token, pid, wanted)
    wrong = []
    for round_ in range(RECONNECTS):
        for session_id, (token, pid, wanted) in sessions.items():
            with WireClient(ws_url, token, timeout=20) as client:
                got_pid, _, value = slider_state(client)
                if (got_pid, value) != (pid, wanted):
                    wrong.append((round_, session_id, (pid, wanted), (got_pid, value)))
                drop(client)
    if wrong:
        for host in hosts:
            open(f"/tmp/xhost-{host.port}.log", "w").write(host.server.log() + json.dumps(host.worker_stats(), indent=1))
    assert not wrong, f"{len(wrong)} reconnects did not reattach, e.g. {wrong[:3]}"

    # Every session was made once, by the worker that served its page, on both hosts.
    made = Counter(session_id for _, session_id in _read_log(created_log))
    assert set(made) == set(sessions)
    assert max(made.values()) == 1
    owners = Counter(pid for _, pid, _ in sessions.values())
    for host in hosts:
        assert sum(owners[pid] for pid in host.server.child_pids()) >= SESSIONS // 4, owners

    # Which host each WebSocket reached (nginx), against which host owns its session.
    pids = {host.port: host.server.child_pids() for host in hosts}
    host_of_pid = {pid: port for port, worker_pids in pids.items() for pid in worker_pids}
    arrivals = Counter()
    for line in access_log.read_text().splitlines():
        upstream, _, protocols = line.partition(" ")
        token = protocols.split(",")[-1].strip()
        owner_port = host_of_pid[sessions[get_session_id(token)][1]]
        arrivals["cross" if int(upstream.rsplit(":", 1)[1]) != owner_port else "same"] += 1
    assert sum(arrivals.values()) == SESSIONS * (1 + RECONNECTS)
    # Round-robin over two hosts: about half of them cross.
    assert arrivals["cross"] > SESSIONS * (1 + RECONNECTS) // 4, arrivals

    # Relays end once nginx has passed on the clients' resets.
    deadline = time.monotonic() + 15
    while True:
        stats = [s["routing"] for host in hosts for s in host.worker_stats().values()]
        if sum(s["relays_open"] for s in stats) == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for host in hosts:  # relays in both directions
        assert sum(s["routing"]["relayed"] for s in host.worker_stats().values()) > 0
    relayed = sum(s["relayed"] for s in stats)
    received = sum(s["relay_received"] for s in stats)
    assert relayed == arrivals["cross"], (relayed, arrivals)
    assert received == arrivals["cross"], (received, arrivals)
    assert sum(s["relay_failed"] + s["cross_host_fresh"] for s in stats) == 0
    assert sum(s["adopted"] for s in stats) == 0
    # Same-host arrivals at the other worker are handed over; so are relays
    # that reach a worker other than the owner on its host.
    assert sum(s["handed_over"] for s in stats) > 0
    assert all(s["registry"]["available"] for s in stats)
    assert sum(s["relays_open"] for s in stats) == 0


def _reconnect(host: Host, token: str) -> tuple[int, str, object]:
    with WireClient(f"ws://127.0.0.1:{host.port}/home/ws", token, timeout=20) as client:
        state = slider_state(client)
        drop(client)
    return state


def _set_value(host: Host, token: str, value: int) -> int:
    with WireClient(f"ws://127.0.0.1:{host.port}/home/ws", token, timeout=20) as client:
        pid, slider_id, _ = slider_state(client)
        msgid = client.send("PATCH-DOC", {"events": [
            {"kind": "ModelChanged", "model": {"id": slider_id}, "attr": "value", "new": value}]})
        client.recv_until("OK", msgid)
        drop(client)
    return pid


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.timeout(180)
def test_without_redis_hosts_route_their_own_and_others_get_fresh_sessions_then_recover(cluster, redis_server):  # noqa: F811
    hosts, _, _, _ = cluster
    a, b = hosts
    page = f"http://127.0.0.1:{a.port}/home"
    local, crossing = fetch_token(page), fetch_token(page)
    owner = _set_value(a, local, 111)
    assert _set_value(a, crossing, 222) in a.server.child_pids()
    assert _reconnect(b, crossing)[::2] != (0, 0)  # reachable across hosts while Redis is up
    assert _reconnect(b, crossing)[2] == 222

    redis_server.stop()
    try:
        # Within host A nothing changes: every reconnect (either worker) reattaches.
        for _ in range(6):
            assert _reconnect(a, local)[::2] == (owner, 111)
        # At host B the session of host A cannot be looked up: one fresh copy
        # there, which every reconnect to B finds (either worker).
        fresh_pid, _, value = _reconnect(b, crossing)
        assert fresh_pid in b.server.child_pids() and value == INITIAL_VALUE
        assert _set_value(b, crossing, 333) == fresh_pid
        for _ in range(4):
            assert _reconnect(b, crossing)[::2] == (fresh_pid, 333)
        # New pages are served on both hosts meanwhile.
        for host in hosts:
            token = fetch_token(f"http://127.0.0.1:{host.port}/home")
            assert _reconnect(host, token)[0] in host.server.child_pids()
        assert "cannot be looked up while Redis is unreachable" in b.server.log()
        assert "Redis at" in b.server.log() and "cannot be reached" in b.server.log()
    finally:
        redis_server.start()

    # Once every worker of B has its registry back, the owner on A wins again.
    _wait_for(lambda: all(s["routing"]["registry"]["available"] and s["routing"]["registry"]["heir_claims"] == 0
                          for s in b.worker_stats().values())
              and all(_registered(redis_server, s["routing"]["tag"]) for s in a.worker_stats().values()),
              20, "the registry to be back")
    for _ in range(4):
        assert _reconnect(b, crossing)[::2] == (a_pid_of(a, crossing), 222)
    assert "reachable again" in b.server.log()


def _registered(redis_server, tag: str) -> bool:  # noqa: F811
    return redis_server.client().exists(f"docsync:worker:{tag}") == 1


def a_pid_of(host: Host, token: str) -> int:
    """The pid of the worker of ``host`` that holds the session (a reconnect straight there)."""
    return _reconnect(host, token)[0]


def _raw_upgrade(host: Host, token: str, headers: dict[str, str], source: str = "127.0.0.1") -> int:
    """Send a WebSocket upgrade by hand; the status of the answer."""
    lines = ["GET /home/ws HTTP/1.1", f"Host: {headers.pop('Host', f'127.0.0.1:{host.port}')}",
             "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", f"Sec-WebSocket-Protocol: bokeh, {token}",
             *(f"{k}: {v}" for k, v in headers.items())]
    return raw_request(host.server, lines, read_timeout=20, source=source)[0]


def _environ_of(port: int, token: str, headers: dict[str, str]) -> dict[str, str]:
    """The HTTP_* keys of an upgrade request as the receiving host's environ has them."""
    environ = {"HTTP_HOST": f"127.0.0.1:{port}", "HTTP_UPGRADE": "websocket", "HTTP_CONNECTION": "Upgrade",
               "HTTP_SEC_WEBSOCKET_VERSION": "13", "HTTP_SEC_WEBSOCKET_KEY": "dGhlIHNhbXBsZSBub25jZQ==",
               "HTTP_SEC_WEBSOCKET_PROTOCOL": f"bokeh, {token}"}
    environ.update({"HTTP_" + k.upper().replace("-", "_"): v for k, v in headers.items()})
    return environ


@pytest.mark.timeout(60)
def test_a_forged_replayed_or_misdirected_relay_header_is_refused(cluster):
    from flask_docsync import relay

    hosts, _, _, _ = cluster
    a, b = hosts
    token = fetch_token(f"http://127.0.0.1:{a.port}/home")
    host_a = a.worker_stats()[next(iter(a.server.child_pids()))]["routing"]["host"]
    host_b = b.worker_stats()[next(iter(b.server.child_pids()))]["routing"]["host"]
    extra = {"X-DocSync-Relay-For": "10.1.2.3", "Cookie": "login=alice"}
    digest = relay.headers_digest(_environ_of(a.port, token, extra))
    args = ("GET", "/home/ws", digest)
    with mock.patch.object(relay.time, "time", return_value=time.time() - 60):
        stale = relay.sign(SECRET.encode(), 1, host_a, "http", *args)
    cases = (
        ("1.2.3", {}, 403, "the relay header is malformed"),
        (relay.sign(b"another deployment's secret", 1, host_a, "http", *args), {}, 403,
         "is not signed with this deployment's secret"),
        # Replayed with someone else's cookie: the MAC covers every header.
        (relay.sign(SECRET.encode(), 1, host_a, "http", *args), {"Cookie": "login=mallory"}, 403,
         "is not signed with this deployment's secret"),
        (stale, {}, 403, "the relay header is 60."),
        (relay.sign(SECRET.encode(), 2, host_a, "http", *args), {}, 403, "has been relayed 2 times"),
        (relay.sign(SECRET.encode(), 1, host_b, "http", *args), {}, 502, f"for host {host_b} reached host {host_a}"),
    )
    for value, changed, status, reason in cases:
        assert _raw_upgrade(a, token, {**extra, **changed, "X-DocSync-Relay": value}) == status, reason
        _wait_for(lambda: reason in a.server.log(), 5, reason)
    # A header that checks out is taken.
    signature = relay.sign(SECRET.encode(), 1, host_a, "http", *args)
    assert _raw_upgrade(a, token, {**extra, "X-DocSync-Relay": signature}) == 101
    assert _reconnect(a, token)[2] == INITIAL_VALUE


@pytest.mark.timeout(90)
def test_a_relay_keeps_the_scheme_the_client_used(tmp_path, redis_server):  # noqa: F811
    """Behind a TLS balancer whose X-Forwarded-Proto only the balancer's address may set."""
    created = tmp_path / "created.log"
    created.touch()
    hosts = [Host(redis_server.url, created, FORWARDED_ALLOW_IPS="127.0.0.2") for _ in range(2)]
    try:
        a, b = hosts
        token = fetch_token(f"http://127.0.0.1:{a.port}/home")
        balancer = {"Host": "localhost", "Origin": "https://localhost", "X-Forwarded-Proto": "https"}
        assert _raw_upgrade(a, token, dict(balancer), source="127.0.0.2") == 101
        assert _raw_upgrade(b, token, dict(balancer), source="127.0.0.2") == 101  # relayed to A
        assert sum(s["routing"]["relayed"] for s in b.worker_stats().values()) == 1
    finally:
        for host in hosts:
            host.stop()


def _made_count(created_log: Path) -> Counter:
    return Counter(session_id for _, session_id in _read_log(created_log))


@pytest.mark.timeout(180)
def test_a_killed_workers_sessions_are_made_anew_once_in_the_whole_deployment(cluster):
    hosts, nginx, created_log, _ = cluster
    a, b = hosts
    ws_url = nginx.url.replace("http", "ws") + "/home/ws"
    tokens = [fetch_token(f"http://127.0.0.1:{a.port}/home") for _ in range(40)]
    owner_of = {token: _set_value(a, token, 500 + n) for n, token in enumerate(tokens)}
    victim = owner_of[tokens[0]]  # the kernel may give one worker every page
    gone = [token for token in tokens if owner_of[token] == victim]
    os.kill(victim, signal.SIGKILL)
    _wait_for(lambda: victim not in a.server.child_pids(), 10, "the worker to die")

    # Each gone session, reconnected through nginx (so on both hosts), is
    # made anew once, and every later reconnect finds that one copy.
    homes: dict[str, set[int]] = {}
    for round_ in range(4):
        for token in gone:
            with WireClient(ws_url, token, timeout=20) as client:
                pid, slider_id, value = slider_state(client)
                if round_ == 0:
                    assert value == INITIAL_VALUE
                    msgid = client.send("PATCH-DOC", {"events": [
                        {"kind": "ModelChanged", "model": {"id": slider_id}, "attr": "value", "new": 7}]})
                    client.recv_until("OK", msgid)
                else:
                    assert value == 7, (round_, token[:20])
                homes.setdefault(token, set()).add(pid)
                drop(client)
    assert all(len(pids) == 1 for pids in homes.values()), homes
    made = _made_count(created_log)
    assert all(made[get_session_id(token)] == 2 for token in gone)
    # The survivors' sessions were not touched.
    for n, token in enumerate(tokens):
        if token not in gone:
            assert _reconnect(b, token)[::2] == (owner_of[token], 500 + n)
            assert made[get_session_id(token)] == 1


@pytest.mark.timeout(180)
def test_a_whole_host_gone_its_sessions_are_made_anew_once_on_the_other(cluster):
    hosts, _, created_log, _ = cluster
    a, b = hosts
    tokens = [fetch_token(f"http://127.0.0.1:{b.port}/home") for _ in range(20)]
    for token in tokens:
        _set_value(b, token, 42)
    b.server.stop(signal.SIGKILL)  # master and workers at once: no entry is deleted
    homes: dict[str, set[int]] = {}
    for _ in range(3):
        for token in tokens:
            pid, _, value = _reconnect(a, token)
            assert value == INITIAL_VALUE
            homes.setdefault(token, set()).add(pid)
    assert all(len(pids) == 1 and pids <= a.server.child_pids() for pids in homes.values()), homes
    made = _made_count(created_log)
    assert all(made[get_session_id(token)] == 2 for token in tokens)
    stats = [s["routing"] for s in a.worker_stats().values()]
    assert sum(s["relay_failed"] for s in stats) >= 1
    assert "cannot be reached" in a.server.log()


@pytest.mark.timeout(240)
def test_browsers_behind_round_robin_keep_their_sessions_across_an_nginx_restart(cluster, tmp_path):
    import browser_util

    browser_util.require_browser()
    hosts, nginx, created_log, _ = cluster
    port = int(nginx.url.rsplit(":", 1)[1])
    site = (tmp_path / "nginx" / "site.conf").read_text()
    pages = []
    with browser_util.launch_browser() as browser:
        context = browser.new_context()
        context.add_init_script(RECORD_SOCKETS)
        for n in range(4):
            page = context.new_page()
            page.goto(nginx.url + "/home", timeout=browser_util.TIMEOUT_MS)
            _browser_set(page, 100 + n)
            pages.append(page)
        relayed = sum(s["routing"]["relayed"] for host in hosts for s in host.worker_stats().values())
        assert relayed >= 1, "no page's WebSocket crossed hosts"

        # Every WebSocket is cut at once; BokehJS reconnects through a new
        # nginx (round robin again) with the same token.
        os.killpg(nginx.proc.pid, signal.SIGKILL)
        nginx.proc.wait(timeout=10)
        restarted = Nginx(tmp_path / "nginx2", site, port)
        try:
            for n, page in enumerate(pages):
                _wait_reconnected(page)
                assert _browser_value(page) == 100 + n
                _browser_set(page, 200 + n)  # the reattached session answers
        finally:
            restarted.stop()
    made = _made_count(created_log)
    assert sum(made.values()) == len(pages) and max(made.values()) == 1, made


def _browser_set(page, value: int) -> None:
    page.wait_for_function(
        "() => window.Bokeh && Bokeh.documents.length > 0 && Bokeh.documents[0].get_model_by_name('slider')",
        timeout=20_000)
    page.evaluate(f"() => {{ Bokeh.documents[0].get_model_by_name('slider').value = {value} }}")
    page.wait_for_function(
        f"() => Bokeh.documents[0].get_model_by_name('echo').text === 'echo {value}'", timeout=20_000)


def _browser_value(page) -> int:
    return page.evaluate("() => Bokeh.documents[0].get_model_by_name('slider').value")


#: Keeps every WebSocket the page opens.
RECORD_SOCKETS = """
(() => {
  const Native = window.WebSocket;
  window.__sockets = [];
  window.WebSocket = class extends Native {
    constructor(url, protocols) { super(url, protocols); window.__sockets.push(this); }
  };
})();
"""


def _wait_reconnected(page) -> None:
    page.wait_for_function(
        "() => window.__sockets.length >= 2 && window.__sockets[window.__sockets.length - 1].readyState === 1",
        timeout=45_000)
    # Then BokehJS pulls the document and replaces its own with it.
    time.sleep(1.0)


@pytest.mark.timeout(120)
def test_a_redis_restart_that_loses_every_entry_sends_no_reconnect_to_a_copy(cluster, redis_server):  # noqa: F811
    hosts, _, created_log, _ = cluster
    a, b = hosts
    token = fetch_token(f"http://127.0.0.1:{a.port}/home")
    owner = _set_value(a, token, 321)
    for _ in range(40):  # until both of B's workers have relayed it once (each remembers A's URL)
        assert _reconnect(b, token)[::2] == (owner, 321)
        if all(s["routing"]["relayed"] for s in b.worker_stats().values()):
            break
    else:
        pytest.fail("the kernel never gave one of B's workers a connection")
    redis_server.client().flushall()  # what a restart without persistence leaves
    for _ in range(6):
        assert _reconnect(b, token)[::2] == (owner, 321)
    assert _made_count(created_log)[get_session_id(token)] == 1


@pytest.mark.timeout(120)
def test_two_flask_docsync_serve_hosts_with_redis_url_share_their_sessions(tmp_path, redis_server):  # noqa: F811
    """`flask-docsync serve --redis-url`, one process each: it advertises its own address."""
    created = tmp_path / "created.log"
    created.touch()
    servers = []
    try:
        for _ in range(2):
            port = free_port()
            cmd = [sys.executable, "-m", "flask_docsync", "serve", str(APPS / "home_script.py"), "--port", str(port),
                   "--address", "127.0.0.1", "--redis-url", redis_server.url]
            servers.append(RunningServer(cmd, port, env={"DOCSYNC_SECRET_KEY": SECRET, "HOME_LOG": str(created)},
                                         wait_path="/home_script"))
        for n in range(10):
            home, other = servers[n % 2], servers[1 - n % 2]
            token = fetch_token(home.url + "/home_script")
            pids = set()
            for server in (other, home, other):  # the page's WebSocket at the other host, then reconnects
                with WireClient(server.ws_url + "/home_script/ws", token, timeout=10) as client:
                    pids.add(int(find_model(client.handshake().content["doc"], "pid")["attributes"]["text"]))
            assert pids == {home.proc.pid}
            assert _made_count(created)[get_session_id(token)] == 1
    finally:
        for server in servers:
            server.stop()


@pytest.mark.timeout(120)
def test_a_relaying_host_that_stops_ends_its_relays_and_the_session_lives_on(cluster):
    import websocket

    hosts, _, _, _ = cluster
    a, b = hosts
    token = fetch_token(f"http://127.0.0.1:{a.port}/home")
    owner = _set_value(a, token, 654)
    client = WireClient(f"ws://127.0.0.1:{b.port}/home/ws", token, timeout=20)
    try:
        assert slider_state(client)[::2] == (owner, 654)
        assert sum(s["routing"]["relays_open"] for s in b.worker_stats().values()) == 1
        began = time.monotonic()
        b.server.stop()  # SIGTERM: gunicorn's graceful stop
        with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError, OSError)):
            while True:  # the owner's keep-alive pings arrive until the relay ends
                opcode, _ = client.recv_frame()
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    raise websocket.WebSocketConnectionClosedException("closed")
        # At once, not after gunicorn's graceful timeout (5 s here) ran out.
        assert time.monotonic() - began < 3
    finally:
        client.close()
    assert _reconnect(a, token)[::2] == (owner, 654)
    assert "Traceback" not in b.server.log()


@pytest.mark.timeout(120)
def test_redis_coming_and_going_gives_a_gone_workers_session_one_heir_on_its_host(cluster, redis_server):  # noqa: F811
    hosts, _, created_log, _ = cluster
    a = hosts[0]
    tokens = [fetch_token(f"http://127.0.0.1:{a.port}/home") for _ in range(6)]
    owners = {token: _set_value(a, token, 5) for token in tokens}
    victim = owners[tokens[0]]
    gone = [token for token in tokens if owners[token] == victim]
    os.kill(victim, signal.SIGKILL)
    _wait_for(lambda: victim not in a.server.child_pids() and len(a.server.child_pids()) == WORKERS, 15,
              "the worker to be replaced")
    homes: dict[str, set[tuple[int, str]]] = {}

    def reconnect_all(times: int) -> None:
        for _ in range(times):
            for token in gone:
                pid, slider_id, _ = _reconnect(a, token)
                homes.setdefault(token, set()).add((pid, slider_id))

    reconnect_all(4)
    redis_server.stop()
    try:
        reconnect_all(6)
    finally:
        redis_server.start()
    reconnect_all(4)
    assert all(len(found) == 1 for found in homes.values()), homes
    made = _made_count(created_log)
    assert all(made[get_session_id(token)] == 2 for token in gone), made
