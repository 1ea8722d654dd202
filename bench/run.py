#!/usr/bin/env python
"""``bokeh serve`` against ``flask-docsync serve``, on the same apps, in one run.

    python bench/run.py [--quick] [--only lifecycle,roundtrip,...] [--json out.json]

Starts both servers on free ports of 127.0.0.1 with the apps of
``bench/apps/`` and the same options (short unused-session lifetime so
cleanup can be measured), measures the in-process floor, then runs every
scenario on one server and then the other (alternating which goes first)
and prints each figure for both with the ratio ours/bokeh. The main figure
is server CPU per operation: user + system CPU of the server's process
tree from psutil, sampled around each measuring window. Both servers are
stopped at the end, on Ctrl-C and on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

try:
    import numpy  # noqa: F401  (the streaming and idle apps)
    import psutil  # noqa: F401
except ImportError as exc:  # pragma: no cover
    sys.exit(f"bench/run.py needs psutil and numpy ({exc}); pip install -e '.[test]' installs both")

import harness as h  # noqa: E402

SCENARIOS = ("idle", "lifecycle", "get", "roundtrip", "streaming")

PLANS = {
    "quick": {
        "floor_n": 10,
        "idle_sessions": 50,
        "lifecycle_seq": (20, 12.0),              # sessions, time limit s
        "lifecycle_conc": (40, 10, 12.0),         # sessions, concurrency, limit
        "get": (20, 8.0),
        "roundtrip": [(1, 3.0, 20000), (50, 3.0, 200000), (200, 3.0, 200000)],  # sessions, s, max ops
        "streaming": [(10, 3.0), (100, 3.0)],
        "reps": 1,
    },
    "full": {
        "floor_n": 40,
        "idle_sessions": 500,
        "lifecycle_seq": (150, 60.0),
        "lifecycle_conc": (300, 20, 60.0),
        "get": (150, 45.0),
        "roundtrip": [(1, 8.0, 50000), (50, 8.0, 500000), (200, 8.0, 500000)],
        "streaming": [(10, 8.0), (100, 8.0), (500, 8.0)],
        "reps": 1,
    },
}


# --------------------------------------------------------------------------- report

class Row:
    def __init__(self, group: str, metric: str, key: Callable[[dict], float], fmt: str = "{:.2f}",
                 target: str = "", check: Callable[[float, float, float], bool] | None = None,
                 ratio: bool = True) -> None:
        self.group, self.metric, self.key, self.fmt, self.target, self.check = group, metric, key, fmt, target, check
        self.ratio = ratio


def _get(d: dict, *path: Any) -> float:
    for p in path:
        if d is None:
            return float("nan")
        d = d[p] if isinstance(d, list) else d.get(p)
    return float("nan") if d is None else float(d)


def build_rows(plan: dict, floor: dict) -> list[tuple[str, Row]]:
    """(result key, row) pairs, in table order."""
    floor_ms = floor["idle"]["total_ms"]
    rt_floor = floor["roundtrip"]["round_trip"]["op_ms"]
    stream_floor = floor["streaming"]["stream"]["op_ms"]
    rows: list[tuple[str, Row]] = []
    le = lambda t: (lambda b, o, r: r <= t)  # noqa: E731
    ge = lambda t: (lambda b, o, r: r >= t)  # noqa: E731
    rows.append(("lifecycle_seq", Row("session lifecycle, sequential", "server CPU ms/session incl. cleanup",
                                      lambda d: d["cpu_ms"], target="≤0.5×", check=le(0.5))))
    rows.append(("lifecycle_seq", Row("", "… ÷ in-process floor", lambda d: d["cpu_ms"] / floor_ms,
                                      "{:.2f}×", target="ours ≤1.2×", check=lambda b, o, r: o <= 1.2)))
    rows.append(("lifecycle_seq", Row("", "latency p50 ms", lambda d: d["p50_ms"], "{:.1f}")))
    c = plan["lifecycle_conc"][1]
    rows.append(("lifecycle_conc", Row(f"session lifecycle, {c} concurrent", "server CPU ms/session incl. cleanup",
                                       lambda d: d["cpu_ms"], target="≤0.5×", check=le(0.5))))
    rows.append(("lifecycle_conc", Row("", "sessions/s", lambda d: d["rate_per_s"], "{:.1f}")))
    rows.append(("lifecycle_conc", Row("", "latency p50 / p99 ms",
                                       lambda d: d["p99_ms"], "{:.0f}")))
    rows.append(("get", Row("page GET (session never connected)", "server CPU ms/GET incl. cleanup",
                            lambda d: d["cpu_ms"])))
    rows.append(("get", Row("", "latency p50 ms", lambda d: d["p50_ms"], "{:.1f}")))
    for n, _, _ in plan["roundtrip"]:
        key = f"roundtrip_{n}"
        g = f"slider round trip, {n} session{'s' if n > 1 else ''}"
        p50_target, p50_check = ("ours ≤3 ms", lambda b, o, r: o <= 3.0) if n == 1 else ("", None)
        rows.append((key, Row(g, "latency p50 ms", lambda d: d["p50_ms"], "{:.2f}", p50_target, p50_check)))
        p99_target, p99_check = ("≤0.4×", le(0.4)) if n == 200 else ("", None)
        rows.append((key, Row("", "latency p99 ms", lambda d: d["p99_ms"], "{:.2f}", p99_target, p99_check)))
        rows.append((key, Row("", "server CPU ms/round trip", lambda d: d["cpu_ms"], "{:.3f}")))
        if n == 1:
            rows.append((key, Row("", "… ÷ in-process floor", lambda d: d["cpu_ms"] / rt_floor, "{:.1f}×")))
        rows.append((key, Row("", "round trips/s", lambda d: d["ops_per_s"], "{:.0f}")))
    last = plan["streaming"][-1][0]
    for n, _ in plan["streaming"]:
        key = f"streaming_{n}"
        g = f"streaming push, {n} sessions × 10 Hz"
        rows.append((key, Row(g, "server CPU ms/pushed message", lambda d: d["cpu_ms"], "{:.3f}",
                              "≤0.3×", le(0.3))))
        rows.append((key, Row("", "… ÷ in-process floor", lambda d: d["cpu_ms"] / stream_floor, "{:.1f}×")))
        dt, dc = ("≥4× (at 500)", ge(4.0)) if n == last and n >= 500 else ("", None)
        rows.append((key, Row("", "delivered % of expected", lambda d: d["delivered_pct"], "{:.1f}", dt, dc)))
    n = plan["idle_sessions"]
    rows.append(("idle", Row(f"{n} idle sessions, cycle 1", "RSS MB per idle session",
                             lambda d: d["cycles"][0]["mb_per_session"], "{:.3f}", "≤0.9×", le(0.9))))
    rows.append(("idle", Row("", "RSS held after cleanup %", lambda d: d["cycles"][0]["retained_pct"], "{:.0f}")))
    rows.append(("idle", Row("", "discard: server CPU ms/session", lambda d: d["cycles"][0]["discard_cpu_ms"],
                             "{:.2f}", "≤0.05×", le(0.05))))
    rows.append(("idle", Row("", "discard: longest loop stall ms", lambda d: d["cycles"][0]["stall_ms"], "{:.0f}",
                             "ours ≤50 ms", lambda b, o, r: o <= 50)))
    rows.append(("idle", Row("", "discard: wall s", lambda d: d["cycles"][0]["discard_wall_s"], "{:.1f}")))
    rows.append(("idle", Row(f"{n} idle sessions, cycle 2", "RSS peak growth, % of cycle 1's",
                             lambda d: d.get("cycle2_growth_pct", float("nan")), "{:.1f}",
                             "ours ≤10%", lambda b, o, r: o <= 10, ratio=False)))
    rows.append(("idle", Row("", "RSS held after cleanup %",
                             lambda d: _get(d, "cycles", 1, "retained_pct"), "{:.0f}")))
    rows.append(("idle", Row("", "discard: server CPU ms/session",
                             lambda d: _get(d, "cycles", 1, "discard_cpu_ms"), "{:.2f}", "≤0.05×", le(0.05))))
    rows.append(("idle", Row("", "discard: longest loop stall ms",
                             lambda d: _get(d, "cycles", 1, "stall_ms"), "{:.0f}",
                             "ours ≤50 ms", lambda b, o, r: o <= 50)))
    return rows


def fmt(value: float, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return spec.format(value)


def render_table(results: dict[str, dict[str, Any]], plan: dict, floor: dict) -> str:
    lines = [
        "| scenario | figure | bokeh serve | flask-docsync | ours/bokeh | target |",
        "|---|---|---:|---:|---:|---|",
    ]
    for key, row in build_rows(plan, floor):
        if key not in results:
            continue
        vals = {}
        for kind in ("bokeh", "docsync"):
            try:
                vals[kind] = float(row.key(results[key][kind]))
            except (KeyError, IndexError, TypeError, ZeroDivisionError):
                vals[kind] = float("nan")
        b, o = vals["bokeh"], vals["docsync"]
        ratio = o / b if row.ratio and b and not math.isnan(b) and not math.isnan(o) else float("nan")
        mark = ""
        if row.check is not None and not math.isnan(o):
            mark = " ✓" if row.check(b, o, ratio) else " ✗"
        if row.metric == "latency p50 / p99 ms":
            bs = f"{fmt(results[key]['bokeh']['p50_ms'], '{:.0f}')} / {fmt(b, row.fmt)}"
            os_ = f"{fmt(results[key]['docsync']['p50_ms'], '{:.0f}')} / {fmt(o, row.fmt)}"
        else:
            bs, os_ = fmt(b, row.fmt), fmt(o, row.fmt)
        lines.append(f"| {row.group} | {row.metric} | {bs} | {os_} | {fmt(ratio, '{:.2f}×')} | {row.target}{mark} |")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import bokeh
    import gevent
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "bokeh": bokeh.__version__,
        "gevent": gevent.__version__,
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg(),
    }


# --------------------------------------------------------------------------- run

def run_floor(n: int) -> dict[str, Any]:
    cmd = [sys.executable, str(h.HERE / "floor.py"), "--json", "--n", str(n),
           *[str(h.APPS_DIR / f"{a}.py") for a in h.APPS]]
    out = subprocess.run(cmd, cwd=str(h.REPO), capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


async def run_all(args: argparse.Namespace, plan: dict, servers: dict[str, h.Server],
                  results: dict[str, dict[str, Any]]) -> None:
    order = ["bokeh", "docsync"]
    step = 0

    async def alternate(key: str, make: Callable[[h.Server], Any], after: str = "quiet", last: bool = False) -> None:
        nonlocal step
        kinds = order if step % 2 == 0 else order[::-1]
        step += 1
        reps: dict[str, list[dict]] = {k: [] for k in kinds}
        for rep in range(plan["reps"]):
            for kind in (kinds if rep % 2 == 0 else kinds[::-1]):
                server = servers[kind]
                h.log(f"{key}: {kind} ...")
                t0 = time.monotonic()
                result = await make(server)
                reps[kind].append(result)
                h.log(f"{key}: {kind} done in {time.monotonic() - t0:.1f} s: {short(result)}")
                if after == "restart" and last and rep == plan["reps"] - 1:
                    # its hundreds of closed sessions would stream on until discarded
                    await asyncio.to_thread(server.stop, 2.0)
                elif after == "restart":
                    # cheaper than waiting for the server to discard hundreds of sessions
                    await asyncio.to_thread(server.restart)
                    await h.warm_up(server)
                elif after == "quiet":
                    await h.wait_quiet(server, h.CLEANUP_WAIT, 120)
                # after == "none": the scenario itself waited for the cleanup
        results[key] = {k: merge(v) for k, v in reps.items()}

    if "idle" in args.only:
        n = plan["idle_sessions"]
        await alternate("idle", lambda s: h.idle_cycles(s, n, 2, max_discard_s=args.max_discard_s), after="none")
    if "lifecycle" in args.only:
        n, lim = plan["lifecycle_seq"]
        await alternate("lifecycle_seq", lambda s: h.lifecycle(s, "idle", n, 1, lim), after="none")
        n, c, lim = plan["lifecycle_conc"]
        await alternate("lifecycle_conc", lambda s: h.lifecycle(s, "idle", n, c, lim), after="none")
    if "get" in args.only:
        n, lim = plan["get"]
        await alternate("get", lambda s: h.page_get(s, "idle", n, lim), after="none")
    if "roundtrip" in args.only:
        for n, dur, cap in plan["roundtrip"]:
            # bokeh needs many seconds to discard 100+ sessions; a fresh process is quicker
            await alternate(f"roundtrip_{n}", lambda s, n=n, dur=dur, cap=cap: h.round_trip(s, n, dur, cap),
                            after="restart" if n >= 100 else "quiet")
    if "streaming" in args.only:
        for i, (n, dur) in enumerate(plan["streaming"]):
            await alternate(f"streaming_{n}", lambda s, n=n, dur=dur: h.streaming(s, n, dur), after="restart",
                            last=i == len(plan["streaming"]) - 1)


def merge(runs: list[dict]) -> dict:
    """Median of each numeric top-level figure over repetitions (the first run's nested data)."""
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = h.summarize([r[k] for r in runs])
    out["reps"] = runs
    return out


def short(result: dict) -> str:
    if "cycles" in result:
        parts = []
        for i, c in enumerate(result["cycles"], 1):
            parts.append(
                f"cycle {i}: {c['mb_per_session']:.3f} MB/session, held {c['retained_pct']:.0f}%,"
                f" discard {c['discard_cpu_ms']:.1f} ms/session over {c['discard_wall_s']:.1f} s,"
                f" stall {c['stall_ms']:.0f} ms, errors {c['errors']}"
            )
        return "; ".join(parts)
    keys = ("ops", "delivered_pct", "cpu_ms", "p50_ms", "p99_ms", "server_cpu_pct", "client_cpu_pct", "errors")
    return ", ".join(f"{k}={result[k]:.3g}" if isinstance(result[k], float) else f"{k}={result[k]}"
                     for k in keys if k in result)


def main() -> int:
    parser = argparse.ArgumentParser(description="bokeh serve vs flask-docsync serve, in one run")
    parser.add_argument("--quick", action="store_true", help="smaller counts; under ~3 minutes")
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help=f"comma-separated scenarios to run (default all: {','.join(SCENARIOS)})")
    parser.add_argument("--json", default=None, help="also write all figures to this JSON file")
    parser.add_argument("--log-level", default="warning", help="--log-level of both servers (default warning)")
    parser.add_argument("--logs", default=None, help="keep the servers' logs in this directory")
    parser.add_argument("--max-discard-s", type=float, default=900.0,
                        help="give up waiting for a discard sweep after this long (default 900)")
    args = parser.parse_args()
    args.only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = args.only - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    plan = PLANS["quick" if args.quick else "full"]

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    # Ctrl-C and SIGTERM end the run and stop the servers (SIGINT may arrive
    # ignored when started in the background of a non-interactive shell).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    t_start = time.monotonic()
    machine = machine_info()
    h.log(f"plan: {'quick' if args.quick else 'full'}; {machine['cpu']}, {machine['cores']} cores,"
          f" load {machine['loadavg_start'][0]:.2f}")
    h.log("in-process floor ...")
    floor = run_floor(plan["floor_n"])
    for app, f in floor.items():
        h.log(f"floor {app}: app {f['app_ms']:.2f} ms + serialize {f['serialize_ms']:.2f} ms"
              f" = {f['total_ms']:.2f} ms CPU per session")

    logdir_ctx = tempfile.TemporaryDirectory(prefix="docsync-bench-") if args.logs is None else None
    logdir = Path(args.logs) if args.logs else Path(logdir_ctx.name)  # type: ignore[union-attr]
    logdir.mkdir(parents=True, exist_ok=True)
    servers = {k: h.Server(k, logdir, args.log_level) for k in ("bokeh", "docsync")}
    results: dict[str, dict[str, Any]] = {}
    idle: dict[str, Any] = {}
    interrupted = failed = False
    try:
        for s in servers.values():
            s.start()
            h.log(f"started {s.kind}: pid {s.proc.pid}, port {s.port}")

        async def go() -> None:
            await asyncio.gather(*(h.warm_up(s) for s in servers.values()))
            for k, s in servers.items():
                idle[k] = await h.idle_cpu(s)
            await run_all(args, plan, servers, results)

        asyncio.run(go())
    except KeyboardInterrupt:
        interrupted = True
        h.log("interrupted; stopping the servers")
    except BaseException:
        interrupted = failed = True
        h.log(f"failed; stopping the servers (their logs stay in {logdir})")
        raise
    finally:
        for s in servers.values():
            s.stop(3.0 if interrupted else 10.0)
        if logdir_ctx is not None and not failed:
            logdir_ctx.cleanup()

    machine["loadavg_end"] = os.getloadavg()
    print()
    print(f"# flask-docsync vs bokeh serve ({'quick' if args.quick else 'full'} run,"
          f" {time.monotonic() - t_start:.0f} s)")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; Python {machine['python']},"
          f" bokeh {machine['bokeh']}, gevent {machine['gevent']}; load average"
          f" {machine['loadavg_start'][0]:.2f} at start, {machine['loadavg_end'][0]:.2f} at end")
    print(f"idle server CPU: bokeh {idle.get('bokeh', {}).get('idle_cpu_pct', float('nan')):.2f}%,"
          f" flask-docsync {idle.get('docsync', {}).get('idle_cpu_pct', float('nan')):.2f}% of a core")
    print("in-process floor (Document + app script + PULL-DOC-REPLY, CPU per session): "
          + "; ".join(f"{a} {f['total_ms']:.2f} ms (app {f['app_ms']:.2f} + serialize {f['serialize_ms']:.2f})"
                      for a, f in floor.items()))
    print(f"in-process floor per operation: round trip {floor['roundtrip']['round_trip']['op_ms']:.3f} ms"
          f" (parse PATCH-DOC, apply + callback, PATCH-DOC + OK); streamed message"
          f" {floor['streaming']['stream']['op_ms']:.3f} ms (stream() {floor['streaming']['stream']['model_ms']:.3f}"
          f" + PATCH-DOC {floor['streaming']['stream']['serialize_ms']:.3f})")
    print()
    if interrupted:
        print("(interrupted: partial results)\n")
    print(render_table(results, plan, floor))
    errs = {f"{k}/{kind}": r.get("errors") for k, v in results.items() for kind, r in v.items()
            if isinstance(r, dict) and r.get("errors")}
    if errs:
        print(f"\nerrors: {errs}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"plan": "quick" if args.quick else "full", "machine": machine, "floor": floor,
                       "idle_cpu": idle, "results": results}, f, indent=1, default=str)
        print(f"\nall figures: {args.json}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
