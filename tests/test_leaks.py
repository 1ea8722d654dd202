"""Nothing is left behind: sessions, connections, callbacks, documents, models, memory.

Two layers:

- Against a real ``flask-docsync serve`` (``DOCSYNC_STATS_ENDPOINT=True``,
  ``--unused-session-lifetime 50 --check-unused-sessions 50``): two batches of
  connect / pull / patch / disconnect cycles over the raw Bokeh protocol,
  every 20th one a session of tests/apps/ticker.py whose periodic, timeout
  and next-tick callbacks ran (the client waits for the periodic callback's
  first patch). After each batch the server's own figures must be back to
  zero sessions, connections, live sessions, scheduled callback greenlets
  and models, and the RSS at the end of batch 2 may exceed that at the end
  of batch 1 by no more than 10 MB or 10 % (the allocator keeps what batch 1
  needed; a leak grows with every batch).
- In-process, through ``flask_docsync.testing``: the gc-level counts of
  Document, ServerSession, ServerConnection, Model and Greenlet objects
  return to their baseline after many open / change / stream / close cycles.

``DOCSYNC_LEAK_CYCLES`` sets the number of cycles, split over the two
batches (default 2000: about 30 s on two cores). The issue's 10,000
cycles: ``DOCSYNC_LEAK_CYCLES=10000 python -m pytest tests/test_leaks.py -s``
(``-s`` prints the figures).
"""

from __future__ import annotations

import gc
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import gevent
import pytest
from bokeh.document import Document
from bokeh.model import Model
from bokeh.util.token import generate_jwt_token
from flask import Flask

from flask_docsync import DocSync
from flask_docsync.connection import ServerConnection
from flask_docsync.session import ServerSession, live_sessions
from flask_docsync.testing import DocSyncTestClient
from reliability_util import rss_mb, stats
from serve_util import APPS, changed, events_of, model_id, value_patch, wait_until
from wire import WireClient, fetch_token

CYCLES = int(os.environ.get("DOCSYNC_LEAK_CYCLES", "2000"))
#: Client threads: the server is one process on one hub; a few concurrent
#: clients keep it busy while each waits for its replies.
THREADS = 4
#: Batch 2's end RSS over batch 1's: at most this many MB, or 10 %. What
#: batch 1 needed stays with the allocator, and how much that is depends on
#: how many sessions were alive at once, which varies with the machine's
#: load; a leak of whole sessions (a Document of tests/apps/sliders.py is
#: ~0.3 MB) would add hundreds of MB per batch. Smaller leaks show in the
#: object counts of the in-process test below.
RSS_TOLERANCE_MB = 10
RSS_TOLERANCE = 0.10


def _token(route_tag: str) -> str:
    # Unsigned server: the client names its session, as bokeh.client does.
    return generate_jwt_token(f"{route_tag}{uuid.uuid4().hex}", secret_key=None, signed=False, expiration=300)


def _cycle(server, i: int) -> None:
    if i % 20 == 0:
        # A session whose callbacks ran: wait for the periodic callback's first patch.
        with WireClient(f"{server.ws_url}/ticker/ws", _token("ticker"), timeout=30) as client:
            client.handshake()
            while True:
                message = client.recv()
                if message.msgtype == "PATCH-DOC" and any(
                        e.get("kind") == "ColumnsStreamed" for e in message.content["events"]):
                    break
        return
    # Every 10th session is made by the page, the others by the WebSocket.
    token = fetch_token(f"{server.url}/sliders") if i % 10 == 5 else _token("sliders")
    with WireClient(f"{server.ws_url}/sliders/ws", token, timeout=30) as client:
        doc = client.handshake().content["doc"]
        value = 2 + i % 90
        reqid = client.send("PATCH-DOC", value_patch(model_id(doc, "slider"), "value", value), num_buffers=0)
        _, before = client.recv_until("OK", reqid)
        assert changed(events_of(before), model_id(doc, "result"), "text") == [f"value={value}"]


def _batch(server, cycles: int) -> tuple[float, int]:
    """Run ``cycles`` cycles; return the seconds taken and the most sessions seen alive at once."""
    started = time.monotonic()
    peak = 0
    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(_cycle, server, i) for i in range(cycles)]
        while not all(f.done() for f in futures):
            peak = max(peak, stats(server)["sessions"])
            time.sleep(0.5)
        for future in futures:
            future.result()
    return time.monotonic() - started, peak


def _all_reaped(server) -> dict:
    def probe():
        s = stats(server)
        models = sum(app["models"] for app in s["apps"].values())
        done = (s["sessions"], s["connections"], s["live_sessions_in_process"], s["greenlets_scheduled"],
                s["queued_messages"], models) == (0, 0, 0, 0, 0, 0)
        return done and s

    return wait_until(probe, timeout=60, interval=0.1, message="every session reaped")


@pytest.mark.timeout(max(120, CYCLES // 20))  # 10,000 cycles take a few minutes
def test_connect_pull_patch_disconnect_cycles_leave_nothing_behind(serve):
    server = serve(APPS / "sliders.py", APPS / "ticker.py", "--keep-alive", "0",
                   "--check-unused-sessions", "50", "--unused-session-lifetime", "50",
                   env={"DOCSYNC_STATS_ENDPOINT": "true"})
    _batch(server, 40)  # warm up: imports, caches, allocator arenas
    _all_reaped(server)
    start_rss = rss_mb(server)

    seconds1, peak1 = _batch(server, CYCLES // 2)
    after1 = _all_reaped(server)
    time.sleep(0.5)
    rss1 = rss_mb(server)

    seconds2, peak2 = _batch(server, CYCLES - CYCLES // 2)
    after2 = _all_reaped(server)
    time.sleep(0.5)
    rss2 = rss_mb(server)

    runs = after2["callbacks"]["runs"]
    print(f"\nleaks: {CYCLES} cycles in two batches ({seconds1:.1f} s, {seconds2:.1f} s; at most {peak1}"
          f" and {peak2} sessions alive at once; {CYCLES // 20} ticker sessions, {runs} callback runs in all);"
          f" RSS {start_rss:.1f} MB after warm-up, {rss1:.1f} MB after batch 1, {rss2:.1f} MB after batch 2"
          f" ({rss2 - rss1:+.1f} MB)")
    assert after1["callbacks"]["runs"] > 0 and runs > after1["callbacks"]["runs"]
    assert after2["callbacks"]["errors"] == 0
    assert rss2 - rss1 <= max(RSS_TOLERANCE_MB, RSS_TOLERANCE * rss1)


# In-process: gc-level object counts


def _counts() -> dict[str, int]:
    gc.collect()
    kinds = {"Document": Document, "ServerSession": ServerSession, "ServerConnection": ServerConnection,
             "Model": Model, "Greenlet": gevent.Greenlet}
    counts = dict.fromkeys(kinds, 0)
    for obj in gc.get_objects():
        for name, kind in kinds.items():
            if isinstance(obj, kind):
                counts[name] += 1
    return counts


@pytest.fixture
def leak_app():
    app = Flask(__name__)
    app.config["SECRET_KEY"] = "test"
    docsync = DocSync()
    docsync.add_app("/sliders", str(APPS / "sliders.py"))
    docsync.add_app("/ticker", str(APPS / "ticker.py"))
    docsync.init_app(app)
    yield app
    app.extensions["docsync"].stop()


def _in_process_cycles(app, n: int) -> None:
    with DocSyncTestClient(app) as client:
        for i in range(n):
            with client.open("/sliders") as session:
                session.set("slider", "value", 2 + i % 90)
                assert session.model("result").text == f"value={2 + i % 90}"
                session.click("button")
            with client.open("/ticker") as session:
                session.run_callbacks(55)  # the periodic callback runs 5 times, the timeout once
                assert session.model("count").text == "5"
                assert session.browser_model("count").text == "5"
                session.set("slider", "value", 3)


def test_in_process_object_counts_return_to_baseline(leak_app):
    _in_process_cycles(leak_app, 5)  # warm up
    baseline = _counts()
    _in_process_cycles(leak_app, 100)
    after = _counts()
    server = leak_app.extensions["docsync"]
    assert server.session_count() == 0 and not live_sessions()
    assert after == baseline, {k: (baseline[k], after[k]) for k in baseline}
