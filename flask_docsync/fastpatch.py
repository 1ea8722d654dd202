"""A fast path for the PATCH-DOC messages a live document sends most.

Streaming and interactive apps send the same few events again and again:
rows streamed into a ``ColumnDataSource``, patched cells, and scalar
property changes (a Div's text, a slider's value). Bokeh's generic
serializer builds a reference for every model of the document for each of
them. :func:`encode_patch` writes those events directly, producing the
same JSON and binary buffers Bokeh would (``tests/test_fastpatch.py``
compares the two on many inputs), and returns ``None`` for anything else,
which then takes Bokeh's own path. :func:`ok_frames` does the same for the
OK reply every client patch gets.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from typing import Any

import numpy as np
from bokeh.document.events import ColumnsPatchedEvent, ColumnsStreamedEvent, ModelChangedEvent
from bokeh.util.serialization import BINARY_ARRAY_TYPES, array_encoding_disabled, transform_array

# JavaScript numbers hold integers exactly up to 2**53; Bokeh sends larger
# ones as floats with a warning, which the generic path keeps doing.
_MAX_SAFE_INT = 2**53 - 1

# Ids only need to be unique within a connection's stream; a prefix of our
# own keeps them apart from Bokeh's "p<counter>" ids.
_ids = itertools.count(1)

_ORDER = sys.byteorder
# ASCII-only output: a lone surrogate in a str (valid in JSON, which a client
# can send) has no UTF-8 encoding, so kept as is it would fail the send.
_dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
# A JSON string literal, as _dumps writes it.
_string = json.encoder.encode_basestring_ascii

# Native-order arrays of these types are sent exactly as they are:
# Bokeh's transform_array leaves them unchanged (no datetime or 64-bit
# integer conversion), so the copy can be taken without calling it.
_AS_IS = frozenset(BINARY_ARRAY_TYPES)


class _Fallback(Exception):
    """The value needs Bokeh's generic serializer."""


def _scalar(value: Any) -> Any:
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is int:
        if -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT:
            return value
        raise _Fallback
    if kind is float:
        if math.isnan(value):
            return {"type": "number", "value": "nan"}
        if math.isinf(value):
            return {"type": "number", "value": "-inf" if value < 0 else "+inf"}
        return value
    raise _Fallback


def _column_json(value: Any, buffers: list[tuple[str, bytes]]) -> str:
    """:func:`_column` written straight to JSON text (the streaming hot path)."""
    if (
        type(value) is np.ndarray
        and value.ndim == 1
        and value.dtype in _AS_IS
        and value.flags.c_contiguous
    ):
        buffer_id = f"d{next(_ids)}"
        buffers.append((buffer_id, value.tobytes()))
        return (
            '{"type":"ndarray","array":{"type":"bytes","data":{"id":"' + buffer_id + '"}},"shape":['
            + str(value.shape[0]) + '],"dtype":"' + value.dtype.name + '","order":"' + _ORDER + '"}'
        )
    return _dumps(_column(value, buffers))


def _column(value: Any, buffers: list[tuple[str, bytes]]) -> Any:
    if type(value) is list:
        return [_scalar(v) for v in value]
    if type(value) is np.ndarray and value.shape != () and value.dtype.kind != "O":
        array = transform_array(value)
        if array.dtype.kind in "UMm" or array_encoding_disabled(array):
            raise _Fallback
        buffer_id = f"d{next(_ids)}"
        # Copied now: the app may reuse its array before the writer sends it.
        buffers.append((buffer_id, array.tobytes()))
        return {
            "type": "ndarray",
            "array": {"type": "bytes", "data": {"id": buffer_id}},
            "shape": list(array.shape),
            "dtype": array.dtype.name,
            "order": _ORDER,
        }
    raise _Fallback


def _index(index: Any) -> Any:
    if type(index) is int:
        return _scalar(index)
    if type(index) is slice:
        return {"type": "slice", "start": _scalar(index.start), "stop": _scalar(index.stop),
                "step": _scalar(index.step)}
    raise _Fallback


def _patch_value(value: Any, buffers: list[tuple[str, bytes]]) -> Any:
    if type(value) is list or type(value) is np.ndarray:
        return _column(value, buffers)
    return _scalar(value)


def _map(items: Any) -> dict[str, Any]:
    entries = list(items)
    return {"type": "map", "entries": entries} if entries else {"type": "map"}


def _event_text(event: Any, buffers: list[tuple[str, bytes]]) -> str:
    """The JSON text of one event. The two commonest kinds are written
    directly, without building the dicts first; the key order is Bokeh's."""
    kind = type(event)
    if kind is ModelChangedEvent:
        return (
            '{"kind":"ModelChanged","model":{"id":' + _string(event.model.id) + '},"attr":'
            + _string(event.attr) + ',"new":' + _dumps(_scalar(event.new)) + "}"
        )
    if kind is ColumnsStreamedEvent:
        rollover = event.rollover
        if type(event.data) is not dict or type(rollover) not in (int, type(None)):
            raise _Fallback
        entries = ",".join(
            "[" + _dumps(_scalar(k)) + "," + _column_json(v, buffers) + "]" for k, v in event.data.items()
        )
        data = '{"type":"map","entries":[' + entries + "]}" if entries else '{"type":"map"}'
        return (
            '{"kind":"ColumnsStreamed","model":{"id":' + _string(event.model.id) + '},"attr":'
            + _string(event.attr) + ',"data":' + data + ',"rollover":'
            + ("null" if rollover is None else str(rollover)) + "}"
        )
    if kind is ColumnsPatchedEvent:
        return _dumps(_patched_json(event, buffers))
    raise _Fallback


def _patched_json(event: ColumnsPatchedEvent, buffers: list[tuple[str, bytes]]) -> dict[str, Any]:
    if type(event.patches) is not dict:
        raise _Fallback
    patches = _map(
        [_scalar(column), [_pair(pair, buffers) for pair in changes]]
        for column, changes in event.patches.items()
        if type(changes) is list or _fallback()
    )
    return {"kind": "ColumnsPatched", "model": event.model.ref, "attr": event.attr, "patches": patches}


def _pair(pair: Any, buffers: list[tuple[str, bytes]]) -> list[Any]:
    if type(pair) is not tuple or len(pair) != 2:
        raise _Fallback
    index, value = pair
    return [_index(index), _patch_value(value, buffers)]


def _fallback() -> bool:
    raise _Fallback


def encode_patch(event: Any) -> list[str | bytes] | None:
    """The frames of a one-event PATCH-DOC message, or ``None`` to use Bokeh's path."""
    buffers: list[tuple[str, bytes]] = []
    try:
        content = '{"events":[' + _event_text(event, buffers) + "]}"
    except (_Fallback, ValueError, TypeError):
        return None
    header = '{"msgid":"d' + str(next(_ids)) + '","msgtype":"PATCH-DOC","num_buffers":' + str(len(buffers)) + "}"
    frames: list[str | bytes] = [header, "{}", content]
    for buffer_id, data in buffers:
        frames.append('{"id":"' + buffer_id + '"}')
        frames.append(data)
    return frames


def ok_frames(reqid: Any) -> list[str | bytes]:
    """The frames of the OK reply to the client message ``reqid``.

    The same message as ``protocol.create("OK", reqid)``, which costs about
    as much as applying a small patch, without building it.
    """
    if type(reqid) is str:
        header = '{"msgid":"d' + str(next(_ids)) + '","msgtype":"OK","reqid":' + _string(reqid) + "}"
    else:
        # Any other JSON value the client used as its msgid, as Bokeh writes
        # it (no reqid key for null).
        fields = {"msgid": f"d{next(_ids)}", "msgtype": "OK"}
        if reqid is not None:
            fields["reqid"] = reqid
        header = json.dumps(fields)
    return [header, "{}", "{}"]
