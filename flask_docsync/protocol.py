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

from .errors import CloseCode, ProtocolViolation

# Bokeh 3.9 closes with 10000/10001, outside the valid range, which makes
# clients fail the close itself; every code here is a CloseCode.

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


def run_sync(coro: Any) -> Any:
    """Run a coroutine that never suspends (``Receiver.consume``)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("bokeh.protocol.Receiver.consume suspended; this Bokeh is not supported")


#: What each WebSocket message of a Bokeh message counts towards the size
#: limit besides its bytes: about what keeping it costs the server, so a
#: message of thousands of tiny buffers is bounded like any other.
FRAGMENT_COST = 64


def _wire_size(fragment: str | bytes) -> int:
    if isinstance(fragment, str) and not fragment.isascii():
        return len(fragment.encode("utf-8", "surrogatepass"))
    return len(fragment)


class MessageDecoder:
    """Assembles whole Bokeh messages from WebSocket messages, one at a time.

    The fragments of a message are kept as they arrived until the last one
    is in, and only then handed to Bokeh's receiver, which parses the
    metadata and content: a client that sends a large content and then
    never sends its buffers holds the server to the bytes it sent, not to
    the several times larger parsed JSON.

    Every violation raises :class:`~flask_docsync.errors.ProtocolViolation`
    with close code 1002, or 1009 for a message over the size limit; the
    caller ends the connection with it.

    :param max_message_size: The largest Bokeh message in bytes, header,
        metadata, content and every buffer together, plus
        :data:`FRAGMENT_COST` per fragment. Each WebSocket message is
        already under the transport's limit, but a Bokeh message is up to
        3 + 2 × :data:`MAX_BUFFERS` of them, so without a limit of its own
        one message could hold many times the configured size. ``None``
        means no limit.
    """

    def __init__(self, max_message_size: int | None = None) -> None:
        self._receiver: Receiver | None = Receiver(protocol)
        self._max_size = max_message_size
        self._fragments: list[str | bytes] = []
        self._expected = 0
        self._size = 0

    def feed(self, fragment: str | bytes) -> Message[Any] | None:
        """Consume one WebSocket message; return a message when one is complete."""
        fragments = self._fragments
        position = len(fragments)
        if position == 0:
            self._expected = 3 + 2 * self._check_header(fragment)
            self._size = 0
        elif position < 3 or position % 2 == 1:
            if not isinstance(fragment, str):
                part = ("metadata", "content")[position - 1] if position < 3 else "buffer header"
                raise ProtocolViolation(
                    CloseCode.PROTOCOL_ERROR, f"malformed message: expected a text frame with the {part}"
                )
            if position >= 3:
                self._check_buffer_header(fragment)
        elif not isinstance(fragment, bytes):
            raise ProtocolViolation(
                CloseCode.PROTOCOL_ERROR, "malformed message: expected a binary frame with a buffer payload"
            )
        self._size += _wire_size(fragment) + FRAGMENT_COST
        if self._max_size is not None and self._size > self._max_size:
            fragments.clear()
            raise ProtocolViolation(
                CloseCode.MESSAGE_TOO_BIG,
                f"message over the limit of {self._max_size} bytes (header, metadata,"
                " content and buffers together)",
            )
        fragments.append(fragment)
        if len(fragments) < self._expected:
            return None
        self._fragments = []
        message = None
        for part in fragments:
            message = self._consume(part)
        if message is None:  # pragma: no cover - the receiver counts as we do
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "malformed message: incomplete")
        if message.msgtype not in CLIENT_MESSAGE_TYPES:
            raise ProtocolViolation(
                CloseCode.PROTOCOL_ERROR,
                f"message type {message.msgtype!r} is sent by servers, not clients",
            )
        return message

    def _consume(self, fragment: str | bytes) -> Message[Any] | None:
        try:
            return run_sync(self._receiver.consume(fragment))  # type: ignore[union-attr]
        except (MessageError, ProtocolError, ValidationError) as exc:
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, f"malformed message: {exc}") from None
        except KeyError as exc:
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, f"unknown message type {exc}") from None
        except (ValueError, TypeError, AttributeError) as exc:
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, f"malformed message: {exc}") from None
        except RecursionError:
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "malformed message: JSON nested too deeply") from None

    def close(self) -> None:
        """Let go of the receiver and any partial message; the decoder is not fed again.

        Bokeh's ``Receiver`` keeps its next step as a bound method of
        itself, a reference cycle: left alone, the receiver of a closed
        connection (and the last message it assembled) waits for Python's
        next full collection, which runs rarely once the heap is large.
        """
        self._fragments = []
        receiver = self._receiver
        if receiver is not None:
            self._receiver = None
            vars(receiver).clear()

    @staticmethod
    def _check_buffer_header(fragment: str) -> None:
        # Checked on arrival, as Bokeh's receiver would, so a bad one is
        # refused at once rather than when the whole message is in.
        try:
            header = json.loads(fragment)
        except (ValueError, RecursionError):
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "malformed message: buffer header is not valid JSON") from None
        if not isinstance(header, dict) or set(header) != {"id"}:
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, f"malformed message: Malformed buffer header {header!r}")

    def _check_header(self, fragment: str | bytes) -> int:
        # Checked before Bokeh's receiver sees it so a bad header gets a clear
        # reason instead of a KeyError deep inside message assembly.
        if not isinstance(fragment, str):
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "expected a text frame with a message header")
        try:
            header = json.loads(fragment)
        except ValueError:
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "message header is not valid JSON") from None
        except RecursionError:
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "message header: JSON nested too deeply") from None
        if not isinstance(header, dict) or "msgtype" not in header or "msgid" not in header:
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "message header needs 'msgid' and 'msgtype'")
        msgtype = header["msgtype"]
        if not isinstance(msgtype, str) or msgtype not in protocol._messages:
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, f"unknown message type {msgtype!r}")
        if msgtype not in CLIENT_MESSAGE_TYPES:
            # Refused before its content arrives: nothing of it is used.
            raise ProtocolViolation(
                CloseCode.PROTOCOL_ERROR,
                f"message type {msgtype!r} is sent by servers, not clients",
            )
        num_buffers = header.get("num_buffers", 0)
        if type(num_buffers) is not int or not 0 <= num_buffers <= MAX_BUFFERS:
            raise ProtocolViolation(
                CloseCode.PROTOCOL_ERROR, f"num_buffers must be an integer from 0 to {MAX_BUFFERS}"
            )
        return num_buffers
