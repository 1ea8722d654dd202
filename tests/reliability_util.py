"""Helpers for the reliability tests (test_hostile, test_slow_clients, test_leaks, test_faults).

The central one is :class:`HealthyClient`: a thread that keeps a session of
tests/apps/sliders.py busy with patch round trips, so a test can show that
another session on the same server kept working *while* something hostile
or faulty was going on, not merely afterwards.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from conftest import RunningServer
from serve_util import changed, events_of, model_id, value_patch
from wire import WireClient, fetch_token


class HealthyClient:
    """A well-behaved client doing PATCH-DOC round trips on its own /sliders session.

    Each round trip sets the slider and waits for the OK, checking that the
    app's on_change callback updated the ``result`` Div before it. The
    thread records when each round trip ended and any error; :meth:`stop`
    raises if one failed.
    """

    def __init__(self, server: RunningServer, route: str = "/sliders", pause: float = 0.0,
                 timeout: float = 20.0) -> None:
        self.server = server
        self.route = route
        self.pause = pause
        self.timeout = timeout
        self.completed: list[float] = []
        self.error: BaseException | None = None
        self.token = fetch_token(f"{server.url}{route}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="healthy-client", daemon=True)

    def __enter__(self) -> HealthyClient:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop(check=exc[0] is None)

    @property
    def count(self) -> int:
        return len(self.completed)

    def start(self) -> None:
        self._thread.start()
        self.wait_for(1)

    def _run(self) -> None:
        try:
            with WireClient(f"{self.server.ws_url}{self.route}/ws", self.token, timeout=self.timeout) as client:
                doc = client.handshake().content["doc"]
                slider, result = model_id(doc, "slider"), model_id(doc, "result")
                n = 0
                while not self._stop.is_set():
                    n = n % 98 + 2  # 2..99: never the initial value 1, never a repeat
                    reqid = client.send("PATCH-DOC", value_patch(slider, "value", n), num_buffers=0)
                    _, before = client.recv_until("OK", reqid)
                    got = changed(events_of(before), result, "text")
                    if got != [f"value={n}"]:
                        raise AssertionError(f"round trip {n}: on_change effect {got!r}")
                    self.completed.append(time.monotonic())
                    if self.pause:
                        self._stop.wait(self.pause)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def wait_for(self, n: int, timeout: float = 30.0) -> None:
        """Wait until ``n`` round trips have completed in all."""
        deadline = time.monotonic() + timeout
        while self.count < n:
            if self.error is not None:
                raise AssertionError(f"the healthy client failed: {self.error!r}") from self.error
            if not self._thread.is_alive():
                raise AssertionError("the healthy client stopped")
            if time.monotonic() > deadline:
                raise AssertionError(f"the healthy client completed {self.count} of {n} round trips in {timeout} s")
            time.sleep(0.01)

    def completed_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.completed if start <= t <= end)

    def stop(self, check: bool = True) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout + 5)
        if check:
            assert not self._thread.is_alive(), "the healthy client hung"
            if self.error is not None:
                raise AssertionError(f"the healthy client failed: {self.error!r}") from self.error


def under_attack(server: RunningServer, attack: Callable[[], Any], min_round_trips: int = 3,
                 max_runs: int = 200, timeout: float = 60.0, route: str = "/sliders") -> int:
    """Repeat ``attack()`` until a healthy session completed ``min_round_trips`` meanwhile.

    The attack runs in this thread and the healthy client's round trips (on
    a session of ``route``) in another, at the same time; every round trip
    counted both started and ended while attacks were running. ``attack``
    asserts its own outcome each time. Returns how many times it ran.
    """
    with HealthyClient(server, route) as healthy:
        started = time.monotonic()
        runs = 0
        base = healthy.count
        deadline = started + timeout
        while runs == 0 or healthy.count < base + min_round_trips + 1:
            assert runs < max_runs, f"{runs} attacks, yet only {healthy.count - base} round trips meanwhile"
            assert time.monotonic() < deadline, f"healthy client made {healthy.count - base} round trips in {timeout} s"
            if healthy.error is not None:
                break
            attack()
            runs += 1
        ended = time.monotonic()
    # The first round trip after `started` may have begun before it: demand one more.
    assert healthy.completed_between(started, ended) >= min_round_trips + 1
    return runs


def stats(server: RunningServer) -> dict[str, Any]:
    """The server's ``/_stats`` figures (DOCSYNC_STATS_ENDPOINT=True, no prefix)."""
    status, _, body = server.get("/_stats")
    assert status == 200, (status, body[:500])
    return json.loads(body)


def rss_mb(server: RunningServer) -> float:
    return psutil.Process(server.proc.pid).memory_info().rss / 2**20


def raw_request(server: RunningServer, lines: list[str], read_timeout: float = 10.0,
                source: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """Send a hand-written HTTP request head; return (status, headers, body so far).

    Reads the response head and, with Content-Length, the body. Raises if the
    server sends nothing within ``read_timeout``.

    :param source: The local address to connect from (``None``: any).
    """
    address = (source, 0) if source else None
    with socket.create_connection(("127.0.0.1", server.port), timeout=read_timeout, source_address=address) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(status_line.split()[1]), headers, body
