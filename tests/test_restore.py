"""Integration: sessions outlive their worker under `gunicorn -k gevent -w 2` with a real Redis.

A page's session (tests/apps/restore_app.py) gets what a browser sends:
a slider value (whose callback derives a text), a select that rebuilds the
figure, a zoom of the rebuilt figure, a table cell edit, and a click that
changes the app's declared state. Then its worker dies (``kill -9``) or the
arbiter reloads (``kill -HUP``: every worker stops gracefully), and the
reconnect with the same token, landing on a live worker, pulls a document
that has all of it back.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import APPS, RunningServer, free_port
from redis_util import redis_server  # noqa: F401  (fixture)
from wire import WireClient, fetch_token, find_model

SECRET = "restore-secret-" + "r" * 32
WORKERS = 2
ROUTE = "/restore"


class RestoreServer:
    def __init__(self, tmp: Path, redis_url: str, flush_ms: int, unused_lifetime_ms: int = 15_000,
                 advertise: bool = False) -> None:
        port = free_port()
        cmd = [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", str(WORKERS),
               "--bind", f"127.0.0.1:{port}", "--chdir", str(APPS), "--graceful-timeout", "10",
               "restore_app:create_app()"]
        self.server = RunningServer(cmd, port, env={
            "TEST_SECRET": SECRET, "TEST_REDIS_URL": redis_url, "RESTORE_FLUSH_MS": str(flush_ms),
            "RESTORE_UNUSED_LIFETIME_MS": str(unused_lifetime_ms),
            **({"RESTORE_ADVERTISE_URL": f"http://127.0.0.1:{port}"} if advertise else {}),
        })
        self.page_url = self.server.url + ROUTE
        self.ws_url = self.server.ws_url + ROUTE + "/ws"
        self.server.wait_for_workers(WORKERS, "/pid")

    def connect(self, token: str, retry_for: float = 20.0) -> WireClient:
        """A WireClient; refused connects are retried (a reload has no listener for a moment)."""
        deadline = time.monotonic() + retry_for
        while True:
            try:
                return WireClient(self.ws_url, token, timeout=30)
            except (ConnectionRefusedError, ConnectionResetError):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)


@pytest.fixture
def restore_server(tmp_path, redis_server):  # noqa: F811
    started: list[RestoreServer] = []

    def start(flush_ms: int = 200, unused_lifetime_ms: int = 15_000, advertise: bool = False) -> RestoreServer:
        server = RestoreServer(tmp_path, redis_server.url, flush_ms, unused_lifetime_ms, advertise)
        started.append(server)
        return server

    yield start
    for server in started:
        server.server.stop()


def attrs(doc: dict, name: str) -> dict:
    return find_model(doc, name)["attributes"]


def patch(client: WireClient, *events: dict) -> None:
    msgid = client.send("PATCH-DOC", {"events": list(events)})
    client.recv_until("OK", msgid)


def changed(model_id: str, attr: str, new) -> dict:
    return {"kind": "ModelChanged", "model": {"id": model_id}, "attr": attr, "new": new}


def use_the_app(client: WireClient, doc: dict) -> None:
    """What a user does in the page; the document is pulled again after the select rebuilt the figure."""
    patch(client, changed(find_model(doc, "select")["id"], "value", "scatter"))
    reqid = client.send("PULL-DOC-REQ", {})
    doc = client.recv_until("PULL-DOC-REPLY", reqid)[0].content["doc"]
    assert attrs(doc, "plot")["title"]["attributes"]["text"] == "scatter"
    xr = find_model(doc, "xr")["id"]
    patch(client, changed(xr, "start", 2.5), changed(xr, "end", 7.25))
    patch(client, changed(find_model(doc, "slider")["id"], "value", 42))
    patch(client, {"kind": "ColumnsPatched", "model": {"id": find_model(doc, "source")["id"]}, "attr": "data",
                   "patches": {"type": "map", "entries": [["score", [[1, 99]]]]}})  # as BokehJS's DataTable sends it
    button = find_model(doc, "button")["id"]
    for _ in range(2):
        patch(client, {"kind": "MessageSent", "msg_type": "bokeh_event", "msg_data": {
            "type": "event", "name": "button_click",
            "values": {"type": "map", "entries": [["model", {"id": button}]]}}})


def assert_restored(doc: dict) -> None:
    found = {
        "slider": attrs(doc, "slider").get("value"),
        "derived": attrs(doc, "derived").get("text"),
        "select": attrs(doc, "select").get("value"),
        "title": attrs(doc, "plot")["title"]["attributes"].get("text"),
        "zoom": (attrs(doc, "xr").get("start"), attrs(doc, "xr").get("end")),
        "clicks": attrs(doc, "clicks").get("text"),
    }
    data = attrs(doc, "source")["data"]
    entries = dict(data["entries"]) if isinstance(data, dict) and "entries" in data else data
    found["score"] = entries["score"]
    assert found == {
        "slider": 42, "derived": "double: 84", "select": "scatter", "title": "scatter",
        "zoom": (2.5, 7.25), "clicks": "clicks: 2", "score": [1, 99, 3],
    }


def open_page(server: RestoreServer) -> tuple[str, WireClient, dict]:
    token = fetch_token(server.page_url)
    client = server.connect(token)
    return token, client, client.handshake().content["doc"]


@pytest.mark.timeout(120)
def test_kill_9_of_the_owner_restores_the_session_on_a_live_worker(restore_server):
    server = restore_server(flush_ms=200)
    token, client, doc = open_page(server)
    owner = int(attrs(doc, "pid")["text"])
    time.sleep(0.6)  # flushes before the user does anything: later changes must be saved by later ones
    use_the_app(client, doc)
    time.sleep(1.0)  # a few flush intervals: what kill -9 may lose is the last one only
    os.kill(owner, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while owner in server.server.child_pids() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert owner not in server.server.child_pids()
    client.close()

    client = server.connect(token)
    try:
        doc = client.handshake().content["doc"]
    finally:
        client.close()
    new_pid = int(attrs(doc, "pid")["text"])
    assert new_pid != owner
    assert_restored(doc)
    # Later reconnects find the restored session itself (not restored again).
    client = server.connect(token)
    try:
        doc = client.handshake().content["doc"]
        assert int(attrs(doc, "pid")["text"]) == new_pid
        assert_restored(doc)
    finally:
        client.close()
    log = server.server.log()
    assert "restored session" in log and "Traceback" not in log


@pytest.mark.timeout(120)
def test_a_graceful_reload_saves_everything_before_closing(restore_server):
    # A flush interval far longer than the test: only the save at stop can
    # have written what the user did.
    server = restore_server(flush_ms=600_000)
    token, client, doc = open_page(server)
    owner = int(attrs(doc, "pid")["text"])
    use_the_app(client, doc)
    os.kill(server.server.proc.pid, signal.SIGHUP)  # gunicorn: new workers, old ones stop gracefully
    code, _ = client.expect_close()
    client.close()
    assert code == 1012
    deadline = time.monotonic() + 20
    while owner in server.server.child_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert owner not in server.server.child_pids()

    client = server.connect(token)
    try:
        doc = client.handshake().content["doc"]
    finally:
        client.close()
    assert int(attrs(doc, "pid")["text"]) != owner
    assert_restored(doc)
    log = server.server.log()
    assert "Saved 1 session(s) for restore" in log and "Traceback" not in log


@pytest.mark.timeout(120)
def test_a_session_that_changed_nothing_reconnects_as_new_without_error(restore_server):
    """Killed at once, before or just after the first flush: the reconnect
    finds nothing saved, or only the app's initial state; either way the
    page gets the app as it starts, and a working session."""
    server = restore_server(flush_ms=200)
    token, client, doc = open_page(server)
    owner = int(attrs(doc, "pid")["text"])
    os.kill(owner, signal.SIGKILL)
    client.close()
    time.sleep(0.5)
    client = server.connect(token)
    try:
        doc = client.handshake().content["doc"]
        assert int(attrs(doc, "pid")["text"]) != owner
        assert (attrs(doc, "slider").get("value", 1), attrs(doc, "clicks")["text"]) == (1, "clicks: 0")
        patch(client, changed(find_model(doc, "slider")["id"], "value", 3))
    finally:
        client.close()
    log = server.server.log()
    assert ("nothing saved" in log or "(0 changes)" in log) and "Traceback" not in log


#: Pages opened before the kill; about half are the victim's sessions.
STAMPEDE_PAGES = 300


@pytest.mark.timeout(240)
def test_a_dead_workers_sessions_all_come_back_when_they_reconnect_at_once(restore_server):
    """Every session of the killed worker reconnects at the same moment; each
    gets its own slider value back, within BokehJS's ~30 s of retries, the
    restores taking turns (DOCSYNC_RESTORE_CONCURRENCY) on the survivors."""
    from concurrent.futures import ThreadPoolExecutor

    # Sessions nobody is connected to are discarded after their unused
    # lifetime, and their saved data with them; the pages here wait longer.
    server = restore_server(flush_ms=200, unused_lifetime_ms=300_000)
    pages = []
    for n in range(STAMPEDE_PAGES):
        token, client, doc = open_page(server)
        try:
            patch(client, changed(find_model(doc, "slider")["id"], "value", 1000 + n))
        finally:
            client.close()
        pages.append((token, int(attrs(doc, "pid")["text"]), 1000 + n))
    victim = pages[0][1]
    victims = [(token, value) for token, pid, value in pages if pid == victim]
    time.sleep(1.0)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while victim in server.server.child_pids() and time.monotonic() < deadline:
        time.sleep(0.02)

    def reconnect(item):
        token, value = item
        started = time.monotonic()
        client = server.connect(token, retry_for=30)
        try:
            doc = client.handshake().content["doc"]
        finally:
            client.close()
        return (attrs(doc, "slider").get("value"), attrs(doc, "derived").get("text"), value,
                time.monotonic() - started)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(victims)) as pool:
        results = list(pool.map(reconnect, victims))
    elapsed = time.monotonic() - started
    wrong = [r for r in results if (r[0], r[1]) != (r[2], f"double: {r[2] * 2}")]
    slowest = max(r[3] for r in results)
    print(f"{len(victims)} sessions of the killed worker restored in {elapsed:.1f} s (slowest {slowest:.1f} s)")
    assert not wrong, f"{len(wrong)} of {len(victims)} sessions did not come back, e.g. {wrong[:3]}"
    assert len(victims) > 50
    assert slowest < 30, f"the slowest reconnect took {slowest:.1f} s: BokehJS would have given up"
    log = server.server.log()
    assert log.count("restored session") >= len(victims) and "Traceback" not in log


@pytest.mark.timeout(120)
def test_a_whole_host_killed_its_sessions_are_restored_on_another_host(restore_server):
    """Two hosts joined through Redis: the reconnect reaches the other host, which restores the session."""
    survivor, doomed = restore_server(flush_ms=200, advertise=True), restore_server(flush_ms=200, advertise=True)
    token, client, doc = open_page(doomed)
    use_the_app(client, doc)
    time.sleep(1.0)
    client.close()
    doomed.server.stop(signal.SIGKILL)  # master and workers at once: nothing saved at a stop
    client = survivor.connect(token)
    try:
        doc = client.handshake().content["doc"]
    finally:
        client.close()
    assert int(attrs(doc, "pid")["text"]) in survivor.server.child_pids()
    assert_restored(doc)
    assert "restored session" in survivor.server.log()
