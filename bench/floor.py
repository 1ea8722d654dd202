"""The in-process floor: what Bokeh's own code costs with no server at all.

Per session, for each app script: a new ``Document``, the app handler run
on it (``Application.initialize_document``, as both servers do when a
session is created), and the PULL-DOC-REPLY a client's pull gets
(``Document.to_json`` inside ``protocol.create`` plus its frames). CPU time
of this process, averaged over ``--n`` sessions after a warm-up. No server
does less work than this per session, so it is the floor of the session
lifecycle figure.

Per operation, with the same model code a server runs:

- round trip (``roundtrip.py``): parse the client's PATCH-DOC frames with
  Bokeh's ``Receiver``, ``apply_to_document`` (which runs the slider's
  ``on_change`` callback), create the PATCH-DOC of the Div change and the
  OK reply, and encode their frames;
- streamed message (``streaming.py``): ``source.stream(...)`` of 10 points
  as the app's tick does, and the PATCH-DOC of the ColumnsStreamed event
  with its frames.

    python bench/floor.py [--n 30] [--json] bench/apps/idle.py ...
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time


def measure(path: str, n: int, warmup: int = 3) -> dict[str, float]:
    from bokeh.command.util import build_single_handler_application
    from bokeh.document import Document
    from bokeh.protocol import Protocol

    protocol = Protocol()
    application = build_single_handler_application(path, [])
    init_ms: list[float] = []
    ser_ms: list[float] = []
    size = 0
    docs = []
    for i in range(warmup + n):
        t0 = time.process_time()
        doc = Document()
        application.initialize_document(doc)
        t1 = time.process_time()
        message = protocol.create("PULL-DOC-REPLY", "bench", doc)
        frames = [message.header_json, message.metadata_json, message.content_json]
        for buffer in message.buffers:
            frames.append(json.dumps(buffer.ref))
            frames.append(buffer.to_bytes())
        t2 = time.process_time()
        size = sum(len(f) for f in frames)
        if i >= warmup:
            init_ms.append((t1 - t0) * 1000)
            ser_ms.append((t2 - t1) * 1000)
            docs.append(doc)  # sessions stay alive on a server too
    del docs
    gc.collect()
    return {
        "app_ms": statistics.mean(init_ms),
        "serialize_ms": statistics.mean(ser_ms),
        "total_ms": statistics.mean(init_ms) + statistics.mean(ser_ms),
        "total_median_ms": statistics.median([a + b for a, b in zip(init_ms, ser_ms)]),
        "pull_reply_bytes": size,
        "n": n,
    }


def _frames(message) -> list:
    frames = [message.header_json, message.metadata_json, message.content_json]
    for buffer in message.buffers:
        frames.append(json.dumps(buffer.ref))
        frames.append(buffer.to_bytes())
    return frames


def _new_doc(path: str):
    from bokeh.command.util import build_single_handler_application
    from bokeh.document import Document

    doc = Document()
    build_single_handler_application(path, []).initialize_document(doc)
    return doc


def _consume(receiver, frame):
    coro = receiver.consume(frame)
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("Receiver.consume suspended")


def measure_round_trip(path: str, n: int, warmup: int = 20) -> dict[str, float]:
    from bokeh.protocol import Protocol
    from bokeh.protocol.receiver import Receiver

    protocol = Protocol()
    doc = _new_doc(path)
    slider = doc.get_model_by_name("slider")
    events: list = []
    doc.on_change(events.append)
    setter = object()
    receiver = Receiver(protocol)
    times = []
    for i in range(warmup + n):
        incoming = [
            '{"msgid":"%d","msgtype":"PATCH-DOC"}' % i, "{}",
            '{"events":[{"kind":"ModelChanged","model":{"id":"%s"},"attr":"value","new":%d}]}' % (slider.id, i + 1),
        ]
        t0 = time.process_time()
        message = None
        for frame in incoming:
            message = _consume(receiver, frame)
        message.apply_to_document(doc, setter)
        out = [e for e in events if e.setter is not setter]
        events.clear()
        _frames(protocol.create("PATCH-DOC", out))
        _frames(protocol.create("OK", message.header["msgid"]))
        t1 = time.process_time()
        if not out:
            raise RuntimeError("the slider callback changed nothing")
        if i >= warmup:
            times.append((t1 - t0) * 1000)
    return {"op_ms": statistics.mean(times), "op_median_ms": statistics.median(times), "n": n}


def measure_stream(path: str, n: int, warmup: int = 20, points: int = 10) -> dict[str, float]:
    import numpy as np
    from bokeh.protocol import Protocol

    protocol = Protocol()
    doc = _new_doc(path)
    source = doc.get_model_by_name("source")
    events: list = []
    doc.on_change(events.append)
    model_ms, ser_ms = [], []
    for i in range(warmup + n):
        x = np.arange(i * points, (i + 1) * points, dtype=np.float64)
        t0 = time.process_time()
        source.stream(dict(x=x, y=np.sin(x / 50.0)), rollover=1000)
        t1 = time.process_time()
        for event in events:
            _frames(protocol.create("PATCH-DOC", [event]))
        t2 = time.process_time()
        if len(events) != 1:
            raise RuntimeError(f"expected one event per stream, got {len(events)}")
        events.clear()
        if i >= warmup:
            model_ms.append((t1 - t0) * 1000)
            ser_ms.append((t2 - t1) * 1000)
    return {
        "model_ms": statistics.mean(model_ms),
        "serialize_ms": statistics.mean(ser_ms),
        "op_ms": statistics.mean(model_ms) + statistics.mean(ser_ms),
        "n": n,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("apps", nargs="+")
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    results = {}
    for path in args.apps:
        name = os.path.splitext(os.path.basename(path.rstrip("/")))[0]
        results[name] = measure(path, args.n)
        if name == "roundtrip":
            results[name]["round_trip"] = measure_round_trip(path, args.n * 20)
        if name == "streaming":
            results[name]["stream"] = measure_stream(path, args.n * 20)
    if args.json:
        json.dump(results, sys.stdout)
        print()
    else:
        for name, r in results.items():
            print(
                f"{name:10s} app {r['app_ms']:7.2f} ms + serialize {r['serialize_ms']:6.2f} ms"
                f" = {r['total_ms']:7.2f} ms per session ({r['pull_reply_bytes']} bytes pulled)"
            )
            if "round_trip" in r:
                print(f"{'':10s} per round trip (parse, apply + callback, PATCH-DOC + OK):"
                      f" {r['round_trip']['op_ms']:.3f} ms")
            if "stream" in r:
                s = r["stream"]
                print(f"{'':10s} per streamed message: stream() {s['model_ms']:.3f} ms"
                      f" + PATCH-DOC {s['serialize_ms']:.3f} ms = {s['op_ms']:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
