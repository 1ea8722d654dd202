"""Integration: a DocSync app factory under real gunicorn gevent workers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import websocket
from bokeh.client import pull_session

from conftest import APPS, RunningServer, free_port
from wire import WireClient, fetch_token, find_model

SECRET = "test-secret-" + "x" * 32


def pull_text(url: str, name: str, secret: str | None = None, **arguments: str) -> str:
    """bokeh.client in a subprocess; with ``secret`` it signs like the server."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("BOKEH_")}
    if secret:
        env.update(BOKEH_SECRET_KEY=secret, BOKEH_SIGN_SESSIONS="true")
    result = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "pull_in_subprocess.py"), url, name,
         *[f"{k}={v}" for k, v in arguments.items()]],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def gunicorn(worker_class: str, workers: int = 1, secret: str | None = SECRET) -> RunningServer:
    port = free_port()
    cmd = [sys.executable, "-m", "gunicorn", "-k", worker_class, "-w", str(workers),
           "--bind", f"127.0.0.1:{port}", "--chdir", str(APPS), "--graceful-timeout", "5",
           "factory:create_app()"]
    return RunningServer(cmd, port, env={"TEST_SECRET": secret or ""})


@pytest.fixture
def servers():
    started: list[RunningServer] = []
    yield started
    for server in started:
        server.stop()


def round_trip(server: RunningServer, route: str = "/fn") -> None:
    token = fetch_token(server.url + route)
    with WireClient(server.ws_url + route + "/ws", token) as client:
        reply = client.handshake()
        slider = find_model(reply.content["doc"], "slider")
        msgid = client.send("PATCH-DOC", {"events": [
            {"kind": "ModelChanged", "model": {"id": slider["id"]}, "attr": "value", "new": 7}]})
        _, before = client.recv_until("OK", msgid)
        assert any(e.get("new") == "value=7" for m in before for e in m.content["events"])


def test_gevent_worker_serves_pages_websockets_and_host_routes(servers):
    server = gunicorn("gevent", secret=None)
    servers.append(server)
    status, _, body = server.get("/")
    assert status == 200 and body == b"host app home"
    round_trip(server)
    round_trip(server, "/sliders")
    session = pull_session(url=server.url + "/sliders", arguments={"start": "9"})
    try:
        assert session.document.select_one({"name": "result"}).text == "value=9"
    finally:
        session.close()
    assert "Traceback" not in server.log()


def test_two_gevent_workers_with_a_shared_secret(servers):
    server = gunicorn("gevent", workers=2)
    servers.append(server)
    for _ in range(12):
        # The page and the WebSocket may land on different workers: the
        # signed token lets either create the session.
        round_trip(server)
    for _ in range(3):
        assert pull_text(server.url + "/sliders", "result", SECRET, start="5") == "value=5"


def test_geventwebsocket_worker(servers):
    pytest.importorskip("geventwebsocket")
    server = gunicorn("geventwebsocket.gunicorn.workers.GeventWebSocketWorker")
    servers.append(server)
    round_trip(server)
    # A foreign origin: gevent-websocket has already sent the 101, so the
    # refusal is a close frame with the policy code.
    token = fetch_token(server.url + "/fn")
    with WireClient(server.ws_url + "/fn/ws", token, origin="http://evil.example") as client:
        code, reason = client.expect_close()
    assert code == 1008 and "Origin" in reason


def test_sock_route_idiom(servers):
    server = gunicorn("gevent")
    servers.append(server)
    ws = websocket.create_connection(server.ws_url + "/echo", timeout=10)
    try:
        ws.send("hello")
        assert ws.recv() == "hello"
        ws.send_binary(b"\x00\x01" * 50000)
        assert ws.recv() == b"\x00\x01" * 50000
    finally:
        ws.close()


def test_serve_num_procs_runs_gunicorn_workers(serve):
    port = free_port()
    cmd = [sys.executable, "-m", "flask_docsync", "serve", str(APPS / "sliders.py"), "--num-procs", "2",
           "--port", str(port), "--address", "127.0.0.1"]
    server = RunningServer(cmd, port, env={"DOCSYNC_SECRET_KEY": SECRET})
    try:
        for _ in range(4):
            assert pull_text(server.url + "/sliders", "result", SECRET, start="4") == "value=4"
    finally:
        server.stop()


def test_serve_num_procs_without_secret_refuses_to_start():
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "flask_docsync", "serve", str(APPS / "sliders.py"), "--num-procs", "2",
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=60,
        env={k: v for k, v in __import__("os").environ.items() if k not in ("DOCSYNC_SECRET_KEY", "BOKEH_SECRET_KEY")},
    )
    assert result.returncode == 1
    assert "DOCSYNC_SECRET_KEY" in result.stderr
