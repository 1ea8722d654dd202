"""A host process that has imported Panel: Flask-level tests, each in its own interpreter.

Importing Panel changes process-wide Bokeh state (its models join Bokeh's
registry, its script runner sets Bokeh's global ``curdoc``), so these checks
run in a fresh ``python`` that imports Panel first, as a host app that does
``import panel`` at its top does; the rest of the suite stays Panel-free and
keeps testing plain Bokeh. Each snippet prints one JSON line with what it
saw; the assertions are here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

if importlib.util.find_spec("panel") is None:  # not imported here: this process stays Panel-free
    pytest.skip("the Panel tests need Panel (pip install -e '.[test]' installs it)", allow_module_level=True)

from conftest import APPS, HERE, ROOT  # noqa: E402


def in_panel_process(source: str, timeout: float = 120, import_panel: bool = True) -> Any:
    """Run ``source`` after ``import panel`` (unless told not to) in a new
    interpreter; return what it printed last, as JSON."""
    code = ("import panel\n" if import_panel else "") + textwrap.dedent(source)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(HERE), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=str(ROOT))
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_private_panel_names_flask_docsync_panel_relies_on():
    # flask_docsync/panel.py replaces or calls these; a Panel release that
    # renames one must fail here rather than in a browser.
    missing = in_panel_process("""
        import json
        import panel.io.document as panel_document
        from panel.io.application import Application
        from panel.io.state import state
        from flask_docsync import panel as docsync_panel

        missing = [n for n in docsync_panel.PANEL_NAMES if not hasattr(state, n)]
        missing += [n for n in docsync_panel.PANEL_DOCUMENT_NAMES if not hasattr(panel_document, n)]
        if not isinstance(type(state)._current_thread, property):
            missing.append("_current_thread is no property")
        if not callable(getattr(Application, "_set_session_prefix", None)):
            missing.append("Application._set_session_prefix")
        print(json.dumps(missing))
    """)
    assert missing == []


def test_plain_bokeh_pages_and_embeds_load_every_script_from_under_the_prefix():
    """Panel's models join every page's bundle (as with ``bokeh serve``); the
    paths Panel gives relative to the page are made absolute under the
    blueprint, and each one is served."""
    seen = in_panel_process("""
        import json, re
        from bokeh.models import Div
        from flask import Flask, render_template_string
        from flask_docsync import DocSync

        app = Flask(__name__)
        docsync = DocSync()
        docsync.add_app("/hello", lambda doc: doc.add_root(Div(text="hello")))
        docsync.init_app(app)

        @app.route("/embedded")
        def embedded():
            return render_template_string(
                "<html><head>{{ docsync_resources() }}</head>"
                "<body>{{ docsync_document('/hello') }}</body></html>")

        client = app.test_client()
        pages = {}
        for path in ("/docsync/hello", "/docsync/hello/", "/embedded"):
            html = client.get(path, base_url="http://localhost/corp").get_data(as_text=True)
            urls = re.findall(r'<script src="([^"]+)"', html) + re.findall(r'<link[^>]+href="([^"]+)"', html)
            pages[path] = {url: client.get(url.removeprefix("/corp"), base_url="http://localhost/corp").status_code
                           for url in urls}
        app.extensions["docsync"].stop()
        print(json.dumps(pages))
    """)
    for path, urls in seen.items():
        assert any("/extensions/panel/panel.min.js" in url for url in urls), (path, urls)
        assert any("es-module-shims" in url for url in urls), (path, urls)
        assert all(url.startswith("/corp/docsync/static/") for url in urls), (path, urls)
        assert set(urls.values()) == {200}, (path, urls)


@pytest.mark.parametrize("app", ["sliders.py", "ticker.py"])
def test_a_discarded_session_of_a_script_app_is_freed_by_reference_counting(app):
    """Panel's script runner "restores" Bokeh's global curdoc to the session's
    document; that reference kept every session's document alive until the
    next one replaced it."""
    alive = in_panel_process(f"""
        import gc, json, weakref
        import gevent
        from flask_docsync.apps import build_application
        from flask_docsync.context import ApplicationContext, RequestData
        from bokeh.io import curdoc

        context = ApplicationContext(build_application({str(APPS / app)!r}), "/t")
        context.create_session_if_needed("warm-up", RequestData(), "token", {{}})
        context.destroy_all()
        session = context.create_session_if_needed("s1", RequestData(), "token", {{}})
        gevent.sleep(0.3)
        refs = [weakref.ref(session), weakref.ref(session.document), *(weakref.ref(m) for m in session.document.models)]
        global_doc_is_session = curdoc() is session.document
        gc.collect()
        gc.disable()
        session.request_expiration()
        assert context.cleanup_unused_sessions(10_000) == 1
        del session
        gevent.sleep(0)
        alive = [repr(r()) for r in refs if r() is not None]
        print(json.dumps({{"alive": alive, "global_doc_is_session": global_doc_is_session}}))
    """)
    assert alive == {"alive": [], "global_doc_is_session": False}


def test_a_worker_that_has_not_run_a_panel_app_serves_its_assets():
    """Under several workers the page comes from one and its assets may be
    fetched from another that has not imported Panel or the app's component
    module yet: both are served (the module is imported because it lies in
    an app's folder); a module from elsewhere is not imported for a URL."""
    seen = in_panel_process(f"""
        import json, sys
        from flask import Flask
        from flask_docsync import DocSync

        app = Flask(__name__)
        DocSync(app).add_app("/assets", {str(APPS / "panel" / "assets_app.py")!r})
        before = sorted(m for m in ("panel", "docsync_fancy", "antigravity") if m in sys.modules)
        client = app.test_client()
        statuses = [client.get(u).status_code for u in (
            "/docsync/static/extensions/panel/panel.min.js",
            "/docsync/components/docsync_fancy/Fancy/_stylesheets/docsync_fancy.css",
            "/docsync/components/docsync_fancy/Fancy/_stylesheets/assets_app.py",
            "/docsync/components/antigravity/Fly/_stylesheets/a.css",
        )]
        from panel.io.state import state  # imported by the component request
        adapted = type(state).user.fget.__module__ == "flask_docsync.panel"
        print(json.dumps({{"before": before, "statuses": statuses, "antigravity": "antigravity" in sys.modules,
                          "adapted": adapted}}))
    """, import_panel=False)
    # Looking up Panel's folder for the script must not use up the hook
    # that adapts Panel when it is imported (it did: pn.state.user was
    # Panel's own in that worker).
    assert seen == {"before": [], "statuses": [200, 200, 403, 404], "antigravity": False, "adapted": True}


def test_the_session_whose_script_imports_panel_gets_local_stylesheets_too():
    """In a host that never imports Panel itself, the first session's script
    does: its models, made before Panel knew our routes, pointed at Panel's
    CDN. Embedded (no Panel page render to patch them) they must not."""
    seen = in_panel_process(rf"""
        import json, re, sys
        from flask import Flask, render_template_string
        from flask_docsync import DocSync
        from flask_docsync.session import live_sessions

        app = Flask(__name__)
        DocSync(app).add_app("/onload", {str(APPS / "panel" / "onload_app.py")!r})
        client = app.test_client()
        app.add_url_rule("/page", "page", lambda: render_template_string("{{{{ docsync_document('/onload') }}}}"))
        urls = []
        for _ in range(2):
            client.get("/page")
        for session in live_sessions():
            text = str([m.properties_with_values() for m in session.document.models])
            urls.append(sorted(set(re.findall(r"https?://[\w./@^%-]+|/docsync/static/[\w./@^%-]+", text))))
        print(json.dumps(urls))
    """, import_panel=False)
    assert len(seen) == 2
    for urls in seen:
        assert urls and all(u.startswith("/docsync/static/extensions/panel/") for u in urls), urls


def test_the_page_head_names_no_cdn_file_once_a_tabulator_was_made():
    """Making a Tabulator points its model class's stylesheet at Panel's CDN
    (Panel maps that back only when it renders a page itself); the head
    ``docsync_resources()`` writes for the site's own pages must still name
    our static route, and every file it names must be served."""
    seen = in_panel_process(f"""
        import json, re
        from flask import Flask, render_template_string
        from flask_docsync import DocSync

        app = Flask(__name__)
        DocSync(app).add_app("/assets", {str(APPS / "panel" / "assets_app.py")!r})
        app.add_url_rule("/page", "page", lambda: render_template_string(
            "<head>{{{{ docsync_resources() }}}}</head>{{{{ docsync_document('/assets') }}}}"))
        client = app.test_client()
        import pandas as pd, panel as pn
        from bokeh.document import Document
        pn.widgets.Tabulator(pd.DataFrame({{"a": [1]}})).get_root(Document())  # as any session's would
        head = client.get("/page").get_data(as_text=True).split("</head>")[0]
        urls = re.findall(r'(?:href|src)="([^"]+)"', head)
        print(json.dumps({{"urls": urls, "statuses": [client.get(u).status_code for u in urls if u.startswith("/")]}}))
    """)
    urls = seen["urls"]
    assert any("tabulator" in u and u.endswith(".css") for u in urls), urls
    assert all(u.startswith("/docsync/static/") for u in urls), urls
    assert set(seen["statuses"]) == {200}, seen
