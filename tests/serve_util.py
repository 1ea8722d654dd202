"""Helpers shared by the tests/test_serve_*.py integration tests.

They drive a real ``python -m flask_docsync serve`` subprocess (see
conftest.RunningServer) with the raw WireClient or bokeh.client.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from bokeh.util.token import get_session_id

from conftest import ROOT, RunningServer, free_port
from wire import Message, WireClient, fetch_token, find_model

T = TypeVar("T")

APPS = ROOT / "tests" / "apps"


def start_server(*args: str, env: dict[str, str] | None = None) -> RunningServer:
    """Start ``flask_docsync serve ARGS`` on a free port (for module-scoped fixtures).

    The caller stops it; the ``serve`` fixture of conftest does the same per test.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "flask_docsync", "serve", *map(str, args),
           "--port", str(port), "--address", "127.0.0.1"]
    return RunningServer(cmd, port, env=env)


def wait_until(probe: Callable[[], T], timeout: float = 15.0, interval: float = 0.05,
               message: str = "condition") -> T:
    """Call ``probe`` until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{message} not reached in {timeout} s; last value: {last!r}")


def session_id_of(token: str) -> str:
    return get_session_id(token)


def pull_doc(server: RunningServer, route: str, token: str) -> dict[str, Any]:
    """Open a connection with ``token``, pull the document JSON, close."""
    with WireClient(f"{server.ws_url}{route}/ws", token) as client:
        return client.handshake().content["doc"]


def attr(doc_json: dict[str, Any], name: str, attribute: str = "text") -> Any:
    """An attribute of the model called ``name`` in pulled document JSON."""
    return find_model(doc_json, name)["attributes"].get(attribute)


def model_id(doc_json: dict[str, Any], name: str) -> str:
    return find_model(doc_json, name)["id"]


def events_of(messages: list[Message]) -> list[dict[str, Any]]:
    """Every event of every PATCH-DOC among ``messages``."""
    return [e for m in messages if m.msgtype == "PATCH-DOC" for e in m.content["events"]]


def changed(events: list[dict[str, Any]], model: str, attribute: str) -> list[Any]:
    """New values of ``model.attribute`` among ModelChanged events."""
    return [e["new"] for e in events
            if e.get("kind") == "ModelChanged" and e["model"]["id"] == model and e["attr"] == attribute]


def value_patch(model: str, attribute: str, new: Any) -> dict[str, Any]:
    """PATCH-DOC content setting one property, as BokehJS sends it."""
    return {"events": [{"kind": "ModelChanged", "model": {"id": model}, "attr": attribute, "new": new}]}


def decode_ndarray(encoded: dict[str, Any], buffers: list[tuple[dict[str, Any], bytes]]) -> np.ndarray:
    """Decode a binary ``{"type": "ndarray", ...}`` value using the message's buffers."""
    assert encoded["type"] == "ndarray", encoded
    array = encoded["array"]
    assert array["type"] == "bytes", array
    ref = array["data"]
    assert set(ref) == {"id"}, f"expected a buffer reference, got {ref!r}"
    payload = dict((r["id"], data) for r, data in buffers)[ref["id"]]
    assert encoded["order"] == "little"
    return np.frombuffer(payload, dtype=encoded["dtype"]).reshape(encoded["shape"])


def map_entries(value: dict[str, Any]) -> dict[str, Any]:
    assert value["type"] == "map", value
    return dict(value["entries"])


def assert_server_healthy(server: RunningServer, route: str = "/sliders") -> None:
    """A fresh session on ``server`` does a full handshake and a patch round trip.

    Uses tests/apps/sliders.py: setting the slider makes its on_change
    callback update the ``result`` Div before the OK reply.
    """
    token = fetch_token(f"{server.url}{route}")
    with WireClient(f"{server.ws_url}{route}/ws", token) as client:
        doc = client.handshake().content["doc"]
        slider, result = model_id(doc, "slider"), model_id(doc, "result")
        reqid = client.send("PATCH-DOC", value_patch(slider, "value", 17), num_buffers=0)
        ok, before = client.recv_until("OK", reqid)
        assert changed(events_of(before), result, "text") == ["value=17"], before


def log_has_line(server: RunningServer, *parts: str, timeout: float = 10.0) -> str:
    """Wait for one server log line containing every one of ``parts``; return it."""

    def probe() -> str | None:
        for line in server.log().splitlines():
            if all(p in line for p in parts):
                return line
        return None

    try:
        return wait_until(probe, timeout=timeout, message=f"log line with {parts!r}")
    except AssertionError:
        raise AssertionError(f"no log line contains all of {parts!r}:\n{server.log()[-4000:]}") from None


def sliders_ws_url(server: RunningServer) -> str:
    return server.ws_url + "/sliders/ws"


def connected(server: RunningServer) -> tuple[WireClient, str, dict]:
    """A new /sliders session after a completed handshake: (client, session id, doc)."""
    token = fetch_token(server.url + "/sliders")
    client = WireClient(sliders_ws_url(server), token)
    return client, session_id_of(token), client.handshake().content["doc"]
