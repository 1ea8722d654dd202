#!/usr/bin/env python
"""Load test: 1,000 concurrent sessions on one worker, half streaming, half interacting.

    python bench/load.py [--sessions 1000] [--seconds 60] [--warmup 10]
                         [--server docsync|bokeh] [--json out.json]

Starts ``flask-docsync serve`` (one gevent worker; ``--server bokeh`` runs
``bokeh serve`` instead) on ``bench/apps/load.py`` on a free port of
127.0.0.1, opens ``--sessions`` sessions (page GET, WebSocket, ACK,
PULL-DOC) and keeps them all connected. Once every session is connected,
half of them set the app's ``run`` Toggle, which starts a 10 Hz periodic
callback streaming a numbered batch (column ``seq`` = tick number); the
other half each set the app's slider about once a second (staggered over
the second) and time the round trip until the callback's PATCH-DOC *and*
the OK have arrived. After ``--warmup`` seconds, a measuring window of
``--seconds`` seconds. Then each streaming session clears ``run``; the app
answers with ``status.text = "stopped after <n>"``, so the client can check
it received every batch the server produced, up to the last one.

Checks, per session, over the whole run (not only the window):

* every ColumnsStreamed batch is exactly the previous one + 1, from 0 to the
  server's last; a batch skipped is a gap (lost patch), one older than the
  last seen a reorder; the batch's binary ``x`` buffer must belong to its
  ``seq`` (so buffers are not swapped between messages either);
* every reply pairs with a request (its ``reqid`` is the one outstanding)
  and every slider patch carries the value just sent; interacting sessions
  get no stream batches and streaming sessions no slider patches;
* connections the server closed (e.g. 1008 "client too slow" of the
  slow-client policy) and connections dropped without a close frame are
  counted separately, never folded into the loss figures.

Reported: sessions connected; delivered vs expected streamed messages (10
per streaming session per second of the window); round-trip p50/p99;
server CPU (user + system of the server's process tree, psutil) as % of one
core and per message sent; server RSS; load average. Every loop is bounded
in count and time; only 127.0.0.1 is contacted; the server is stopped on
exit, Ctrl-C and errors. Reuses ``client.py`` and ``harness.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

try:
    import numpy as np
    import psutil  # noqa: F401
except ImportError as exc:  # pragma: no cover
    sys.exit(f"bench/load.py needs psutil and numpy ({exc}); pip install -e '.[test]' installs both")

import client as bc  # noqa: E402
import harness as h  # noqa: E402
import profile_server  # noqa: E402
from run import machine_info  # noqa: E402

APP = "load"
APP_PATH = h.APPS_DIR / f"{APP}.py"
STREAM_HZ = 10  # bench/apps/load.py: PERIOD_MS = 100
STOPPED_PREFIX = b'"stopped after '
now = h.now


# --------------------------------------------------------------------------- server


class LoadServer(h.Server):
    """``h.Server`` serving only ``bench/apps/load.py``, with the servers' default session lifetimes.

    (``h.Server`` uses a 1 s unused-session lifetime so the benchmark can
    measure cleanup; under load the gap between a page GET and its
    WebSocket may exceed that, so the defaults of both servers are used.)
    """

    def command(self) -> list[str]:
        cmd = super().command()
        apps = {str(h.APPS_DIR / f"{a}.py") for a in h.APPS}
        first = next(i for i, c in enumerate(cmd) if c in apps)
        out = [c for c in cmd[:first]] + [str(APP_PATH)]
        rest = [c for c in cmd[first:] if c not in apps]
        skip = {"--unused-session-lifetime", "--check-unused-sessions"}
        i = 0
        while i < len(rest):
            if rest[i] in skip:
                i += 2
                continue
            out.append(rest[i])
            i += 1
        return out


# --------------------------------------------------------------------------- client


class LoadConnection(bc.BokehConnection):
    """``bc.BokehConnection`` that checks every message it receives.

    ``bc.connect`` builds ``bc.BokehConnection``; ``main`` points that name at
    this class so every connection of the run is one of these.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.role = ""              # "stream" or "interact", set once connected
        self.received = 0           # every Bokeh message from the server
        self.next_seq = 0           # the stream batch expected next
        self.batches = 0            # stream batches received
        self.gaps = 0               # times one or more batches were skipped
        self.missing = 0            # batches skipped in all
        self.reorders = 0           # batches older than the newest already seen
        self.bad_batches = 0        # malformed batch (seq column or x buffer wrong)
        self.stopped_after: int | None = None  # the server's tick count when streaming stopped
        self.after_stop = 0         # stream batches that arrived after "stopped after"
        self.expect_value: bytes | None = None  # b'"value=<v>"' of the request in flight
        self.value_patches = 0
        self.mismatched = 0         # slider patches with another value than the one in flight
        self.unpaired = 0           # replies whose reqid is not a request in flight
        self.unexpected = 0         # messages of a kind this session should never get
        self.close_reason = b""
        self.closed_by_us = False
        self.first_problem = ""

    def _problem(self, what: str) -> None:
        if not self.first_problem:
            self.first_problem = what[:300]

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == bc.OP_CLOSE:
            self.close_reason = payload[2:125]
        super()._control(opcode, payload)

    def _message(self, header: dict[str, Any], frames: list[bytes]) -> None:
        self.received += 1
        reqid = header.get("reqid")
        msgtype = header["msgtype"]
        if reqid is not None:
            if reqid not in self.waiters:
                self.unpaired += 1
                self._problem(f"{msgtype} for reqid {reqid}, no such request in flight")
        elif msgtype == "PATCH-DOC":
            content = frames[2]
            if b'"ColumnsStreamed"' in content:
                self._batch(header, frames)
            elif STOPPED_PREFIX in content:
                try:
                    new = json.loads(content)["events"][0]["new"]
                    self.stopped_after = int(new.rsplit(" ", 1)[1])
                except (ValueError, KeyError, IndexError, TypeError):
                    self.bad_batches += 1
                    self._problem(f"bad stop status {content[:200]!r}")
            elif b'"value=' in content:
                self.value_patches += 1
                if self.role != "interact":
                    self.unexpected += 1
                    self._problem(f"slider patch on a {self.role} session")
                elif self.expect_value is None or self.expect_value not in content:
                    self.mismatched += 1
                    self._problem(f"slider patch {content[:120]!r} while {self.expect_value!r} in flight")
            else:
                self.unexpected += 1
                self._problem(f"unexpected PATCH-DOC {content[:200]!r}")
        elif msgtype == "ERROR":
            self._problem(f"ERROR {frames[2][:200]!r}")
        super()._message(header, frames)

    def _batch(self, header: dict[str, Any], frames: list[bytes]) -> None:
        self.batches += 1
        if self.role != "stream":
            self.unexpected += 1
            self._problem(f"stream batch on a {self.role or 'new'} session")
        try:
            events = json.loads(frames[2])["events"]
            if len(events) != 1 or events[0]["kind"] != "ColumnsStreamed":
                raise ValueError(f"{len(events)} events")
            cols = dict(events[0]["data"]["entries"])
            seqs = cols["seq"]
            seq = seqs[0]
            if not isinstance(seq, int) or any(s != seq for s in seqs):
                raise ValueError(f"seq column {seqs!r}")
            buffers = {json.loads(frames[i])["id"]: frames[i + 1] for i in range(3, len(frames) - 1, 2)}
            x = np.frombuffer(buffers[cols["x"]["array"]["data"]["id"]], dtype="<f8")
            if len(x) != len(seqs) or x[0] != seq * len(seqs):
                raise ValueError(f"x {x[:3]!r} does not belong to batch {seq}")
        except Exception as exc:  # noqa: BLE001 - any malformation is counted, not raised
            self.bad_batches += 1
            self._problem(f"bad batch: {type(exc).__name__}: {exc}")
            return
        if self.stopped_after is not None:
            self.after_stop += 1
            self._problem(f"batch {seq} after 'stopped after {self.stopped_after}'")
        if seq == self.next_seq:
            self.next_seq = seq + 1
        elif seq > self.next_seq:
            self.gaps += 1
            self.missing += seq - self.next_seq
            self._problem(f"gap: batch {seq} after {self.next_seq - 1}")
            self.next_seq = seq + 1
        else:
            self.reorders += 1
            self._problem(f"reorder: batch {seq} after {self.next_seq - 1}")

    async def timed_round_trip(self, slider_id: str, value: int, timeout: float) -> float:
        self.expect_value = b'"value=%d"' % value
        try:
            return await self.round_trip(slider_id, value, timeout)
        finally:
            self.expect_value = None


# --------------------------------------------------------------------------- the run


class Stats:
    """Counters shared by the tasks of one run."""

    def __init__(self) -> None:
        self.rtts: list[tuple[float, float]] = []  # (sent at, round trip s)
        self.rtt_errors = h.Errors()
        self.late = 0          # a round trip took longer than the period: the next one went right after
        self.stream_on_errors = h.Errors()
        self.stop_errors = h.Errors()
        self.timeline: list[dict[str, Any]] = []


def snapshot(server: h.Server, conns: list[LoadConnection]) -> dict[str, float]:
    return {
        "t": now(),
        "cpu": server.cpu(),
        "client_cpu": time.process_time(),
        "batches": sum(c.batches for c in conns),
        "received": sum(c.received for c in conns),
    }


async def monitor(server: h.Server, conns: list[LoadConnection], stats: Stats, t0: float,
                  stop: asyncio.Event, every: float) -> dict[str, float]:
    """Log a progress line every ``every`` s; track peak RSS and load average until ``stop``."""
    peak = {"rss": 0.0, "load1": 0.0}
    prev = snapshot(server, conns)
    prev_rtts = len(stats.rtts)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass
        cur = snapshot(server, conns)
        dt = max(cur["t"] - prev["t"], 1e-9)
        rss = server.rss() / 2**20
        load1 = os.getloadavg()[0]
        peak["rss"] = max(peak["rss"], rss)
        peak["load1"] = max(peak["load1"], load1)
        recent = [r for _, r in stats.rtts[prev_rtts:]]
        row = {
            "t_s": round(cur["t"] - t0, 1),
            "batches_per_s": (cur["batches"] - prev["batches"]) / dt,
            "round_trips_per_s": len(recent) / dt,
            "rtt_p50_ms": 1000 * h.pct(recent, 50),
            "rtt_p99_ms": 1000 * h.pct(recent, 99),
            "server_cpu_pct": 100 * (cur["cpu"] - prev["cpu"]) / dt,
            "client_cpu_pct": 100 * (cur["client_cpu"] - prev["client_cpu"]) / dt,
            "server_rss_mb": rss,
            "load1": load1,
        }
        stats.timeline.append(row)
        h.log(
            f"t={row['t_s']:5.0f}s  {row['batches_per_s']:6.0f} batches/s  {row['round_trips_per_s']:4.0f} rt/s"
            f" (p50 {row['rtt_p50_ms']:.0f} ms, p99 {row['rtt_p99_ms']:.0f} ms)  server"
            f" {row['server_cpu_pct']:3.0f}% CPU {rss:.0f} MB  client {row['client_cpu_pct']:3.0f}%  load {load1:.2f}"
        )
        prev, prev_rtts = cur, len(stats.rtts)
    return peak


async def interact(conn: LoadConnection, slider_id: str, offset: float, period: float, until: float,
                   cap: int, timeout: float, stats: Stats) -> int:
    """Set the slider every ``period`` s (first after ``offset``), one request in flight, until ``until``."""
    await asyncio.sleep(offset)
    value = 0
    due = now()
    while value < cap and now() < until and not conn.closed.done():
        value += 1
        sent = now()
        try:
            stats.rtts.append((sent, await conn.timed_round_trip(slider_id, value, timeout)))
        except Exception as exc:  # noqa: BLE001
            stats.rtt_errors.add(exc)
            return value
        due += period
        wait = due - now()
        if wait < 0:
            stats.late += 1
            due = now()
            wait = 0
        await asyncio.sleep(wait)
    return value


async def set_run(conn: LoadConnection, run_id: str, active: bool, sem: asyncio.Semaphore, timeout: float,
                  errors: h.Errors) -> None:
    async with sem:
        if conn.closed.done():
            errors.add(bc.BenchError(f"connection already closed (code {conn.close_code})"))
            return
        try:
            await conn.set_property(run_id, "active", active, timeout)
            if not active:
                # the app sets status.text = "stopped after <n>" in the same callback
                deadline = now() + timeout
                while conn.stopped_after is None and now() < deadline and not conn.closed.done():
                    await asyncio.sleep(0.02)
                if conn.stopped_after is None:
                    raise bc.BenchError("no 'stopped after' status")
        except Exception as exc:  # noqa: BLE001
            errors.add(exc)


def start_py_spy(server: h.Server, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    """py-spy on the server process for the measuring window (raw stacks, for ``profile_server.report``)."""
    path = Path(args.profile) / f"{args.server}-load{args.sessions}.txt"
    args.profile_path = path
    cmd = [args.py_spy, "record", "--pid", str(server.server_process().pid), "--duration",
           str(max(1, int(args.seconds))), "--rate", "100", "--format", "raw", "--nolineno",
           "--nonblocking", "--output", str(path)]
    h.log(f"py-spy on the server for {args.seconds:.0f} s -> {path}")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def load_run(server: h.Server, args: argparse.Namespace, out: dict[str, Any]) -> None:
    stats = Stats()
    t_start = now()
    timeout = args.timeout

    # warm-up: imports and first-run caches, one session of each role
    conn, content = await bc.open_session(h.HOST, server.port, APP, timeout)
    conn.role = "stream"
    await conn.set_property(bc.find_model_id(content, "run"), "active", True, timeout)
    sid = bc.find_model_id(content, "slider")
    await asyncio.sleep(0.5)
    await set_run(conn, bc.find_model_id(content, "run"), False, asyncio.Semaphore(1), timeout, stats.stop_errors)
    conn.role = "interact"
    for v in range(1, 4):
        await conn.timed_round_trip(sid, v, timeout)
    await conn.close()
    await h.wait_quiet(server, 0.5, 30)
    rss_base = server.rss()
    out["server_rss_base_mb"] = rss_base / 2**20

    # connect all sessions
    h.log(f"opening {args.sessions} sessions, {args.connect_concurrency} at a time ...")
    stop_monitor = asyncio.Event()
    monitored: list[LoadConnection] = []
    mon = asyncio.ensure_future(monitor(server, monitored, stats, t_start, stop_monitor, args.report_every))
    cpu0, t0 = server.cpu(), now()
    opened, open_errors = await h.open_many(server, APP, args.sessions, args.connect_concurrency, timeout,
                                            args.max_setup_s)
    setup_s = now() - t0
    out["setup"] = {
        "sessions_requested": args.sessions,
        "sessions_connected": len(opened),
        "connect_errors": open_errors.count,
        "connect_error_samples": open_errors.samples,
        "wall_s": setup_s,
        "sessions_per_s": len(opened) / max(setup_s, 1e-9),
        "server_cpu_ms_per_session": 1000 * (server.cpu() - cpu0) / max(len(opened), 1),
    }
    rss_connected = server.rss()
    out["server_rss_connected_mb"] = rss_connected / 2**20
    out["server_rss_mb_per_session"] = (rss_connected - rss_base) / 2**20 / max(len(opened), 1)
    h.log(f"{len(opened)} sessions connected in {setup_s:.1f} s ({open_errors.count} failed);"
          f" server RSS {rss_connected / 2**20:.0f} MB")

    conns: list[LoadConnection] = []
    streamers: list[tuple[LoadConnection, str]] = []
    interactors: list[tuple[LoadConnection, str]] = []
    for i, (c, content) in enumerate(opened):
        assert isinstance(c, LoadConnection)
        conns.append(c)
        if i % 2 == 0:
            c.role = "stream"
            streamers.append((c, bc.find_model_id(content, "run")))
        else:
            c.role = "interact"
            interactors.append((c, bc.find_model_id(content, "slider")))
    monitored.extend(conns)
    tasks: list[asyncio.Future[Any]] = []
    spy: subprocess.Popen[bytes] | None = None
    try:
        # streaming on, once everyone is connected
        sem = asyncio.Semaphore(32)
        t0 = now()
        await asyncio.gather(*(set_run(c, rid, True, sem, timeout, stats.stream_on_errors) for c, rid in streamers))
        h.log(f"streaming on in {len(streamers)} sessions ({now() - t0:.1f} s,"
              f" {stats.stream_on_errors.count} failed); {len(interactors)} sessions interacting")

        # interactions: each session every `period` s, staggered over the period
        period = args.period
        end = now() + args.warmup + args.seconds
        cap = int((args.warmup + args.seconds) / period) + 10
        n_int = max(len(interactors), 1)
        tasks = [asyncio.ensure_future(interact(c, sid, period * i / n_int, period, end, cap, timeout, stats))
                 for i, (c, sid) in enumerate(interactors)]

        await asyncio.sleep(args.warmup)
        if args.profile:
            spy = start_py_spy(server, args)
        w = h.Window(server)
        b0 = sum(c.batches for c in conns)
        m0 = sum(c.received for c in conns)
        with w:
            await asyncio.sleep(args.seconds)
            b1 = sum(c.batches for c in conns)
            m1 = sum(c.received for c in conns)
        rss_end = server.rss()
        load_end = os.getloadavg()

        # stop interacting (bounded: each round trip has its timeout), then stop streaming
        done, pending = await asyncio.wait(tasks, timeout=timeout + 5)
        for t in pending:
            t.cancel()
        sem = asyncio.Semaphore(32)
        t0 = now()
        await asyncio.gather(*(set_run(c, rid, False, sem, timeout, stats.stop_errors) for c, rid in streamers))
        await asyncio.sleep(1.0)  # anything arriving after "stopped after" is a reorder
        stop_s = now() - t0
    finally:
        for t in tasks:
            t.cancel()
        if spy is not None and spy.poll() is None:
            try:
                await asyncio.to_thread(spy.wait, 30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait(5)
        stop_monitor.set()
        try:
            peak = await asyncio.wait_for(mon, 10)
        except Exception:  # noqa: BLE001
            peak = {"rss": float("nan"), "load1": float("nan")}
        # who was closed by the server before we closed anything
        for c in conns:
            c.closed_by_us = not c.closed.done()
        await h.close_all(conns, concurrency=64, timeout=2.0)

    # ---- figures
    in_window = [r for t, r in stats.rtts if w.t0 <= t < w.t1]
    delivered = b1 - b0
    expected = len(streamers) * STREAM_HZ * w.wall
    messages = m1 - m0
    out["window"] = {
        "seconds": w.wall,
        "streaming_sessions": len(streamers),
        "interacting_sessions": len(interactors),
        "delivered": delivered,
        "expected": expected,
        "delivered_pct": 100 * delivered / max(expected, 1),
        "round_trips": len(in_window),
        "round_trips_expected": len(interactors) * w.wall / period,
        "rtt_p50_ms": 1000 * h.pct(in_window, 50),
        "rtt_p99_ms": 1000 * h.pct(in_window, 99),
        "rtt_max_ms": 1000 * max(in_window) if in_window else float("nan"),
        "messages_received": messages,
        "server_cpu_pct": 100 * w.server_cpu / w.wall,
        "server_cpu_ms_per_message": 1000 * w.server_cpu / max(messages, 1),
        "server_cpu_ms_per_streamed": 1000 * w.server_cpu / max(delivered, 1),
        "client_cpu_pct": w.client_cpu_pct,
        "server_rss_end_mb": rss_end / 2**20,
        "server_rss_peak_mb": peak["rss"],
        "loadavg_end": load_end,
        "loadavg_peak_1min": peak["load1"],
    }
    closed_by_server = [c for c in conns if not c.closed_by_us]
    by_code: dict[str, int] = {}
    for c in closed_by_server:
        key = f"{c.close_code} {c.close_reason.decode(errors='replace')}".strip() if c.close_code else "no close frame"
        by_code[key] = by_code.get(key, 0) + 1
    stream_conns = [c for c, _ in streamers]
    incomplete = [c for c in stream_conns if c.stopped_after is not None and c.next_seq < c.stopped_after]
    problems = [f"{c.role} session: {c.first_problem}" for c in conns if c.first_problem][:5]
    out["integrity"] = {
        "batches_received": sum(c.batches for c in conns),
        "gaps": sum(c.gaps for c in conns),
        "missing_batches": sum(c.missing for c in conns),
        "reorders": sum(c.reorders for c in conns),
        "bad_batches": sum(c.bad_batches for c in conns),
        "batches_after_stop": sum(c.after_stop for c in conns),
        "streams_verified_to_last": sum(1 for c in stream_conns if c.stopped_after is not None
                                        and c.next_seq >= c.stopped_after),
        "streams_not_verified": sum(1 for c in stream_conns if c.stopped_after is None),
        "streams_short_of_last": len(incomplete),
        "tail_missing": sum(c.stopped_after - c.next_seq for c in incomplete),
        "round_trips_total": len(stats.rtts),
        "slider_patches": sum(c.value_patches for c in conns),
        "mismatched_replies": sum(c.mismatched for c in conns),
        "unpaired_replies": sum(c.unpaired for c in conns),
        "unexpected_messages": sum(c.unexpected for c in conns),
        "error_messages": sum(c.errors for c in conns),
        "round_trip_errors": stats.rtt_errors.count,
        "round_trip_error_samples": stats.rtt_errors.samples,
        "late_round_trips": stats.late,
        "stream_on_errors": stats.stream_on_errors.count,
        "stream_stop_errors": stats.stop_errors.count,
        "stream_stop_error_samples": stats.stop_errors.samples,
        "stream_stop_s": stop_s,
        "closed_by_server": len(closed_by_server),
        "closed_by_server_by_code": by_code,
        "first_problems": problems,
    }
    out["timeline"] = stats.timeline


# --------------------------------------------------------------------------- report


def clean(i: dict[str, Any]) -> bool:
    """No lost, reordered, malformed or unpaired message.

    A batch *after* "stopped after <n>" is not one of these: it is batch n, in
    sequence, from a tick that ran after the app removed its periodic
    callback (``bokeh serve`` does this when the tick is already waiting for
    the document lock while the PATCH-DOC that removes it holds the lock).
    It is reported on its own line.
    """
    return not any(i[k] for k in ("gaps", "reorders", "bad_batches", "streams_short_of_last",
                                  "mismatched_replies", "unpaired_replies", "unexpected_messages"))


def render(out: dict[str, Any]) -> str:
    m, s = out["machine"], out.get("setup", {})
    w, i = out.get("window"), out.get("integrity")
    name = "flask-docsync serve (1 gevent worker)" if out["server"] == "docsync" else "bokeh serve"
    lines = [
        f"# load test: {name}, {out['sessions']} sessions, {out['seconds']:.0f} s window after"
        f" {out['warmup']:.0f} s warm-up ({out['total_s']:.0f} s in all)",
        f"machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, bokeh {m['bokeh']},"
        f" gevent {m['gevent']}, flask-docsync {m['flask_docsync']}; load average"
        f" {m['loadavg_start'][0]:.2f} at start"
        + (f", {w['loadavg_peak_1min']:.2f} peak, {w['loadavg_end'][0]:.2f} at end of window" if w else ""),
        "",
        "| figure | value |",
        "|---|---:|",
    ]
    if s:
        lines += [
            f"| sessions connected | {s['sessions_connected']} / {s['sessions_requested']}"
            f" ({s['connect_errors']} failed) |",
            f"| connect: wall s, sessions/s, server CPU ms/session | {s['wall_s']:.1f} s,"
            f" {s['sessions_per_s']:.0f}/s, {s['server_cpu_ms_per_session']:.1f} ms |",
        ]
    if w:
        lines += [
            f"| streaming sessions × 10 Hz | {w['streaming_sessions']} |",
            f"| streamed batches delivered / expected | {w['delivered']:,} / {w['expected']:,.0f}"
            f" (**{w['delivered_pct']:.1f} %**) |",
            f"| interacting sessions × 1 round trip/{out['period']:g} s | {w['interacting_sessions']} |",
            f"| round trips done / scheduled | {w['round_trips']:,} / {w['round_trips_expected']:,.0f} |",
            f"| round trip p50 / p99 / max | {w['rtt_p50_ms']:.1f} / {w['rtt_p99_ms']:.1f} /"
            f" {w['rtt_max_ms']:.0f} ms |",
            f"| server CPU, % of one core | {w['server_cpu_pct']:.0f} % |",
            f"| server CPU per message sent (all {w['messages_received']:,}) | {w['server_cpu_ms_per_message']:.3f} ms |",
            f"| server CPU per streamed batch (all CPU ÷ batches) | {w['server_cpu_ms_per_streamed']:.3f} ms |",
            f"| server RSS: idle / connected / end (peak) | {out['server_rss_base_mb']:.0f} /"
            f" {out['server_rss_connected_mb']:.0f} / {w['server_rss_end_mb']:.0f}"
            f" ({w['server_rss_peak_mb']:.0f}) MB; {1024 * out['server_rss_mb_per_session']:.0f} kB/session |",
            f"| load client CPU, % of one core | {w['client_cpu_pct']:.0f} % |",
        ]
    if i:
        ok = clean(i)
        lines += [
            f"| stream batches checked (whole run) | {i['batches_received']:,} |",
            f"| **lost (gaps) / reordered / malformed** | **{i['missing_batches']} ({i['gaps']} gaps) /"
            f" {i['reorders']} / {i['bad_batches']}** |",
            f"| streams verified up to the server's last batch | {i['streams_verified_to_last']}"
            f" (short: {i['streams_short_of_last']}, unverified: {i['streams_not_verified']}) |",
            f"| batches from a tick after the callback's removal | {i['batches_after_stop']} |",
            f"| round trips paired (whole run) | {i['round_trips_total']:,}; mismatched"
            f" {i['mismatched_replies']}, unpaired {i['unpaired_replies']}, unexpected {i['unexpected_messages']},"
            f" ERROR {i['error_messages']} |",
            f"| round-trip failures / late (over 1 period) | {i['round_trip_errors']} / {i['late_round_trips']} |",
            f"| connections closed by the server | {i['closed_by_server']}"
            + (f" ({', '.join(f'{k}: {v}' for k, v in i['closed_by_server_by_code'].items())})"
               if i['closed_by_server_by_code'] else "") + " |",
            f"| verdict | {'**zero lost or reordered patches**' if ok else '**PROBLEMS FOUND**'} |",
        ]
        if i["first_problems"]:
            lines.append("\nfirst anomaly of each session (up to 5):")
            lines += [f"  {p}" for p in i["first_problems"]]
        samples = i["round_trip_error_samples"] + i["stream_stop_error_samples"]
        if samples:
            lines.append("\nerror samples:")
            lines += [f"  {e}" for e in samples]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def raise_nofile(sessions: int) -> tuple[int, int]:
    """Room for ``sessions`` sockets (client side; the server inherits the limit) plus slack."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * sessions + 1024
    if hard != resource.RLIM_INFINITY and hard < want:
        h.log(f"warning: open-files hard limit {hard} < {want}; some sessions may fail")
        want = hard
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def main() -> int:
    parser = argparse.ArgumentParser(description="1,000 concurrent sessions on one worker: streaming + interacting")
    parser.add_argument("--sessions", type=int, default=1000, help="concurrent sessions (default 1000; half stream)")
    parser.add_argument("--seconds", type=float, default=60.0, help="measuring window, s (default 60)")
    parser.add_argument("--warmup", type=float, default=10.0, help="load before the window, s (default 10)")
    parser.add_argument("--period", type=float, default=1.0, help="s between an interacting session's round trips")
    parser.add_argument("--server", choices=("docsync", "bokeh"), default="docsync")
    parser.add_argument("--connect-concurrency", type=int, default=16, help="sessions opened at a time (default 16)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per request, s (default 30)")
    parser.add_argument("--max-setup-s", type=float, default=300.0, help="give up opening sessions after this long")
    parser.add_argument("--report-every", type=float, default=10.0, help="progress line every N s (default 10)")
    parser.add_argument("--json", default=None, help="also write all figures to this JSON file")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="attach py-spy to the server for the window; raw stacks in DIR, top functions printed")
    parser.add_argument("--restore-redis", default=None, metavar="URL",
                        help="flask-docsync only: save sessions for restore in this Redis (--restore-sessions,"
                             " signed session ids), to compare CPU per message with restore off")
    parser.add_argument("--log-level", default="warning", help="the server's --log-level (default warning)")
    parser.add_argument("--logs", default=None, help="keep the server's log in this directory")
    args = parser.parse_args()
    if not 2 <= args.sessions <= 20000:
        parser.error("--sessions must be between 2 and 20000")
    if not 1 <= args.seconds <= 3600 or not 0 <= args.warmup <= 600:
        parser.error("--seconds must be within 1..3600 and --warmup within 0..600")
    if not 0.05 <= args.period <= 60:
        parser.error("--period must be within 0.05..60")
    args.py_spy = shutil.which("py-spy")
    if args.profile:
        if args.py_spy is None:
            parser.error("--profile needs py-spy (pip install py-spy)")
        Path(args.profile).mkdir(parents=True, exist_ok=True)

    soft, _ = raise_nofile(args.sessions)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # connect() builds bc.BokehConnection: make every connection of this run a LoadConnection
    bc.BokehConnection = LoadConnection  # type: ignore[misc]

    machine = machine_info()
    try:
        from importlib.metadata import version
        machine["flask_docsync"] = version("flask-docsync")
    except Exception:  # noqa: BLE001
        machine["flask_docsync"] = "?"
    machine["numpy"] = np.__version__
    machine["psutil"] = psutil.__version__
    h.log(f"{machine['cpu']}, {machine['cores']} cores, load {machine['loadavg_start'][0]:.2f};"
          f" open files limit {soft}")

    logdir_ctx = tempfile.TemporaryDirectory(prefix="docsync-load-") if args.logs is None else None
    logdir = Path(args.logs) if args.logs else Path(logdir_ctx.name)  # type: ignore[union-attr]
    logdir.mkdir(parents=True, exist_ok=True)
    extra = []
    if args.restore_redis:
        if args.server != "docsync":
            parser.error("--restore-redis is for --server docsync")
        extra = ["--session-ids", "signed", "--redis-url", args.restore_redis, "--restore-sessions"]
    server = LoadServer(args.server, logdir, args.log_level, extra=extra)
    if args.restore_redis:
        server.env["BOKEH_SECRET_KEY"] = "bench-restore-secret-" + "x" * 32
    atexit.register(server.stop, 3.0)
    out: dict[str, Any] = {
        "server": args.server, "restore": bool(args.restore_redis), "sessions": args.sessions,
        "seconds": args.seconds, "warmup": args.warmup,
        "period": args.period, "machine": machine,
    }
    t_start = time.monotonic()
    interrupted = failed = False
    try:
        server.start()
        out["server_command"] = " ".join(server.command()[1:])
        h.log(f"started {args.server}: pid {server.proc.pid}, port {server.port}")
        asyncio.run(load_run(server, args, out))
    except KeyboardInterrupt:
        interrupted = True
        h.log("interrupted; stopping the server")
    except BaseException:
        interrupted = failed = True
        h.log(f"failed; stopping the server (its log stays in {logdir})")
        raise
    finally:
        server.stop(3.0)
        out["total_s"] = time.monotonic() - t_start
        log_text = ""
        for f in sorted(logdir.glob("*.log")):
            log_text += f.read_text(errors="replace")
        out["server_log_tail"] = log_text.splitlines()[-20:]
        out["server_log_warnings"] = sum(1 for line in log_text.splitlines() if "WARNING" in line.upper())
        if logdir_ctx is not None and not failed:
            logdir_ctx.cleanup()

    print()
    if interrupted:
        print("(interrupted: partial results)\n")
    print(render(out))
    if out["server_log_warnings"]:
        print(f"\nserver log: {out['server_log_warnings']} warning line(s); last lines:")
        for line in out["server_log_tail"][-5:]:
            print(f"  {line[:200]}")
    if args.profile and getattr(args, "profile_path", None) and args.profile_path.exists():
        profile_server.report(f"py-spy, {args.server}, measuring window", args.profile_path, 25)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"\nall figures: {args.json}")
    if interrupted:
        return 130
    return 0 if "integrity" in out and clean(out["integrity"]) else 1


if __name__ == "__main__":
    sys.exit(main())
