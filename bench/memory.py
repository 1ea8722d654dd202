#!/usr/bin/env python
"""Where the memory of an idle session goes, in both servers.

    python bench/memory.py [--sessions 200]

Starts ``bokeh serve`` and ``flask-docsync serve`` on the bench apps with
tracemalloc on (``PYTHONTRACEMALLOC=1``, so both run slower and use more
memory than in ``run.py``), opens ``--sessions`` idle sessions on each
(page, WebSocket, PULL-DOC) and compares tracemalloc snapshots taken before
and after. Python allocations per session are printed grouped into the
Bokeh document (Bokeh's model, property and document code, the app script
and numpy: the same objects in both servers) and the server around it (the
rest: Tornado and bokeh.server, or gevent, Flask and flask_docsync), with
the largest files of each. It explains the memory row of ``run.py``: a
server cannot use less per session than the document it holds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness as h  # noqa: E402

#: Files whose allocations belong to the document itself.
DOCUMENT_PARTS = (
    "bokeh/core/", "bokeh/model/", "bokeh/models/", "bokeh/document/", "bokeh/plotting/",
    "bokeh/util/callback_manager", "bokeh/util/serialization", "bokeh/application/",
    "numpy/", str(HERE / "apps"),
)


def part_of(filename: str) -> str:
    return "document" if any(p in filename for p in DOCUMENT_PARTS) else "server"


def short(filename: str) -> str:
    for marker in ("site-packages/", "lib/python3."):
        if marker in filename:
            rest = filename.split(marker, 1)[1]
            return rest.split("/", 1)[1] if marker == "lib/python3." else rest
    return os.path.relpath(filename, h.REPO)


async def measure(kind: str, sessions: int, workdir: Path) -> dict:
    os.environ["DOCSYNC_BENCH_MEMPROBE"] = str(workdir / kind)
    server = h.Server(kind, workdir)
    server.start()
    try:
        await h.warm_up(server)
        await h.wait_quiet(server, h.CLEANUP_WAIT, 60)
        rss0 = server.rss()
        os.kill(server.proc.pid, signal.SIGUSR1)
        await asyncio.sleep(2)
        opened, errors = await h.open_many(server, "idle", sessions)
        await asyncio.sleep(2)
        rss1 = server.rss()
        os.kill(server.proc.pid, signal.SIGUSR1)
        result = workdir / f"{kind}.{server.proc.pid}.json"
        for _ in range(120):
            if result.exists():
                break
            await asyncio.sleep(0.5)
        rows = json.loads(result.read_text())
        await h.close_all([c for c, _ in opened])
    finally:
        server.stop()
    n = len(opened)
    parts: dict[str, float] = collections.Counter()
    files: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for row in rows:
        part = part_of(row["file"])
        parts[part] += row["bytes"] / n
        files[part][short(row["file"])] += row["bytes"] / n
    return {"sessions": n, "errors": errors.count, "rss_per_session": (rss1 - rss0) / n,
            "parts": dict(parts), "files": {k: v.most_common(8) for k, v in files.items()}}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=200)
    args = parser.parse_args()
    os.environ["PYTHONTRACEMALLOC"] = "1"
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(HERE / "memprobe"), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    with tempfile.TemporaryDirectory() as tmp:
        results = {kind: await measure(kind, args.sessions, Path(tmp)) for kind in ("bokeh", "docsync")}
    kib = 1024
    print(f"\nKiB per idle session ({args.sessions} sessions of bench/apps/idle.py, tracemalloc on)\n")
    print("| | bokeh serve | flask-docsync |")
    print("|---|---:|---:|")
    for part in ("document", "server"):
        print(f"| {part} (Python allocations) | {results['bokeh']['parts'].get(part, 0) / kib:.1f}"
              f" | {results['docsync']['parts'].get(part, 0) / kib:.1f} |")
    total = {k: sum(r["parts"].values()) / kib for k, r in results.items()}
    print(f"| all Python allocations | {total['bokeh']:.1f} | {total['docsync']:.1f} |")
    print(f"| RSS growth (tracemalloc's own bookkeeping included) | "
          f"{results['bokeh']['rss_per_session'] / kib:.1f} | {results['docsync']['rss_per_session'] / kib:.1f} |")
    for kind, r in results.items():
        print(f"\n{kind}: largest files of the server part, KiB per session")
        for name, size in r["files"].get("server", []):
            print(f"  {size / kib:7.1f}  {name}")
        if r["errors"]:
            print(f"  ({r['errors']} sessions failed to open)")


if __name__ == "__main__":
    asyncio.run(main())
