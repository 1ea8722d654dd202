"""Integration: one home per session under `gunicorn -k gevent -w 4` on one port.

A page's session lives in the worker that served the page; its WebSocket,
and every reconnect, land on whichever worker the kernel picks. That worker
must hand the client socket to the session's owner (the worker named by the
signed owner tag in the session id) instead of making a second copy of the
session from the token. If the owner is gone, the reconnect gets one fresh
session on a live worker, and later reconnects find that one.

The app (tests/apps/home_app.py) records every session any worker creates
(``"<pid> <session_id>"`` lines in $HOME_LOG) and destroys ($HOME_DESTROYED_LOG);
its document's ``pid`` Div names the worker that made the session.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import websocket
from bokeh.util.token import (
    _base64_decode,
    _base64_encode,
    generate_jwt_token,
    generate_session_id,
    get_session_id,
    get_token_payload,
)

from conftest import APPS, RunningServer, free_port
from flask_docsync.config import Settings
from flask_docsync.tokens import TokenPolicy, owner_tag
from wire import Message, WireClient, fetch_token, find_model

SECRET = "home-secret-" + "h" * 32
WORKERS = 4
ROUTE = "/home"
#: The slider's value in a fresh session (tests/apps/home_app.py INITIAL_VALUE).
INITIAL_VALUE = 1

#: Pages of test 1, fetched one after another.
PAGES = 200
#: Sessions of test 2 and reconnects of each: the issue's full proof (200 × 5)
#: runs in well under 90 s here (about 15-25 s on 2 cores), so it is used as is.
RECONNECT_SESSIONS = 200
RECONNECTS = 5


# -- server ------------------------------------------------------------------


class HomeServer:
    """gunicorn with WORKERS gevent workers serving home_app, and its session logs."""

    def __init__(self, tmp: Path, gunicorn_args: tuple[str, ...] = (), tls: ssl.SSLContext | None = None,
                 **env: str) -> None:
        self.tls = tls
        self.created_log = tmp / "created.log"
        self.destroyed_log = tmp / "destroyed.log"
        self.created_log.touch()
        self.destroyed_log.touch()
        port = free_port()
        cmd = [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", str(WORKERS),
               "--bind", f"127.0.0.1:{port}", "--chdir", str(APPS), "--graceful-timeout", "5",
               *gunicorn_args, "home_app:create_app()"]
        self.server = RunningServer(cmd, port, env={
            "TEST_SECRET": SECRET, "HOME_LOG": str(self.created_log),
            "HOME_DESTROYED_LOG": str(self.destroyed_log), **env,
        }, tls=tls)
        self.url = self.server.url
        self.page_url = self.url + ROUTE
        self.ws_url = self.server.ws_url + ROUTE + "/ws"
        self.server.wait_for_workers(WORKERS, "/pid")

    def worker_pids(self) -> set[int]:
        """The arbiter's live children (gunicorn's workers)."""
        return self.server.child_pids()

    def created(self) -> list[tuple[int, str]]:
        return _read_log(self.created_log)

    def destroyed(self) -> list[tuple[int, str]]:
        return _read_log(self.destroyed_log)

    def stop(self) -> None:
        self.server.stop()


def _read_log(path: Path) -> list[tuple[int, str]]:
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            pid, session_id = line.split(" ", 1)
            lines.append((int(pid), session_id))
    return lines


@pytest.fixture
def home(tmp_path) -> Iterator:
    """``home(**env)`` starts a HomeServer; every one is stopped after the test."""
    started: list[HomeServer] = []

    def start(gunicorn_args: tuple[str, ...] = (), tls: ssl.SSLContext | None = None, **env: str) -> HomeServer:
        server = HomeServer(tmp_path, gunicorn_args, tls, **env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# -- client helpers ----------------------------------------------------------


def connect(server: HomeServer, token: str, retry_for: float = 5.0, timeout: float = 10.0) -> WireClient:
    """A WireClient; only a refused TCP connect (no listener yet) is retried.

    :param timeout: Seconds the TCP connect and the upgrade may take.
    """
    deadline = time.monotonic() + retry_for
    while True:
        try:
            return WireClient(server.ws_url, token, timeout=timeout, context=server.tls)
        except ConnectionRefusedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def state(reply: Message) -> tuple[int, str, object]:
    """(pid of the session's worker, the slider's id, the slider's value) of a PULL-DOC-REPLY."""
    doc = reply.content["doc"]
    pid = int(find_model(doc, "pid")["attributes"]["text"])
    slider = find_model(doc, "slider")
    return pid, slider["id"], slider["attributes"].get("value")


def set_slider(client: WireClient, slider_id: str, value: int) -> None:
    msgid = client.send("PATCH-DOC", {"events": [
        {"kind": "ModelChanged", "model": {"id": slider_id}, "attr": "value", "new": value}]})
    client.recv_until("OK", msgid)


def drop(client: WireClient) -> None:
    """Cut the TCP connection with a RST: no close frame, no FIN handshake."""
    sock = client.ws.sock
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.ws.shutdown()


def open_page(server: HomeServer) -> tuple[str, str, WireClient, tuple[int, str, object]]:
    """Fetch a page and open its WebSocket: (token, session id, client, state)."""
    token = fetch_token(server.page_url, server.tls)
    client = connect(server, token)
    try:
        reply = client.handshake()
    except BaseException:
        client.close()
        raise
    return token, get_session_id(token), client, state(reply)


def refusal(server: HomeServer, token: str) -> str | None:
    """``None`` if the WebSocket with ``token`` is refused (403 before the
    upgrade, or close 1008 before any message); else what happened instead."""
    try:
        client = connect(server, token)
    except websocket.WebSocketBadStatusException as exc:
        return None if exc.status_code == 403 else f"HTTP {exc.status_code}"
    with client:
        try:
            opcode, data = client.recv_frame()
        except websocket.WebSocketConnectionClosedException:
            return "connection cut without a close frame"
        except websocket.WebSocketTimeoutException:
            return "accepted and left open"
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
            return None if code == 1008 else f"closed with {code}"
        return f"accepted: got frame {opcode} {data[:200]!r}"


# -- tests -------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_every_websocket_reaches_the_page_session(home):
    """Every page's WebSocket is served by the worker that made the page's
    session, and no second copy of any session is made."""
    server = home()
    pages: list[tuple[str, int]] = []  # (session id, pid in the pulled document)
    started = time.monotonic()
    for _ in range(PAGES):
        token, session_id, client, (pid, _, _) = open_page(server)
        client.close()
        pages.append((session_id, pid))
    elapsed = time.monotonic() - started

    created = server.created()
    makers: dict[str, list[int]] = {}
    for pid, session_id in created:
        makers.setdefault(session_id, []).append(pid)
    copies = {sid: pids for sid, pids in makers.items() if len(pids) > 1}
    elsewhere = [(sid, pid, makers.get(sid)) for sid, pid in pages if makers.get(sid) != [pid]]
    one_home = not copies and not elsewhere and len(created) == PAGES
    assert one_home, (
        f"{len(created)} sessions created for {PAGES} pages; {len(copies)} sessions made more than"
        f" once; {len(elsewhere)} WebSockets served by a worker that did not make the page's"
        f" session, e.g. (session, document pid, creating pids) {elsewhere[:3]}"
    )
    assert {sid for sid, _ in pages} == set(makers)
    # Meaningful only if the pages were spread over workers.
    page_workers = Counter(pid for pid, _ in created)
    assert len(page_workers) > 1, f"every page was served by one worker: {page_workers}"
    assert elapsed < 60, f"{PAGES} pages took {elapsed:.1f}s"
    assert "Traceback" not in server.server.log()


@pytest.mark.timeout(150)
def test_reconnects_reattach_with_their_state(home):
    """A session's reconnects after abrupt drops (RST) reattach to it: the value
    it set and the worker serving it are unchanged."""
    server = home()
    reattached = 0
    failures: list[str] = []
    started = time.monotonic()
    for n in range(RECONNECT_SESSIONS):
        value = 100 + n
        token, session_id, client, (pid, slider_id, _) = open_page(server)
        try:
            set_slider(client, slider_id, value)
        finally:
            drop(client)
        for attempt in range(RECONNECTS):
            client = connect(server, token)
            try:
                got_pid, got_slider, got_value = state(client.handshake())
            finally:
                drop(client)
            if (got_pid, got_slider, got_value) == (pid, slider_id, value):
                reattached += 1
            else:
                failures.append(f"session {n} reconnect {attempt + 1}: pid {got_pid} (was {pid}),"
                                f" slider {got_slider} (was {slider_id}), value {got_value} (set {value})")
    elapsed = time.monotonic() - started
    total = RECONNECT_SESSIONS * RECONNECTS
    assert reattached == total, (
        f"{reattached} of {total} reconnects reattached ({elapsed:.1f}s); e.g. {failures[:3]}"
    )
    copies = [sid for sid, n in Counter(sid for _, sid in server.created()).items() if n > 1]
    assert len(copies) == 0, f"{len(copies)} sessions were created more than once"
    assert "Traceback" not in server.server.log()


@pytest.mark.timeout(90)
def test_owner_killed_gives_a_fresh_session_at_the_first_retry(home):
    """When the owner worker is killed, the first accepted reconnect gets a
    fresh session on a live worker, and later reconnects find that session."""
    server = home()
    token, session_id, client, (owner, slider_id, _) = open_page(server)
    try:
        set_slider(client, slider_id, 77)
    finally:
        client.close()
    assert owner in server.worker_pids()
    before_kill = len(server.created())
    os.kill(owner, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while owner in server.worker_pids() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert owner not in server.worker_pids(), "the killed worker is still a live child"

    # The first WebSocket the server accepts must work (only a refused TCP
    # connect is retried, by connect()).
    client = connect(server, token)
    try:
        new_pid, new_slider, value = state(client.handshake())
        assert new_pid != owner
        assert new_pid in server.worker_pids(), f"{new_pid} is not a live worker"
        assert value == INITIAL_VALUE, f"a fresh session has the initial value, got {value}"
        set_slider(client, new_slider, 4242)
    finally:
        drop(client)

    # Later reconnects with the same token reach that same new session,
    # wherever the kernel puts them.
    seen = []
    for _ in range(8):
        client = connect(server, token)
        try:
            seen.append(state(client.handshake()))
        finally:
            client.close()
    assert all(s == (new_pid, new_slider, 4242) for s in seen), (
        f"expected every reconnect at the new session {(new_pid, new_slider, 4242)}, got {seen}"
    )
    after_kill = server.created()[before_kill:]
    assert len(after_kill) == 1 and after_kill[0][0] == new_pid, (
        f"one fresh session expected after the kill, created: {after_kill}"
    )
    assert "Traceback" not in server.server.log()


def _forge(token: str, session_id: str) -> str:
    """``token`` with its payload's session id replaced, the signature kept."""
    payload_part, signature = token.split(".", 1)
    payload = json.loads(_base64_decode(payload_part))
    assert payload["session_id"] == get_session_id(token)
    payload["session_id"] = session_id
    return _base64_encode(json.dumps(payload)) + "." + signature


def _altered(session_id: str, i: int) -> str:
    c = session_id[i]
    replacement = "B" if c == "A" else "A" if c.isalpha() else "1" if c == "0" else "0"
    return session_id[:i] + replacement + session_id[i + 1:]


@pytest.mark.timeout(90)
def test_forged_or_foreign_owner_tags_are_refused(home):
    """A session id altered anywhere (its owner tag wherever it is), swapped for
    another session's, or signed with another key is refused, and the server
    goes on serving the real sessions."""
    server = home()
    token, session_id, client, (_, slider_id, _) = open_page(server)
    try:
        set_slider(client, slider_id, 55)
    finally:
        client.close()
    other_token, other_id, other, _ = open_page(server)
    other.close()
    created_before = len(server.created())

    forged: dict[str, str] = {}
    # One character changed at every position of the id, separators included.
    for i in range(len(session_id)):
        forged[f"id[{i}] changed"] = _forge(token, _altered(session_id, i))
    forged["another session's id in this token"] = _forge(token, other_id)
    forged["this id in another session's token"] = _forge(other_token, session_id)
    foreign_key = b"another-deployment-" + b"k" * 32
    foreign_id = generate_session_id(secret_key=foreign_key, signed=True)
    forged["signed with another key"] = generate_jwt_token(
        foreign_id, secret_key=foreign_key, signed=True, expiration=300)
    forged["this id signed with another key"] = generate_jwt_token(
        session_id, secret_key=foreign_key, signed=True, expiration=300)

    outcomes = {name: refusal(server, t) for name, t in forged.items()}
    accepted = {name: why for name, why in outcomes.items() if why is not None}
    assert not accepted, f"{len(accepted)} forged tokens were not refused: {accepted}"
    assert len(server.created()) == created_before, "a forged token created a session"

    # The real sessions are still served (that a reconnect reattaches with its
    # state is test_reconnects_reattach_with_their_state's business).
    for real in (token, other_token):
        with connect(server, real) as client:
            got_pid, _, _ = state(client.handshake())
        assert got_pid in server.worker_pids()
    _, _, client, _ = open_page(server)
    client.close()
    assert "Traceback" not in server.server.log()


@pytest.mark.timeout(90)
def test_expired_token_for_a_discarded_session_is_refused(home):
    """A token past its expiry whose session was discarded (its owner alive) is
    refused, as Bokeh refuses it, by whichever worker gets the reconnect."""
    expiration = 2
    server = home(HOME_TOKEN_EXPIRATION=str(expiration), HOME_UNUSED_LIFETIME_MS="500",
                  HOME_CHECK_UNUSED_MS="200")
    token, session_id, client, (pid, _, _) = open_page(server)
    client.close()
    expiry = float(get_token_payload(token)["session_expiry"])
    assert expiry - time.time() <= expiration + 1

    def discarded() -> bool:
        made = Counter(s for _, s in server.created() if s == session_id)
        gone = Counter(s for _, s in server.destroyed() if s == session_id)
        return bool(made) and gone == made

    deadline = time.monotonic() + 20
    while not (discarded() and time.time() > expiry + 0.2):
        assert time.monotonic() < deadline, (
            f"session not discarded in time: created {server.created()}, destroyed {server.destroyed()}"
        )
        time.sleep(0.1)
    assert pid in server.worker_pids(), "the owner must still be alive for this test"
    created_before = len(server.created())

    # Several tries, so both the owner and other workers are likely asked.
    outcomes = [refusal(server, token) for _ in range(8)]
    assert outcomes == [None] * 8, f"an expired token for a discarded session was not refused: {outcomes}"
    assert len(server.created()) == created_before, "the expired token recreated its session"

    # Other sessions are still served.
    _, _, client, _ = open_page(server)
    client.close()


#: Pages opened before one worker is killed; about a quarter are its sessions.
STAMPEDE_PAGES = 240


@pytest.mark.timeout(150)
def test_a_dead_workers_sessions_reconnect_at_once_each_made_anew_once(home):
    server = home()
    pages = []
    for _ in range(STAMPEDE_PAGES):
        token, session_id, client, (pid, _, _) = open_page(server)
        client.close()
        pages.append((token, session_id, pid))
    by_pid: dict[int, list[tuple[str, str]]] = {}
    for token, session_id, pid in pages:
        by_pid.setdefault(pid, []).append((token, session_id))
    victim, orphans = max(by_pid.items(), key=lambda item: len(item[1]))
    others = [(token, sid, pid) for token, sid, pid in pages if pid != victim][:20]
    before = len(server.created())
    os.kill(victim, signal.SIGKILL)

    results: dict[str, object] = {}

    def reconnect(token: str, session_id: str) -> None:
        try:
            # A browser's opening handshake has far longer than 10 s; a
            # loaded 2-core CI machine making 86 sessions at once may need it.
            with connect(server, token, timeout=60) as client:
                results[session_id] = state(client.handshake())
        except Exception as exc:  # recorded, asserted below
            results[session_id] = exc

    threads = [threading.Thread(target=reconnect, args=orphan) for orphan in orphans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    failed = {sid: r for sid, r in results.items() if isinstance(r, Exception)}
    assert len(results) == len(orphans) and not failed, f"{len(failed)} of {len(orphans)} failed: {list(failed.values())[:3]}"
    new_pids = {r[0] for r in results.values()}
    assert victim not in new_pids and all(r[2] == INITIAL_VALUE for r in results.values())
    made = [sid for _, sid in server.created()[before:]]
    assert sorted(made) == sorted(sid for _, sid in orphans), "each orphan is made anew exactly once"
    assert len(new_pids) > 1, f"all {len(orphans)} re-created on one worker: {new_pids}"
    # The other workers' sessions were not disturbed: they reattach as they were.
    for token, session_id, pid in others:
        with connect(server, token) as client:
            assert state(client.handshake())[0] == pid
    assert len(server.created()) == before + len(orphans)
    assert "Traceback" not in server.server.log()


#: Reconnects at once for a killed worker's sessions, as the issue asks.
THOUSAND = 1000


@pytest.mark.timeout(150)
def test_a_thousand_reconnects_at_once_for_a_dead_worker(home):
    """1,000 WebSockets at once for sessions of a worker killed with SIGKILL:
    each gets a fresh session, made once, spread over the survivors; their
    reconnects find those copies; the survivors' own sessions go on.

    Making 1,000 sessions on one worker first would take minutes, so the ids
    are signed here with the deployment's secret and the victim's owner tag,
    exactly what that worker would have given out: the survivors cannot tell
    them apart from real sessions of a dead worker, and must not.
    """
    # Sessions outlive the test: on a loaded machine the first copies would
    # otherwise be unused for the default 15 s before the sample reconnects
    # below, discarded, and made once more.
    server = home(HOME_UNUSED_LIFETIME_MS="120000")
    token, session_id, client, (victim, _, _) = open_page(server)
    client.close()
    tag = owner_tag(session_id)
    assert tag, session_id
    others = []
    while len({pid for _, _, pid in others}) < 2 and len(others) < 40:
        other_token, other_id, other, (pid, slider_id, _) = open_page(server)
        if pid == victim:
            other.close()
            continue
        set_slider(other, slider_id, 900 + len(others))
        other.close()
        others.append((other_token, 900 + len(others), pid))
    policy = TokenPolicy(Settings.load({}, {"secret_key": SECRET}))
    orphans = [policy.new_session_id(owner=tag) for _ in range(THOUSAND)]
    tokens = {sid: generate_jwt_token(sid, secret_key=SECRET.encode(), signed=True, expiration=300) for sid in orphans}
    before = len(server.created())
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while victim in server.worker_pids() and time.monotonic() < deadline:
        time.sleep(0.02)

    results: dict[str, object] = {}
    go = threading.Event()

    def reconnect(sid: str) -> None:
        go.wait()
        try:
            # A browser gives the opening handshake far longer than 10 s;
            # 1,000 at once on a loaded 2-core CI machine may need it.
            with connect(server, tokens[sid], retry_for=30, timeout=90) as c:
                results[sid] = state(c.handshake())
        except Exception as exc:  # recorded, asserted below
            results[sid] = exc

    threads = [threading.Thread(target=reconnect, args=(sid,), daemon=True) for sid in orphans]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    go.set()
    for thread in threads:
        thread.join(timeout=max(1.0, 120 - (time.monotonic() - started)))
    elapsed = time.monotonic() - started
    failed = [r for r in results.values() if isinstance(r, Exception)]
    assert len(results) == THOUSAND and not failed, (
        f"{THOUSAND - len(results)} unfinished, {len(failed)} failed in {elapsed:.1f}s: {failed[:3]}"
    )
    made = Counter(sid for _, sid in server.created()[before:])
    assert sorted(made) == sorted(orphans) and set(made.values()) == {1}, "each is made anew exactly once"
    homes = Counter(r[0] for r in results.values())
    assert victim not in homes and len(homes) > 1, homes
    # Reconnects of a sample reach the copies just made.
    for sid in orphans[:: THOUSAND // 50]:
        with connect(server, tokens[sid]) as c:
            assert state(c.handshake()) == results[sid]
    for other_token, value, pid in others:
        with connect(server, other_token) as c:
            assert state(c.handshake())[::2] == (pid, value)
    assert len(server.created()) == before + THOUSAND
    assert "Traceback" not in server.server.log()


@pytest.mark.timeout(120)
def test_serve_num_procs_gives_every_session_one_home(tmp_path):
    created = tmp_path / "created.log"
    created.touch()
    port = free_port()
    cmd = [sys.executable, "-m", "flask_docsync", "serve", str(APPS / "home_script.py"), "--num-procs", "4",
           "--port", str(port), "--address", "127.0.0.1"]
    server = RunningServer(cmd, port, env={"DOCSYNC_SECRET_KEY": SECRET, "HOME_LOG": str(created)},
                           wait_path="/home_script")
    try:
        pids = set()
        for _ in range(40):
            token = fetch_token(server.url + "/home_script")
            for _ in range(2):  # the page's WebSocket, then a reconnect
                with WireClient(server.ws_url + "/home_script/ws", token, timeout=10) as client:
                    pid = int(find_model(client.handshake().content["doc"], "pid")["attributes"]["text"])
                pids.add(pid)
                made = [line.split()[0] for line in created.read_text().splitlines()
                        if line.split()[1] == get_session_id(token)]
                assert made == [str(pid)], f"session made by {made}, served by {pid}"
        assert len(pids) > 1, "one worker served everything: the test proves nothing"
    finally:
        server.stop()


@pytest.mark.timeout(90)
def test_clients_that_vanish_during_a_hand_over_affect_nobody(home):
    server = home()
    keep_token, _, keeper, (keep_pid, slider_id, _) = open_page(server)
    with keeper:
        set_slider(keeper, slider_id, 77)
        tokens = [fetch_token(server.page_url) for _ in range(40)]
        host, port = server.url.rsplit("//", 1)[1].split(":")
        for token in tokens:
            # The upgrade request, then a RST before any answer: wherever the
            # hand-over is when the client goes, it ends there.
            raw = socket.create_connection((host, int(port)))
            raw.sendall((
                f"GET {ROUTE}/ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Protocol: bokeh, {token}\r\n\r\n").encode())
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()
        time.sleep(0.5)
        # The live session still answers, and every page's session is still there to attach to.
        set_slider(keeper, slider_id, 78)
    for token in tokens[:10]:
        with connect(server, token) as client:
            assert state(client.handshake())[2] == INITIAL_VALUE
    with connect(server, keep_token) as client:
        assert state(client.handshake())[0::2] == (keep_pid, 78)
    assert "Traceback" not in server.server.log()


@pytest.mark.timeout(90)
def test_gunicorn_speaking_tls_itself_serves_every_websocket(home, tmp_path):
    """With ``--certfile`` the TLS state of a connection lives in the worker
    that accepted it, so it cannot be handed over: the WebSocket is served
    where it lands (a copy of the session from the token, as before routing),
    and one warning per worker says to terminate TLS at a proxy instead."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    server = home(("--certfile", str(cert), "--keyfile", str(key)), context)
    pages = 30
    for n in range(pages):
        token, _, client, (pid, slider_id, _) = open_page(server)
        with client:
            set_slider(client, slider_id, 500 + n)
            reply, _ = client.recv_until("PULL-DOC-REPLY", client.send("PULL-DOC-REQ", {}))
            got_pid, _, value = state(reply)
        assert (got_pid, value) == (pid, 500 + n)
    created = server.created()
    log = server.server.log()
    # The server-ready probe connects without TLS: gevent logs that handshake's EOF.
    tracebacks = [t for t in log.split("Traceback")[1:] if "SSLEOFError" not in t.split("\n\n")[0]]
    assert not tracebacks, tracebacks
    warned = log.count("a TLS connection cannot be passed to another process")
    copies = len(created) - pages
    # The kernel spreads the WebSockets; unless all of them landed on their
    # page's worker (then no copy was made and nothing was said), some did not.
    assert (copies == 0 and warned == 0) or (copies > 0 and 1 <= warned <= WORKERS), (copies, warned)
