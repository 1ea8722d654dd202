"""Memory comes back after sessions are discarded, against a real ``flask-docsync serve``.

Both tests use tests/apps/churn.py (64 KiB of numpy data, a figure, an
``on_change`` and a periodic callback: ~0.3 MB a session), with
``--unused-session-lifetime 200 --check-unused-sessions 100`` and the
stats endpoint, each on a fresh server:

- Churn: page GET + WebSocket + PULL-DOC + close cycles, four at a time.
  The RSS once every session is reaped after a batch of 400 may exceed
  the RSS after a first batch of 100 by at most 10 %. Memory waiting for
  a garbage collection, or a cleanup that falls behind the sessions being
  created, grows with the length of the run.
- Idle: 150 sessions connected, then closed. Once they are reaped, at most
  half of the RSS they added may still be held.

The RSS is read ``RECLAIM_WAIT`` seconds after the last session is
reaped: the reclaimer runs a second after the last cleanup pass that
discarded sessions (flask_docsync/reclaim.py). About 40 s in all on two
cores. ``bench/churn.py`` measures the same against ``bokeh serve``.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from reliability_util import rss_mb, stats
from serve_util import APPS, wait_until
from wire import WireClient, fetch_token

CHURN_FIRST = 100
CHURN_MORE = 400
IDLE_SESSIONS = 150
THREADS = 4
#: The reclaimer's settle time (1 s) plus a margin for a loaded machine.
RECLAIM_WAIT = 3.0
MAX_GROWTH = 0.10
MAX_HELD = 0.50


def _serve(serve):
    return serve(APPS / "churn.py", "--keep-alive", "0",
                 "--check-unused-sessions", "100", "--unused-session-lifetime", "200",
                 env={"DOCSYNC_STATS_ENDPOINT": "true"})


def _cycle(server) -> None:
    token = fetch_token(f"{server.url}/churn")
    with WireClient(f"{server.ws_url}/churn/ws", token, timeout=30) as client:
        client.handshake()


def _churn(server, cycles: int) -> None:
    with ThreadPoolExecutor(THREADS) as pool:
        for future in [pool.submit(_cycle, server) for _ in range(cycles)]:
            future.result()


def _rss_once_reaped(server) -> float:
    wait_until(lambda: stats(server)["sessions"] == 0, timeout=60, interval=0.1, message="every session reaped")
    time.sleep(RECLAIM_WAIT)
    return rss_mb(server)


@pytest.mark.timeout(120)
def test_rss_after_churn_does_not_grow_with_the_number_of_cycles(serve):
    server = _serve(serve)
    _churn(server, 20)  # warm up: imports, caches
    _rss_once_reaped(server)
    _churn(server, CHURN_FIRST)
    first = _rss_once_reaped(server)
    _churn(server, CHURN_MORE)
    more = _rss_once_reaped(server)
    print(f"\nchurn: RSS {first:.1f} MB after {CHURN_FIRST} cycles, {more:.1f} MB after {CHURN_MORE} more"
          f" ({100 * (more - first) / first:+.1f} %); reclaim {stats(server).get('reclaim')}")
    assert more <= first * (1 + MAX_GROWTH)


@pytest.mark.timeout(120)
def test_most_of_the_memory_of_closed_sessions_is_returned(serve):
    server = _serve(serve)
    _churn(server, 5)
    base = _rss_once_reaped(server)
    clients = []
    try:
        for _ in range(IDLE_SESSIONS):
            client = WireClient(f"{server.ws_url}/churn/ws", fetch_token(f"{server.url}/churn"), timeout=30)
            clients.append(client)
            client.handshake()
        time.sleep(1.0)
        peak = rss_mb(server)
    finally:
        for client in clients:
            client.close()
    after = _rss_once_reaped(server)
    held = (after - base) / (peak - base)
    print(f"\nidle: RSS {base:.1f} MB before, {peak:.1f} MB with {IDLE_SESSIONS} sessions, {after:.1f} MB"
          f" after they were reaped: {100 * held:.0f} % of what they added still held;"
          f" reclaim {stats(server).get('reclaim')}")
    assert peak - base > IDLE_SESSIONS * 0.2  # the sessions did add memory to return
    assert held <= MAX_HELD
