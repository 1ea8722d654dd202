#!/usr/bin/env python
"""In-process CPU of our RFC 6455 framing against wsproto's, same I/O around both.

    python bench/framing.py [--n 20000] [--repeat 5]

``WsprotoWebSocket`` below is :class:`flask_docsync.websocket.WebSocket`
with its frame parsing and serialising done by ``wsproto.frame_protocol``
(feed bytes, take frames; ``send_data``/``ping``/``pong``/``close`` for
writing) while the buffered-bytes handling, write lock, whole-message
writes, yield budget and message size limit stay ours. It is the
implementation that was benchmarked in the servers (README, "Why not wsproto
for the frames"). Both run on a fake socket, so the figures are parsing and
serialising only:

-   PATCH-DOC in: the 3 masked frames a browser sends (header, metadata,
    ~300 bytes of content) arriving in one recv(), read with 3 receive().
-   PATCH-DOC out: the same 3 messages written with one send_many().
-   1 MiB binary in (masked) and out.

Each figure is the best of ``--repeat`` timings of ``--n`` operations.
Skips, with a message, when wsproto is not installed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import struct
import sys
import time
import timeit
import typing as t
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:
    from wsproto.frame_protocol import FrameDecoder, FrameProtocol, Opcode, ParseFailed
except ImportError:
    print("bench/framing.py: wsproto is not installed (pip install wsproto); nothing to compare.")
    sys.exit(0)

import gevent  # noqa: E402

from flask_docsync import websocket as w  # noqa: E402
from flask_docsync.websocket import ConnectionClosed, WebSocket  # noqa: E402

MiB = 1024 * 1024


# --------------------------------------------------------------------------- wsproto under our I/O


class _LimitedDecoder(FrameDecoder):
    """wsproto's decoder plus our size limit, checked from each header
    before the payload is read (wsproto has no limit; an extension could
    see the header too, but costs two payload copies per frame)."""

    def __init__(self, max_message_size: int | None) -> None:
        super().__init__(client=False, extensions=[])
        self.max_message_size = max_message_size
        self.message_size = 0

    def extension_processing(self, opcode, rsv, payload_len):  # type: ignore[override]
        if opcode < 8 and self.max_message_size is not None:
            size = payload_len if opcode else self.message_size + payload_len
            if size > self.max_message_size:
                raise ParseFailed(f"message over the limit of {self.max_message_size} bytes",
                                  w.MESSAGE_TOO_BIG)  # type: ignore[arg-type]
            self.message_size = size
        if rsv[0] or rsv[1] or rsv[2]:
            raise ParseFailed("Reserved bit set unexpectedly")


class WsprotoWebSocket(WebSocket):
    """Our WebSocket with wsproto's frame layer (what DOCSYNC_FRAMING=wsproto selected)."""

    def __init__(self, environ: dict, sock: t.Any, *, max_message_size: int | None = 20 * MiB,
                 buffered: bytes = b"", **kw: t.Any) -> None:
        super().__init__(environ, sock, max_message_size=max_message_size, **kw)
        self._proto = FrameProtocol(client=False, extensions=[])
        self._proto._frame_decoder = self._decoder = _LimitedDecoder(max_message_size)
        if buffered:
            self._proto.receive_bytes(buffered)
        self._ws_parts: t.Any = None

    @property
    def buffered(self) -> bool:
        return len(self._decoder.buffer) > 0

    def _ws_next(self, deadline: float | None) -> t.Any:
        proto = self._proto
        while True:
            try:
                for frame in proto.received_frames():
                    return frame
            except ParseFailed as exc:
                raise w._Fail(int(exc.code), str(exc)) from None
            if self._shut:
                raise w._Gone("the connection was shut down")
            data = self._recv(w._READ_SIZE, deadline)
            if data is None:
                return None
            proto.receive_bytes(data)

    def receive(self, timeout: float | None = None) -> str | bytes | None:
        if self.closed:
            raise ConnectionClosed(self.close_code or w.ABNORMAL, self.close_reason or "")
        current = gevent.getcurrent()
        if self._reader is not None and self._reader is not current:
            raise RuntimeError("only one greenlet at a time may read a WebSocket")
        deadline = None if timeout is None else time.monotonic() + timeout
        self._reader = current
        try:
            while True:
                frame = self._ws_next(deadline)
                if frame is None:
                    if self.closed:
                        raise ConnectionClosed(self.close_code or w.ABNORMAL, self.close_reason or "")
                    return None
                opcode, payload, frame_finished, message_finished = frame
                if frame_finished:
                    self._turn_frames += 1
                self._turn_bytes += len(payload)
                if self._turn_frames >= w._YIELD_FRAMES or self._turn_bytes >= w._YIELD_BYTES:
                    self._turn_frames = self._turn_bytes = 0
                    gevent.sleep(0)
                if self.closed:
                    if opcode is Opcode.CLOSE:
                        self._shutdown()
                        raise ConnectionClosed(self.close_code or w.ABNORMAL, self.close_reason or "")
                    continue
                if opcode is Opcode.PING:
                    self._write_control(w._OP_PONG, payload)
                    continue
                if opcode is Opcode.PONG:
                    self.last_pong = time.monotonic()
                    continue
                if opcode is Opcode.CLOSE:
                    code, reason = payload
                    code = int(code)
                    self.closed, self.close_code, self.close_reason = True, code, reason
                    self._send_close_frame(w.NORMAL if code == w.NO_STATUS else code, "")
                    self._shutdown()
                    raise ConnectionClosed(code, reason)
                # wsproto gives the message's opcode on every part and decodes text itself.
                parts = self._ws_parts
                if parts is None:
                    if message_finished:
                        self._decoder.message_size = 0
                        return payload
                    parts = io.StringIO() if opcode is Opcode.TEXT else bytearray()
                    self._ws_parts = parts
                if opcode is Opcode.TEXT:
                    parts.write(payload)
                else:
                    parts += payload
                if message_finished:
                    self._ws_parts = None
                    self._decoder.message_size = 0
                    return parts.getvalue() if opcode is Opcode.TEXT else bytes(parts)
        except w._Fail as exc:
            self._fail(exc.code, exc.reason)
        except w._Gone as exc:
            self._lost(str(exc))
        finally:
            self._reader = None

    def _drain(self, deadline: float) -> None:
        self._reader = gevent.getcurrent()
        try:
            while True:
                frame = self._ws_next(deadline)
                if frame is None or frame[0] is Opcode.CLOSE:
                    return
        except (w._Fail, w._Gone):
            return
        finally:
            self._reader = None

    def _write_control(self, opcode: int, payload: bytes) -> None:
        frame = self._proto.pong(payload) if opcode == w._OP_PONG else self._proto.ping(payload)
        with self._write_lock:
            if self.closed:
                return
            self._sendall_locked((frame,))

    def send_many(self, messages: t.Iterable[str | bytes]) -> None:
        chunks: list[t.Any] = []
        small: list[t.Any] = []
        send_data = self._proto.send_data
        for message in messages:
            if not isinstance(message, (str, bytes, bytearray, memoryview)):
                raise TypeError(f"A WebSocket message must be str or bytes, not {type(message).__name__}.")
            frame = send_data(message)
            if len(frame) <= w._JOIN_LIMIT:
                small.append(frame)
            else:
                if small:
                    chunks.append(b"".join(small))
                    small = []
                chunks.append(frame)
        if small:
            chunks.append(b"".join(small))
        with self._write_lock:
            if self.closed:
                raise ConnectionClosed(self.close_code or w.ABNORMAL, self.close_reason or "")
            self._sendall_locked(chunks)

    def ping(self, payload: bytes = b"") -> None:
        payload = bytes(payload)
        if len(payload) > 125:
            raise ValueError("A ping payload is limited to 125 bytes.")
        frame = self._proto.ping(payload)
        with self._write_lock:
            if self.closed:
                raise ConnectionClosed(self.close_code or w.ABNORMAL, self.close_reason or "")
            self._sendall_locked((frame,))

    def _send_close_frame(self, code: int, reason: str) -> bool:
        frame = self._proto.close(code, reason)
        if not self._write_lock.acquire(timeout=self.close_timeout):
            self.abort()
            return False
        try:
            if self._shut:
                return False
            self._sock.sendall(frame)
            return True
        except OSError:
            return False
        finally:
            self._write_lock.release()


# --------------------------------------------------------------------------- fake socket and frames


class FakeSocket:
    """recv() hands out queued bytes, at most ``size`` at a time; sendall() counts."""

    def __init__(self) -> None:
        self.data = b""
        self.pos = 0
        self.sent = 0

    def queue(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def recv(self, size: int) -> bytes:
        if self.pos >= len(self.data):
            raise AssertionError("the benchmark read past its data")
        chunk = self.data[self.pos:self.pos + size]
        self.pos += len(chunk)
        return chunk

    def sendall(self, data: t.Any) -> None:
        self.sent += len(data)

    def shutdown(self, how: int) -> None:
        pass

    def setsockopt(self, *args: t.Any) -> None:
        pass


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked, final frame as a browser sends it."""
    key = os.urandom(4)
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 0x10000:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    mask = (key * (n // 4 + 1))[:n]
    return header + key + (int.from_bytes(payload, "little") ^ int.from_bytes(mask, "little")).to_bytes(n, "little")


def patch_doc() -> list[str]:
    header = json.dumps({"msgid": "1A2B3C4D5E", "msgtype": "PATCH-DOC", "num_buffers": 0})
    content = json.dumps({"events": [{"kind": "ModelChanged", "model": {"id": "p1001"}, "attr": "value",
                                      "new": 42.125}], "references": [],
                          "padding": "x" * 170})
    return [header, "{}", content]


# --------------------------------------------------------------------------- measure


def measure(cls: type[WebSocket], n: int, repeat: int) -> dict[str, float]:
    messages = patch_doc()
    patch_wire = b"".join(client_frame(1, m.encode()) for m in messages)
    big = os.urandom(MiB)
    big_wire = client_frame(2, big)
    out: dict[str, float] = {}

    def best(stmt: t.Callable[[], None], number: int) -> float:
        return min(timeit.repeat(stmt, number=number, repeat=repeat)) / number * 1e6

    sock = FakeSocket()
    ws = cls({}, sock)

    def patch_in() -> None:
        sock.queue(patch_wire)
        for m in messages:
            ws.receive()

    patch_in()
    assert sock.pos == len(patch_wire)
    out["patch_in_us"] = best(patch_in, n)
    out["patch_out_us"] = best(lambda: ws.send_many(messages), n)

    def big_in() -> None:
        sock.queue(big_wire)
        assert len(ws.receive()) == MiB

    big_in()
    out["mib_in_us"] = best(big_in, max(1, n // 200))
    out["mib_out_us"] = best(lambda: ws.send_many((big,)), max(1, n // 200))
    return out


def check(cls: type[WebSocket]) -> None:
    """Both implementations return the same messages and write the same bytes."""
    sock = FakeSocket()
    ws = cls({}, sock)
    messages = patch_doc()
    sock.queue(b"".join(client_frame(1, m.encode()) for m in messages) + client_frame(2, b"\x00\xff"))
    got = [ws.receive() for _ in range(4)]
    assert got == [*messages, b"\x00\xff"], got


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="PATCH-DOCs per timing (1 MiB: n/200)")
    parser.add_argument("--repeat", type=int, default=5, help="timings; the best is reported")
    args = parser.parse_args()

    import wsproto

    for cls in (WebSocket, WsprotoWebSocket):
        check(cls)
    print(f"python {platform.python_version()}, wsproto {wsproto.__version__}, "
          f"C unmask: {w._c_mask is not None}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    results = {name: measure(cls, args.n, args.repeat) for name, cls in (("own", WebSocket), ("wsproto", WsprotoWebSocket))}
    rows = [("PATCH-DOC in (3 masked frames, receive)", "patch_in_us"),
            ("PATCH-DOC out (3 frames, send_many)", "patch_out_us"),
            ("PATCH-DOC in + out", None),
            ("1 MiB binary in (masked, receive)", "mib_in_us"),
            ("1 MiB binary out (send_many)", "mib_out_us")]
    print(f"{'µs per message':42} {'own':>9} {'wsproto':>9} {'wsproto/own':>12}")
    for label, key in rows:
        if key is None:
            a = results["own"]["patch_in_us"] + results["own"]["patch_out_us"]
            b = results["wsproto"]["patch_in_us"] + results["wsproto"]["patch_out_us"]
        else:
            a, b = results["own"][key], results["wsproto"][key]
        print(f"{label:42} {a:9.1f} {b:9.1f} {b / a:11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
