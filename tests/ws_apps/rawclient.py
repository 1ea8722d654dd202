"""A minimal WebSocket client over a plain socket, for protocol edge cases
that websocket-client refuses to produce (unmasked frames, bad opcodes,
oversized headers...). Works with stdlib and gevent sockets alike.
"""

import base64
import hashlib
import os
import socket
import struct

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def build_frame(opcode, payload=b"", fin=True, mask=True, rsv=0, length=None):
    """Build a client frame. ``length`` overrides the declared payload
    length, to announce more than is sent."""
    if length is None:
        length = len(payload)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if mask else 0
    if length < 126:
        header = struct.pack("!BB", first, mask_bit | length)
    elif length < 0x10000:
        header = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, length)
    if not mask:
        return header + payload
    key = os.urandom(4)
    n = len(payload)
    masked = (
        int.from_bytes(payload, "little")
        ^ int.from_bytes((key * (n // 4 + 1))[:n], "little")
    ).to_bytes(n, "little")
    return header + key + masked


def close_payload(code, reason=b""):
    return struct.pack("!H", code) + reason


class RawClient:
    def __init__(self, sock, buffered=b""):
        self.sock = sock
        self.buf = bytearray(buffered)
        self.status = None
        self.headers = {}

    @classmethod
    def connect(cls, port, protocols="bokeh, sometoken", extra=(), key=None,
                version="13", path="/ws", timeout=10.0, pipelined=b""):
        """Open a connection and do the handshake. ``pipelined`` is sent in
        the same write as the request, before the response is read."""
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = key or base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            f"Sec-WebSocket-Version: {version}",
        ]
        if protocols:
            lines.append(f"Sec-WebSocket-Protocol: {protocols}")
        lines.extend(extra)
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + pipelined)
        client = cls(sock)
        client.key = key
        client.read_response()
        return client

    def read_response(self):
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"EOF during handshake: {bytes(self.buf)!r}")
            self.buf += data
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        return self.status

    def expected_accept(self):
        return base64.b64encode(
            hashlib.sha1((self.key + GUID).encode()).digest()
        ).decode()

    def read_body(self):
        # For error responses: read to EOF or Content-Length.
        length = int(self.headers.get("content-length", "-1"))
        while length < 0 or len(self.buf) < length:
            try:
                data = self.sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            self.buf += data
        return bytes(self.buf)

    def send_frame(self, opcode, payload=b"", **kwargs):
        self.sock.sendall(build_frame(opcode, payload, **kwargs))

    def send_text(self, text):
        self.send_frame(1, text.encode())

    def _need(self, n):
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"EOF with {len(self.buf)} of {n} bytes buffered")
            self.buf += data

    def recv_frame(self):
        """Return (fin, opcode, payload) of the next server frame."""
        self._need(2)
        b0, b1 = self.buf[0], self.buf[1]
        assert not b1 & 0x80, "server frames must not be masked"
        length = b1 & 0x7F
        offset = 2
        if length == 126:
            self._need(4)
            length = struct.unpack_from("!H", self.buf, 2)[0]
            offset = 4
        elif length == 127:
            self._need(10)
            length = struct.unpack_from("!Q", self.buf, 2)[0]
            offset = 10
        self._need(offset + length)
        payload = bytes(self.buf[offset:offset + length])
        del self.buf[:offset + length]
        return bool(b0 & 0x80), b0 & 0x0F, payload

    def recv_close(self):
        """Skip data frames up to a close frame; return (code, reason, raw payload)."""
        while True:
            _, opcode, payload = self.recv_frame()
            if opcode == 8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                return code, payload[2:].decode("utf-8"), payload

    def at_eof(self):
        """True once the server ended the TCP connection (FIN or reset)."""
        if self.buf:
            return False
        try:
            return self.sock.recv(65536) == b""
        except ConnectionResetError:
            return True

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
