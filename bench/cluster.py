#!/usr/bin/env python
"""One home per session: what a hand-over costs under ``gunicorn -k gevent -w 4``.

    python bench/cluster.py [--quick] [--only connect,perop,lifecycle] [--json out.json]

Starts ``flask-docsync serve`` as gunicorn gevent workers on one port,
``-w 4`` and ``-w 1`` (a free port each on 127.0.0.1, the apps and options
of ``bench/run.py``, a fresh ``DOCSYNC_SECRET_KEY``), and measures:

1. **connect time**, direct vs handed over, on ``-w 4``: one at a time, a
   page GET (its token), a pause (``--pause``, 50 ms; a browser loads
   BokehJS in between), then from the start of the WebSocket connect to
   the PULL-DOC reply (handshake, ACK, PULL-DOC); the server's CPU over
   the same span too (read just outside it), which holds the hand-over's
   cost on both workers. Each connect is classified afterwards by the
   ``homed`` app (``bench/apps/homed.py``): its ``who`` Div holds the
   owner's routing figures, stamped when the page made the session and
   again on a probe after the PULL; the owner's ``received`` went up iff
   the worker that accepted the WebSocket handed it over. p50 / p99 of
   each; ``-w 1`` (routing off) for reference. The kernel picks the worker
   that accepts, so direct connects are whatever share it gives (few).
2. **CPU per round trip and per streamed message**, direct vs handed-over
   connections, on ``-w 4``: the connect scenario's sessions stay open
   (more are opened if needed) and as many direct as handed-over ones are
   taken from every owning worker, so both sets load the workers alike;
   then round trips (closed loop, every session of the set at once) and
   streaming (10 Hz per session) run on one set, then the other,
   alternating which goes first, ``reps`` times; medians compared.
3. **CPU per session lifecycle** (page GET + WebSocket + ACK + PULL-DOC +
   close, cleanup included, on the ``idle`` app), ``-w 4`` vs ``-w 1``:
   ``harness.lifecycle`` sequential and 8 concurrent, the servers
   alternating, and a sequential variant where the servers take turns
   session by session inside one window each (slow drifts of the machine
   cancel out; neither server keeps a hot cache between its sessions).
   Hand-overs in the ``-w 4`` runs are counted from every worker's routing
   figures (one ``homed`` session per worker, kept open).

Server CPU is that of the whole process tree (gunicorn master and every
worker), from ``/proc/<pid>/task/*/schedstat`` (nanoseconds; psutil's
10 ms ticks are too coarse for these windows), over the window divided by
the operations in it.

Everything is printed side by side with ratios at the end. The servers are
stopped at the end, on Ctrl-C and on errors. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import resource
import secrets
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

SERVE_FLAG = "--_serve-gunicorn"


def serve_gunicorn(argv: list[str]) -> int:
    """``python bench/cluster.py --_serve-gunicorn N serve ...``: the server process.

    ``flask-docsync serve`` with N gunicorn gevent workers, also for N = 1
    (where ``--num-procs 1`` would run the plain gevent server), with a
    secret made here and inherited by every worker.
    """
    # Imported like `python -m flask_docsync` would be, without bench/'s modules on the path.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    sys.path.insert(0, str(HERE.parent))
    from flask_docsync import cli

    workers = int(argv[0])
    os.environ["DOCSYNC_SECRET_KEY"] = secrets.token_urlsafe(32)
    options = cli.build_parser().parse_args(argv[1:])
    options.num_procs = workers
    return cli.serve_with_gunicorn(options)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == SERVE_FLAG:
    sys.exit(serve_gunicorn(sys.argv[2:]))

sys.path.insert(0, str(HERE))

try:
    import numpy  # noqa: F401  (the streaming and idle apps)
    import psutil
except ImportError as exc:  # pragma: no cover
    sys.exit(f"bench/cluster.py needs psutil and numpy ({exc}); pip install -e '.[test]' installs both")

import client as bc  # noqa: E402
import harness as h  # noqa: E402
import run as br  # noqa: E402

now = h.now
HOST = h.HOST
APPS = (*h.APPS, "homed")
SCENARIOS = ("connect", "perop", "lifecycle")

PLANS = {
    "quick": {
        "connects_w4": 100, "connects_w1": 30,
        "pairs": 8, "reps": 3, "rt_s": 2.0, "rt_max_ops": 100000, "stream_s": 2.0, "stream_warmup_s": 1.0,
        "lifecycle_seq": (30, 8.0), "lifecycle_mixed": (30, 8.0), "lifecycle_conc": (60, 8, 8.0),
        "lifecycle_reps": 2,
    },
    "full": {
        "connects_w4": 300, "connects_w1": 80,
        "pairs": 24, "reps": 3, "rt_s": 3.0, "rt_max_ops": 400000, "stream_s": 8.0, "stream_warmup_s": 1.0,
        "stream_reps": 5,
        "lifecycle_seq": (60, 10.0), "lifecycle_mixed": (60, 15.0), "lifecycle_conc": (120, 8, 15.0),
        "lifecycle_reps": 5,
    },
}

#: Seconds between a page GET and its WebSocket (a browser loads BokehJS in
#: between). With none, the worker that served the page is still busy when
#: the WebSocket arrives and nearly always loses the accept to another.
DEFAULT_PAUSE = 0.05
PAUSE = DEFAULT_PAUSE

#: ``--pin``: the CPUs the servers run on (the bench client gets the others),
#: or ``None`` to let the kernel place everything.
PIN: list[int] | None = None


# --------------------------------------------------------------------------- servers


class Cluster(h.Server):
    """``flask-docsync serve`` as ``gunicorn -k gevent -w N`` (see :func:`serve_gunicorn`)."""

    def __init__(self, workers: int, logdir: Path, log_level: str = "warning") -> None:
        logdir = logdir / f"w{workers}"
        logdir.mkdir(parents=True, exist_ok=True)
        super().__init__("docsync", logdir, log_level, apps=APPS)
        self.workers = workers
        self.label = f"-w {workers}"

    def command(self) -> list[str]:
        base = super().command()  # [python, -m, flask_docsync, serve, ...]
        assert base[3] == "serve"
        pin = ["taskset", "-c", ",".join(map(str, PIN))] if PIN else []
        return [*pin, sys.executable, str(Path(__file__).resolve()), SERVE_FLAG, str(self.workers), *base[3:]]

    def start(self, timeout: float = 60.0) -> None:
        super().start(timeout)
        deadline = time.monotonic() + timeout
        while len(self.worker_pids()) < self.workers:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{self.label}: {len(self.worker_pids())} workers, not {self.workers}")
            time.sleep(0.1)

    def cpu(self) -> float:
        """CPU seconds of the process tree, from the scheduler's nanosecond clock.

        ``/proc/<pid>/task/*/schedstat`` (time on a CPU, every thread);
        psutil's user + system times tick at 10 ms per process, too coarse
        for windows of a few hundred milliseconds of CPU over five processes.
        Falls back to those where schedstat is missing.
        """
        total = 0.0
        for p in self.processes():
            try:
                tasks = os.listdir(f"/proc/{p.pid}/task")
                ns = 0
                for t in tasks:
                    try:
                        with open(f"/proc/{p.pid}/task/{t}/schedstat") as fh:
                            ns += int(fh.read().split()[0])
                    except (FileNotFoundError, ProcessLookupError):
                        continue  # a thread that ended
                total += ns / 1e9
            except OSError:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.NoSuchProcess:
                    continue
        return total

    def worker_pids(self) -> set[int]:
        try:
            return {p.pid for p in self.ps.children()} if self.ps is not None else set()
        except psutil.NoSuchProcess:
            return set()


# --------------------------------------------------------------------------- homed sessions

_probes = itertools.count(1)


def model_attr(content: bytes, name: str, attr: str) -> Any:
    """``attr`` of the model called ``name`` in a PULL-DOC-REPLY content."""
    found: list[Any] = []

    def walk(node: Any) -> None:
        if found:
            return
        if isinstance(node, dict):
            attrs = node.get("attributes")
            if isinstance(attrs, dict) and attrs.get("name") == name:
                found.append(attrs.get(attr))
                return
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(content))
    if not found:
        raise bc.BenchError(f"no model named {name!r} in the pulled document")
    return found[0]


@dataclass
class Homed:
    """A connected session of the ``homed`` app, and whether its WebSocket was handed over."""

    conn: bc.BokehConnection
    slider: str
    run: str
    probe_id: str
    owner: int
    handed: bool
    connect_ms: float
    page_ms: float
    value: int = 1
    connect_cpu_ms: float = math.nan

    async def who(self, timeout: float = 30.0) -> dict[str, Any]:
        """Set the probe; the owner's pid and routing figures as of now."""
        await self.conn.set_property(self.probe_id, "value", next(_probes), timeout)
        _, frames = await self.conn.pull(timeout)
        return json.loads(model_attr(frames[2], "who", "text"))


class Anomalies:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1


async def open_homed(server: h.Server, anomalies: Anomalies, pause: float = 0.0, timeout: float = 30.0,
                     cpu_of: h.Server | None = None) -> Homed:
    """Page GET, ``pause`` s, then WebSocket + ACK + PULL-DOC (timed), then the probe that classifies it.

    With ``cpu_of``, that server's CPU is read just before and after the
    timed span. Only valid when nothing else connects to the server meanwhile.
    """
    t0 = now()
    token = await bc.get_token(HOST, server.port, "homed", timeout)
    page_ms = 1000 * (now() - t0)
    if pause:
        await asyncio.sleep(pause)
    cpu1 = cpu_of.cpu() if cpu_of is not None else 0.0
    t1 = now()
    conn = await bc.connect(HOST, server.port, "homed", token, timeout)
    try:
        _, frames = await conn.pull(timeout)
        t2 = now()
        cpu2 = cpu_of.cpu() if cpu_of is not None else 0.0
        content = frames[2]
        before = json.loads(model_attr(content, "who", "text"))
        s = Homed(conn, bc.find_model_id(content, "slider"), bc.find_model_id(content, "run"),
                  bc.find_model_id(content, "probe"), before["pid"], False, 1000 * (t2 - t1), page_ms)
        after = await s.who(timeout)
    except BaseException:
        conn.abort()
        raise
    if "error" in before:
        raise bc.BenchError(f"homed app: {before['error']}")
    if after["pid"] != before["pid"]:
        anomalies.add("pid changed between page and WebSocket (a second copy)")
    got = (after.get("received") or 0) - (before.get("received") or 0)
    if got not in (0, 1):
        anomalies.add(f"owner received {got} hand-overs in one connect")
    if after.get("adopted") != before.get("adopted"):
        anomalies.add("adopted")
    s.handed = got > 0
    s.connect_cpu_ms = 1000 * (cpu2 - cpu1) if cpu_of is not None else math.nan
    return s


class Watchers:
    """One open ``homed`` session per worker, to read every worker's routing figures."""

    def __init__(self, server: Cluster) -> None:
        self.server = server
        self.by_pid: dict[int, Homed] = {}

    async def gather(self, max_tries: int = 400, limit_s: float = 60.0) -> None:
        want = self.server.worker_pids()
        spare: list[Homed] = []
        anomalies = Anomalies()
        deadline = now() + limit_s
        tries = 0
        try:
            while set(self.by_pid) < want and tries < max_tries and now() < deadline:
                tries += 1
                s = await open_homed(self.server, anomalies, PAUSE)
                if s.owner in self.by_pid:
                    spare.append(s)
                else:
                    self.by_pid[s.owner] = s
        finally:
            await h.close_all([s.conn for s in spare])
        missing = want - set(self.by_pid)
        if missing:
            h.log(f"{self.server.label}: no session landed on worker(s) {sorted(missing)} in {tries} pages")

    async def totals(self) -> dict[str, Any]:
        figures = {pid: await s.who() for pid, s in self.by_pid.items()}
        keys = ("handed_over", "handover_failed", "received", "adopted")
        out: dict[str, Any] = {k: sum((f.get(k) or 0) for f in figures.values()) for k in keys}
        out["workers_seen"] = len(figures)
        out["per_worker"] = {str(pid): {k: f.get(k) for k in keys} for pid, f in figures.items()}
        return out

    async def close(self) -> None:
        await h.close_all([s.conn for s in self.by_pid.values()])
        self.by_pid.clear()


def delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in ("handed_over", "handover_failed", "received", "adopted")}


# --------------------------------------------------------------------------- scenarios


class Pool:
    """Classified ``homed`` sessions kept open, by owner and by whether they were handed over."""

    def __init__(self) -> None:
        self.by_owner: dict[int, dict[bool, list[Homed]]] = {}
        self.opened = 0

    def add(self, s: Homed) -> None:
        self.opened += 1
        self.by_owner.setdefault(s.owner, {False: [], True: []})[s.handed].append(s)

    def matched(self) -> int:
        return sum(min(len(d[False]), len(d[True])) for d in self.by_owner.values())

    def counts(self) -> dict[str, dict[str, int]]:
        return {str(pid): {"direct": len(d[False]), "handed": len(d[True])} for pid, d in self.by_owner.items()}

    async def take(self, pairs: int) -> tuple[list[Homed], list[Homed]]:
        """Up to ``pairs`` (direct, handed-over) pairs with the same owner, round robin over owners; closes the rest."""
        direct: list[Homed] = []
        handed: list[Homed] = []
        owners = sorted(self.by_owner)
        limit = {pid: min(len(self.by_owner[pid][False]), len(self.by_owner[pid][True])) for pid in owners}
        taken = dict.fromkeys(owners, 0)
        while len(direct) < pairs and any(taken[pid] < limit[pid] for pid in owners):
            for pid in owners:
                if taken[pid] < limit[pid] and len(direct) < pairs:
                    direct.append(self.by_owner[pid][False][taken[pid]])
                    handed.append(self.by_owner[pid][True][taken[pid]])
                    taken[pid] += 1
        keep = {id(x) for x in direct + handed}
        await h.close_all([x.conn for d in self.by_owner.values() for xs in d.values() for x in xs if id(x) not in keep])
        self.by_owner.clear()
        return direct, handed

    async def close(self) -> None:
        await h.close_all([x.conn for d in self.by_owner.values() for xs in d.values() for x in xs])
        self.by_owner.clear()


async def connect_times(server: Cluster, watchers: Watchers, n: int, pool: Pool | None = None,
                        limit_s: float = 120.0) -> dict[str, Any]:
    """``n`` sequential page + WebSocket connects, kept open in ``pool`` (closed at the end without one).

    Each connect's latency is from the start of the WebSocket connect to the
    PULL-DOC reply; its server CPU is the process tree's over the same span
    (read just outside it), so it holds the hand-over's cost on both workers.
    """
    await h.wait_quiet(server, 0, 30)
    anomalies = Anomalies()
    errors = h.Errors()
    lat: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    pages: list[float] = []
    owners: dict[int, int] = {}
    own = pool if pool is not None else Pool()
    before = await watchers.totals()
    deadline = now() + limit_s
    for _ in range(n):
        if now() > deadline:
            errors.add(TimeoutError("connect scenario time limit"))
            break
        try:
            s = await open_homed(server, anomalies, PAUSE, cpu_of=server)
        except Exception as exc:
            errors.add(exc)
            continue
        lat[s.handed].append(s.connect_ms)
        cpu[s.handed].append(s.connect_cpu_ms)
        pages.append(s.page_ms)
        owners[s.owner] = owners.get(s.owner, 0) + 1
        own.add(s)
    routing = delta(await watchers.totals(), before)
    if pool is None:
        await own.close()
        await h.wait_quiet(server, h.CLEANUP_WAIT, 60)

    def summary(v: list[float], c: list[float]) -> dict[str, float]:
        return {"n": len(v), "p50_ms": h.pct(v, 50), "p99_ms": h.pct(v, 99), "mean_ms": sum(v) / len(v) if v else math.nan,
                "cpu_p50_ms": h.pct(c, 50), "cpu_mean_ms": sum(c) / len(c) if c else math.nan}

    return {
        "direct": summary(lat[False], cpu[False]), "handed": summary(lat[True], cpu[True]),
        "all": summary(lat[False] + lat[True], cpu[False] + cpu[True]),
        "page_get": summary(pages, []), "owners": {str(k): v for k, v in owners.items()},
        "routing_delta": routing, "anomalies": anomalies.counts,
        "errors": errors.count, "error_samples": errors.samples,
    }


async def fill_pool(server: Cluster, pool: Pool, pairs: int, max_tries: int, limit_s: float = 90.0) -> dict[str, Any]:
    """More classified sessions until the pool has ``pairs`` (direct, handed-over) pairs of the same owner."""
    anomalies = Anomalies()
    errors = h.Errors()
    tries = 0
    deadline = now() + limit_s
    while pool.matched() < pairs and tries < max_tries and now() < deadline:
        tries += 1
        try:
            s = await open_homed(server, anomalies, PAUSE)
        except Exception as exc:
            errors.add(exc)
            continue
        bucket = pool.by_owner.get(s.owner, {}).get(s.handed, [])
        if len(bucket) >= pairs:  # never needed: more than all pairs from one owner
            pool.opened += 1
            await s.conn.close()
        else:
            pool.add(s)
    return {"opened_more": tries, "anomalies": anomalies.counts, "errors": errors.count, "error_samples": errors.samples}


async def rt_window(server: h.Server, sessions: list[Homed], duration: float, max_ops: int,
                    timeout: float = 30.0) -> dict[str, Any]:
    """Every session of the set in a closed round-trip loop for ``duration`` s."""
    lat: list[float] = []
    errors = h.Errors()

    async def loop(s: Homed, until: float) -> None:
        while now() < until and len(lat) < max_ops:
            s.value += 1
            try:
                lat.append(await s.conn.round_trip(s.slider, s.value, timeout))
            except Exception as exc:
                errors.add(exc)
                return

    with h.Window(server) as w:
        until = now() + duration
        await asyncio.gather(*(loop(s, until) for s in sessions))
    ops = max(len(lat), 1)
    return {
        "sessions": len(sessions), "ops": len(lat), "cpu_ms": 1000 * w.server_cpu / ops,
        "p50_ms": 1000 * h.pct(lat, 50), "p99_ms": 1000 * h.pct(lat, 99),
        "ops_per_s": len(lat) / w.wall, "server_cpu_pct": 100 * w.server_cpu / w.wall,
        "client_cpu_pct": w.client_cpu_pct, "wall_s": w.wall, "server_cpu_s": w.server_cpu,
        "errors": errors.count, "error_samples": errors.samples,
    }


async def stream_window(server: h.Server, sessions: list[Homed], duration: float, warmup: float,
                        timeout: float = 30.0) -> dict[str, Any]:
    """Turn the 10 Hz stream on for the set, count ColumnsStreamed PATCH-DOCs over ``duration`` s, turn it off."""
    errors = h.Errors()

    async def toggle(s: Homed, on: bool) -> None:
        try:
            await s.conn.set_property(s.run, "active", on, timeout)
        except Exception as exc:
            errors.add(exc)

    await asyncio.gather(*(toggle(s, True) for s in sessions))
    try:
        await asyncio.sleep(warmup)
        n0 = sum(s.conn.streamed for s in sessions)
        with h.Window(server) as w:
            await asyncio.sleep(duration)
            n1 = sum(s.conn.streamed for s in sessions)
    finally:
        await asyncio.gather(*(toggle(s, False) for s in sessions))
    await asyncio.sleep(0.5)  # the last ticks in flight
    delivered = n1 - n0
    expected = len(sessions) * h.STREAM_HZ * w.wall
    return {
        "sessions": len(sessions), "delivered": delivered,
        "delivered_pct": 100 * delivered / max(expected, 1), "msgs_per_s": delivered / w.wall,
        "cpu_ms": 1000 * w.server_cpu / max(delivered, 1), "server_cpu_pct": 100 * w.server_cpu / w.wall,
        "client_cpu_pct": w.client_cpu_pct, "wall_s": w.wall, "server_cpu_s": w.server_cpu,
        "errors": errors.count, "error_samples": errors.samples,
    }


async def per_op(server: Cluster, watchers: Watchers, plan: dict[str, Any], pool: Pool) -> dict[str, Any]:
    """CPU per round trip and per streamed message, direct vs handed-over sets, alternating.

    ``pool`` holds the sessions of the connect scenario, if it ran; more are
    opened until there are enough pairs.
    """
    await h.wait_quiet(server, 0, 30)
    from_connect = pool.opened
    info = await fill_pool(server, pool, plan["pairs"], max_tries=20 * plan["pairs"] + 40)
    info["from_connect_scenario"] = from_connect
    info["opened"] = pool.opened
    info["per_owner"] = pool.counts()
    direct, handed = await pool.take(plan["pairs"])
    info["pairs"] = len(direct)
    info["owners_of_pairs"] = {str(pid): sum(1 for x in direct if x.owner == pid) for pid in sorted({x.owner for x in direct})}
    sets = {"direct": direct, "handed": handed}
    out: dict[str, Any] = {"sets": info, "roundtrip": {"direct": [], "handed": []},
                           "streaming": {"direct": [], "handed": []}, "order": []}
    if not direct:
        h.log("per-op: no matched pairs; skipped")
        await h.close_all([s.conn for s in handed])
        return out
    h.log(f"per-op: {len(direct)} direct + {len(handed)} handed-over sessions, matched by owner"
          f" {info['owners_of_pairs']} (of {info['opened']} classified: {info['per_owner']})")
    try:
        await h.wait_quiet(server, h.CLEANUP_WAIT, 60)  # the spare sessions discarded
        out["idle_cpu_pct"] = (await h.idle_cpu(server, 2.0))["idle_cpu_pct"]
        # warm both sets
        for label in ("direct", "handed"):
            await rt_window(server, sets[label], 0.5, 4 * len(sets[label]))
        for rep in range(plan["reps"]):
            order = ("direct", "handed") if rep % 2 == 0 else ("handed", "direct")
            out["order"].append(order)
            for label in order:
                r = await rt_window(server, sets[label], plan["rt_s"], plan["rt_max_ops"])
                out["roundtrip"][label].append(r)
                h.log(f"per-op rep {rep + 1} round trips, {label}: {br.short(r)}")
        await h.wait_quiet(server, 0, 30)
        for rep in range(plan.get("stream_reps", plan["reps"])):
            order = ("handed", "direct") if rep % 2 == 0 else ("direct", "handed")
            for label in order:
                r = await stream_window(server, sets[label], plan["stream_s"], plan["stream_warmup_s"])
                out["streaming"][label].append(r)
                h.log(f"per-op rep {rep + 1} streaming, {label}: {br.short(r)}")
    finally:
        await h.close_all([s.conn for s in direct + handed])
    await h.wait_quiet(server, h.CLEANUP_WAIT, 60)
    idle_ms_per_s = out.get("idle_cpu_pct", 0.0) * 10  # % of a core -> ms per s
    for kind in ("roundtrip", "streaming"):
        for label in ("direct", "handed"):
            runs = out[kind][label]
            ops_key = "ops" if kind == "roundtrip" else "delivered"
            for r in runs:
                r["cpu_ms_net_of_idle"] = (1000 * r["server_cpu_s"] - idle_ms_per_s * r["wall_s"]) / max(r[ops_key], 1)
            out[kind][f"{label}_median"] = {
                k: h.summarize([r[k] for r in runs])
                for k in ("cpu_ms", "cpu_ms_net_of_idle", "p50_ms", "p99_ms", "ops_per_s", "msgs_per_s",
                          "delivered_pct", "server_cpu_pct", "client_cpu_pct")
                if runs and k in runs[0]
            }
        pairs = zip(out[kind]["direct"], out[kind]["handed"])
        out[kind]["paired_ratios"] = [hd["cpu_ms"] / d["cpu_ms"] for d, hd in pairs if d["cpu_ms"] > 0]
    return out


async def lifecycles(servers: dict[int, Cluster], watchers: dict[int, Watchers], plan: dict[str, Any]
                     ) -> dict[str, Any]:
    """``harness.lifecycle`` on ``idle``, -w 1 and -w 4 alternating, sequential then concurrent."""
    out: dict[str, Any] = {}
    n_seq, limit_seq = plan["lifecycle_seq"]
    variants = [("seq", n_seq, 1, limit_seq), ("conc", *plan["lifecycle_conc"])]
    step = 0
    for name, n, conc, limit in variants:
        runs: dict[int, list[dict[str, Any]]] = {w: [] for w in servers}
        for rep in range(plan["lifecycle_reps"]):
            order = sorted(servers) if step % 2 == 0 else sorted(servers, reverse=True)
            step += 1
            for w in order:
                server = servers[w]
                before = await watchers[w].totals()
                r = await h.lifecycle(server, "idle", n, conc, limit)
                r["routing_delta"] = delta(await watchers[w].totals(), before)
                r["handed_pct"] = 100 * r["routing_delta"]["handed_over"] / max(r["ops"], 1)
                runs[w].append(r)
                h.log(f"lifecycle {name} rep {rep + 1} {server.label}: {br.short(r)},"
                      f" handed over {r['routing_delta']['handed_over']}")
        out[name] = {"n": n, "concurrency": conc}
        for w, rs in runs.items():
            out[name][f"w{w}"] = {
                **{k: h.summarize([r[k] for r in rs]) for k in ("cpu_ms", "cpu_window_ms", "p50_ms", "p99_ms",
                                                                  "rate_per_s", "handed_pct")},
                "ops": sum(r["ops"] for r in rs),
                "handed_over": sum(r["routing_delta"]["handed_over"] for r in rs),
                "handover_failed": sum(r["routing_delta"]["handover_failed"] for r in rs),
                "adopted": sum(r["routing_delta"]["adopted"] for r in rs),
                "errors": sum(r["errors"] for r in rs),
                "runs": rs,
            }
        if 1 in runs and 4 in runs:
            out[name]["paired_ratios"] = [b["cpu_ms"] / a["cpu_ms"] for a, b in zip(runs[1], runs[4])]
        if name == "seq" and len(servers) > 1:
            out["mixed"] = await lifecycle_mixed(servers, watchers, plan)
    return out


async def lifecycle_mixed(servers: dict[int, Cluster], watchers: dict[int, Watchers], plan: dict[str, Any],
                          timeout: float = 60.0) -> dict[str, Any]:
    """Sequential lifecycles taking turns between the servers, one session each, within one window per server.

    Each server's CPU counts only its own sessions, and both see the same
    machine over the same minutes: slow drifts of a noisy VM cancel out.
    Cleanup included (``harness._with_cleanup``).
    """
    n, limit = plan["lifecycle_mixed"]
    order = sorted(servers)
    runs: dict[int, list[dict[str, Any]]] = {w: [] for w in order}
    for rep in range(plan["lifecycle_reps"]):
        for w in order:
            await h.wait_quiet(servers[w], 0, 30)
        before = {w: await watchers[w].totals() for w in order}
        lat: dict[int, list[float]] = {w: [] for w in order}
        errors = {w: h.Errors() for w in order}
        windows = {w: h.Window(servers[w]) for w in order}
        for w in order:
            windows[w].__enter__()
        deadline = now() + limit
        for i in range(n):
            if now() > deadline:
                break
            for w in (order if (i + rep) % 2 == 0 else order[::-1]):
                t0 = now()
                try:
                    conn, _ = await bc.open_session(HOST, servers[w].port, "idle", timeout)
                    await conn.close()
                    lat[w].append(now() - t0)
                except Exception as exc:
                    errors[w].add(exc)
        for w in order:
            windows[w].close()
        for w in order:
            r = await h._with_cleanup(servers[w], windows[w], lat[w], errors[w])
            r["routing_delta"] = delta(await watchers[w].totals(), before[w])
            runs[w].append(r)
            h.log(f"lifecycle mixed rep {rep + 1} {servers[w].label}: {br.short(r)},"
                  f" handed over {r['routing_delta']['handed_over']}")
    out: dict[str, Any] = {"n": n, "concurrency": 1}
    for w, rs in runs.items():
        out[f"w{w}"] = {
            **{k: h.summarize([r[k] for r in rs]) for k in ("cpu_ms", "cpu_window_ms", "p50_ms", "p99_ms")},
            "rate_per_s": math.nan,
            "ops": sum(r["ops"] for r in rs),
            "handed_over": sum(r["routing_delta"]["handed_over"] for r in rs),
            "handover_failed": sum(r["routing_delta"]["handover_failed"] for r in rs),
            "adopted": sum(r["routing_delta"]["adopted"] for r in rs),
            "errors": sum(r["errors"] for r in rs),
            "runs": rs,
        }
    if 1 in runs and 4 in runs:
        out["paired_ratios"] = [b["cpu_ms"] / a["cpu_ms"] for a, b in zip(runs[1], runs[4])]
    return out


# --------------------------------------------------------------------------- report


def f(value: Any, spec: str = "{:.2f}") -> str:
    return br.fmt(value, spec)


def ratio(a: float, b: float) -> float:
    try:
        return b / a if a and not math.isnan(a) and not math.isnan(b) else math.nan
    except TypeError:
        return math.nan


def verdict(r: float, limit: float) -> str:
    if math.isnan(r):
        return ""
    return " ✓" if r <= limit else " ✗"


def render(results: dict[str, Any]) -> str:
    lines = ["| scenario | figure | A | B | B/A | target |", "|---|---|---:|---:|---:|---|"]

    def row(group: str, metric: str, a: float, b: float, spec: str, target: str = "", limit: float | None = None,
            show_ratio: bool = True) -> None:
        r = ratio(a, b) if show_ratio else math.nan
        mark = verdict(r, limit) if limit is not None else ""
        lines.append(f"| {group} | {metric} | {f(a, spec)} | {f(b, spec)} | {f(r, '{:.3f}×')} | {target}{mark} |")

    c = results.get("connect")
    if c:
        w4 = c["w4"]
        g = f"connect, -w 4 (A direct n={w4['direct']['n']}, B handed over n={w4['handed']['n']})"
        row(g, "WS connect → PULL-DOC reply p50 ms", w4["direct"]["p50_ms"], w4["handed"]["p50_ms"], "{:.2f}")
        row("", "… p99 ms", w4["direct"]["p99_ms"], w4["handed"]["p99_ms"], "{:.2f}")
        row("", "… mean ms", w4["direct"]["mean_ms"], w4["handed"]["mean_ms"], "{:.2f}")
        row("", "server CPU ms over the connect, p50", w4["direct"]["cpu_p50_ms"], w4["handed"]["cpu_p50_ms"], "{:.2f}")
        row("", "… mean", w4["direct"]["cpu_mean_ms"], w4["handed"]["cpu_mean_ms"], "{:.2f}")
        if "w1" in c:
            w1 = c["w1"]
            g = f"connect, A -w 1 (n={w1['all']['n']}) vs B -w 4 all (n={w4['all']['n']})"
            row(g, "WS connect → PULL-DOC reply p50 ms", w1["all"]["p50_ms"], w4["all"]["p50_ms"], "{:.2f}")
            row("", "… p99 ms", w1["all"]["p99_ms"], w4["all"]["p99_ms"], "{:.2f}")
            row("", "server CPU ms over the connect, p50", w1["all"]["cpu_p50_ms"], w4["all"]["cpu_p50_ms"], "{:.2f}")
            row("", "page GET p50 ms (not in the above)", w1["page_get"]["p50_ms"], w4["page_get"]["p50_ms"], "{:.2f}")
    p = results.get("perop")
    if p and p.get("roundtrip", {}).get("direct"):
        n = p["sets"]["pairs"]
        rt, st = p["roundtrip"], p["streaming"]
        d, hd = rt["direct_median"], rt["handed_median"]
        g = f"round trips, -w 4, {n} sessions per set (A direct, B handed over), median of {len(rt['direct'])}"
        row(g, "server CPU ms/round trip", d["cpu_ms"], hd["cpu_ms"], "{:.3f}", "≤1.05×", 1.05)
        row("", "… net of idle CPU", d["cpu_ms_net_of_idle"], hd["cpu_ms_net_of_idle"], "{:.3f}", "≤1.05×", 1.05)
        lines.append(f"| | … per-rep ratios B/A | | | {', '.join(f(x, '{:.3f}') for x in rt['paired_ratios'])} | |")
        row("", "latency p50 ms", d["p50_ms"], hd["p50_ms"], "{:.2f}")
        row("", "latency p99 ms", d["p99_ms"], hd["p99_ms"], "{:.2f}")
        row("", "round trips/s", d["ops_per_s"], hd["ops_per_s"], "{:.0f}")
        d, hd = st["direct_median"], st["handed_median"]
        g = f"streaming, -w 4, {n} sessions per set × 10 Hz, median of {len(st['direct'])}"
        row(g, "server CPU ms/streamed message", d["cpu_ms"], hd["cpu_ms"], "{:.3f}", "≤1.05×", 1.05)
        row("", "… net of idle CPU", d["cpu_ms_net_of_idle"], hd["cpu_ms_net_of_idle"], "{:.3f}", "≤1.05×", 1.05)
        lines.append(f"| | … per-rep ratios B/A | | | {', '.join(f(x, '{:.3f}') for x in st['paired_ratios'])} | |")
        row("", "delivered % of expected", d["delivered_pct"], hd["delivered_pct"], "{:.1f}")
    lc = results.get("lifecycle")
    if lc:
        for name, title in (("seq", "sequential"), ("mixed", "sequential, servers taking turns"),
                            ("conc", "concurrent")):
            v = lc.get(name)
            if not v or "w1" not in v or "w4" not in v:
                continue
            a, b = v["w1"], v["w4"]
            g = f"lifecycle (idle app), {title} ×{v['concurrency']}, A -w 1, B -w 4"
            row(g, "server CPU ms/session incl. cleanup", a["cpu_ms"], b["cpu_ms"], "{:.2f}", "≤1.10×", 1.10)
            lines.append(f"| | … per-rep ratios B/A | | | {', '.join(f(x, '{:.3f}') for x in v['paired_ratios'])} | |")
            row("", "server CPU ms/session, window only", a["cpu_window_ms"], b["cpu_window_ms"], "{:.2f}")
            row("", "latency p50 ms", a["p50_ms"], b["p50_ms"], "{:.1f}")
            row("", "latency p99 ms", a["p99_ms"], b["p99_ms"], "{:.1f}")
            if not math.isnan(a["rate_per_s"]):
                row("", "sessions/s", a["rate_per_s"], b["rate_per_s"], "{:.1f}")
            lines.append(f"| | WebSockets handed over | {a['handed_over']} of {a['ops']} | {b['handed_over']} of"
                         f" {b['ops']} ({100 * b['handed_over'] / max(b['ops'], 1):.0f}%) | | |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- run


async def run_all(args: argparse.Namespace, plan: dict[str, Any], servers: dict[int, Cluster],
                  results: dict[str, Any], extra: dict[str, Any]) -> None:
    watchers = {w: Watchers(s) for w, s in servers.items()}
    try:
        for w, s in servers.items():
            await h.warm_up(s)
            await watchers[w].gather()
            for hs in watchers[w].by_pid.values():  # every worker: a round trip, a hand-over path or two
                for _ in range(3):
                    hs.value += 1
                    await hs.conn.round_trip(hs.slider, hs.value)
            h.log(f"{s.label}: workers {sorted(s.worker_pids())}, watched {sorted(watchers[w].by_pid)}")
        if 4 in servers:
            # the hand-over path warmed on every worker
            warm = await connect_times(servers[4], watchers[4], 40)
            h.log(f"warm-up connects -w 4: {warm['direct']['n']} direct, {warm['handed']['n']} handed over")
        for w, s in servers.items():
            await h.wait_quiet(s, h.CLEANUP_WAIT, 60)
            extra.setdefault("idle_cpu_pct", {})[s.label] = (await h.idle_cpu(s, 2.0))["idle_cpu_pct"]
        pool = Pool()
        if "connect" in args.only:
            results["connect"] = {}
            for w, n in ((4, plan["connects_w4"]), (1, plan["connects_w1"])):
                if w in servers:
                    r = await connect_times(servers[w], watchers[w], n, pool if w == 4 and "perop" in args.only else None)
                    results["connect"][f"w{w}"] = r
                    h.log(f"connect {servers[w].label}: direct {r['direct']['n']} p50 {r['direct']['p50_ms']:.2f} ms,"
                          f" handed {r['handed']['n']} p50 {r['handed']['p50_ms']:.2f} ms; routing {r['routing_delta']}")
        if "perop" in args.only and 4 in servers:
            results["perop"] = await per_op(servers[4], watchers[4], plan, pool)
        await pool.close()
        if "lifecycle" in args.only:
            results["lifecycle"] = await lifecycles(servers, watchers, plan)
        for w, s in servers.items():
            extra.setdefault("routing_totals", {})[s.label] = await watchers[w].totals()
    finally:
        for wt in watchers.values():
            await wt.close()


def main() -> int:
    parser = argparse.ArgumentParser(description="hand-over costs under gunicorn -k gevent -w 4 (vs -w 1)")
    parser.add_argument("--quick", action="store_true", help="smaller counts; about a minute and a half")
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help=f"comma-separated scenarios (default all: {','.join(SCENARIOS)})")
    parser.add_argument("--json", default=None, help="also write all figures to this JSON file")
    parser.add_argument("--log-level", default="warning", help="--log-level of the servers (default warning)")
    parser.add_argument("--pause", type=float, default=DEFAULT_PAUSE,
                        help="seconds between a page GET and its WebSocket in the classified connects"
                             f" (default {DEFAULT_PAUSE})")
    parser.add_argument("--logs", default=None, help="keep the servers' logs in this directory")
    parser.add_argument("--pin", default=None, metavar="CPUS",
                        help="run the servers on these CPUs (taskset list, e.g. 0) and this client on the"
                             " others, so that -w 4 cannot spread a window over more cores than -w 1: CPU"
                             " time then measures work, not two cores contending for the machine's caches")
    args = parser.parse_args()
    args.only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = args.only - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    plan = PLANS["quick" if args.quick else "full"]
    global PAUSE, PIN
    PAUSE = args.pause
    if args.pin:
        PIN = sorted({int(c) for c in args.pin.split(",")})
        others = set(os.sched_getaffinity(0)) - set(PIN)
        if not others:
            parser.error(f"--pin {args.pin} leaves no CPU for the client")
        os.sched_setaffinity(0, others)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    t_start = time.monotonic()
    machine = br.machine_info()
    import gunicorn

    machine["gunicorn"] = gunicorn.__version__
    machine["pinned_servers_to"] = PIN
    h.log(f"plan: {'quick' if args.quick else 'full'}; {machine['cpu']}, {machine['cores']} cores,"
          f" load {machine['loadavg_start'][0]:.2f}" + (f"; servers pinned to CPU {PIN}" if PIN else ""))
    logdir_ctx = tempfile.TemporaryDirectory(prefix="docsync-cluster-") if args.logs is None else None
    logdir = Path(args.logs) if args.logs else Path(logdir_ctx.name)  # type: ignore[union-attr]
    logdir.mkdir(parents=True, exist_ok=True)
    workers = (4, 1) if args.only & {"connect", "lifecycle"} else (4,)
    servers = {w: Cluster(w, logdir, args.log_level) for w in workers}
    results: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    interrupted = failed = False
    try:
        for s in servers.values():
            s.start()
            h.log(f"started {s.label}: pid {s.proc.pid}, port {s.port}, workers {sorted(s.worker_pids())}")
        asyncio.run(run_all(args, plan, servers, results, extra))
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
    print(f"# flask-docsync, one home per session: gunicorn -k gevent -w 4 vs -w 1"
          f" ({'quick' if args.quick else 'full'} run, {time.monotonic() - t_start:.0f} s)")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores (nproc {len(os.sched_getaffinity(0))});"
          f" Python {machine['python']}, bokeh {machine['bokeh']}, gunicorn {machine['gunicorn']},"
          f" gevent {machine['gevent']};" + (f" servers pinned to CPU {PIN}, client on the others;" if PIN else "")
          + f" load average {machine['loadavg_start'][0]:.2f} at start,"
          f" {machine['loadavg_end'][0]:.2f} at end")
    if extra.get("idle_cpu_pct"):
        print("idle server CPU (process tree): "
              + ", ".join(f"{k} {v:.2f}% of a core" for k, v in extra["idle_cpu_pct"].items()))
    c = results.get("connect", {}).get("w4")
    if c:
        print(f"connect -w 4: owners of the sessions {c['owners']}; routing figures over the scenario"
              f" {c['routing_delta']}; classified handed over {c['handed']['n']}")
    p = results.get("perop")
    if p:
        print(f"per-op sets: {p['sets']['pairs']} pairs, owners {p['sets'].get('owners_of_pairs')}, from"
              f" {p['sets']['opened']} classified sessions ({p['sets']['from_connect_scenario']} of the connect"
              f" scenario), per owner (direct/handed) {p['sets']['per_owner']}")
    anomalies = {k: v.get("anomalies") for k, v in (results.get("connect") or {}).items() if v.get("anomalies")}
    if p and p["sets"].get("anomalies"):
        anomalies["perop"] = p["sets"]["anomalies"]
    if anomalies:
        print(f"anomalies: {anomalies}")
    for label, t in extra.get("routing_totals", {}).items():
        print(f"routing totals {label} at the end: " + ", ".join(f"{k} {t[k]}" for k in
                                                                 ("handed_over", "handover_failed", "received", "adopted"))
              + f" over {t['workers_seen']} worker(s)")
    print()
    if interrupted:
        print("(interrupted: partial results)\n")
    print(render(results))
    errs = {}
    for key, v in results.items():
        for sub, r in (v.items() if isinstance(v, dict) else ()):
            if isinstance(r, dict) and r.get("errors"):
                errs[f"{key}/{sub}"] = r["errors"]
    if errs:
        print(f"\nerrors: {errs}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"plan": "quick" if args.quick else "full", "plan_values": plan, "machine": machine,
                       "extra": extra, "results": results}, fh, indent=1, default=str)
        print(f"\nall figures: {args.json}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
