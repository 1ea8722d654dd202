"""End to end: the example site (examples/site) in headless Chromium.

The site runs as users run it, ``python examples/site/run.py`` in a
subprocess (gevent ``WSGIServer``, monkey-patched), on a free port:

* ``site``: plain, at ``/``, WebSockets from its own origin only;
* ``prefixed_site``: the same site under the URL prefix ``/corp``
  (``SCRIPT_NAME=/corp``: run.py mounts the app with Werkzeug's
  ``DispatcherMiddleware``, as a reverse proxy forwarding ``/corp/`` needs),
  started with ``DOCSYNC_ALLOW_WEBSOCKET_ORIGIN`` naming the foreign origin
  below, so one more server covers both the prefix and an allowed origin;
* ``foreign``: a static page on another port (another origin) embedding the
  site's app with ``bokeh.embed.server_document``.

The tests log in through the site's form, drive widgets of the embedded
documents and wait for the server's answer in the DOM. They wait for
behaviour with generous timeouts and never measure time. Skipped when
Debian's chromium (/usr/bin/chromium) or the playwright package is missing;
``scripts/test.sh`` installs both.
"""

from __future__ import annotations

import http.cookiejar
import json
import re
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from browser_util import TIMEOUT_MS, launch_browser, require_browser, static_site  # noqa: E402

sync_api = require_browser()
expect = sync_api.expect

import websocket  # noqa: E402

from conftest import ROOT, RunningServer, free_port  # noqa: E402

RUN_PY = ROOT / "examples" / "site" / "run.py"
PASSWORD = "docsync"
TOKEN = re.compile(r'"token":"([A-Za-z0-9_.\-]+)"')

#: Defined before any page script: the model called ``name`` in whichever
#: embedded document has it (a page with two documents has two).
FIND_MODEL = """
window.findModel = (name) => {
  for (const doc of (window.Bokeh ? Bokeh.documents : [])) {
    const model = doc.get_model_by_name(name);
    if (model) return model;
  }
  return null;
};
"""


def rendered(count: int) -> str:
    return (f"() => window.Bokeh !== undefined && Bokeh.documents.length === {count}"
            " && Bokeh.documents.every(d => d.roots().length > 0)")


# --------------------------------------------------------------------------
# Servers and browser
# --------------------------------------------------------------------------


def start_site(env: dict[str, str] | None = None) -> RunningServer:
    """``python examples/site/run.py`` on a free port, as the README runs it."""
    port = free_port()
    # Empty values shadow whatever the outer environment may set.
    base = {"PORT": str(port), "HOST": "127.0.0.1", "SCRIPT_NAME": "", "DOCSYNC_ALLOW_WEBSOCKET_ORIGIN": ""}
    server = RunningServer([sys.executable, str(RUN_PY)], port, env={**base, **(env or {})})
    server.wait_for_log("Site running at", timeout=30)
    return server


def stop_site(server: RunningServer) -> None:
    """SIGTERM: run.py closes WebSockets and sessions and exits 0, with nothing logged amiss."""
    code = server.stop()
    log = Path(server._log.name).read_text(encoding="utf-8", errors="replace")
    assert code == 0, log
    assert "Traceback" not in log and " ERROR " not in log, log




@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A static site on another port of 127.0.0.1 (another origin): (origin, folder)."""
    folder = tmp_path_factory.mktemp("foreign")
    with static_site(folder) as origin:
        yield origin, folder


@pytest.fixture(scope="module")
def site() -> Iterator[RunningServer]:
    server = start_site()
    yield server
    stop_site(server)


@pytest.fixture(scope="module")
def prefixed_site(foreign: tuple[str, Path]) -> Iterator[RunningServer]:
    origin, _ = foreign
    server = start_site({"SCRIPT_NAME": "/corp",
                         "DOCSYNC_ALLOW_WEBSOCKET_ORIGIN": origin.removeprefix("http://")})
    yield server
    stop_site(server)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with launch_browser() as browser:
        yield browser


class Page:
    """A page in a fresh browser context, recording errors and WebSockets."""

    def __init__(self, browser: Any) -> None:
        self.context = browser.new_context()
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.page.add_init_script(FIND_MODEL)
        self.errors: list[str] = []
        self.websockets: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        self.page.on("websocket", lambda ws: self.websockets.append(ws.url))

    def login(self, base: str, user: str, color: str = "blue", path: str = "/dashboard") -> None:
        """Open ``path``, get sent to the login form, fill it in, land on ``path``.

        ``path="/"`` (a public page) opens the form directly: no document
        opens before the test starts watching.
        """
        page = self.page
        page.goto(base + (f"/login?next={path}" if path == "/" else path))
        assert urllib.parse.urlsplit(page.url).path.endswith("/login"), page.url
        page.fill("input[name=username]", user)
        page.fill("input[name=password]", PASSWORD)
        page.select_option("select[name=color]", color)
        page.click("button[type=submit]")
        page.wait_for_url(base + path)

    def model(self, expression: str) -> Any:
        return self.page.evaluate(f"() => {expression}")

    def wait(self, predicate: str) -> None:
        self.page.wait_for_function(predicate, timeout=TIMEOUT_MS)


@pytest.fixture
def open_page(browser: Any) -> Iterator[Any]:
    pages: list[Page] = []

    def open_() -> Page:
        pages.append(Page(browser))
        return pages[-1]

    yield open_
    for page in pages:
        page.context.close()


def logged_in_opener(base: str, user: str) -> tuple[urllib.request.OpenerDirector, http.cookiejar.CookieJar]:
    """A urllib opener logged in to the site (a cookie jar holds the session)."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    form = urllib.parse.urlencode({"username": user, "password": PASSWORD}).encode()
    with opener.open(base + "/login", data=form, timeout=15) as response:
        assert response.status == 200
    return opener, jar


# --------------------------------------------------------------------------
# 1. Dashboard: two documents among the site's HTML, both live
# --------------------------------------------------------------------------


def drive_dashboard(p: Page, site_url: str, prefix: str, user: str, color: str, hex_color: str) -> None:
    """Log in, then drive both documents of the dashboard; shared by the prefix test."""
    base = site_url + prefix
    p.login(base, user, color)
    page = p.page
    # The site's own HTML around the documents.
    expect(page.locator("nav .user")).to_have_text(f"Signed in as {user}")
    expect(page.locator(".color-name")).to_have_text(color)
    p.wait(rendered(2))
    ws_base = site_url.replace("http://", "ws://") + prefix
    assert sorted(p.websockets) == [ws_base + "/docsync/sliders/ws", ws_base + "/docsync/streaming/ws"]

    # Sliders: the colour argument reached the app; a slider change is
    # recomputed on the server, whose Div names the user and links with url_for.
    assert p.model("findModel('line').glyph.line_color.value") == hex_color
    page.evaluate("() => { findModel('amplitude').value = 2.5 }")
    summary = page.locator(".summary")
    expect(summary).to_contain_text(f"{user}: amplitude 2.5, frequency 1.0, peak 2.50", timeout=TIMEOUT_MS)
    expected_link = f"{prefix}/docsync/sliders/?color={urllib.parse.quote(hex_color)}"
    expect(summary.locator("a.own-page")).to_have_attribute("href", expected_link)
    assert max(p.model("Array.from(findModel('wave').data.y)")) == pytest.approx(2.5, abs=0.01)

    # Streaming: rows keep arriving from the periodic callback.
    p.wait("() => findModel('stream').data.x.length >= 20")
    last = p.model("(x => x[x.length - 1])(findModel('stream').data.x)")
    p.wait(f"() => (x => x[x.length - 1] > {last})(findModel('stream').data.x)")
    expect(page.locator(".rows")).to_have_text(re.compile(r"rows: [1-9]\d*"))
    # A real click on Bokeh's button (in its shadow root) pauses them.
    page.locator("button", has_text="Pause").click()
    expect(page.locator("button", has_text="Resume")).to_be_visible()
    expect(page.locator(".status")).to_have_text(f"Paused by {user}.")
    assert p.errors == [], p.errors


def test_dashboard_documents_answer_the_logged_in_user(site, open_page):
    p = open_page()
    drive_dashboard(p, site.url, "", "alice", "red", "#d62728")
    # A ?color= query overrides the preference for this view only.
    p.page.goto(site.url + "/dashboard?color=green")
    p.wait(rendered(2))
    assert p.model("findModel('line').glyph.line_color.value") == "#2ca02c"


# --------------------------------------------------------------------------
# 2. Report: a document the view created and changed before sending it
# --------------------------------------------------------------------------


def test_report_shows_what_the_view_set_and_rebins_on_the_server(site, open_page):
    p = open_page()
    p.login(site.url, "bob", path="/report?bins=12")
    p.wait(rendered(1))
    page = p.page
    expect(page.locator("h2", has_text="Report for bob")).to_be_visible()
    assert p.model("findModel('plot').title.text") == "Sample of bob"
    assert p.model("findModel('bins').value") == 12
    stats = page.locator(".stats")
    expect(stats).to_contain_text("bins=12")  # filled by the app's next-tick callback

    page.evaluate("() => { findModel('bins').value = 30 }")
    expect(stats).to_contain_text("bins=30", timeout=TIMEOUT_MS)
    expect(stats.locator("a.permalink")).to_have_attribute("href", "/report?bins=30")
    assert p.model("findModel('histogram').data.top.length") == 30
    # BokehJS appends the page's own query string to the WebSocket URL.
    assert p.websockets == [site.ws_url + "/docsync/histogram/ws?bins=12"]
    assert p.errors == [], p.errors


# --------------------------------------------------------------------------
# 3. Logged out: no document, no WebSocket; a direct WebSocket is refused
# --------------------------------------------------------------------------


def test_logged_out_browser_gets_the_login_page_and_no_websocket(site, open_page):
    p = open_page()
    page = p.page
    for path in ("/dashboard", "/report"):
        page.goto(site.url + path)
        page.wait_for_load_state("networkidle")
        parts = urllib.parse.urlsplit(page.url)
        assert parts.path == "/login" and urllib.parse.parse_qs(parts.query) == {"next": [path]}
        expect(page.locator("form.login")).to_be_visible()
        assert p.model("Bokeh.documents.length") == 0  # BokehJS loaded, nothing to render
    # The app's own page refuses too.
    response = page.goto(site.url + "/docsync/sliders")
    assert response is not None and response.status == 403
    assert p.websockets == []
    assert not [e for e in p.errors if "403" not in e], p.errors


def test_direct_websocket_without_the_login_cookie_is_refused(site):
    opener, jar = logged_in_opener(site.url, "carol")
    with opener.open(site.url + "/dashboard", timeout=15) as response:
        sliders_token, _streaming_token = TOKEN.findall(response.read().decode("utf-8"))  # page order
    ws_url = site.ws_url + "/docsync/sliders/ws"

    # A valid token alone is not enough: the authorize hook sees no login,
    # and the handshake is refused with an HTTP status before the upgrade.
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(ws_url, subprotocols=["bokeh", sliders_token], origin=site.url, timeout=10)
    assert info.value.status_code in (401, 403)
    site.wait_for_log("Not authorized to open this document's WebSocket", timeout=10)

    # The same token with the login cookie joins the session (control).
    cookie = "; ".join(f"{c.name}={c.value}" for c in jar)
    ws = websocket.create_connection(ws_url, subprotocols=["bokeh", sliders_token], origin=site.url,
                                     cookie=cookie, timeout=10)
    try:
        assert ws.subprotocol == "bokeh"
        assert json.loads(ws.recv())["msgtype"] == "ACK"
    finally:
        ws.close()


# --------------------------------------------------------------------------
# 4. The site under a URL prefix
# --------------------------------------------------------------------------


def test_site_works_under_a_url_prefix(prefixed_site, open_page):
    status, headers, _ = prefixed_site.get("/")
    assert status == 302 and headers["Location"] == "/corp/"
    p = open_page()
    drive_dashboard(p, prefixed_site.url, "/corp", "dora", "purple", "#9467bd")
    paths = p.page.evaluate(
        "() => [...document.querySelectorAll('script[src], link[href], a[href], form[action]')]"
        ".map(e => e.getAttribute('src') || e.getAttribute('href') || e.getAttribute('action'))"
        ".filter(u => u.startsWith('/'))"
    )
    assert paths and all(u.startswith("/corp/") for u in paths), paths
    p.page.click("a.logout")
    p.page.wait_for_url(prefixed_site.url + "/corp/")
    expect(p.page.locator("a.login")).to_be_visible()


# --------------------------------------------------------------------------
# 5. A page on another origin, refused unless its origin is allowed
# --------------------------------------------------------------------------


def write_foreign_page(folder: Path, name: str, app_url: str) -> str:
    from bokeh.embed import server_document

    # with_credentials: the autoload.js request carries the site's login
    # cookie (127.0.0.1 on another port is the same site, so it is sent).
    html = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Elsewhere</title>"
        "<link rel='icon' href='data:,'></head><body><h1>Another site</h1>"
        f"{server_document(app_url, with_credentials=True, arguments={'color': '#ff7f0e'})}</body></html>"
    )
    (folder / name).write_text(html, encoding="utf-8")
    return "/" + name


def test_foreign_origin_is_refused_unless_allowed(site, prefixed_site, foreign, open_page):
    origin, folder = foreign

    # The plain site allows only its own origin: the WebSocket is refused
    # before the upgrade, although the user is logged in.
    p = open_page()
    p.login(site.url, "erin", path="/")
    p.page.goto(origin + write_foreign_page(folder, "refused.html", site.url + "/docsync/sliders"))
    assert p.page.evaluate("location.origin") == origin
    site.wait_for_log(f"Refusing websocket connection from Origin '{origin}'", timeout=TIMEOUT_MS / 1000)
    p.wait("() => window.Bokeh !== undefined")
    assert p.websockets == [site.ws_url + "/docsync/sliders/ws"]
    assert p.model("Bokeh.documents.length") == 0
    assert any("403" in e for e in p.errors), p.errors

    # The prefixed site names this origin in DOCSYNC_ALLOW_WEBSOCKET_ORIGIN:
    # the document renders in the foreign page and answers.
    p = open_page()
    p.login(prefixed_site.url + "/corp", "erin", path="/")
    p.page.goto(origin + write_foreign_page(folder, "allowed.html", prefixed_site.url + "/corp/docsync/sliders"))
    p.wait(rendered(1))
    assert p.websockets == [prefixed_site.ws_url + "/corp/docsync/sliders/ws"]
    assert p.model("findModel('line').glyph.line_color.value") == "#ff7f0e"
    p.page.evaluate("() => { findModel('frequency').value = 2 }")
    expect(p.page.locator(".summary")).to_contain_text("erin: amplitude 1.0, frequency 2.0", timeout=TIMEOUT_MS)
    assert p.errors == [], p.errors
    assert "Refusing websocket connection" not in prefixed_site.log()
