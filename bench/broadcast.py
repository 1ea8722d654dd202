#!/usr/bin/env python
"""Broadcast: publish-to-session latency and server CPU per delivery.

    python bench/broadcast.py [--sessions 100] [--count 200] [--rate 20] [--json out.json]

Three servers, one after the other, on 127.0.0.1, each with ``--sessions``
connected sessions of ``bench/apps/bcast.py``, and one more session that
publishes ``--count`` broadcasts at ``--rate`` per second from a periodic
callback (each carries its publish time):

- ``bokeh``: ``bokeh serve``, one process, the usual recipe there (a module
  that keeps every document; a next-tick callback added to each);
- ``docsync``: ``flask-docsync serve``, one process, ``flask_docsync.subscribe``
  and ``broadcast`` without Redis;
- ``redis``: two ``flask-docsync serve --num-procs 2 --redis-url`` "hosts"
  on one ``redis-server`` (sessions spread over both), the same app.

For each, the p50 / p99 / max of the time from publish to the PATCH-DOC's
arrival at the client, over every (broadcast, session) pair, and the server
CPU (whole process trees; redis-server's own for ``redis`` shown apart) per
delivered message over the publishing window. Ratios are to ``bokeh``. Not
part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import client as bc  # noqa: E402

REPO = HERE.parent
HOST = "127.0.0.1"
APP = HERE / "apps" / "bcast.py"
NEW = re.compile(rb'"new":"(\d+)\|([0-9.]+)"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    full = {**os.environ, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE / "apps"), str(REPO), os.environ.get("PYTHONPATH")])),
            **env}
    proc = subprocess.Popen(cmd, cwd=str(REPO), stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True, env=full)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited; see {log}")
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{cmd[:4]} did not listen; see {log}")


def stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(10)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def start_redis(logdir: Path) -> tuple[subprocess.Popen, str]:
    """``redis-server`` on a free port of 127.0.0.1, no persistence; the process and its URL."""
    redis_server = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    proc = start([redis_server, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                  "--dir", str(logdir)], port, {}, logdir / "redis.log")
    return proc, f"redis://{HOST}:{port}/0"


def cpu(procs: list[subprocess.Popen]) -> float:
    total = 0.0
    for proc in procs:
        try:
            root = psutil.Process(proc.pid)
            for p in [root, *root.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def serve_cmd(kind: str, port: int, extra: list[str]) -> list[str]:
    module = "bokeh" if kind == "bokeh" else "flask_docsync"
    return [sys.executable, "-m", module, "serve", str(APP), "--port", str(port), "--address", HOST,
            "--allow-websocket-origin", f"{HOST}:{port}", "--unused-session-lifetime", "600000",
            "--log-level", "warning", *extra]


async def measure(ports: list[int], procs: list[subprocess.Popen], sessions: int, count: int, rate: float,
                  redis_proc: subprocess.Popen | None) -> dict:
    arrivals: list[float] = []
    got = [0] * sessions
    conns = []
    for i in range(sessions):
        conn, _ = await bc.open_session(HOST, ports[i % len(ports)], "bcast")
        original = conn._message

        def on_message(header, frames, i=i, original=original):
            if header["msgtype"] == "PATCH-DOC":
                received = time.time()
                for n, t in NEW.findall(frames[2]):
                    arrivals.append(received - float(t))
                    got[i] = max(got[i], int(n) + 1)
            original(header, frames)

        conn._message = on_message  # type: ignore[method-assign]
        conns.append(conn)
    await asyncio.sleep(1.0)
    cpu0, redis0, t0 = cpu(procs), cpu([redis_proc]) if redis_proc else 0.0, time.monotonic()
    status, _ = await bc.http_get(HOST, ports[0], f"/bcast?publish={count}&rate={rate}")
    assert status == 200, status
    deadline = time.monotonic() + count / rate + 60
    while min(got) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - t0
    cpu1, redis1 = cpu(procs), cpu([redis_proc]) if redis_proc else 0.0
    for conn in conns:
        await conn.close()
    arrivals.sort()
    delivered = len(arrivals)

    def q(p: float) -> float:
        return arrivals[min(delivered - 1, int(p * delivered))] * 1000 if delivered else float("nan")

    return {
        "delivered": delivered, "expected": sessions * count, "complete": min(got) >= count,
        "p50_ms": q(0.50), "p99_ms": q(0.99), "max_ms": arrivals[-1] * 1000 if arrivals else float("nan"),
        "cpu_us_per_delivery": (cpu1 - cpu0) / max(delivered, 1) * 1e6,
        "redis_cpu_s": redis1 - redis0, "window_s": elapsed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--only", default="bokeh,docsync,redis")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logdir = Path(tempfile.mkdtemp(prefix="docsync-bench-broadcast-"))
    results: dict[str, dict] = {}
    for kind in args.only.split(","):
        procs: list[subprocess.Popen] = []
        redis_proc = None
        try:
            if kind == "redis":
                redis_proc, redis_url = start_redis(logdir)
                env = {"DOCSYNC_SECRET_KEY": secrets.token_urlsafe(32)}
                ports = [free_port(), free_port()]
                for i, port in enumerate(ports):
                    extra = ["--num-procs", "2", "--redis-url", redis_url]
                    procs.append(start(serve_cmd(kind, port, extra), port, env, logdir / f"redis-host{i}.log"))
            else:
                port = free_port()
                env = {"BENCH_BCAST": "bokeh"} if kind == "bokeh" else {}
                procs.append(start(serve_cmd(kind, port, []), port, env, logdir / f"{kind}.log"))
                ports = [port]
            print(f"{kind}: {args.sessions} sessions, {args.count} broadcasts at {args.rate:g}/s ...", flush=True)
            results[kind] = asyncio.run(measure(ports, procs, args.sessions, args.count, args.rate, redis_proc))
        finally:
            for proc in procs:
                stop(proc)
            if redis_proc is not None:
                stop(redis_proc)
    base = results.get("bokeh")
    print(f"\n{'server':<9}{'delivered':>12}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'CPU us/msg':>12}{'ratio':>7}")
    for kind, r in results.items():
        ratio = f"{r['cpu_us_per_delivery'] / base['cpu_us_per_delivery']:.2f}" if base and kind != "bokeh" else ""
        print(f"{kind:<9}{r['delivered']:>7}/{r['expected']:<5}{r['p50_ms']:>8.1f}{r['p99_ms']:>9.1f}"
              f"{r['max_ms']:>9.1f}{r['cpu_us_per_delivery']:>12.1f}{ratio:>7}"
              + (f"   (redis-server {r['redis_cpu_s']:.2f} s CPU)" if kind == "redis" else ""))
    print(f"\nmachine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; logs in {logdir}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
