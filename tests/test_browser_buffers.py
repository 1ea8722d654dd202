"""Headless Chromium: a document with numpy columns survives a reconnect that pulls it again.

BokehJS reconnects by itself and replaces its document with the one it
pulls. Before Bokeh 3.10 it drops the pulled document's binary buffers
there (bokeh issue 15347; `bokeh serve` shows the same), so a numpy column
failed to load ("Failed to repull session ... buffer for id=... not found")
and the page kept its stale document, talking to a session whose models it
does not have. The server inlines the buffers of such pulls.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
from browser_util import TIMEOUT_MS, launch_browser, require_browser

require_browser()

from conftest import APPS, RunningServer, free_port  # noqa: E402

READ = """() => {
  const d = Bokeh.documents[0];
  const y = d.get_model_by_name('source').data.y;
  return {pid: Number(d.get_model_by_name('pid').text), n: y.length, y10: y[10],
          slider: d.get_model_by_name('slider').value};
}"""


@pytest.mark.timeout(120)
def test_numpy_columns_load_again_after_the_worker_is_killed():
    port = free_port()
    server = RunningServer(
        [sys.executable, "-m", "flask_docsync", "serve", str(APPS / "numpy_app.py"), "--num-procs", "2",
         "--port", str(port), "--address", "127.0.0.1"],
        port, env={"DOCSYNC_SECRET_KEY": "buffers-secret-" + "b" * 32}, wait_path="/numpy_app")
    try:
        with launch_browser() as browser:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            console: list[str] = []
            page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
            page.goto(server.url + "/numpy_app")
            page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0"
                                   " && Bokeh.documents[0].get_model_by_name('source') != null")
            before = page.evaluate(READ)
            assert before["n"] == 1000
            os.kill(before["pid"], signal.SIGKILL)
            # BokehJS retries; a live worker makes the session anew; the page
            # loads the pulled document, numpy column included.
            page.wait_for_function(f"() => Number(Bokeh.documents[0].get_model_by_name('pid').text) !== {before['pid']}",
                                   timeout=40_000)
            after = page.evaluate(READ)
            assert after["n"] == 1000 and after["y10"] == pytest.approx(before["y10"])
            # And it is the session's document: a change goes round.
            page.evaluate("() => { Bokeh.documents[0].get_model_by_name('slider').value = 3 }")
            page.wait_for_function("() => Math.abs(Bokeh.documents[0].get_model_by_name('source').data.y[10]"
                                   f" - 3 * {before['y10']}) < 1e-9")
            assert not [line for line in console if "Failed to repull" in line or "not found" in line], console
    finally:
        server.stop()
