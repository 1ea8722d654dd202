#!/usr/bin/env python
"""Profile a server during the round-trip and streaming scenarios.

    python bench/profile_server.py [--server docsync|bokeh] [--roundtrip 50] [--streaming 100]
                                   [--lifecycle 0] [--discard 0] [--seconds 8] [--out DIR]

Starts the server as ``bench/run.py`` does, sets the scenario up (sessions
opened, warmed) and attaches py-spy (``pip install py-spy``) to the server
process only for the measuring window, so session creation does not mix
into the profile. Prints the top functions by own time and by inclusive
time and the own time per source file, and keeps the raw collapsed stacks
(``DIR/<server>-<scenario>.txt``, for any flamegraph tool).

Without py-spy, ``--cprofile`` runs the server under ``python -m cProfile``
instead; that profile covers the whole server run (setup included) and is
distorted by greenlet switches, so prefer py-spy.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402

FRAME_RE = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*)\)$")


def parse_raw(path: Path) -> tuple[collections.Counter, collections.Counter, collections.Counter, int]:
    """Own-time and inclusive counters per function, own time per file, total samples."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    files: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        # py-spy puts the process / thread first; keep Python frames only
        frames = [f for f in frames if FRAME_RE.match(f)]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        m = FRAME_RE.match(frames[-1])
        files[m.group("file") if m else "?"] += n
        for f in set(frames):
            incl[f] += n
    return own, incl, files, total


def report(title: str, path: Path, top: int) -> None:
    own, incl, files, total = parse_raw(path)
    print(f"\n## {title}: {total} samples (raw stacks: {path})")
    if not total:
        print("no samples")
        return
    print(f"\n### top {top} by own time")
    for f, n in own.most_common(top):
        print(f"{100 * n / total:5.1f}%  {f}")
    print(f"\n### top {top} by inclusive time")
    for f, n in incl.most_common(top):
        print(f"{100 * n / total:5.1f}%  {f}")
    print(f"\n### own time per file (top {top})")
    for f, n in files.most_common(top):
        print(f"{100 * n / total:5.1f}%  {f}")


async def profile(args: argparse.Namespace, server: h.Server, out: Path) -> list[tuple[str, Path]]:
    done: list[tuple[str, Path]] = []
    spies: list[subprocess.Popen[bytes]] = []

    def spy(name: str):
        async def on_window(duration: float) -> None:
            path = out / f"{server.kind}-{name}.txt"
            cmd = [args.py_spy, "record", "--pid", str(server.server_process().pid), "--duration",
                   str(max(1, int(duration))), "--rate", str(args.rate), "--format", "raw", "--nolineno",
                   "--nonblocking", "--output", str(path)]
            spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            done.append((name, path))
            await asyncio.sleep(0.3)  # let py-spy attach before the window opens
        return on_window if args.py_spy else None

    await h.warm_up(server)
    try:
        if args.discard:
            name = f"discard{args.discard}"
            hook = spy(name)

            async def on_discard(cycle: int) -> None:
                if hook is not None:
                    await hook(args.seconds)

            r = await h.idle_cycles(server, args.discard, 1, on_discard=on_discard)
            c = r["cycles"][0]
            h.log(f"discard: {c['discard_cpu_ms']:.1f} ms CPU per session over {c['discard_wall_s']:.1f} s,"
                  f" longest stall {c['stall_ms']:.0f} ms")
        if args.lifecycle:
            r = await h.lifecycle(server, "idle", args.lifecycle, 1, args.seconds,
                                  on_window=spy(f"lifecycle{args.lifecycle}"))
            h.log(f"lifecycle: {r['ops']} sessions, {r['cpu_ms']:.1f} ms CPU each incl. cleanup")
        if args.roundtrip:
            r = await h.round_trip(server, args.roundtrip, args.seconds, 10**7,
                                   on_window=spy(f"roundtrip{args.roundtrip}"))
            h.log(f"round trip: {r['ops']} ops, {r['cpu_ms']:.3f} ms CPU each, p50 {r['p50_ms']:.2f} ms")
            await h.wait_quiet(server, h.CLEANUP_WAIT, 60)
        if args.streaming:
            r = await h.streaming(server, args.streaming, args.seconds, on_window=spy(f"streaming{args.streaming}"))
            h.log(f"streaming: {r['delivered']} msgs ({r['delivered_pct']:.1f}%), {r['cpu_ms']:.3f} ms CPU each")
    finally:
        for p in spies:
            try:
                p.wait(args.seconds + 30)
            except subprocess.TimeoutExpired:
                p.kill()
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description="profile a server under the bench scenarios")
    parser.add_argument("--server", choices=sorted(h.KINDS), default="docsync")
    parser.add_argument("--roundtrip", type=int, default=50, help="sessions (0 to skip)")
    parser.add_argument("--streaming", type=int, default=100, help="sessions (0 to skip)")
    parser.add_argument("--discard", type=int, default=0,
                        help="idle sessions opened, then profiled while they are closed and discarded (0 to skip)")
    parser.add_argument("--lifecycle", type=int, default=0,
                        help="sessions of the idle app opened and closed one by one, cleanup included (0 to skip)")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each profiled window")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default=None, help="keep the profiles here (default: a temp dir)")
    parser.add_argument("--cprofile", action="store_true", help="use cProfile instead of py-spy")
    args = parser.parse_args()
    args.py_spy = None if args.cprofile else shutil.which("py-spy")
    if not args.cprofile and args.py_spy is None:
        parser.error("py-spy not found: pip install py-spy, or pass --cprofile")

    out = Path(args.out or tempfile.mkdtemp(prefix="docsync-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    server = h.Server(args.server, out)
    prof_path = out / f"{args.server}.cprofile"
    if args.cprofile:
        module = h.KINDS[args.server]
        base = server.command
        server.command = lambda: [sys.executable, "-m", "cProfile", "-o", str(prof_path), "-m", module,
                                  *base()[3:]]
    try:
        server.start()
        h.log(f"{server.kind} pid {server.proc.pid} on port {server.port}; profiles in {out}")
        done = asyncio.run(profile(args, server, out))
    finally:
        server.stop()
    if args.cprofile:
        print(f"\n## cProfile of the whole {args.server} run ({prof_path})")
        stats = pstats.Stats(str(prof_path))
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)
    else:
        for name, path in done:
            report(f"{args.server} {name}", path, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
