#!/usr/bin/env python
"""Memory after session churn, in ``bokeh serve`` and ``flask-docsync serve``.

    python bench/churn.py [--cycles 1000] [--first 200] [--idle 300] [--live 300]
                          [--server both|docsync|bokeh] [--json out.json]

Starts each server in turn on ``bench/apps/churn.py`` and
``bench/apps/idle.py``, on a free port of 127.0.0.1 with the options of
``bench/run.py`` (``--unused-session-lifetime 1000 --check-unused-sessions
500``, so cleanup keeps up), and measures with the client of
``bench/client.py``:

- **churn**: ``--cycles`` page GET + WebSocket + PULL-DOC + close cycles of
  the churn app (64 KiB of numpy data per session, an ``on_change``
  callback and a 4 Hz periodic callback), ``--concurrency`` at a time. The
  RSS is read once the server is quiet again after the first ``--first``
  cycles and after all of them; the growth between the two is the leak
  check. Memory that is only waiting for a garbage collection shows up
  here as growth.
- **idle**: ``--idle`` idle sessions connected, then all closed; once the
  server has discarded them and is quiet, the share of the RSS they added
  that is still held, and the server CPU from the close until quiet per
  session (the discard cost).
- **idle beside live ones**: ``--live`` idle sessions stay connected while
  another ``--idle`` are opened and closed: the same figures with a heap
  that stays large, which is what makes a full collection expensive.

Each scenario runs on a fresh server process (warmed up with one session
of each app), so the memory one leaves with the allocator cannot serve the
next. During every cleanup wait a probe WebSocket pings the server every 20 ms;
the longest round trip is the longest event-loop stall (as in
``bench/harness.py``). Needs ``psutil`` and ``numpy``; not part of the test
suite. Prints one table with both servers, the ratio ours/bokeh and the
targets of the issue, with the machine and its load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import client as bc  # noqa: E402
import harness as h  # noqa: E402
from run import machine_info  # noqa: E402

MIB = 2**20


def load1() -> float:
    return os.getloadavg()[0]


async def cleaned_up(server: h.Server, probe: h.Probe, max_wait: float) -> dict[str, Any]:
    """Wait until the server has discarded what was closed and is quiet; probe meanwhile."""
    probe.start()
    waited, quiet = await h.wait_quiet(server, h.CLEANUP_WAIT, max_wait)
    stall = await probe.stop()
    return {"waited_s": waited, "quiet": quiet, "stall_ms": 1000 * stall, "rss_mb": server.rss() / MIB}


async def churn(server: h.Server, probe: h.Probe, cycles: int, concurrency: int, max_wait: float) -> dict[str, Any]:
    """``cycles`` open / pull / close cycles of the churn app, then the cleanup."""
    await h.wait_quiet(server, 0, 30)
    errors = h.Errors()
    started = done = 0

    async def worker() -> None:
        nonlocal started, done
        while started < cycles:
            started += 1
            try:
                conn, _ = await bc.open_session(h.HOST, server.port, "churn", 60)
                await conn.close()
                done += 1
            except Exception as exc:
                errors.add(exc)

    cpu0, t0, load0 = server.cpu(), h.now(), load1()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = h.now() - t0
    after = await cleaned_up(server, probe, max_wait)
    return {
        "cycles": done,
        "wall_s": wall,
        "cpu_ms_per_cycle": 1000 * (server.cpu() - cpu0) / max(done, 1),
        "errors": errors.count,
        "error_samples": errors.samples,
        "load1": (load0, load1()),
        **after,
    }


async def open_close(server: h.Server, probe: h.Probe, n: int, max_wait: float) -> dict[str, Any]:
    """Open ``n`` idle sessions, close them all; RSS held and discard cost once quiet."""
    await h.wait_quiet(server, 0, 30)
    base = server.rss()
    load0 = load1()
    opened, errors = await h.open_many(server, "idle", n)
    conns = [c for c, _ in opened]
    await asyncio.sleep(1.0)
    peak = server.rss()
    cpu0, t0 = server.cpu(), h.now()
    await h.close_all(conns)
    after = await cleaned_up(server, probe, max_wait)
    n = max(len(conns), 1)
    return {
        "sessions": len(conns),
        "rss_base_mb": base / MIB,
        "rss_peak_mb": peak / MIB,
        "held_pct": 100 * (after["rss_mb"] * MIB - base) / max(peak - base, 1),
        "discard_cpu_ms": 1000 * (server.cpu() - cpu0) / n,
        "discard_wall_s": h.now() - t0,
        "errors": errors.count,
        "error_samples": errors.samples,
        "load1": (load0, load1()),
        **after,
    }


async def fresh_server(kind: str, logdir: Path) -> tuple[h.Server, bc.BokehConnection]:
    """A new server process, warmed up (one session of each app), and a probe connection."""
    server = h.Server(kind, logdir, apps=("churn", "idle"))
    server.start()
    try:
        for app in ("churn", "idle"):
            conn, _ = await bc.open_session(h.HOST, server.port, app)
            await conn.close()
        await h.wait_quiet(server, h.CLEANUP_WAIT, 60)
        probe_conn, _ = await bc.open_session(h.HOST, server.port, "idle")
        await h.wait_quiet(server, 0, 30)
    except BaseException:
        server.stop()
        raise
    return server, probe_conn


async def measure(kind: str, args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    """Every scenario on a fresh process of ``kind``: what one leaves behind must not help the next."""
    out: dict[str, Any] = {}

    h.log(f"{kind}: {args.idle} idle sessions opened and closed ...")
    server, probe_conn = await fresh_server(kind, logdir)
    try:
        out["idle"] = await open_close(server, h.Probe(probe_conn), args.idle, args.max_wait)
    finally:
        await probe_conn.close()
        server.stop()
    h.log(f"{kind}: ... held {out['idle']['held_pct']:.1f} %,"
          f" {out['idle']['discard_cpu_ms']:.2f} ms CPU per discarded session,"
          f" stall {out['idle']['stall_ms']:.0f} ms")

    if args.live:
        h.log(f"{kind}: {args.live} idle sessions stay; {args.idle} more opened and closed ...")
        server, probe_conn = await fresh_server(kind, logdir)
        try:
            live, errors = await h.open_many(server, "idle", args.live)
            try:
                out["beside_live"] = await open_close(server, h.Probe(probe_conn), args.idle, args.max_wait)
                out["beside_live"]["live"] = len(live)
                out["beside_live"]["live_errors"] = errors.count
            finally:
                await h.close_all([c for c, _ in live])
        finally:
            await probe_conn.close()
            server.stop()
        h.log(f"{kind}: ... held {out['beside_live']['held_pct']:.1f} %,"
              f" {out['beside_live']['discard_cpu_ms']:.2f} ms CPU per discarded session,"
              f" stall {out['beside_live']['stall_ms']:.0f} ms")

    h.log(f"{kind}: churn, first {args.first} cycles ...")
    server, probe_conn = await fresh_server(kind, logdir)
    try:
        probe = h.Probe(probe_conn)
        start = server.rss() / MIB
        first = await churn(server, probe, args.first, args.concurrency, args.max_wait)
        h.log(f"{kind}: ... RSS {first['rss_mb']:.1f} MiB; the next {args.cycles - args.first} ...")
        rest = await churn(server, probe, args.cycles - args.first, args.concurrency, args.max_wait)
        h.log(f"{kind}: ... RSS {rest['rss_mb']:.1f} MiB")
    finally:
        await probe_conn.close()
        server.stop()
    cycles = first["cycles"] + rest["cycles"]
    out["churn"] = {
        "rss_start_mb": start,
        "first": first,
        "rest": rest,
        "growth_pct": 100 * (rest["rss_mb"] - first["rss_mb"]) / first["rss_mb"],
        "cpu_ms_per_cycle": (first["cpu_ms_per_cycle"] * first["cycles"]
                             + rest["cpu_ms_per_cycle"] * rest["cycles"]) / max(cycles, 1),
        "stall_ms": max(first["stall_ms"], rest["stall_ms"]),
    }
    return out


def ratio_at_most_005(ours: float, ratio: float) -> bool | None:
    return None if math.isnan(ratio) else ratio <= 0.05


ROWS = [
    # (group, figure, key path, format, target, check(ours, ratio): met, or None when it cannot tell)
    ("churn", "RSS after warm-up MiB", ("churn", "rss_start_mb"), "{:.1f}", "", None),
    ("churn", "RSS after cleanup, first cycles MiB", ("churn", "first", "rss_mb"), "{:.1f}", "", None),
    ("churn", "RSS after cleanup, all cycles MiB", ("churn", "rest", "rss_mb"), "{:.1f}", "", None),
    ("churn", "RSS growth, first → all %", ("churn", "growth_pct"), "{:.1f}", "ours ≤10%",
     lambda o, r: o <= 10),
    ("churn", "server CPU ms/cycle incl. cleanup", ("churn", "cpu_ms_per_cycle"), "{:.1f}", "", None),
    ("churn", "longest loop stall in cleanup ms", ("churn", "stall_ms"), "{:.0f}", "ours ≤50 ms",
     lambda o, r: o <= 50),
    ("idle", "RSS after warm-up MiB", ("idle", "rss_base_mb"), "{:.1f}", "", None),
    ("idle", "RSS added by the sessions MiB", None, "{:.1f}", "", None),
    ("idle", "RSS held after cleanup %", ("idle", "held_pct"), "{:.1f}", "ours ≤50%", lambda o, r: o <= 50),
    ("idle", "discard: server CPU ms/session", ("idle", "discard_cpu_ms"), "{:.2f}", "≤0.05×", ratio_at_most_005),
    ("idle", "discard: longest loop stall ms", ("idle", "stall_ms"), "{:.0f}", "ours ≤50 ms",
     lambda o, r: o <= 50),
    ("idle", "discard: wall s", ("idle", "discard_wall_s"), "{:.1f}", "", None),
    ("beside_live", "RSS added by the sessions MiB", None, "{:.1f}", "", None),
    ("beside_live", "RSS held after cleanup %", ("beside_live", "held_pct"), "{:.1f}", "", None),
    ("beside_live", "discard: server CPU ms/session", ("beside_live", "discard_cpu_ms"), "{:.2f}", "≤0.05×",
     ratio_at_most_005),
    ("beside_live", "discard: longest loop stall ms", ("beside_live", "stall_ms"), "{:.0f}", "ours ≤50 ms",
     lambda o, r: o <= 50),
    ("beside_live", "discard: wall s", ("beside_live", "discard_wall_s"), "{:.1f}", "", None),
]


def value(result: dict[str, Any] | None, path: tuple[str, ...] | None, group: str) -> float:
    if result is None:
        return math.nan
    if path is None:  # RSS the idle sessions added
        part = result.get(group)
        return part["rss_peak_mb"] - part["rss_base_mb"] if part else math.nan
    node: Any = result
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return math.nan
        node = node[key]
    return float(node)


def render(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    titles = {
        "churn": f"{args.cycles} churn cycles ({args.concurrency} at a time; first = {args.first})",
        "idle": f"{args.idle} idle sessions closed",
        "beside_live": f"{args.idle} idle sessions closed, {args.live} stay",
    }
    lines = ["| scenario | figure | bokeh serve | flask-docsync | ours/bokeh | target |",
             "|---|---|---:|---:|---:|---|"]
    shown = set()
    for group, figure, path, spec, target, check in ROWS:
        b = value(results.get("bokeh"), path, group)
        o = value(results.get("docsync"), path, group)
        if math.isnan(b) and math.isnan(o):
            continue
        # A ratio of two growth percentages near zero says nothing.
        comparable = not figure.startswith("RSS growth")
        ratio = o / b if comparable and b and not math.isnan(b) and not math.isnan(o) else math.nan
        mark = ""
        met = check(o, ratio) if check is not None and not math.isnan(o) else None
        if met is not None:
            mark = " ✓" if met else " ✗"
        cells = ["–" if math.isnan(v) else spec.format(v) for v in (b, o)]
        label = titles[group] if group not in shown else ""
        shown.add(group)
        lines.append(f"| {label} | {figure} | {cells[0]} | {cells[1]} |"
                     f" {'–' if math.isnan(ratio) else f'{ratio:.3f}×' if ratio < 0.1 else f'{ratio:.2f}×'} | {target}{mark} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=1000, help="churn cycles in all (default 1000)")
    parser.add_argument("--first", type=int, default=200, help="cycles before the first RSS reading (200)")
    parser.add_argument("--concurrency", type=int, default=4, help="churn cycles at a time (4)")
    parser.add_argument("--idle", type=int, default=300, help="idle sessions opened and closed (300)")
    parser.add_argument("--live", type=int, default=300,
                        help="idle sessions that stay while --idle more are closed (300; 0 skips it)")
    parser.add_argument("--server", choices=("both", "docsync", "bokeh"), default="both")
    parser.add_argument("--max-wait", type=float, default=900.0, help="longest cleanup wait, s (900)")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = parser.parse_args()
    if not 0 < args.first < args.cycles:
        parser.error("--first must be between 0 and --cycles")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    kinds = ("bokeh", "docsync") if args.server == "both" else (args.server,)
    machine = machine_info()
    t0 = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="docsync-churn-") as tmp:
        for kind in kinds:
            results[kind] = asyncio.run(measure(kind, args, Path(tmp)))
    machine["loadavg_end"] = os.getloadavg()
    print()
    print(f"# memory after churn: flask-docsync vs bokeh serve ({time.monotonic() - t0:.0f} s)")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; Python {machine['python']},"
          f" bokeh {machine['bokeh']}, gevent {machine['gevent']}; load average"
          f" {machine['loadavg_start'][0]:.2f} at start, {machine['loadavg_end'][0]:.2f} at end")
    for kind, r in results.items():
        loads = [r[g]["load1"] for g in ("churn", "idle", "beside_live") if g in r and g != "churn"]
        loads += [r["churn"][p]["load1"] for p in ("first", "rest")]
        lo = min(x for pair in loads for x in pair)
        hi = max(x for pair in loads for x in pair)
        errors = sum(r[g].get("errors", 0) for g in ("idle", "beside_live") if g in r)
        errors += sum(r["churn"][p]["errors"] for p in ("first", "rest"))
        print(f"{kind}: load average {lo:.2f}–{hi:.2f} during its run; {errors} failed sessions")
    print()
    print(render(results, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "results": results}, f, indent=1, default=str)
        print(f"\nall figures: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
