"""Server processes and benchmark scenarios shared by ``run.py`` and ``profile_server.py``.

Every scenario measures one server: the server's CPU (user + system of its
process tree, from psutil) is sampled around the measuring window and
divided by the operations done in it. Every loop is bounded in count and
in time, and only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

import client as bc

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
APPS_DIR = HERE / "apps"
APPS = ("idle", "roundtrip", "streaming")
HOST = "127.0.0.1"

#: Short unused-session settings for both servers, so cleanup is measurable.
LIFETIME_MS = 1000
CHECK_MS = 500
CLEANUP_WAIT = (LIFETIME_MS + CHECK_MS) / 1000 + 0.5

#: Streaming app constants (bench/apps/streaming.py).
STREAM_HZ = 10

now = time.perf_counter

KINDS = {
    # label: python -m <module> serve ...
    "bokeh": "bokeh",
    "docsync": "flask_docsync",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))
    return s[k]


# --------------------------------------------------------------------------- servers


class Server:
    """One ``bokeh serve`` or ``flask-docsync serve`` process on a free port."""

    def __init__(self, kind: str, logdir: Path, log_level: str = "warning", extra: list[str] | None = None,
                 apps: tuple[str, ...] = APPS, env: dict[str, str] | None = None) -> None:
        self.kind = kind
        #: Environment variables for the server, set after the secrets of the bench's own environment are dropped.
        self.env = dict(env or {})
        self.apps = apps
        self.logdir = logdir
        self.log_level = log_level
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.ps: psutil.Process | None = None
        self.port = 0
        self.starts = 0
        #: Environment variables for the server, set after the secret keys
        #: of this process are dropped (a run may give its own).
        self.env: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"<{self.kind} pid={self.proc.pid if self.proc else None} port={self.port}>"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", KINDS[self.kind], "serve",
            *[str(APPS_DIR / f"{a}.py") for a in self.apps],
            "--port", str(self.port), "--address", HOST,
            "--allow-websocket-origin", f"{HOST}:{self.port}",
            "--unused-session-lifetime", str(LIFETIME_MS),
            "--check-unused-sessions", str(CHECK_MS),
            "--log-level", self.log_level,
            *self.extra,
        ]

    def start(self, timeout: float = 60.0) -> None:
        self.port = free_port()
        self.starts += 1
        logfile = open(self.logdir / f"{self.kind}-{self.starts}.log", "wb")
        env = dict(os.environ)
        env.pop("BOKEH_SECRET_KEY", None)
        env.pop("DOCSYNC_SECRET_KEY", None)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        self.proc = subprocess.Popen(
            self.command(), cwd=str(REPO), stdout=logfile, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, env=env,
        )
        logfile.close()
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}; see {logfile.name}")
            try:
                with socket.create_connection((HOST, self.port), timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"{self.kind} did not listen on {self.port} within {timeout} s")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGINT, then SIGTERM, then SIGKILL to the server's process group.

        Both servers may take many seconds to shut down gracefully with
        hundreds of sessions (they discard each), hence the escalation.
        """
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, min(timeout, 5.0)), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)  # the group this process leads (start_new_session)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def restart(self) -> None:
        """A fresh process (its sessions are not part of any later measurement)."""
        self.stop(timeout=2.0)
        self.start()

    def processes(self) -> list[psutil.Process]:
        assert self.ps is not None
        try:
            return [self.ps, *self.ps.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def server_process(self) -> psutil.Process:
        """The Python process serving (for py-spy)."""
        return self.ps  # type: ignore[return-value]

    def cpu(self) -> float:
        """User + system CPU seconds of the server's process tree."""
        total = 0.0
        for p in self.processes():
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system
            if p is self.ps:
                total += t.children_user + t.children_system
        return total

    def rss(self) -> int:
        total = 0
        for p in self.processes():
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total


class Serving:
    """``with Serving(servers, logdir) as run:`` stops every server however the block ends.

    Ctrl-C (``KeyboardInterrupt``) ends the block early and is swallowed,
    with ``run.interrupted`` set, so the partial results can be printed; any
    other error is re-raised with ``run.failed`` set, and the logs are kept.
    ``servers`` may still be filled inside the block (servers as they start);
    ``also`` are called after them (other processes to stop); ``cleanup``
    (removing a temporary log directory) runs unless the block failed.
    """

    def __init__(self, servers: list[Server], logdir: Path, cleanup: Any = None, also: tuple[Any, ...] = ()) -> None:
        self.servers = servers
        self.logdir = logdir
        self.cleanup = cleanup
        self.also = also
        self.interrupted = self.failed = False

    def __enter__(self) -> Serving:
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        if kind is KeyboardInterrupt:
            self.interrupted = True
            log("interrupted; stopping the servers")
        elif kind is not None:
            self.interrupted = self.failed = True
            log(f"failed; stopping the servers (their logs stay in {self.logdir})")
        for s in self.servers:
            s.stop(3.0 if self.interrupted else 10.0)
        for stop in self.also:
            stop()
        if self.cleanup is not None and not self.failed:
            self.cleanup()
        return kind is KeyboardInterrupt


async def wait_quiet(
    server: Server, min_wait: float = 0.0, max_wait: float = 60.0, window: float = 1.0, threshold: float = 0.05
) -> tuple[float, bool]:
    """Wait ``min_wait``, then until the server used < ``threshold`` of a core over ``window`` s.

    Returns ``(seconds waited, quiet reached)``; gives up after ``max_wait``.
    """
    t0 = now()
    await asyncio.sleep(min_wait)
    samples: collections.deque[tuple[float, float]] = collections.deque()
    while now() - t0 < max_wait:
        t, c = now(), server.cpu()
        samples.append((t, c))
        while len(samples) > 2 and t - samples[1][0] >= window:
            samples.popleft()
        if t - samples[0][0] >= window and (c - samples[0][1]) / (t - samples[0][0]) < threshold:
            return now() - t0, True
        await asyncio.sleep(0.2)
    return now() - t0, False


class Window:
    """Server CPU, client CPU and wall time around a measuring window."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def __enter__(self) -> Window:
        self.cpu0 = self.server.cpu()
        self.client0 = time.process_time()
        self.t0 = now()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if not hasattr(self, "t1"):
            self.t1 = now()
            self.cpu1 = self.server.cpu()
            self.client1 = time.process_time()

    @property
    def wall(self) -> float:
        return self.t1 - self.t0

    @property
    def server_cpu(self) -> float:
        return self.cpu1 - self.cpu0

    @property
    def client_cpu_pct(self) -> float:
        return 100 * (self.client1 - self.client0) / max(self.wall, 1e-9)


@dataclass
class Errors:
    count: int = 0
    samples: list[str] = field(default_factory=list)

    def add(self, exc: BaseException) -> None:
        self.count += 1
        if len(self.samples) < 3:
            self.samples.append(f"{type(exc).__name__}: {exc}"[:200])


async def open_many(
    server: Server, app: str, n: int, concurrency: int = 8, timeout: float = 60.0, limit_s: float = 600.0
) -> tuple[list[tuple[bc.BokehConnection, bytes]], Errors]:
    """Open ``n`` sessions of ``app`` (page, WebSocket, PULL), ``concurrency`` at a time."""
    errors = Errors()
    out: list[tuple[bc.BokehConnection, bytes]] = []
    sem = asyncio.Semaphore(concurrency)
    deadline = now() + limit_s

    async def one() -> None:
        async with sem:
            if now() > deadline:
                errors.add(TimeoutError("setup time limit"))
                return
            try:
                conn, content = await bc.open_session(HOST, server.port, app, timeout)
                out.append((conn, content or b""))
            except Exception as exc:
                errors.add(exc)

    await asyncio.gather(*(one() for _ in range(n)))
    return out, errors


async def close_all(conns: list[bc.BokehConnection], concurrency: int = 64, timeout: float = 5.0) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one(c: bc.BokehConnection) -> None:
        async with sem:
            try:
                await c.close(timeout)
            except Exception:
                c.abort()

    await asyncio.gather(*(one(c) for c in conns))


# --------------------------------------------------------------------------- scenarios


async def warm_up(server: Server) -> None:
    """One session per app (imports, template, first-run caches), then quiet."""
    for app in APPS:
        conn, content = await bc.open_session(HOST, server.port, app)
        if app == "roundtrip":
            sid = bc.find_model_id(content, "slider")
            for v in range(1, 4):
                await conn.round_trip(sid, v)
        await conn.close()
    await wait_quiet(server, CLEANUP_WAIT, 60)


async def idle_cpu(server: Server, seconds: float = 2.0) -> dict[str, float]:
    with Window(server) as w:
        await asyncio.sleep(seconds)
    return {"idle_cpu_pct": 100 * w.server_cpu / w.wall}


async def lifecycle(
    server: Server, app: str, n: int, concurrency: int, limit_s: float, timeout: float = 60.0,
    on_window: Any = None,
) -> dict[str, Any]:
    """Page GET + WebSocket + ACK + PULL-DOC + close, until ``n`` done or ``limit_s``; then cleanup."""
    await wait_quiet(server, 0, 30)
    if on_window is not None:
        await on_window(limit_s + CLEANUP_WAIT + 1)
    lat: list[float] = []
    errors = Errors()
    started = 0
    deadline = now() + limit_s

    async def worker() -> None:
        nonlocal started
        while started < n and now() < deadline:
            started += 1
            t0 = now()
            try:
                conn, _ = await bc.open_session(HOST, server.port, app, timeout)
                await conn.close()
                lat.append(now() - t0)
            except Exception as exc:
                errors.add(exc)

    w = Window(server)
    with w:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    result = await _with_cleanup(server, w, lat, errors)
    result["rate_per_s"] = len(lat) / w.wall
    return result


async def _with_cleanup(server: Server, w: Window, lat: list[float], errors: Errors) -> dict[str, Any]:
    """Wait until the server has cleaned up, then CPU per op (cleanup included) and latencies."""
    waited, quiet = await wait_quiet(server, CLEANUP_WAIT, 120)
    cpu_all = server.cpu() - w.cpu0
    ops = max(len(lat), 1)
    return {
        "ops": len(lat),
        "cpu_ms": 1000 * cpu_all / ops,
        "cpu_window_ms": 1000 * w.server_cpu / ops,
        "p50_ms": 1000 * pct(lat, 50),
        "p99_ms": 1000 * pct(lat, 99),
        "cleanup_wait_s": waited,
        "quiet": quiet,
        "client_cpu_pct": w.client_cpu_pct,
        "errors": errors.count,
        "error_samples": errors.samples,
    }


async def page_get(server: Server, app: str, n: int, limit_s: float, timeout: float = 60.0) -> dict[str, Any]:
    """The app page alone, sequentially (each creates a session that is never connected)."""
    await wait_quiet(server, 0, 30)
    lat: list[float] = []
    errors = Errors()
    deadline = now() + limit_s
    w = Window(server)
    with w:
        for _ in range(n):
            if now() > deadline:
                break
            t0 = now()
            try:
                await bc.get_token(HOST, server.port, app, timeout)
                lat.append(now() - t0)
            except Exception as exc:
                errors.add(exc)
    return await _with_cleanup(server, w, lat, errors)


async def round_trip(
    server: Server, sessions: int, duration: float, max_ops: int, timeout: float = 60.0, on_window: Any = None
) -> dict[str, Any]:
    """``sessions`` clients each set the slider and wait for the Div's PATCH-DOC, in a closed loop."""
    opened, errors = await open_many(server, "roundtrip", sessions)
    conns: list[bc.BokehConnection] = []
    ids: list[str] = []
    for conn, content in opened:
        conns.append(conn)
        ids.append(bc.find_model_id(content, "slider"))
    try:
        values = [1] * len(conns)

        async def loop(i: int, until: float, cap: int, sink: list[float]) -> None:
            conn, sid = conns[i], ids[i]
            while now() < until and len(sink) < cap:
                values[i] += 1
                try:
                    sink.append(await conn.round_trip(sid, values[i], timeout))
                except Exception as exc:
                    errors.add(exc)
                    return

        warm: list[float] = []
        await asyncio.gather(*(loop(i, now() + 10, 3 * len(conns), warm) for i in range(len(conns))))
        lat: list[float] = []
        if on_window is not None:
            await on_window(duration)
        w = Window(server)
        with w:
            until = now() + duration
            await asyncio.gather(*(loop(i, until, max_ops, lat) for i in range(len(conns))))
    finally:
        await close_all(conns)
    ops = max(len(lat), 1)
    return {
        "sessions": len(conns),
        "ops": len(lat),
        "cpu_ms": 1000 * w.server_cpu / ops,
        "p50_ms": 1000 * pct(lat, 50),
        "p99_ms": 1000 * pct(lat, 99),
        "max_ms": 1000 * max(lat) if lat else float("nan"),
        "ops_per_s": len(lat) / w.wall,
        "server_cpu_pct": 100 * w.server_cpu / w.wall,
        "client_cpu_pct": w.client_cpu_pct,
        "errors": errors.count,
        "error_samples": errors.samples,
    }


async def streaming(
    server: Server, sessions: int, duration: float, warmup: float = 1.0, timeout: float = 60.0, on_window: Any = None
) -> dict[str, Any]:
    """``sessions`` clients turn on the 10 Hz stream, then count ColumnsStreamed PATCH-DOCs."""
    opened, errors = await open_many(server, "streaming", sessions)
    conns = [c for c, _ in opened]
    try:
        sem = asyncio.Semaphore(32)

        async def activate(conn: bc.BokehConnection, content: bytes) -> None:
            async with sem:
                try:
                    await conn.set_property(bc.find_model_id(content, "run"), "active", True, timeout)
                except Exception as exc:
                    errors.add(exc)

        await asyncio.gather(*(activate(c, content) for c, content in opened))
        await asyncio.sleep(warmup)
        if on_window is not None:
            await on_window(duration)
        n0 = sum(c.streamed for c in conns)
        w = Window(server)
        with w:
            await asyncio.sleep(duration)
            n1 = sum(c.streamed for c in conns)
    finally:
        await close_all(conns)
    delivered = n1 - n0
    expected = len(conns) * STREAM_HZ * w.wall
    return {
        "sessions": len(conns),
        "delivered": delivered,
        "expected": expected,
        "delivered_pct": 100 * delivered / max(expected, 1),
        "msgs_per_s": delivered / w.wall,
        "cpu_ms": 1000 * w.server_cpu / max(delivered, 1),
        "server_cpu_pct": 100 * w.server_cpu / w.wall,
        "client_cpu_pct": w.client_cpu_pct,
        "errors": errors.count,
        "error_samples": errors.samples,
    }


class Probe:
    """Pings one WebSocket in a closed loop (every ``interval`` s) to see event-loop stalls."""

    def __init__(self, conn: bc.BokehConnection, interval: float = 0.02) -> None:
        self.conn = conn
        self.interval = interval
        self.rtts: list[float] = []
        self._sent_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = False

    async def _run(self) -> None:
        while not self._stop:
            self._sent_at = now()
            try:
                self.rtts.append(await self.conn.ping(timeout=900))
            except Exception:
                return
            finally:
                self._sent_at = None
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self.rtts = []
        self._stop = False
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> float:
        """Stop; return the longest ping round trip (or age of the unanswered one), in s."""
        self._stop = True
        pending = now() - self._sent_at if self._sent_at is not None else 0.0
        longest = max([pending, *self.rtts]) if self.rtts or pending else float("nan")
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 1.0)
            except (asyncio.TimeoutError, Exception):
                self._task.cancel()
        return longest


async def idle_cycles(
    server: Server, sessions: int, cycles: int = 2, max_discard_s: float = 600.0, on_discard: Any = None
) -> dict[str, Any]:
    """Memory per idle session and after cleanup, and the cost of discarding them, ``cycles`` times.

    Each cycle opens ``sessions`` idle sessions and keeps them connected
    (RSS delta / N), closes them all and waits until the server is quiet
    again: the server CPU from the close until then, per session, is the
    discard cost; a probe WebSocket pinging every 20 ms gives the longest
    event-loop stall meanwhile.
    """
    probe_conn, _ = await bc.open_session(HOST, server.port, "roundtrip")
    out: dict[str, Any] = {"sessions": sessions, "cycles": []}
    try:
        await wait_quiet(server, CLEANUP_WAIT, 60)
        base = server.rss()
        out["rss_base_mb"] = base / 2**20
        probe = Probe(probe_conn)
        for cycle in range(1, cycles + 1):
            start_rss = server.rss()
            t_open = now()
            opened, errors = await open_many(server, "idle", sessions)
            open_s = now() - t_open
            conns = [c for c, _ in opened]
            await asyncio.sleep(1.0)
            peak = server.rss()
            if on_discard is not None:
                await on_discard(cycle)
            probe.start()
            w = Window(server)
            with w:
                await close_all(conns)
                waited, quiet = await wait_quiet(server, CLEANUP_WAIT, max_discard_s)
            stall = await probe.stop()
            after = server.rss()
            n = max(len(conns), 1)
            out["cycles"].append({
                "opened": len(conns),
                "open_s": open_s,
                "rss_start_mb": start_rss / 2**20,
                "rss_peak_mb": peak / 2**20,
                "rss_after_mb": after / 2**20,
                "mb_per_session": (peak - start_rss) / 2**20 / n,
                "retained_pct": 100 * (after - base) / max(peak - base, 1),
                "discard_cpu_ms": 1000 * w.server_cpu / n,
                "discard_wall_s": w.wall,
                "quiet": quiet,
                "stall_ms": 1000 * stall,
                "probe_pings": len(probe.rtts),
                "errors": errors.count,
                "error_samples": errors.samples,
            })
        c1 = out["cycles"][0]
        growth1 = c1["rss_peak_mb"] - out["rss_base_mb"]
        if cycles > 1:
            c2 = out["cycles"][1]
            out["cycle2_growth_pct"] = 100 * (c2["rss_peak_mb"] - c1["rss_peak_mb"]) / max(growth1, 1e-9)
    finally:
        await probe_conn.close()
    return out


def summarize(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")
