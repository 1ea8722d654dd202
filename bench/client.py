"""A cheap load client for the Bokeh server protocol, on plain asyncio.

It speaks HTTP/1.1 and RFC 6455 itself (no ``bokeh.client``, no websocket
library): a page GET over a short-lived connection to read the session
token, then a WebSocket whose frames are parsed in bulk inside
``asyncio.Protocol.data_received`` and whose outgoing Bokeh messages are
built as masked frames and written with one ``transport.write`` each.

A Bokeh message is a text header, a text metadata, a text content, then a
text buffer header and a binary payload per buffer (``num_buffers`` in the
header). Only the header is JSON-decoded on receipt; contents stay bytes
unless a caller asks for them.

Used by ``bench/run.py``; it works against ``bokeh serve`` and
``flask-docsync serve`` alike.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import struct
import time
from typing import Any

TOKEN_RE = re.compile(rb'"token"\s*:\s*"([^"]+)"')

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

_now = time.perf_counter


class BenchError(Exception):
    """A protocol step failed (bad status, wrong reply, closed connection)."""


# --------------------------------------------------------------------------- HTTP


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        end = body.find(b"\r\n", pos)
        if end < 0:
            raise BenchError("truncated chunked body")
        size = int(body[pos:end].split(b";", 1)[0], 16)
        if size == 0:
            return bytes(out)
        out += body[end + 2:end + 2 + size]
        pos = end + 2 + size + 2


async def http_get(host: str, port: int, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
    """GET ``path`` with ``Connection: close``; return ``(status, body)``."""

    async def go() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(
                (
                    f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    "User-Agent: docsync-bench\r\nAccept: text/html\r\nConnection: close\r\n\r\n"
                ).encode()
            )
            data = await reader.read(-1)
        finally:
            writer.close()
        head, sep, body = data.partition(b"\r\n\r\n")
        if not sep:
            raise BenchError(f"GET {path}: no complete response ({len(data)} bytes)")
        try:
            status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            raise BenchError(f"GET {path}: bad status line {head[:80]!r}") from None
        if b"transfer-encoding: chunked" in head.lower():
            body = _dechunk(body)
        return status, body

    return await asyncio.wait_for(go(), timeout)


async def get_token(host: str, port: int, app: str, timeout: float = 30.0) -> str:
    """GET the app page (which creates a session) and return its token."""
    status, body = await http_get(host, port, f"/{app}", timeout)
    if status != 200:
        raise BenchError(f"GET /{app}: HTTP {status}")
    match = TOKEN_RE.search(body)
    if match is None:
        raise BenchError(f"GET /{app}: no token in the page")
    return match.group(1).decode()


# --------------------------------------------------------------------------- WebSocket


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return payload
    keys = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(keys, "little")).to_bytes(n, "little")


def frame(opcode: int, payload: bytes, key: bytes) -> bytes:
    """One masked client frame (FIN set)."""
    n = len(payload)
    b0 = 0x80 | opcode
    if n < 126:
        head = struct.pack("!BB", b0, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, n)
    return head + key + _mask(payload, key)


class BokehConnection(asyncio.Protocol):
    """One WebSocket to a Bokeh session.

    Replies are matched to requests by ``reqid``; PATCH-DOC messages from the
    server are counted (``patches``, ``streamed`` for ColumnsStreamed) and, if
    ``patch_waiter`` is set to ``(needle, future)``, the first PATCH-DOC whose
    content contains ``needle`` resolves the future with its arrival time.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.handshake: asyncio.Future[None] = loop.create_future()
        self.ack: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._hs_buf = b""
        self._hs_done = False
        self._buf = bytearray()
        self._frag_op: int | None = None
        self._frag: list[bytes] = []
        self._header: dict[str, Any] | None = None
        self._frames: list[bytes] = []
        self._need = 0
        self._key = os.urandom(4)
        self._ids = itertools.count(1)
        self.waiters: dict[str, asyncio.Future[Any]] = {}
        self.patch_waiter: tuple[bytes, asyncio.Future[float]] | None = None
        self.pong_waiter: asyncio.Future[float] | None = None
        self.patches = 0
        self.streamed = 0
        self.errors = 0
        self.close_code: int | None = None
        self._sent_close = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        err = BenchError(f"connection lost ({exc or 'closed'}, code {self.close_code})")
        for fut in (self.handshake, self.ack):
            if not fut.done():
                fut.set_exception(err)
        for fut in self.waiters.values():
            if not fut.done():
                fut.set_exception(err)
        self.waiters.clear()
        if self.patch_waiter is not None and not self.patch_waiter[1].done():
            self.patch_waiter[1].set_exception(err)
        if self.pong_waiter is not None and not self.pong_waiter.done():
            self.pong_waiter.set_exception(err)
        if not self.closed.done():
            self.closed.set_result(None)
        # Futures nobody awaits must not log "exception never retrieved".
        for fut in (self.handshake, self.ack):
            if fut.done() and not fut.cancelled():
                fut.exception()

    def data_received(self, data: bytes) -> None:
        if not self._hs_done:
            self._hs_buf += data
            head, sep, rest = self._hs_buf.partition(b"\r\n\r\n")
            if not sep:
                return
            self._hs_done = True
            self._hs_buf = b""
            status = head.split(b" ", 2)[1:2]
            if status != [b"101"]:
                if not self.handshake.done():
                    self.handshake.set_exception(
                        BenchError(f"WebSocket upgrade refused: {head.splitlines()[0].decode(errors='replace')}")
                    )
                self.transport.close()
                return
            self.handshake.set_result(None)
            data = rest
            if not data:
                return
        buf = self._buf
        buf += data
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0 = buf[pos]
            n = buf[pos + 1] & 0x7F
            hdr = 2
            if n == 126:
                if end - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                hdr = 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2:pos + 10], "big")
                hdr = 10
            if end - pos < hdr + n:
                break
            payload = bytes(buf[pos + hdr:pos + hdr + n])
            pos += hdr + n
            opcode = b0 & 0x0F
            if opcode >= OP_CLOSE:
                self._control(opcode, payload)
                continue
            if not b0 & 0x80:  # fragmented data message
                if opcode != OP_CONT:
                    self._frag_op = opcode
                self._frag.append(payload)
                continue
            if opcode == OP_CONT:
                self._frag.append(payload)
                payload = b"".join(self._frag)
                self._frag = []
                opcode = self._frag_op or OP_TEXT
                self._frag_op = None
            self._fragment(payload)
        if pos:
            del buf[:pos]

    # frames -> Bokeh messages

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            self.transport.write(frame(OP_PONG, payload, self._key))
        elif opcode == OP_PONG:
            w = self.pong_waiter
            if w is not None and not w.done():
                w.set_result(_now())
        elif opcode == OP_CLOSE:
            if len(payload) >= 2:
                self.close_code = struct.unpack("!H", payload[:2])[0]
            if not self._sent_close:
                self._sent_close = True
                self.transport.write(frame(OP_CLOSE, payload[:2], self._key))
            self.transport.close()

    def _fragment(self, payload: bytes) -> None:
        if self._header is None:
            header = json.loads(payload)
            self._header = header
            self._frames = [payload]
            self._need = 2 + 2 * header.get("num_buffers", 0)
            return
        self._frames.append(payload)
        self._need -= 1
        if self._need == 0:
            header, frames = self._header, self._frames
            self._header = None
            self._frames = []
            self._message(header, frames)

    def _message(self, header: dict[str, Any], frames: list[bytes]) -> None:
        msgtype = header["msgtype"]
        reqid = header.get("reqid")
        if reqid is not None:
            fut = self.waiters.pop(reqid, None)
            if fut is not None and not fut.done():
                fut.set_result((header, frames))
            return
        if msgtype == "PATCH-DOC":
            self.patches += 1
            content = frames[2]
            if b'"ColumnsStreamed"' in content:
                self.streamed += 1
            w = self.patch_waiter
            if w is not None and w[0] in content and not w[1].done():
                w[1].set_result(_now())
        elif msgtype == "ACK":
            if not self.ack.done():
                self.ack.set_result(None)
        elif msgtype == "ERROR":
            self.errors += 1

    # sending

    def send_message(self, msgtype: str, content: bytes = b"{}") -> str:
        msgid = str(next(self._ids))
        header = b'{"msgid":"%s","msgtype":"%s"}' % (msgid.encode(), msgtype.encode())
        key = self._key
        self.transport.write(
            frame(OP_TEXT, header, key) + frame(OP_TEXT, b"{}", key) + frame(OP_TEXT, content, key)
        )
        return msgid

    async def request(
        self, msgtype: str, content: bytes = b"{}", timeout: float = 30.0
    ) -> tuple[dict[str, Any], list[bytes]]:
        msgid = self.send_message(msgtype, content)
        fut = self.loop.create_future()
        self.waiters[msgid] = fut
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.waiters.pop(msgid, None)

    async def pull(self, timeout: float = 30.0) -> tuple[dict[str, Any], list[bytes]]:
        header, frames = await self.request("PULL-DOC-REQ", b"{}", timeout)
        if header["msgtype"] != "PULL-DOC-REPLY":
            raise BenchError(f"PULL-DOC-REQ answered with {header['msgtype']}: {frames[2][:200]!r}")
        return header, frames

    async def set_property(self, model_id: str, attr: str, value: Any, timeout: float = 30.0) -> None:
        """PATCH-DOC ModelChanged and wait for the OK."""
        content = json.dumps(
            {"events": [{"kind": "ModelChanged", "model": {"id": model_id}, "attr": attr, "new": value}]},
            separators=(",", ":"),
        ).encode()
        header, frames = await self.request("PATCH-DOC", content, timeout)
        if header["msgtype"] != "OK":
            raise BenchError(f"PATCH-DOC answered with {header['msgtype']}: {frames[2][:200]!r}")

    async def round_trip(self, slider_id: str, value: int, timeout: float = 30.0) -> float:
        """Set the slider and return seconds until the callback's PATCH-DOC arrives.

        Also waits for the OK reply, so at most one request is in flight.
        """
        patch: asyncio.Future[float] = self.loop.create_future()
        self.patch_waiter = (b'"value=%d"' % value, patch)
        content = b'{"events":[{"kind":"ModelChanged","model":{"id":"%s"},"attr":"value","new":%d}]}' % (
            slider_id.encode(), value,
        )
        t0 = _now()
        msgid = self.send_message("PATCH-DOC", content)
        ok = self.loop.create_future()
        self.waiters[msgid] = ok
        try:
            arrived = await asyncio.wait_for(patch, timeout)
            header, frames = await asyncio.wait_for(ok, timeout)
        finally:
            self.waiters.pop(msgid, None)
            self.patch_waiter = None
        if header["msgtype"] != "OK":
            raise BenchError(f"PATCH-DOC answered with {header['msgtype']}: {frames[2][:200]!r}")
        return arrived - t0

    async def ping(self, timeout: float = 600.0) -> float:
        """A WebSocket ping; seconds until its pong (a probe of the server's event loop)."""
        fut: asyncio.Future[float] = self.loop.create_future()
        self.pong_waiter = fut
        t0 = _now()
        self.transport.write(frame(OP_PING, b"probe", self._key))
        try:
            return await asyncio.wait_for(fut, timeout) - t0
        finally:
            self.pong_waiter = None

    async def close(self, timeout: float = 5.0) -> None:
        """Send close 1000, wait for the server to close (bounded), drop TCP."""
        if self.transport is None or self.closed.done():
            return
        if not self._sent_close:
            self._sent_close = True
            try:
                self.transport.write(frame(OP_CLOSE, struct.pack("!H", 1000), self._key))
            except Exception:
                pass
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def connect(host: str, port: int, app: str, token: str, timeout: float = 30.0) -> BokehConnection:
    """Open the WebSocket of ``app`` with subprotocols ``["bokeh", token]`` and wait for ACK."""
    loop = asyncio.get_running_loop()
    _, conn = await asyncio.wait_for(
        loop.create_connection(lambda: BokehConnection(loop), host, port), timeout
    )
    key = base64.b64encode(os.urandom(16)).decode()
    conn.transport.write(
        (
            f"GET /{app}/ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: bokeh, {token}\r\nOrigin: http://{host}:{port}\r\n"
            "User-Agent: docsync-bench\r\n\r\n"
        ).encode()
    )
    try:
        await asyncio.wait_for(conn.handshake, timeout)
        await asyncio.wait_for(conn.ack, timeout)
    except BaseException:
        conn.abort()
        raise
    return conn


async def open_session(
    host: str, port: int, app: str, timeout: float = 30.0, pull: bool = True
) -> tuple[BokehConnection, bytes | None]:
    """Page GET (token), WebSocket, ACK and PULL-DOC; return the connection and the pulled content."""
    token = await get_token(host, port, app, timeout)
    conn = await connect(host, port, app, token, timeout)
    if not pull:
        return conn, None
    try:
        _, frames = await conn.pull(timeout)
    except BaseException:
        conn.abort()
        raise
    return conn, frames[2]


def find_model_id(content: bytes, name: str) -> str:
    """Id of the model called ``name`` in a PULL-DOC-REPLY content."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if found:
            return
        if isinstance(node, dict):
            attrs = node.get("attributes")
            if isinstance(attrs, dict) and attrs.get("name") == name and "id" in node:
                found.append(node["id"])
                return
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(content))
    if not found:
        raise BenchError(f"no model named {name!r} in the pulled document")
    return found[0]
