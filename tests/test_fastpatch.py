"""The fast PATCH-DOC encoder gives what Bokeh's serializer gives, or defers to it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from bokeh.document import Document
from bokeh.models import ColumnDataSource, Div, Slider
from hypothesis import given, settings
from hypothesis import strategies as st

from flask_docsync.fastpatch import encode_patch, ok_frames
from flask_docsync.protocol import encode, protocol


def capture(doc: Document, change) -> list:
    events = []
    doc.callbacks.on_change(events.append)
    change()
    doc.callbacks.remove_on_change(events.append)
    return events


def normalized(frames: list) -> tuple:
    """Parsed frames with message and buffer ids replaced by their order."""
    header = json.loads(frames[0])
    content = frames[2]
    refs = []
    buffers = []
    for ref, payload in zip(frames[3::2], frames[4::2]):
        buffer_id = json.loads(ref)["id"]
        refs.append(buffer_id)
        buffers.append(bytes(payload))
    for n, buffer_id in enumerate(refs):
        content = content.replace(f'"{buffer_id}"', f'"BUF{n}"')
    header.pop("msgid")
    return header, json.loads(frames[1]), json.loads(content), buffers


def bokeh_frames(event) -> list:
    return encode(protocol.create("PATCH-DOC", [event]))


def assert_same_as_bokeh(event) -> None:
    fast = encode_patch(event)
    assert fast is not None, f"fast path declined {event!r}"
    assert normalized(fast) == normalized(bokeh_frames(event))


@pytest.fixture
def doc():
    d = Document()
    d.add_root(ColumnDataSource(data={"x": [], "y": [], "s": []}, name="src"))
    d.add_root(Div(text="a", name="div"))
    d.add_root(Slider(start=0, end=10, value=1, name="slider"))
    d.to_json()  # every model is now known to clients
    return d


@pytest.mark.parametrize("value", ["text", "ünï", "", "<b>"])
def test_text_changes_match(doc, value):
    div = doc.select_one({"name": "div"})
    [event] = capture(doc, lambda: setattr(div, "text", value))
    assert_same_as_bokeh(event)


def test_boolean_and_none_changes_match(doc):
    div = doc.select_one({"name": "div"})
    [hidden] = capture(doc, lambda: setattr(div, "visible", False))
    assert_same_as_bokeh(hidden)
    [untitled] = capture(doc, lambda: setattr(doc.select_one({"name": "slider"}), "title", None))
    assert_same_as_bokeh(untitled)


@pytest.mark.parametrize("value", [0, 3, 7.5, -2.25])
def test_number_changes_match(doc, value):
    slider = doc.select_one({"name": "slider"})
    [event] = capture(doc, lambda: setattr(slider, "value", value))
    assert_same_as_bokeh(event)


@pytest.mark.parametrize("dtype", ["float64", "float32", "int32", "int64", "uint8", "int16", "bool"])
def test_streamed_arrays_match(doc, dtype):
    source = doc.select_one({"name": "src"})
    new = {"x": np.arange(5).astype(dtype), "y": np.linspace(0, 1, 5), "s": ["a", "b", "c", "d", "e"]}
    [event] = capture(doc, lambda: source.stream(new, rollover=100))
    assert_same_as_bokeh(event)


def test_streamed_lists_with_nan_and_infinity_match(doc):
    source = doc.select_one({"name": "src"})
    new = {"x": [1.0, math.nan, math.inf], "y": [-math.inf, 2, 3], "s": ["p", "q", None]}
    [event] = capture(doc, lambda: source.stream(new))
    assert_same_as_bokeh(event)


def test_patched_cells_and_slices_match(doc):
    source = doc.select_one({"name": "src"})
    capture(doc, lambda: source.stream({"x": np.arange(10.0), "y": np.arange(10.0), "s": list("abcdefghij")}))
    patches = {"x": [(0, 99.0), (slice(2, 5), np.array([1.0, 2.0, 3.0]))], "s": [(1, "zz"), (slice(None, 2), ["m", "n"])]}
    [event] = capture(doc, lambda: source.patch(patches))
    assert_same_as_bokeh(event)


def test_other_values_take_bokehs_path(doc):
    source = doc.select_one({"name": "src"})
    div = doc.select_one({"name": "div"})
    [replaced] = capture(doc, lambda: setattr(source, "data", {"x": [1], "y": [2], "s": ["a"]}))
    assert encode_patch(replaced) is None  # ColumnDataChanged
    [styled] = capture(doc, lambda: setattr(div, "styles", {"color": "red"}))
    assert encode_patch(styled) is None  # a dict value
    [big] = capture(doc, lambda: setattr(doc.select_one({"name": "slider"}), "end", 2**60))
    assert encode_patch(big) is None  # out of JavaScript's exact integer range
    times = ColumnDataSource(data={"t": np.array([], dtype="datetime64[ms]")})
    doc.add_root(times)
    doc.to_json()
    [dates] = capture(doc, lambda: times.stream({"t": np.array(["2024-01-01"], dtype="datetime64[ms]")}))
    # Bokeh sends datetimes as float milliseconds; the fast path must agree.
    assert_same_as_bokeh(dates)


@settings(max_examples=150, deadline=None)
@given(
    floats=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=1, max_size=8),
    texts=st.lists(st.text(max_size=10), min_size=1, max_size=8),
    ints=st.lists(st.integers(min_value=-(2**31), max_value=2**31 - 1), min_size=1, max_size=8),
    as_array=st.booleans(),
)
def test_random_streams_match(floats, texts, ints, as_array):
    n = min(len(floats), len(texts), len(ints))
    doc = Document()
    source = ColumnDataSource(data={"x": [], "y": [], "s": []})
    doc.add_root(source)
    doc.to_json()
    x = np.array(floats[:n]) if as_array else floats[:n]
    y = np.array(ints[:n]) if as_array else ints[:n]
    [event] = capture(doc, lambda: source.stream({"x": x, "y": y, "s": texts[:n]}))
    assert_same_as_bokeh(event)


@pytest.mark.parametrize("reqid", ["m1", "1234", "é\"\\", 17, None, 1.5])
def test_ok_reply_matches(reqid):
    fast = ok_frames(reqid)
    assert normalized(fast) == normalized(encode(protocol.create("OK", reqid)))
    assert len(fast) == 3


def test_lone_surrogates_are_escaped_so_the_frames_can_be_sent(doc):
    # Valid JSON from a client ("\ud800") gives Python a str that has no
    # UTF-8 encoding; written as is it would make the send itself fail.
    div = doc.select_one({"name": "div"})
    [event] = capture(doc, lambda: setattr(div, "text", "a\ud800b"))
    for frames in (encode_patch(event), ok_frames("x\udfff")):
        for frame in frames:
            if isinstance(frame, str):
                frame.encode("utf-8")
    assert json.loads(encode_patch(event)[2])["events"][0]["new"] == "a\ud800b"
