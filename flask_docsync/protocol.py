"""Bokeh wire protocol framing, without any transport.

A Bokeh message travels as three text WebSocket messages (header, metadata,
content) followed by a text buffer header and a binary payload per buffer.
Messages are built and parsed with Bokeh's own ``bokeh.protocol`` classes;
this module turns them into frames and back and says which close code ends
a connection for which violation.
"""

from __future__ import annotations

import json
from typing import Any

from bokeh.protocol import Protocol
from bokeh.protocol.exceptions import MessageError, ProtocolError, ValidationError
from bokeh.protocol.message import Message
from bokeh.protocol.receiver import Receiver

from .errors import ProtocolViolation

# RFC 6455 close codes used by the server. Bokeh 3.9 sends 10000/10001,
# which are outside the valid range and make clients fail the close itself.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_SERVICE_RESTART = 1012
CLOSE_TRY_AGAIN_LATER = 1013

#: Message types a client may send; the others are server-to-client only.
CLIENT_MESSAGE_TYPES = frozenset({"PULL-DOC-REQ", "PUSH-DOC", "PATCH-DOC", "SERVER-INFO-REQ"})

#: A client declaring more buffers than this is refused at once rather than
#: left holding server state for frames that will never come.
MAX_BUFFERS = 10_000

#: Deepest JSON nesting accepted in the content of a client's PATCH-DOC or
#: PUSH-DOC. Bokeh's serializer gives up (RecursionError) at a little over
#: 200 levels, so a value nested deeper could be stored but never sent
#: again: the session could no longer be pulled.
MAX_CONTENT_DEPTH = 128

protocol = Protocol()

Frame = "str | bytes"


def encode(message: Message[Any]) -> list[str | bytes]:
    """Frames of ``message`` in wire order, ready for one atomic send."""
    frames: list[str | bytes] = [message.header_json, message.metadata_json, message.content_json]
    for buffer in message.buffers:
        frames.append(json.dumps(buffer.ref))
        frames.append(buffer.to_bytes())
    return frames


def check_content_depth(message: Message[Any], limit: int = MAX_CONTENT_DEPTH) -> None:
    """Raise ``ValueError`` when the message content nests deeper than ``limit``."""
    text = message.content_json
    if text.count("[") + text.count("{") <= limit:
        return  # cannot be deeper: skip the walk for the usual small patch
    stack = [(message.content, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise ValueError(f"message content nested more than {limit} levels deep")
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))


def _run_sync(coro: Any) -> Any:
    """Run a coroutine that never suspends (``Receiver.consume``)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("bokeh.protocol.Receiver.consume suspended; this Bokeh is not supported")


class MessageDecoder:
    """Assembles whole Bokeh messages from WebSocket messages, one at a time.

    Every violation raises :class:`~flask_docsync.errors.ProtocolViolation`
    with close code 1002; the caller ends the connection with it.
    """

    def __init__(self) -> None:
        self._receiver: Receiver | None = Receiver(protocol)
        self._expect_header = True

    def feed(self, fragment: str | bytes) -> Message[Any] | None:
        """Consume one WebSocket message; return a message when one is complete."""
        if self._expect_header:
            self._check_header(fragment)
        try:
            message = _run_sync(self._receiver.consume(fragment))  # type: ignore[union-attr]
        except (MessageError, ProtocolError, ValidationError) as exc:
            raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, f"malformed message: {exc}") from None
        except KeyError as exc:
            raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, f"unknown message type {exc}") from None
        except (ValueError, TypeError, AttributeError) as exc:
            raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, f"malformed message: {exc}") from None
        except RecursionError:
            raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "malformed message: JSON nested too deeply") from None
        self._expect_header = message is not None
        if message is not None and message.msgtype not in CLIENT_MESSAGE_TYPES:
            raise ProtocolViolation(
                CLOSE_PROTOCOL_ERROR,
                f"message type {message.msgtype!r} is sent by servers, not clients",
            )
        return message

    def close(self) -> None:
        """Let go of the receiver; the decoder is not fed again.

        Bokeh's ``Receiver`` keeps its next step as a bound method of
        itself, a reference cycle: left alone, the receiver of a closed
        connection (and the last message it assembled) waits for Python's
        next full collection, which runs rarely once the heap is large.
        """
        receiver = self._receiver
        if receiver is not None:
            self._receiver = None
            vars(receiver).clear()

    def _check_header(self, fragment: str | bytes) -> None:
        # Checked before Bokeh's receiver sees it so a bad header gets a clear
        # reason instead of a KeyError deep inside message assembly.
        if not isinstance(fragment, str):
            raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "expected a text frame with a message header")
        try:
            header = json.loads(fragment)
        except ValueError:
            raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "message header is not valid JSON") from None
        except RecursionError:
            raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "message header: JSON nested too deeply") from None
        if not isinstance(header, dict) or "msgtype" not in header or "msgid" not in header:
            raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "message header needs 'msgid' and 'msgtype'")
        msgtype = header["msgtype"]
        if not isinstance(msgtype, str) or msgtype not in protocol._messages:
            raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, f"unknown message type {msgtype!r}")
        num_buffers = header.get("num_buffers", 0)
        if not isinstance(num_buffers, int) or not 0 <= num_buffers <= MAX_BUFFERS:
            raise ProtocolViolation(
                CLOSE_PROTOCOL_ERROR, f"num_buffers must be an integer from 0 to {MAX_BUFFERS}"
            )
