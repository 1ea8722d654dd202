"""Loaded by ``bench/memory.py`` into a server it starts (via ``PYTHONPATH``).

With ``DOCSYNC_BENCH_MEMPROBE=<path>`` set, every ``SIGUSR1`` takes a
tracemalloc snapshot (``PYTHONTRACEMALLOC`` must be set too); after the
second one the difference, grouped by source file, is written to
``<path>.<pid>.json``. Without that variable this module does nothing.
"""

import os
import sys

_out = os.environ.get("DOCSYNC_BENCH_MEMPROBE")

if _out and "serve" in sys.argv:
    import gc
    import json
    import signal
    import tracemalloc

    _snapshots = []

    def _snapshot(*_):
        gc.collect()
        _snapshots.append(tracemalloc.take_snapshot())
        if len(_snapshots) != 2:
            return
        before, after = _snapshots
        rows = [
            {"file": str(stat.traceback[0].filename), "bytes": stat.size_diff, "count": stat.count_diff}
            for stat in after.compare_to(before, "filename")
            if stat.size_diff
        ]
        with open(f"{_out}.{os.getpid()}.json", "w") as f:
            json.dump(rows, f)

    signal.signal(signal.SIGUSR1, _snapshot)
