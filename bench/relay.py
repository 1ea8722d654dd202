#!/usr/bin/env python
"""What a cross-host relay costs: slider round trips direct and relayed, against ``bokeh serve``.

    python bench/relay.py [--quick] [--workers 2] [--sessions 20] [--json out.json]

Starts, each on a free port of 127.0.0.1 with the options of ``bench/run.py``
and the ``roundtrip`` app (a slider whose ``on_change`` sets a Div's text):

- ``bokeh serve``, one process;
- a ``redis-server`` without persistence, and two "hosts" joined through it,
  each ``flask-docsync serve --num-procs N --redis-url ... --advertise-url
  http://127.0.0.1:<its port>`` (gunicorn gevent workers), with the same
  ``DOCSYNC_SECRET_KEY`` and ``DOCSYNC_STATS_ENDPOINT`` on.

Three sets of ``--sessions`` connected sessions, each opened one at a time
(page GET, WebSocket, ACK, PULL-DOC) and kept open:

1. ``bokeh``: page and WebSocket at ``bokeh serve``;
2. ``direct``: page and WebSocket at host A (the WebSocket may reach another
   worker of A, which hands it to the owner as for any arrival; no relay);
3. ``relayed``: page at host A, WebSocket at host B, whose worker relays it
   to A (a TCP connection to A's advertise URL, bytes copied both ways).

Each set runs closed-loop round trips (PATCH-DOC setting the slider, until
the PATCH-DOC of the Div comes back, and the OK) with its first session
alone and with all of them at once, for ``rt_s`` seconds per window, the
three sets taking turns in a rotating order, ``reps`` times; medians of
the windows. Latency p50 / p99 per window; server CPU per round trip: user
+ system CPU of every server process (``bokeh serve``; both hosts' gunicorn
masters and workers, also in the direct case, where B is idle), from
``/proc/<pid>/task/*/schedstat`` (``cluster.Cluster.cpu``) read around the
window, divided by the round trips; also each host's share, so what the
relaying host spends is separate. ``redis-server``'s CPU is shown apart and
not counted.

That the relayed set is relayed and the direct one is not is checked from
the ``routing`` figures of every worker of both hosts (``/_stats``, asked at
each host's own port until every worker has answered): opening the direct
set must leave ``relayed`` and ``relay_received`` unchanged on both hosts,
opening the relayed set must add one ``relayed`` on B and one
``relay_received`` on A per session, and the round trips none.

Not part of the test suite. The servers are stopped at the end, on Ctrl-C
and on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import broadcast as bb  # noqa: E402
import client as bc  # noqa: E402
import cluster as bcl  # noqa: E402
import harness as h  # noqa: E402
import run as br  # noqa: E402

HOST = h.HOST
APP = "roundtrip"
CASES = ("bokeh", "direct", "relayed")
ROUTING = ("relayed", "relay_received", "relay_failed", "handed_over", "attached", "adopted", "cross_host_fresh")

PLANS = {
    "quick": {"rt_s": 2.0, "reps": 1, "max_ops": 100000},
    "full": {"rt_s": 5.0, "reps": 5, "max_ops": 400000},
}


# --------------------------------------------------------------------------- servers


class Host(bcl.Cluster):
    """One "host": ``flask-docsync serve --num-procs N --redis-url ... --advertise-url ...`` on its own port."""

    def __init__(self, name: str, workers: int, logdir: Path, redis_url: str, secret: str,
                 log_level: str = "warning") -> None:
        super().__init__(workers, logdir / name, log_level)
        self.apps = (APP,)
        self.label = f"host {name}"
        self.redis_url = redis_url
        self.env = {"DOCSYNC_SECRET_KEY": secret, "DOCSYNC_STATS_ENDPOINT": "1"}

    def command(self) -> list[str]:
        # The documented command line (with N > 1 it runs gunicorn itself), not cluster.py's wrapper.
        return [*h.Server.command(self), "--num-procs", str(self.workers), "--redis-url", self.redis_url,
                "--advertise-url", f"http://{HOST}:{self.port}"]

    async def routing(self, timeout: float = 30.0) -> dict[str, int]:
        """The ``routing`` figures of ``/_stats``, summed over every worker (each request reaches one)."""
        want = self.worker_pids()
        seen: dict[int, dict[str, Any]] = {}
        deadline = h.now() + timeout
        while not want <= set(seen):
            if h.now() > deadline:
                raise bc.BenchError(f"{self.label}: /_stats of workers {sorted(want - set(seen))} not reached")
            status, body = await bc.http_get(HOST, self.port, "/_stats", timeout)
            if status != 200:
                raise bc.BenchError(f"{self.label}: GET /_stats: HTTP {status}")
            stats = json.loads(body)
            seen[stats["pid"]] = stats["routing"]
        return {k: sum(int(r.get(k) or 0) for r in seen.values()) for k in ROUTING}


class BokehServe(h.Server):
    """``bokeh serve``, its CPU read from the same nanosecond clock as the hosts'."""

    cpu = bcl.Cluster.cpu


class Group:
    """Servers measured as one by ``harness.Window``: ``cpu()`` is the sum of ``members``.

    Every reading of every member (and of ``also``, read but not summed) is
    kept, so after a window the last two readings give each one's share.
    """

    def __init__(self, members: dict[str, Callable[[], float]], also: dict[str, Callable[[], float]] | None = None
                 ) -> None:
        self.members = members
        self.also = also or {}
        self.readings: list[dict[str, float]] = []

    def cpu(self) -> float:
        reading = {k: read() for k, read in {**self.members, **self.also}.items()}
        self.readings.append(reading)
        return sum(reading[k] for k in self.members)

    def last_window(self) -> dict[str, float]:
        """CPU seconds of each member between the last two readings."""
        before, after = self.readings[-2:]
        return {k: after[k] - before[k] for k in after}


def routing_delta(after: dict[str, dict[str, int]], before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {host: {k: after[host][k] - before[host][k] for k in ROUTING} for host in after}


# --------------------------------------------------------------------------- sessions


@dataclass
class Session:
    """A connected ``roundtrip`` session; the fields ``cluster.rt_window`` uses."""

    conn: bc.BokehConnection
    slider: str
    value: int = 1


async def open_sessions(page_port: int, ws_port: int, n: int, timeout: float = 30.0) -> list[Session]:
    """``n`` sessions one at a time: the page (its token) at ``page_port``, the WebSocket at ``ws_port``."""
    out: list[Session] = []
    try:
        for _ in range(n):
            token = await bc.get_token(HOST, page_port, APP, timeout)
            conn = await bc.connect(HOST, ws_port, APP, token, timeout)
            try:
                _, frames = await conn.pull(timeout)
                out.append(Session(conn, bc.find_model_id(frames[2], "slider")))
            except BaseException:
                conn.abort()
                raise
    except BaseException:
        await h.close_all([s.conn for s in out])
        raise
    return out


# --------------------------------------------------------------------------- run


async def measure(plan: dict[str, Any], sessions: int, bokeh: BokehServe, hosts: dict[str, Host],
                  redis_cpu: Callable[[], float], checks: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    a, b = hosts["A"], hosts["B"]
    groups = {
        "bokeh": Group({"bokeh": bokeh.cpu}),
        "direct": Group({"A": a.cpu, "B": b.cpu}, {"redis": redis_cpu}),
        "relayed": Group({"A": a.cpu, "B": b.cpu}, {"redis": redis_cpu}),
    }

    async def routing() -> dict[str, dict[str, int]]:
        return {name: await host.routing() for name, host in hosts.items()}

    def check(what: str, ok: bool, figures: Any) -> None:
        line = f"{'ok' if ok else 'FAILED'}: {what} ({figures})"
        checks.append(line)
        h.log(line)

    sets: dict[str, list[Session]] = {}
    results: dict[str, Any] = {}
    try:
        sets["bokeh"] = await open_sessions(bokeh.port, bokeh.port, sessions)
        r0 = await routing()
        sets["direct"] = await open_sessions(a.port, a.port, sessions)
        r1 = await routing()
        d = routing_delta(r1, r0)
        check(f"direct: {sessions} WebSockets at host A, no relay on either host",
              all(d[x][k] == 0 for x in d for k in ("relayed", "relay_received", "relay_failed")), d)
        sets["relayed"] = await open_sessions(a.port, b.port, sessions)
        r2 = await routing()
        d = routing_delta(r2, r1)
        check(f"relayed: {sessions} WebSockets at host B, each relayed by B and received by A",
              d["B"]["relayed"] == sessions and d["A"]["relay_received"] == sessions and d["A"]["relayed"] == 0
              and d["B"]["relay_received"] == 0 and d["A"]["relay_failed"] == d["B"]["relay_failed"] == 0, d)
        extra["handed_over_on_A"] = {"direct": routing_delta(r1, r0)["A"]["handed_over"],
                                     "relayed": d["A"]["handed_over"]}

        for case in CASES:  # warm every set, then let the hosts settle
            await bcl.rt_window(groups[case], sets[case], 1.0, 4 * sessions)
        for server in (bokeh, a, b):
            await h.wait_quiet(server, 0, 30)
            extra.setdefault("idle_cpu_pct", {})[server.label if isinstance(server, Host) else "bokeh serve"] = (
                await h.idle_cpu(server, 2.0))["idle_cpu_pct"]

        for n in sorted({1, sessions}):
            runs: dict[str, list[dict[str, Any]]] = {case: [] for case in CASES}
            for rep in range(plan["reps"]):
                order = CASES[rep % 3:] + CASES[:rep % 3]
                for case in order:
                    r = await bcl.rt_window(groups[case], sets[case][:n], plan["rt_s"], plan["max_ops"])
                    split = groups[case].last_window()
                    ops = max(r["ops"], 1)
                    r["cpu_ms_by"] = {k: 1000 * v / ops for k, v in split.items()}
                    runs[case].append(r)
                    h.log(f"{n} session(s), rep {rep + 1}, {case}: {br.short(r)},"
                          f" CPU ms/rt by {', '.join(f'{k} {v:.3f}' for k, v in r['cpu_ms_by'].items())}")
            results[n] = {
                case: {
                    **{k: h.summarize([r[k] for r in rs]) for k in ("p50_ms", "p99_ms", "cpu_ms", "ops_per_s")},
                    "cpu_ms_by": {k: h.summarize([r["cpu_ms_by"][k] for r in rs]) for k in rs[0]["cpu_ms_by"]},
                    "ops": sum(r["ops"] for r in rs), "errors": sum(r["errors"] for r in rs), "runs": rs,
                }
                for case, rs in runs.items()
            }
        d = routing_delta(await routing(), r2)
        check("round trips: no relay opened or failed while measuring",
              all(d[x][k] == 0 for x in d for k in ("relayed", "relay_received", "relay_failed")), d)
        extra["routing_totals"] = await routing()
    finally:
        await h.close_all([s.conn for ss in sets.values() for s in ss])
    return results


def f(value: Any, spec: str) -> str:
    return br.fmt(value, spec)


def render(results: dict[int, dict[str, Any]], workers: int) -> str:
    lines = [
        "| sessions | figure | bokeh serve | ours, direct | ours, relayed | relayed ÷ direct | direct ÷ bokeh"
        " | relayed ÷ bokeh |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]

    def row(group: str, metric: str, values: tuple[float, float, float], spec: str, ratios_too: bool = True) -> None:
        bk, di, re_ = values
        ratios = (bcl.ratio(di, re_), bcl.ratio(bk, di), bcl.ratio(bk, re_)) if ratios_too else (math.nan,) * 3
        lines.append(f"| {group} | {metric} | {f(bk, spec)} | {f(di, spec)} | {f(re_, spec)} | "
                     + " | ".join(f(r, "{:.2f}×") for r in ratios) + " |")

    for n, r in results.items():
        bk, di, re_ = (r[c] for c in CASES)
        row(f"{n}", "latency p50 ms", (bk["p50_ms"], di["p50_ms"], re_["p50_ms"]), "{:.2f}")
        row("", "latency p99 ms", (bk["p99_ms"], di["p99_ms"], re_["p99_ms"]), "{:.2f}")
        row("", "server CPU ms/round trip, all server processes", (bk["cpu_ms"], di["cpu_ms"], re_["cpu_ms"]), "{:.3f}")
        row("", "… host A (owner of the sessions)", (math.nan, di["cpu_ms_by"]["A"], re_["cpu_ms_by"]["A"]), "{:.3f}")
        row("", "… host B (idle; relaying)", (math.nan, di["cpu_ms_by"]["B"], re_["cpu_ms_by"]["B"]), "{:.3f}",
            ratios_too=False)
        row("", "round trips/s", (bk["ops_per_s"], di["ops_per_s"], re_["ops_per_s"]), "{:.0f}")
        cost = f(re_["cpu_ms"] - di["cpu_ms"], "{:.3f}")
        lines.append(f"| | relay's cost: relayed − direct, CPU ms/round trip | | | {cost} | | | |")
    lines.append(f"\n(ours: 2 hosts × {workers} gunicorn gevent workers; redis-server CPU is not in the figures)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="cost of a cross-host relay: round trips direct, relayed, bokeh serve")
    parser.add_argument("--quick", action="store_true",
                        help="2 s windows, one repeat: about 30 s (the full plan, 5 s × 5: about 3 minutes)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers per host (default 2)")
    parser.add_argument("--sessions", type=int, default=20, help="sessions per set, the concurrent case (default 20)")
    parser.add_argument("--json", default=None, help="also write all figures to this JSON file")
    parser.add_argument("--log-level", default="warning", help="--log-level of the servers (default warning)")
    parser.add_argument("--logs", default=None, help="keep the servers' logs in this directory")
    args = parser.parse_args()
    plan = PLANS["quick" if args.quick else "full"]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    t_start = time.monotonic()
    machine = br.machine_info()
    logdir_ctx = tempfile.TemporaryDirectory(prefix="docsync-relay-") if args.logs is None else None
    logdir = Path(args.logs) if args.logs else Path(logdir_ctx.name)  # type: ignore[union-attr]
    logdir.mkdir(parents=True, exist_ok=True)
    h.log(f"plan: {'quick' if args.quick else 'full'}; {machine['cpu']}, {machine['cores']} cores,"
          f" load {machine['loadavg_start'][0]:.2f}")
    servers: list[h.Server] = []
    results: dict[int, dict[str, Any]] = {}
    checks: list[str] = []
    extra: dict[str, Any] = {}
    redis: list[subprocess.Popen] = []
    with h.Serving(servers, logdir, logdir_ctx.cleanup if logdir_ctx else None,
                   also=(lambda: [bb.stop(p) for p in redis],)) as run:
        redis_proc, redis_url = bb.start_redis(logdir)
        redis.append(redis_proc)
        secret = secrets.token_urlsafe(32)
        hosts = {name: Host(name, args.workers, logdir, redis_url, secret, args.log_level) for name in ("A", "B")}
        bokeh = BokehServe("bokeh", logdir, args.log_level, apps=(APP,))
        for s in (bokeh, *hosts.values()):
            servers.append(s)
            s.start()
            h.log(f"started {getattr(s, 'label', s.kind)}: pid {s.proc.pid}, port {s.port}")
        results = asyncio.run(measure(plan, args.sessions, bokeh, hosts, lambda: bb.cpu(redis), checks, extra))
        extra["redis_cpu_s_total"] = bb.cpu(redis)

    machine["loadavg_end"] = os.getloadavg()
    print()
    print(f"# flask-docsync: what a cross-host relay costs, slider round trips"
          f" ({'quick' if args.quick else 'full'} run: {plan['rt_s']:g} s windows × {plan['reps']},"
          f" {time.monotonic() - t_start:.0f} s)")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores (nproc {len(os.sched_getaffinity(0))});"
          f" Python {machine['python']}, bokeh {machine['bokeh']}, gevent {machine['gevent']};"
          f" load average {machine['loadavg_start'][0]:.2f} at start, {machine['loadavg_end'][0]:.2f} at end")
    if extra.get("idle_cpu_pct"):
        print("idle server CPU: " + ", ".join(f"{k} {v:.2f}% of a core" for k, v in extra["idle_cpu_pct"].items()))
    for line in checks:
        print(f"check {line}")
    if "handed_over_on_A" in extra:
        print(f"WebSockets handed to another worker of host A while opening the sets: {extra['handed_over_on_A']}")
    if "routing_totals" in extra:
        print(f"routing totals at the end: {extra['routing_totals']}")
    if "redis_cpu_s_total" in extra:
        print(f"redis-server CPU over the whole run: {extra['redis_cpu_s_total']:.2f} s")
    print()
    if run.interrupted:
        print("(interrupted: partial results)\n")
    print(render(results, args.workers))
    errors = {f"{n}/{case}": r["errors"] for n, v in results.items() for case, r in v.items() if r["errors"]}
    if errors:
        print(f"\nerrors: {errors}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"plan": plan, "machine": machine, "checks": checks, "extra": extra,
                       "results": {str(n): v for n, v in results.items()}}, fh, indent=1, default=str)
        print(f"\nall figures: {args.json}")
    if run.interrupted:
        return 130
    return 1 if any(not line.startswith("ok") for line in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
