"""End to end: Panel apps in headless Chromium, served by flask-docsync.

Each test serves a `.servable()` Panel script (tests/apps/panel/) two ways:
``flask-docsync serve`` and a Flask site that imports Panel at its top,
under ``gunicorn -k gevent`` (monkey-patched, as in production). Panel's
own JavaScript comes from our static route.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest

if importlib.util.find_spec("panel") is None:  # not imported here: this process stays Panel-free
    pytest.skip("the Panel tests need Panel (pip install -e '.[test]' installs it)", allow_module_level=True)

from browser_util import TIMEOUT_MS, launch_browser, require_browser  # noqa: E402
from conftest import APPS, ROOT, RunningServer, free_port  # noqa: E402

sync_api = require_browser()
expect = sync_api.expect
expect.set_options(timeout=TIMEOUT_MS)

PANEL_APPS = APPS / "panel"
#: Hosts a page may reach: ours. A template's web fonts (Google Fonts'
#: stylesheet and files) are requested by ``panel serve`` too and excepted.
LOCAL_HOSTS = {"127.0.0.1"}
WEB_FONT_HOSTS = {"fonts.googleapis.com", "fonts.gstatic.com"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with launch_browser() as browser:
        yield browser


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page that records script errors and every request for a host other than ours."""
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    external: list[str] = []
    requested: list[str] = []

    def on_request(request: Any) -> None:
        requested.append(request.url)
        host = urlsplit(request.url).hostname
        if host is not None and host not in LOCAL_HOSTS | WEB_FONT_HOSTS and request.resource_type != "font":
            external.append(request.url)

    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", on_request)
    page.errors = errors  # type: ignore[attr-defined]
    page.external = external  # type: ignore[attr-defined]
    page.requested = requested  # type: ignore[attr-defined]
    yield page
    context.close()


def start(kind: str, app: str, route: str, prefix: str = "/docsync", args: Sequence[str] = ()) -> tuple[RunningServer, str]:
    """Serve ``tests/apps/panel/<app>.py`` (or ``<app>`` if it has a suffix); return the server and the app page's URL.

    ``serve``: ``flask-docsync serve``. ``host``: the Flask site of
    host_app.py (imports Panel first) on ``gunicorn -k gevent``, its
    DocSync under ``prefix``. ``panel``: ``panel serve``, the reference.
    ``args``: more options of ``flask-docsync serve`` or ``panel serve``.
    """
    port = free_port()
    script = str(PANEL_APPS / (app if "." in app else f"{app}.py"))
    app = app.split(".")[0]
    if kind == "serve":
        cmd = [sys.executable, "-m", "flask_docsync", "serve", "--port", str(port), "--address", "127.0.0.1",
               *args, script]
        server = RunningServer(cmd, port)
        return server, f"{server.url}/{app}"
    if kind == "panel":
        cmd = [sys.executable, "-m", "panel", "serve", "--port", str(port), "--address", "127.0.0.1",
               "--allow-websocket-origin", f"127.0.0.1:{port}", *args, script]
        server = RunningServer(cmd, port)
        return server, f"{server.url}/{app}"
    cmd = [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "1", "--bind", f"127.0.0.1:{port}",
           "--chdir", str(PANEL_APPS), "host_app:create_app()"]
    server = RunningServer(cmd, port, env={"HOST_URL_PREFIX": prefix})
    return server, f"{server.url}{prefix}{route}/"


def assert_clean(page: Any, server: RunningServer) -> None:
    """No script error, nothing fetched from another host, no traceback or thread warning in the log."""
    assert not page.errors, page.errors
    assert not page.external, page.external
    log = server.log()
    assert "Traceback" not in log, log[-3000:]
    assert "unlocked decorator" not in log, log[-3000:]


@pytest.fixture(params=["serve", "host"])
def onload_server(request: Any) -> Iterator[tuple[RunningServer, str]]:
    """The onload app under ``flask-docsync serve``, or in a Flask site that imports Panel first."""
    server, url = start(request.param, "onload_app", "/onload")
    try:
        yield server, url
    finally:
        server.stop()


def test_onload_hold_and_periodic_callbacks_reach_the_browser(onload_server, page):
    """``pn.state.onload`` runs once the page is up, after which
    ``pn.state.loaded`` is true; rows appended inside ``pn.io.hold()`` from a button appear; a periodic
    callback with a count runs to its end; Panel does not warn about threads; every asset is ours."""
    server, url = onload_server
    response = page.goto(url)
    assert response is not None and response.status == 200, response and response.status
    expect(page.get_by_text("onload ran")).to_be_visible()
    expect(page.get_by_text("ticks 5")).to_be_visible()
    button = page.get_by_role("button", name="add a row")
    button.click()
    expect(page.get_by_text("row 1 loaded=True")).to_be_visible()
    button.click()
    expect(page.get_by_text("row 2 loaded=True")).to_be_visible()
    assert_clean(page, server)


def check_assets_app(page: Any) -> None:
    """The JSComponent is drawn with its own stylesheet; a Tabulator added later shows its rows."""
    fancy = page.locator(".fancy-label")
    expect(fancy).to_have_text("fancy ready")
    expect(fancy).to_have_css("color", "rgb(1, 2, 3)")
    page.get_by_role("button", name="add a table").click()
    expect(page.get_by_text("Oslo")).to_be_visible()
    expect(page.get_by_text("Lima")).to_be_visible()


@pytest.mark.parametrize("kind", ["serve", "host", "panel"])
def test_component_assets_and_lazily_loaded_models_come_from_the_server(kind, page):
    """A component's stylesheet file (``/components/``), Panel's stylesheets and a
    Tabulator loaded after the page is up: all from the app's server, styled,
    with ``panel serve`` as the reference; under a two-level URL prefix in the Flask site."""
    server, url = start(kind, "assets_app", "/assets", prefix="/apps/panel")
    try:
        response = page.goto(url)
        assert response is not None and response.status == 200, response and response.status
        check_assets_app(page)
        assert any("/components/docsync_fancy/Fancy/_stylesheets/docsync_fancy.css" in u for u in page.requested)
        assert any("/static/extensions/panel/css/" in u for u in page.requested), page.requested
        assert_clean(page, server)
    finally:
        server.stop()


def test_panel_apps_embedded_in_a_page_of_the_flask_site(page):
    """Two Panel apps in one of the site's own pages, under a URL prefix:
    ``docsync_resources()`` in the head and ``docsync_document()`` for each,
    nothing else; onload, held appends, component assets and a lazily loaded
    Tabulator all work, and every request stays on our server."""
    server, _ = start("host", "assets_app", "/assets", prefix="/apps/panel")
    try:
        response = page.goto(f"{server.url}/site/dashboard")
        assert response is not None and response.status == 200, response and response.status
        expect(page.get_by_role("heading", name="Our dashboard")).to_be_visible()
        expect(page.get_by_text("onload ran")).to_be_visible()
        page.get_by_role("button", name="add a row").click()
        expect(page.get_by_text("row 1 loaded=True")).to_be_visible()
        check_assets_app(page)
        assert all(urlsplit(u).path.startswith(("/site/", "/apps/panel/")) for u in page.requested
                   if urlsplit(u).hostname == "127.0.0.1"), page.requested
        assert_clean(page, server)
    finally:
        server.stop()


def test_pn_state_knows_the_site_user_the_request_and_scheduled_tasks(page):
    """Behind the site's login: ``pn.state.user``/``user_info`` are the site's
    user (from the authorize hook), ``session_args`` and ``location`` the
    page's request, and a task the factory scheduled with
    ``pn.state.schedule_task`` runs (its count in ``pn.state.cache``)."""
    server, url = start("host", "state_app", "/state")
    try:
        response = page.goto(f"{server.url}/site/login?name=alice&next=/docsync/state/%3Fname%3DBo")
        assert response is not None and response.status == 200, response and response.status
        assert page.url == f"{url}?name=Bo"
        for text in ("user alice", "email alice@example.org", "args Bo", "path /docsync/state/", "search ?name=Bo"):
            expect(page.get_by_text(text)).to_be_visible()
        expect(page.get_by_text(re.compile(r"ticks ([3-9]|\d\d+)"))).to_be_visible()
        assert_clean(page, server)
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["serve", "panel"])
def test_setup_num_threads_and_loading_spinner_options_of_panel_serve(kind, page):
    """``--setup`` schedules a task in the server process, ``--num-threads``
    gives Panel its pool, ``--global-loading-spinner`` covers the page until
    it is ready: under ``flask-docsync serve`` as under ``panel serve``."""
    args = ["--setup", str(PANEL_APPS / "setup_tasks.py"), "--num-threads", "2", "--global-loading-spinner"]
    server, url = start(kind, "state_app", "/state", args=args)
    try:
        with urllib.request.urlopen(f"{url}?name=Bo", timeout=10) as response:
            html = response.read().decode()
        assert re.search(r'<body class="[^"]*pn-loading', html), html[:2000]
        response = page.goto(f"{url}?name=Bo")
        assert response is not None and response.status == 200, response and response.status
        for text in ("user None", "args Bo", "path /state_app", "search ?name=Bo"):
            expect(page.get_by_text(text)).to_be_visible()
        expect(page.get_by_text(re.compile(r"ticks ([3-9]|\d\d+)"))).to_be_visible()
        expect(page.locator("body.pn-loading")).to_have_count(0)
        assert_clean(page, server)
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["serve", "host", "panel"])
def test_a_panel_template_is_served_with_its_own_page(kind, page):
    """FastListTemplate: Panel's template page (header title, sidebar, main),
    a button in the sidebar changes the main area; its assets from the server
    (web fonts excepted, which ``panel serve`` requests too)."""
    server, url = start(kind, "template_app", "/template")
    try:
        response = page.goto(url)
        assert response is not None and response.status == 200, response and response.status
        expect(page).to_have_title("Docsync template")
        expect(page.get_by_text("value 0")).to_be_visible()
        page.get_by_role("button", name="bump").click()
        expect(page.get_by_text("value 1")).to_be_visible()
        assert_clean(page, server)
    finally:
        server.stop()


@dataclass(frozen=True)
class FileApp:
    """An app that ``panel serve`` takes from a file other than a script, and what its page must show."""

    file: str  #: in tests/apps/panel/
    route: str  #: its route in the Flask site
    title: str | None  #: the page's title, where it is checked
    prose: str  #: a text cell or paragraph, rendered
    input_label: str  #: the input that drives the pane
    shown: str  #: the pane at first
    value: str  #: typed into the input
    then_shown: str  #: the pane after


FILE_APPS = [
    # No ``.servable()`` in the notebook: Panel's notebook template shows
    # every cell's output (a markdown cell, an input, a bound pane), and the
    # input drives the pane.
    pytest.param(FileApp("notebook_cells.ipynb", "/notebook", "Notebook Cells", "No .servable(): every output is shown.",
                         "Level", "level is 4", "5", "level is 5"), id="notebook"),
    # A ``.md`` app: its prose rendered, its Python block run, the input drives the pane.
    pytest.param(FileApp("notes_app.md", "/notes", None, "Prose of a Markdown app",
                         "Amount", "amount is 2", "7", "amount is 7"), id="markdown"),
]


@pytest.mark.parametrize("kind", [pytest.param("serve", id="docsync-serve"), pytest.param("host", id="flask-site"),
                                  pytest.param("panel", id="panel-serve")])
@pytest.mark.parametrize("app", FILE_APPS)
def test_a_notebook_or_markdown_file_is_an_app_as_with_panel_serve(app: FileApp, kind, page):
    """A notebook that imports Panel and a Markdown file (see FILE_APPS) are
    apps as ``panel serve`` makes them: the file's text and its pane shown, the
    input drives the pane; under ``flask-docsync serve``, in the Flask site and
    under ``panel serve``."""
    server, url = start(kind, app.file, app.route)
    try:
        response = page.goto(url)
        assert response is not None and response.status == 200, response and response.status
        if app.title is not None:
            expect(page).to_have_title(app.title)
        expect(page.get_by_text(app.prose)).to_be_visible()
        expect(page.get_by_text(app.shown)).to_be_visible()
        field = page.get_by_label(app.input_label)
        field.fill(app.value)
        field.press("Enter")
        expect(page.get_by_text(app.then_shown)).to_be_visible()
        assert_clean(page, server)
    finally:
        server.stop()


def test_functions_and_objects_are_apps_as_with_pn_serve(page):
    server, url = start("host", "onload_app", "/onload")
    try:
        for route, text in (("/function", "made by a function"), ("/object", "one object, a copy per session")):
            for _ in range(2):  # a fresh copy for each session
                response = page.goto(f"{server.url}/docsync{route}/")
                assert response is not None and response.status == 200, response and response.status
                expect(page.get_by_text(text)).to_be_visible()
        assert_clean(page, server)
    finally:
        server.stop()


def test_the_panel_example_site(page):
    """examples/panel on gunicorn -k gevent -w 2: log in on the site's own form;
    its dashboard embeds a streaming trend and an editable Tabulator whose
    total follows an edit and names the site's user; the report is a Panel
    template page; every asset is the server's."""
    port = free_port()
    cmd = [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "2", "--bind", f"127.0.0.1:{port}",
           "--chdir", str(ROOT / "examples" / "panel"), "app:create_app()"]
    server = RunningServer(cmd, port, wait_path="/login")
    try:
        page.goto(f"{server.url}/dashboard")
        page.get_by_label("User").fill("ann")
        page.get_by_label("Password").fill("docsync")
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
        expect(page.get_by_text("Total for ann")).to_be_visible()
        expect(page.get_by_text("489.50 €")).to_be_visible()
        cell = page.locator(".tabulator-row").first.locator('[tabulator-field="quantity"]')
        cell.click()
        editor = cell.locator("input")
        editor.fill("3")
        editor.press("Enter")
        expect(page.get_by_text("538.50 €")).to_be_visible()
        expect(page.locator(".ticker svg, .ticker canvas").first).to_be_visible()
        assert_clean(page, server)
        page.get_by_role("link", name="Report").click()
        expect(page).to_have_title("Report for ann")
        expect(page.get_by_text("50 points, seed 1")).to_be_visible()
        # The summary's Tabulator is made by pn.bind after the page rendered.
        seed = page.get_by_label("Seed")
        seed.fill("2")
        seed.press("Enter")
        expect(page.get_by_text("50 points, seed 2")).to_be_visible()
        assert_clean(page, server)
    finally:
        server.stop()
