"""End to end: headless Chromium, `gunicorn -k gevent -w 2`, a real Redis; the session's worker is killed.

The user picks another plot type in the select (the server rebuilds the
figure), zooms the new figure and moves a slider (through BokehJS's models,
which sync to the server as the widgets do; the server derives a text),
edits a table cell with the table's own editor, and clicks a button twice (the app counts clicks in its ``restorable`` state).
Then the worker holding the session gets ``kill -9``; BokehJS reconnects by
itself with the same token, a live worker restores the session from Redis,
and BokehJS replaces its document with the restored one: the page shows the
new worker's pid and everything the user set.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from browser_util import TIMEOUT_MS, launch_browser, require_browser

sync_api = require_browser()
expect = sync_api.expect

from conftest import APPS, RunningServer, free_port  # noqa: E402
from redis_util import redis_server  # noqa: E402,F401  (fixture)

SECRET = "restore-browser-secret-" + "b" * 32
RECONNECTED = re.compile(r"Reconnected websocket")

READ_STATE = """() => {
  const doc = Bokeh.documents[0];
  const m = (name) => doc.get_model_by_name(name);
  return {
    pid: m('pid').text, slider: m('slider').value, derived: m('derived').text, select: m('select').value,
    title: m('layout').children[3].title.text,
    zoom: [m('layout').children[3].x_range.start, m('layout').children[3].x_range.end], clicks: m('clicks').text,
    score: Array.from(m('source').data.score),
  };
}"""


@pytest.fixture(params=["kill -9", "kill -HUP"])
def server(request, redis_server) -> Iterator[RunningServer]:  # noqa: F811
    port = free_port()
    cmd = [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "2", "--bind", f"127.0.0.1:{port}",
           "--chdir", str(APPS), "--graceful-timeout", "5", "restore_app:create_app()"]
    # For the reload, a flush interval longer than the test: only the save
    # at the graceful stop can have written what the user did.
    flush_ms = "200" if request.param == "kill -9" else "600000"
    running = RunningServer(cmd, port, env={"TEST_SECRET": SECRET, "TEST_REDIS_URL": redis_server.url,
                                             "RESTORE_FLUSH_MS": flush_ms})
    running.how = request.param
    try:
        running.wait_for_workers(2, "/pid")
        yield running
    finally:
        running.stop()


@pytest.fixture
def page() -> Iterator[tuple[Any, list[str]]]:
    with launch_browser() as browser:
        context = browser.new_context()
        try:
            context.set_default_timeout(TIMEOUT_MS)
            page = context.new_page()
            console: list[str] = []
            page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
            yield page, console
        finally:
            context.close()


def js(page: Any, code: str) -> Any:
    return page.evaluate(f"() => {{ const doc = Bokeh.documents[0]; const m = (n) => doc.get_model_by_name(n); {code} }}")


@pytest.mark.timeout(120)
def test_the_page_comes_back_with_what_the_user_set(server, page):
    page, console = page
    page.goto(server.url + "/restore")
    page.wait_for_function("() => window.Bokeh !== undefined && Bokeh.documents.length > 0"
                           " && Bokeh.documents[0].get_model_by_name('pid') != null", timeout=TIMEOUT_MS)
    owner = int(page.evaluate(READ_STATE)["pid"])

    page.locator("select").select_option("scatter")  # the widget itself
    # The old figure may linger in BokehJS's index of models: go through the layout.
    page.wait_for_function(
        "() => Bokeh.documents[0].get_model_by_name('layout').children[3].title.text === 'scatter'")
    js(page, "m('layout').children[3].x_range.setv({start: 2.5, end: 7.25})")
    js(page, "m('slider').value = 42")
    page.wait_for_function("() => Bokeh.documents[0].get_model_by_name('derived').text === 'double: 84'")
    # The table's own cell editor: double-click the second row's score, type, Enter.
    page.locator(".slick-row").nth(1).locator(".slick-cell").nth(2).dblclick()
    editor = page.locator(".slick-cell input").first
    editor.fill("99")
    editor.press("Enter")
    page.wait_for_function("() => Bokeh.documents[0].get_model_by_name('source').data.score[1] === 99")
    for _ in range(2):
        page.locator("button", has_text="click").click()
    page.wait_for_function("() => Bokeh.documents[0].get_model_by_name('clicks').text === 'clicks: 2'")
    before = len(console)
    if server.how == "kill -9":
        time.sleep(1.0)  # a few flush intervals: kill -9 loses the last one
        os.kill(owner, signal.SIGKILL)
    else:
        os.kill(server.proc.pid, signal.SIGHUP)  # new workers; the old ones stop gracefully
    deadline = time.monotonic() + 30
    while not any(RECONNECTED.search(line) for line in console[before:]) and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    assert any(RECONNECTED.search(line) for line in console[before:]), console[before:]

    state = page.evaluate(READ_STATE)
    assert int(state["pid"]) != owner, "the page still shows its old document, not the restored one"
    del state["pid"]
    assert state == {
        "slider": 42, "derived": "double: 84", "select": "scatter", "title": "scatter",
        "zoom": [2.5, 7.25], "clicks": "clicks: 2", "score": [1, 99, 3],
    }
    # The restored session works: the server answers a new change.
    js(page, "m('slider').value = 5")
    page.wait_for_function("() => Bokeh.documents[0].get_model_by_name('derived').text === 'double: 10'")
    log = server.log()
    assert "restored session" in log and "Traceback" not in log, log
