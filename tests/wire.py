"""A raw Bokeh-protocol client for tests, on websocket-client.

It speaks the wire format directly (three text frames plus buffer pairs), so
tests can send what BokehJS and bokeh.client never would.
"""

from __future__ import annotations

import itertools
import json
import re
import ssl
import urllib.request
from typing import Any

import websocket

_ids = itertools.count(1)


def fetch_token(page_url: str, context: ssl.SSLContext | None = None) -> str:
    """Load an app page and return the session token embedded in it (``context`` for https)."""
    with urllib.request.urlopen(page_url, timeout=10, context=context) as response:
        html = response.read().decode("utf-8")
    match = re.search(r'"token":\s*"([A-Za-z0-9_.\-]+)"', html) or re.search(r'\\"token\\":\s*\\"([A-Za-z0-9_.\-]+)\\"', html)
    if not match:
        raise AssertionError("no token in page: " + html[:2000])
    return match.group(1)


class Message:
    def __init__(self, header: dict[str, Any], metadata: dict[str, Any], content: Any, buffers: list[tuple[dict[str, Any], bytes]]):
        self.header = header
        self.metadata = metadata
        self.content = content
        self.buffers = buffers

    @property
    def msgtype(self) -> str:
        return self.header["msgtype"]

    def __repr__(self) -> str:
        return f"<Message {self.msgtype} {self.header} {str(self.content)[:200]}>"


class WireClient:
    """A WebSocket speaking the Bokeh protocol by hand."""

    def __init__(self, ws_url: str, token: str | None, origin: str | None = None,
                 subprotocols: list[str] | None = None, timeout: float = 10.0,
                 context: ssl.SSLContext | None = None) -> None:
        protocols = subprotocols if subprotocols is not None else ["bokeh", token]
        kwargs: dict[str, Any] = {"subprotocols": protocols, "timeout": timeout}
        if context is not None:
            kwargs["sslopt"] = {"context": context}
        if origin is not None:
            kwargs["origin"] = origin
        else:
            kwargs["suppress_origin"] = True
        self.ws = websocket.create_connection(ws_url, **kwargs)

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass

    def __enter__(self) -> WireClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def send_raw(self, *frames: str | bytes) -> None:
        for frame in frames:
            if isinstance(frame, bytes):
                self.ws.send_binary(frame)
            else:
                self.ws.send(frame)

    def send(self, msgtype: str, content: Any, buffers: list[tuple[str, bytes]] = (), msgid: str | None = None, **header: Any) -> str:
        msgid = msgid or f"t{next(_ids)}"
        hdr = {"msgid": msgid, "msgtype": msgtype, **header}
        if buffers:
            hdr["num_buffers"] = len(buffers)
        frames: list[str | bytes] = [json.dumps(hdr), "{}", json.dumps(content)]
        for buf_id, payload in buffers:
            frames += [json.dumps({"id": buf_id}), payload]
        self.send_raw(*frames)
        return msgid

    def recv_frame(self) -> tuple[int, Any]:
        opcode, data = self.ws.recv_data()
        return opcode, data

    def recv(self) -> Message:
        header = json.loads(self._text())
        metadata = json.loads(self._text())
        content = json.loads(self._text())
        buffers = []
        for _ in range(header.get("num_buffers", 0) or 0):
            ref = json.loads(self._text())
            opcode, data = self.ws.recv_data()
            assert opcode == websocket.ABNF.OPCODE_BINARY, opcode
            buffers.append((ref, data))
        return Message(header, metadata, content, buffers)

    def _text(self) -> str:
        opcode, data = self.ws.recv_data()
        assert opcode == websocket.ABNF.OPCODE_TEXT, (opcode, data[:100])
        return data.decode("utf-8")

    def recv_until(self, msgtype: str, reqid: str | None = None, limit: int = 100) -> tuple[Message, list[Message]]:
        """Receive until a message of ``msgtype`` (with ``reqid``); return it and what came before."""
        before = []
        for _ in range(limit):
            msg = self.recv()
            if msg.msgtype == msgtype and (reqid is None or msg.header.get("reqid") == reqid):
                return msg, before
            before.append(msg)
        raise AssertionError(f"no {msgtype} in {limit} messages: {before}")

    def handshake(self) -> Message:
        """Expect ACK, pull the document; return the PULL-DOC-REPLY."""
        ack = self.recv()
        assert ack.msgtype == "ACK", ack
        reqid = self.send("PULL-DOC-REQ", {})
        reply, _ = self.recv_until("PULL-DOC-REPLY", reqid)
        return reply

    def expect_close(self) -> tuple[int | None, str]:
        """Read until the server closes; return the close code and reason."""
        while True:
            try:
                frame = self.ws.recv_frame()
            except websocket.WebSocketConnectionClosedException:
                return None, ""
            if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
                data = frame.data
                code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
                return code, data[2:].decode("utf-8", "replace")


def find_model(doc_json: dict[str, Any], name: str) -> dict[str, Any]:
    """Find a serialized model by its ``name`` anywhere in a PULL-DOC-REPLY doc."""
    found: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and node.get("attributes", {}).get("name") == name:
                found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc_json)
    if not found:
        raise KeyError(name)
    return found[0]
