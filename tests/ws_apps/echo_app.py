"""Echo WSGI application used by tests/test_websocket.py.

``/ws`` accepts a WebSocket (selecting ``bokeh`` when offered) and echoes
every message back with ``send_many``. Text messages starting with ``cmd:``
are commands that let a test drive the server side:

``cmd:mix``                   send Bokeh's frame pattern, opcodes [1,1,1,1,2,1,2]
``cmd:close:<code>:<reason>`` call ``close(code, reason)``
``cmd:close_later:<code>``    close from another greenlet while receive() waits
``cmd:ping:<payload>``        send a ping
``cmd:last_pong``             reply with ``repr(ws.last_pong)``
``cmd:info``                  reply with the subprotocol and the server kind
``cmd:abort``                 drop TCP without a close frame

Any other path answers a plain ``200 hello``.
"""

import json
import os
import sys

import gevent
from gevent import monkey

from flask_docsync.errors import ConnectionClosed
from flask_docsync.errors import HandshakeError
from flask_docsync.websocket import is_websocket_request
from flask_docsync.websocket import requested_subprotocols
from flask_docsync.websocket import validate_upgrade
from flask_docsync.websocket import WebSocket

MAX_MESSAGE_SIZE = int(os.environ.get("WS_MAX_MESSAGE_SIZE", 20 * 1024 * 1024))


def handle_command(ws, command):
    name, _, arg = command.partition(":")
    if name == "mix":
        ws.send_many(["header", "{}", "content", "ref1", b"\x00buf1", "ref2", b"\x01buf2"])
    elif name == "close":
        code, _, reason = arg.partition(":")
        ws.close(int(code), reason)
    elif name == "close_later":
        # The main greenlet is back in receive() by the time this runs.
        gevent.spawn_later(0.1, ws.close, int(arg), "from another greenlet")
    elif name == "ping":
        ws.ping(arg.encode())
    elif name == "last_pong":
        ws.send(repr(ws.last_pong))
    elif name == "info":
        ws.send(json.dumps({
            "subprotocol": ws.subprotocol,
            "class": type(ws).__name__,
            "offered": requested_subprotocols(ws.environ),
            "server": ws.environ.get("SERVER_SOFTWARE", ""),
            "patched": monkey.is_module_patched("socket"),
        }))
    elif name == "abort":
        ws.abort()
    else:
        ws.send("unknown command " + command)


def plain(start_response, status, body, headers=()):
    start_response(status, [
        ("Content-Type", "text/plain"),
        ("Content-Length", str(len(body))),
        *headers,
    ])
    return [body]


def app(environ, start_response):
    if environ.get("PATH_INFO") != "/ws":
        return plain(start_response, "200 OK", b"hello")

    if not is_websocket_request(environ):
        return plain(start_response, "400 Bad Request", b"WebSocket only")

    try:
        validate_upgrade(environ)
    except HandshakeError as exc:
        return plain(start_response, f"{exc.status} Refused", exc.reason.encode(), exc.headers)

    offered = requested_subprotocols(environ)
    ws = WebSocket.accept(
        environ,
        subprotocol="bokeh" if "bokeh" in offered else None,
        max_message_size=MAX_MESSAGE_SIZE,
    )
    try:
        while True:
            message = ws.receive()
            if isinstance(message, str) and message.startswith("cmd:"):
                handle_command(ws, message[4:])
            else:
                ws.send_many([message])
    except ConnectionClosed as exc:
        print(f"closed {exc.code} {type(exc).__name__}", file=sys.stderr, flush=True)
    return ws.wsgi_response()


# gevent-websocket answers the handshake itself and only selects a
# subprotocol when the application object says which one it speaks.
app.app_protocol = lambda path: "bokeh"
