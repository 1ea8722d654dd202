"""What saving sessions for restore costs: CPU per message, Redis memory, restore time.

In one process (gevent monkey-patched, as a worker is), with a real
redis-server (``--redis-url``, or one started on a free port from
``/usr/bin/redis-server`` without persistence):

- **CPU per message, restore on vs off**: a session of ``--app`` (default
  bench/apps/roundtrip.py: a slider whose callback rewrites a Div) with one
  subscribed connection gets ``--messages`` PATCH-DOCs setting the slider,
  each assembled from its frames and handled as the server does
  (``ServerSession.handle_patch``, the callback's PATCH-DOC encoded for the
  connection); with restore on, the recorder runs and the flusher writes to
  Redis every ``--flush-ms``. CPU time of this process (``process_time``,
  so redis-server's own CPU is not in it), rounds alternated, median.
  The WebSocket framing and socket work a real message also costs are not in
  the denominator, so the relative figure is an upper bound.
- **Redis memory per session**: ``--sessions`` sessions each set the slider
  once and are flushed; ``MEMORY USAGE`` of their keys, and ``used_memory``
  before and after, per session.
- **Restore time per session**: those sessions rebuilt by another
  application context (the app run again, checks, replay), against making
  a fresh session, wall time, median.

    python bench/restore.py [--messages 5000] [--sessions 200] [--json]
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


class Connection:
    """A subscriber that keeps nothing (a connection whose writer is instant)."""

    def __init__(self) -> None:
        self.frames = 0

    def send_frames(self, frames) -> None:
        self.frames += 1


def start_redis() -> tuple[str, subprocess.Popen | None, str]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="bench-restore-")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", folder, "--loglevel", "warning"], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    for _ in range(200):
        try:
            if redis.Redis.from_url(url).ping():
                break
        except Exception:
            time.sleep(0.05)
    return url, proc, folder


def make_context(app_path: str, restorer):
    from bokeh.command.util import build_single_handler_application

    from flask_docsync.context import ApplicationContext

    context = ApplicationContext(build_single_handler_application(app_path), "/bench")
    context.restorer = restorer
    return context


def new_session(context, session_id: str, saved=None):
    from bokeh.util.token import generate_jwt_token

    from flask_docsync.context import RequestData

    token = generate_jwt_token(session_id, signed=False, secret_key=None)
    return context.create_session_if_needed(session_id, RequestData(), token, {}, saved=saved)


def cpu_per_message(context, messages: int, rounds: int) -> float:
    from flask_docsync.protocol import protocol

    session = new_session(context, f"cpu-{id(context)}")
    connection = Connection()
    session.subscribe(connection)
    slider = session.document.select_one({"name": "slider"})
    header = json.dumps({"msgid": "m", "msgtype": "PATCH-DOC"})
    samples = []
    value = 0
    import gevent

    for _ in range(rounds):
        started = time.process_time()
        for _ in range(messages):
            value += 1
            content = json.dumps({"events": [
                {"kind": "ModelChanged", "model": {"id": slider.id}, "attr": "value", "new": value}]})
            session.handle_patch(protocol.assemble(header, "{}", content), None)
            if value % 50 == 0:
                gevent.sleep(0)  # let the flusher run, as a worker's loop would between messages
        samples.append((time.process_time() - started) / messages)
    context.discard_session(session)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app", default=os.path.join(HERE, "apps", "roundtrip.py"))
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--flush-ms", type=int, default=300)
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import logging

    import redis

    from flask_docsync.restore import Restorer, Saved

    logging.basicConfig(level=logging.WARNING)
    proc = folder = None
    url = args.redis_url
    if url is None:
        url, proc, folder = start_redis()
    client = redis.Redis.from_url(url)
    try:
        restorer = Restorer(url, prefix="bench", flush_ms=args.flush_ms, ttl_ms=600_000)
        off = make_context(args.app, None)
        on = make_context(args.app, restorer)
        cpu_per_message(off, 500, 1)  # warm-up
        cpu_off, cpu_on = [], []
        for _ in range(2):
            cpu_off.append(cpu_per_message(off, args.messages, args.rounds))
            cpu_on.append(cpu_per_message(on, args.messages, args.rounds))
        off_us, on_us = min(cpu_off) * 1e6, min(cpu_on) * 1e6

        client.flushdb()
        before = client.info("memory")["used_memory"]
        sessions = []
        for n in range(args.sessions):
            session = new_session(on, f"mem-{n:05d}")
            session.handle_patch(_patch(session, n), None)
            sessions.append(session)
        restorer.flush()
        after = client.info("memory")["used_memory"]
        keys = [s.recorder.key for s in sessions]
        usage = [client.memory_usage(k) or 0 for k in keys]

        # Restore: another "worker" (a new context) rebuilds each session.
        other = make_context(args.app, Restorer(url, prefix="bench", flush_ms=60_000, ttl_ms=600_000))
        restore_ms, fresh_ms = [], []
        for n, key in enumerate(keys):
            raw = client.hgetall(key)
            started = time.perf_counter()
            fields = {k.decode(): v.decode() for k, v in client.hgetall(key).items()}
            saved = Saved(other.restorer, key, fields)
            saved.check_before(other.app_fingerprint)
            restored = new_session(other, f"mem-{n:05d}", saved=saved)
            restore_ms.append((time.perf_counter() - started) * 1000)
            assert raw and saved.failure is None, saved.failure
            assert restored.document.select_one({"name": "slider"}).value == n + 1
            started = time.perf_counter()
            fresh = new_session(other, f"fresh-{n:05d}")
            fresh_ms.append((time.perf_counter() - started) * 1000)
        for context in (on, off, other):
            context.destroy_all(force=True)
        result = {
            "cpu_per_message_us_off": round(off_us, 1),
            "cpu_per_message_us_on": round(on_us, 1),
            "cpu_overhead": round(on_us / off_us - 1, 3),
            "redis_memory_usage_per_key_bytes": round(statistics.mean(usage)),
            "redis_used_memory_per_session_bytes": round((after - before) / args.sessions),
            "restore_ms_median": round(statistics.median(restore_ms), 2),
            "fresh_session_ms_median": round(statistics.median(fresh_ms), 2),
            "saves": restorer.figures["saved"],
        }
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
            shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:40} {value}")


def _patch(session, n: int):
    from flask_docsync.protocol import protocol

    slider = session.document.select_one({"name": "slider"})
    return protocol.assemble(json.dumps({"msgid": "m", "msgtype": "PATCH-DOC"}), "{}", json.dumps(
        {"events": [{"kind": "ModelChanged", "model": {"id": slider.id}, "attr": "value", "new": n + 1}]}))


if __name__ == "__main__":
    main()
