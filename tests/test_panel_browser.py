"""End to end: Panel apps in headless Chromium, served by flask-docsync.

Each test serves a `.servable()` Panel script (tests/apps/panel/) two ways:
``flask-docsync serve`` and a Flask site that imports Panel at its top,
under ``gunicorn -k gevent`` (monkey-patched, as in production). Panel's
own JavaScript comes from our static route.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from typing import Any

import pytest

if importlib.util.find_spec("panel") is None:  # not imported here: this process stays Panel-free
    pytest.skip("the Panel tests need Panel (pip install -e '.[test]' installs it)", allow_module_level=True)

from browser_util import TIMEOUT_MS, launch_browser, require_browser  # noqa: E402
from conftest import APPS, RunningServer, free_port  # noqa: E402

sync_api = require_browser()
expect = sync_api.expect
expect.set_options(timeout=TIMEOUT_MS)

PANEL_APPS = APPS / "panel"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with launch_browser() as browser:
        yield browser


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors  # type: ignore[attr-defined]
    yield page
    context.close()


@pytest.fixture(params=["serve", "host"])
def onload_server(request: Any) -> Iterator[tuple[RunningServer, str]]:
    """The onload app under ``flask-docsync serve``, or in a Flask site that imports Panel first."""
    port = free_port()
    if request.param == "serve":
        cmd = [sys.executable, "-m", "flask_docsync", "serve", "--port", str(port), "--address", "127.0.0.1",
               str(PANEL_APPS / "onload_app.py")]
        server = RunningServer(cmd, port)
        url = f"{server.url}/onload_app"
    else:
        cmd = [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "1", "--bind", f"127.0.0.1:{port}",
               "--chdir", str(PANEL_APPS), "host_app:create_app()"]
        server = RunningServer(cmd, port)
        url = f"{server.url}/docsync/onload/"
    try:
        yield server, url
    finally:
        server.stop()


def test_onload_hold_and_periodic_callbacks_reach_the_browser(onload_server, page):
    """``pn.state.onload`` runs once the page is up, after which
    ``pn.state.loaded`` is true; rows appended inside ``pn.io.hold()`` from a button appear; a periodic
    callback with a count runs to its end; Panel does not warn about threads."""
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
    assert not page.errors, page.errors
    log = server.log()
    assert "Traceback" not in log, log[-3000:]
    assert "unlocked decorator" not in log, log[-3000:]
