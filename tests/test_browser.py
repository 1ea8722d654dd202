"""End to end: headless Chromium against a real ``flask-docsync serve``.

BokehJS in a real browser is the client that matters: these tests load
app pages (and an embedding page on a foreign origin), change widgets the
way a user or BokehJS does, and wait for the server's answer to show up in
the DOM. They wait for behaviour with generous timeouts and never measure
time.

Skipped when Debian's chromium (/usr/bin/chromium) or the playwright
package is missing; ``scripts/test.sh`` installs both.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from browser_util import TIMEOUT_MS, launch_browser, require_browser, static_site  # noqa: E402

sync_api = require_browser()
expect = sync_api.expect

from conftest import APPS  # noqa: E402

WIDGETS = APPS / "browser_widgets.py"
STREAMING = APPS / "browser_streaming.py"

#: Wraps window.WebSocket before any page script runs, to record what
#: BokehJS asked for and which subprotocol the server accepted.
RECORD_WEBSOCKETS = """
(() => {
  const Native = window.WebSocket;
  const records = [];
  window.__websockets = records;
  class RecordingWebSocket extends Native {
    constructor(url, protocols) {
      super(url, protocols);
      const record = {url: String(url), requested: protocols == null ? [] : [].concat(protocols),
                      protocol: null, opened: false, closed: false};
      records.push(record);
      this.addEventListener("open", () => { record.opened = true; record.protocol = this.protocol; });
      this.addEventListener("close", () => { record.closed = true; });
    }
  }
  window.WebSocket = RecordingWebSocket;
})();
"""

#: True once BokehJS has a document with roots from the server.
BOKEH_RENDERED = "() => window.Bokeh !== undefined && Bokeh.documents.length > 0 && Bokeh.documents[0].roots().length > 0"


@dataclass
class Watch:
    """What a page reported: console errors, uncaught exceptions, WebSockets, frames."""

    errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    websockets: list[Any] = field(default_factory=list)
    binary_frames: list[bytes] = field(default_factory=list)

    def attach(self, page: Any) -> None:
        page.on("console", self._on_console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("websocket", self._on_websocket)

    def _on_console(self, message: Any) -> None:
        self.console.append(f"{message.type}: {message.text}")
        if message.type == "error":
            self.errors.append(f"console.error: {message.text}")

    def _on_websocket(self, ws: Any) -> None:
        self.websockets.append(ws)
        ws.on("framereceived", lambda payload: self.binary_frames.append(payload) if isinstance(payload, bytes) else None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with launch_browser() as browser:
        yield browser


@pytest.fixture
def open_page(browser: Any) -> Iterator[Any]:
    """``open_page()`` -> (page, watch): a fresh context and page, closed after the test."""
    contexts: list[Any] = []

    def open_() -> tuple[Any, Watch]:
        context = browser.new_context()
        contexts.append(context)
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        page.add_init_script(RECORD_WEBSOCKETS)
        watch = Watch()
        watch.attach(page)
        return page, watch

    yield open_
    for context in contexts:
        context.close()


def wait_rendered(page: Any) -> None:
    page.wait_for_function(BOKEH_RENDERED, timeout=TIMEOUT_MS)


def set_slider(page: Any, value: int) -> None:
    """Change the slider the way BokehJS does: through its model, which syncs to the server."""
    page.evaluate("(v) => { Bokeh.documents[0].get_model_by_name('slider').value = v }", value)


def websocket_records(page: Any) -> list[dict[str, Any]]:
    return page.evaluate("window.__websockets")




# --------------------------------------------------------------------------
# 1. Widgets: a model change and a real click round-trip through the server
# --------------------------------------------------------------------------


def test_widgets_round_trip_through_the_server(serve, open_page):
    server = serve(WIDGETS)
    page, watch = open_page()
    page.goto(server.url + "/browser_widgets")
    wait_rendered(page)
    expect(page.locator(".result")).to_have_text("value=1", timeout=TIMEOUT_MS)

    # The Div only changes when the server's on_change callback runs.
    set_slider(page, 42)
    expect(page.locator(".result")).to_have_text("value=42", timeout=TIMEOUT_MS)

    # A real click on Bokeh's <button> (inside the widget's shadow root).
    page.locator("button", has_text="click").click()
    expect(page.locator(".clicks")).to_have_text("clicks=1", timeout=TIMEOUT_MS)
    page.locator("button", has_text="click").click()
    expect(page.locator(".clicks")).to_have_text("clicks=2", timeout=TIMEOUT_MS)

    assert [ws.url for ws in watch.websockets] == [server.ws_url + "/browser_widgets/ws"]
    (record,) = websocket_records(page)
    assert record["requested"][0] == "bokeh" and len(record["requested"]) == 2  # ['bokeh', token]
    assert record["opened"] and record["protocol"] == "bokeh"  # the subprotocol the server chose
    assert watch.errors == [], watch.errors


# --------------------------------------------------------------------------
# 2. Streaming: numpy columns arrive as binary buffers, as Float64Array
# --------------------------------------------------------------------------


def test_streamed_numpy_columns_arrive_as_typed_arrays(serve, open_page):
    server = serve(STREAMING)
    page, watch = open_page()
    page.goto(server.url + "/browser_streaming")
    wait_rendered(page)

    # Between two ticks the browser holds every row the server says it sent.
    page.wait_for_function(
        """() => {
          const doc = Bokeh.documents[0];
          const x = doc.get_model_by_name('source').data.x;
          const sent = Number(doc.get_model_by_name('sent').text.split('=')[1]);
          return x.length >= 10 && x.length === sent;
        }""",
        timeout=TIMEOUT_MS,
    )
    columns = page.evaluate(
        """() => {
          const data = Bokeh.documents[0].get_model_by_name('source').data;
          // BokehJS keeps ndarrays as subclasses of the typed arrays.
          return {x_typed: data.x instanceof Float64Array, y_typed: data.y instanceof Float64Array,
                  x: Array.from(data.x), y: Array.from(data.y)};
        }"""
    )
    assert columns["x_typed"] and columns["y_typed"]
    n = len(columns["x"])
    assert n >= 10 and len(columns["y"]) == n
    assert columns["x"] == [float(i) for i in range(n)]  # every row, in order

    # On the wire: each stream's columns were binary frames of float64s.
    batch = 3  # tests/apps/browser_streaming.py BATCH
    assert any(len(frame) == 8 * batch for frame in watch.binary_frames), [len(f) for f in watch.binary_frames][:20]
    expect(page.locator(".sent")).to_have_text(re.compile(r"sent=\d+"), timeout=TIMEOUT_MS)
    assert watch.errors == [], watch.errors


# --------------------------------------------------------------------------
# 3. Origins: a page on another origin embeds the app with server_document
# --------------------------------------------------------------------------


@pytest.fixture
def foreign_site(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A static site on another port of 127.0.0.1: (its origin, its folder)."""
    with static_site(tmp_path) as origin:
        yield origin, tmp_path


def write_embed_page(folder: Path, app_url: str) -> str:
    from bokeh.embed import server_document

    html = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Embedding page</title>"
        "<link rel='icon' href='data:,'></head><body><h1>Embedded app</h1>"
        f"{server_document(app_url)}</body></html>"
    )
    (folder / "embed.html").write_text(html, encoding="utf-8")
    return "/embed.html"


def test_foreign_origin_is_refused_unless_allowed(serve, open_page, foreign_site):
    origin, folder = foreign_site

    # Not on the allowlist: the server refuses the WebSocket handshake.
    refusing = serve(WIDGETS)
    embed_path = write_embed_page(folder, refusing.url + "/browser_widgets")
    page, watch = open_page()
    page.goto(origin + embed_path)
    assert page.evaluate("location.origin") == origin != refusing.url
    refusing.wait_for_log("Refusing websocket connection from Origin", timeout=TIMEOUT_MS / 1000)
    page.wait_for_function(
        "() => window.__websockets !== undefined && window.__websockets.length > 0"
        " && window.__websockets.every(r => r.closed)",
        timeout=TIMEOUT_MS,
    )
    assert not any(r["opened"] for r in websocket_records(page))
    # BokehJS loaded from our server, but never got a document to render.
    assert page.evaluate("Bokeh.documents.length") == 0
    assert any("WebSocket" in e and "403" in e for e in watch.errors), watch.errors  # Chromium's report
    assert any("Failed to connect to Bokeh server" in e for e in watch.errors), watch.errors  # BokehJS's
    page.context.close()

    # Allowed: the app renders in the foreign page and round-trips.
    allowing = serve(WIDGETS, "--allow-websocket-origin", origin.removeprefix("http://"))
    embed_path = write_embed_page(folder, allowing.url + "/browser_widgets")
    page, watch = open_page()
    page.goto(origin + embed_path)
    wait_rendered(page)
    set_slider(page, 42)
    expect(page.locator(".result")).to_have_text("value=42", timeout=TIMEOUT_MS)
    (record,) = websocket_records(page)
    assert record["url"].startswith(allowing.ws_url + "/browser_widgets/ws")
    assert record["opened"] and record["protocol"] == "bokeh"
    assert "Refusing websocket connection" not in allowing.log()
    assert watch.errors == [], watch.errors


# --------------------------------------------------------------------------
# 4. Reconnect: the network drops, BokehJS reconnects to the same session
# --------------------------------------------------------------------------


class DroppingProxy:
    """A TCP proxy in front of the server whose connections can all be cut at once.

    Cutting them is what a network drop looks like to both ends: the
    browser's WebSocket closes abnormally (1006) and the server loses the
    connection, while the server and its sessions live on.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._sockets.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._cut(src, dst)

    def _cut(self, *socks: socket.socket) -> None:
        for sock in socks:
            with self._lock:
                self._sockets.discard(sock)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def drop(self) -> None:
        with self._lock:
            socks = list(self._sockets)
        self._cut(*socks)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.listener.close()
        self.drop()


def test_bokehjs_reconnects_to_its_session_after_a_network_drop(serve, open_page):
    server = serve(WIDGETS)
    proxy = DroppingProxy(server.port)
    try:
        page, watch = open_page()
        page.goto(proxy.url + "/browser_widgets")
        wait_rendered(page)
        page.locator("button", has_text="click").click()
        expect(page.locator(".clicks")).to_have_text("clicks=1", timeout=TIMEOUT_MS)

        proxy.drop()
        # BokehJS notices, reconnects on its own (a second WebSocket opens)
        # and tells the server, which saw the first connection go.
        page.wait_for_function(
            "() => window.__websockets.length >= 2 && window.__websockets[0].closed"
            " && window.__websockets[window.__websockets.length - 1].opened",
            timeout=TIMEOUT_MS,
        )
        expect(page.locator(".connection")).to_have_text("lost=1 reconnected=1", timeout=TIMEOUT_MS)

        # Same session: the server kept its state (the click count) and
        # still answers this page.
        page.locator("button", has_text="click").click()
        expect(page.locator(".clicks")).to_have_text("clicks=2", timeout=TIMEOUT_MS)
        set_slider(page, 7)
        expect(page.locator(".result")).to_have_text("value=7", timeout=TIMEOUT_MS)
        assert all(r["protocol"] == "bokeh" for r in websocket_records(page) if r["opened"])
        assert watch.errors == [], watch.errors
    finally:
        proxy.close()


# --------------------------------------------------------------------------
# 5. The examples the README serves render and work
# --------------------------------------------------------------------------


def test_examples_render_and_respond(serve, open_page):
    # The README's command: every example at once, through --glob.
    server = serve("examples/apps/*", "--glob")

    # sliders: the server recomputes the curve and renames the plot.
    page, watch = open_page()
    page.goto(server.url + "/sliders")
    wait_rendered(page)
    page.evaluate("Bokeh.documents[0].get_model_by_name('amplitude').value = 2")
    page.wait_for_function(
        "() => Math.max(...Bokeh.documents[0].get_model_by_name('source').data.y) > 1.99", timeout=TIMEOUT_MS
    )
    page.evaluate("Bokeh.documents[0].get_model_by_name('title').value = 'renamed'")
    page.wait_for_function(
        "() => Bokeh.documents[0].get_model_by_name('plot').title.text === 'renamed'", timeout=TIMEOUT_MS
    )
    assert watch.errors == [], watch.errors
    page.context.close()

    # streaming: ticks count up; the button pauses and resumes the stream.
    page, watch = open_page()
    page.goto(server.url + "/streaming")
    wait_rendered(page)
    page.wait_for_function(
        "() => Bokeh.documents[0].get_model_by_name('source').data.x.length >= 10", timeout=TIMEOUT_MS
    )
    expect(page.locator(".ticks")).to_have_text(re.compile(r"ticks: [1-9]\d*"), timeout=TIMEOUT_MS)
    page.locator("button", has_text="Pause").click()
    expect(page.locator("button", has_text="Resume")).to_be_visible(timeout=TIMEOUT_MS)
    page.locator("button", has_text="Resume").click()
    expect(page.locator("button", has_text="Pause")).to_be_visible(timeout=TIMEOUT_MS)
    assert watch.errors == [], watch.errors
    page.context.close()

    # crossfilter: the directory app's template, static CSS and theme; a
    # Select change makes the server build a new figure.
    for path in ("/crossfilter", "/crossfilter/"):
        page, watch = open_page()
        css = []
        page.on("response", lambda r: css.append(r.status) if r.url.endswith("/crossfilter/static/style.css") else None)
        page.goto(server.url + path)
        wait_rendered(page)
        expect(page.locator("h1#heading")).to_have_text("Crossfilter")
        expect(page.locator("p#description")).to_contain_text("Every change rebuilds the plot")
        assert css == [200]
        assert page.evaluate("getComputedStyle(document.querySelector('h1#heading')).color") == "rgb(29, 111, 145)"
        plot = "Bokeh.documents[0].get_model_by_name('layout').children[1]"
        assert page.evaluate(f"{plot}.background_fill_color") == "#fafbfc"  # theme.yaml
        assert page.evaluate(f"{plot}.title.text") == "Mpg vs Hp"
        page.evaluate("Bokeh.documents[0].get_model_by_name('x').value = 'cyl'")
        page.wait_for_function(f"() => {plot}.title.text === 'Cyl vs Hp'", timeout=TIMEOUT_MS)
        assert page.evaluate(f"{plot}.x_range.factors") == ["4", "6", "8"]  # categorical now
        assert watch.errors == [], watch.errors
        page.context.close()
