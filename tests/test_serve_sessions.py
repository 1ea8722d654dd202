"""Sessions and applications of a real `flask_docsync serve` process.

Lifecycle hooks, directory apps (template, static, theme), unused-session
cleanup, metadata, index, --prefix, concurrent creation and failing apps.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from bokeh.util.token import generate_jwt_token

from conftest import RunningServer, free_port
from serve_util import (
    APPS,
    assert_server_healthy,
    attr,
    log_has_line,
    pull_doc,
    session_id_of,
    start_server,
    wait_until,
)
from wire import WireClient, fetch_token

# Unused sessions live 1 s, checked every 0.2 s.
SHORT_CLEANUP = ("--check-unused-sessions", "200", "--unused-session-lifetime", "1000")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("serve-sessions")
    return {"records": base / "hooks.txt", "counts": base / "counts.txt", "prefix_records": base / "prefix.txt"}


@pytest.fixture(scope="module")
def server(files):
    s = start_server(
        APPS / "hooksapp", APPS / "sliders.py", APPS / "counting.py", APPS / "broken.py",
        *SHORT_CLEANUP, "--keep-alive", "0",
        env={"HOOKSAPP_RECORD": str(files["records"]), "COUNT_FILE": str(files["counts"])},
    )
    yield s
    s.stop()


def records(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


# Directory app: hooks, template, static, theme


def test_directory_app_page_template_and_async_session_hook(server, files):
    assert records(files["records"])[0] == "server_loaded"
    status, headers, body = server.get("/hooksapp")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    html = body.decode()
    # templates/index.html extends Bokeh's page with a variable set by main.py.
    assert '<h1 id="greeting">Hello from hooksapp</h1>' in html
    assert "<title>hooksapp</title>" in html
    token = fetch_token(server.url + "/hooksapp")
    sid = session_id_of(token)
    # The async on_session_created awaited, then recorded, before main.py ran.
    assert f"session_created {sid}" in records(files["records"])
    doc = pull_doc(server, "/hooksapp", token)
    assert attr(doc, "hook") == "hook_ran=True"
    assert attr(doc, "hook", "width") == 321  # from theme.yaml


def test_directory_app_static_and_metadata(server):
    status, _, body = server.get("/hooksapp/static/hello.txt")
    assert (status, body) == (200, b"hello from hooksapp static\n")
    assert server.get("/hooksapp/static/missing.txt")[0] == 404
    status, headers, body = server.get("/hooksapp/metadata")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == {"url": "/hooksapp", "data": {}}


def test_index_lists_every_app(server):
    status, _, body = server.get("/")
    assert status == 200
    html = body.decode()
    for route in ("/hooksapp", "/sliders", "/counting", "/broken"):
        assert f'href="{route}"' in html or f"href='{route}'" in html, html


# Unused sessions


def test_unused_session_is_discarded_and_destroyed_hook_runs(server, files):
    token = fetch_token(server.url + "/hooksapp")
    sid = session_id_of(token)
    wait_until(lambda: f"session_destroyed {sid}" in records(files["records"]),
               message="on_session_destroyed of a session nobody connected to")
    # The session is gone: the (unexpired) token now creates a fresh one.
    assert attr(pull_doc(server, "/hooksapp", token), "hook") == "hook_ran=True"
    assert records(files["records"]).count(f"session_created {sid}") == 2


def test_connected_session_is_kept_until_its_connection_closes(server, files):
    token = fetch_token(server.url + "/hooksapp")
    sid = session_id_of(token)
    with WireClient(server.ws_url + "/hooksapp/ws", token) as client:
        client.handshake()
        time.sleep(2.0)  # twice the unused lifetime
        assert f"session_destroyed {sid}" not in records(files["records"])
        reqid = client.send("PULL-DOC-REQ", {})
        reply, _ = client.recv_until("PULL-DOC-REPLY", reqid)
        assert attr(reply.content["doc"], "hook") == "hook_ran=True"
        assert records(files["records"]).count(f"session_created {sid}") == 1
    wait_until(lambda: f"session_destroyed {sid}" in records(files["records"]),
               message="on_session_destroyed after the last connection closed")


# Concurrent creation


def test_concurrent_opens_of_a_new_id_create_one_session(server, files):
    session_id = "concurrent" + uuid.uuid4().hex
    token = generate_jwt_token(session_id, secret_key=None, signed=False, expiration=300)
    results: list = []
    start, done = threading.Barrier(6), threading.Barrier(6)

    def open_one() -> None:
        try:
            start.wait(timeout=10)
            with WireClient(server.ws_url + "/counting/ws", token, timeout=20) as client:
                results.append(attr(client.handshake().content["doc"], "counted"))
                # Stay connected until all are in, so the short unused-session
                # cleanup cannot discard the session between two opens.
                done.wait(timeout=20)
        except Exception as exc:  # reported below
            results.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == ["counted"] * 6
    # counting.py appends the session id each time it runs.
    assert records(files["counts"]).count(session_id) == 1


# Failing apps


def test_failing_script_is_logged_and_server_keeps_serving(server):
    status, _, body = server.get("/broken")
    # As with bokeh serve: the error is logged and the page has an empty document.
    assert status == 200
    token = fetch_token(server.url + "/broken")
    sid = session_id_of(token)
    line = log_has_line(server, sid, "broken app exploded on purpose")
    assert "/broken" in line
    assert pull_doc(server, "/broken", token)["roots"] == []
    assert_server_healthy(server)


# --prefix and the one-app redirect


def test_prefix_urls_and_single_app_redirect(serve, tmp_path):
    s = serve(APPS / "hooksapp", "--prefix", "/foo", "--keep-alive", "0",
              env={"HOOKSAPP_RECORD": str(tmp_path / "records.txt")})
    status, headers, _ = s.get("/foo/")
    assert status == 302 and headers["Location"].endswith("/foo/hooksapp")
    status, headers, _ = s.get("/foo")
    assert status in (301, 302, 308) and "/foo" in headers["Location"]
    status, _, body = s.get("/foo/hooksapp")
    assert status == 200
    html = body.decode()
    assert "Hello from hooksapp" in html
    scripts = [part.split('"')[0] for part in html.split('src="')[1:]]
    assert scripts and all(src.startswith("/foo/static/js/") for src in scripts), scripts
    status, headers, body = s.get(scripts[0])
    assert status == 200 and len(body) > 1000
    assert s.get("/foo/hooksapp/static/hello.txt")[2] == b"hello from hooksapp static\n"
    assert s.get("/hooksapp")[0] == 404
    token = fetch_token(s.url + "/foo/hooksapp")
    with WireClient(s.ws_url + "/foo/hooksapp/ws", token) as client:
        assert attr(client.handshake().content["doc"], "hook") == "hook_ran=True"
    # A clean shutdown destroys the sessions and runs on_server_unloaded.
    assert s.stop() == 0
    lines = records(tmp_path / "records.txt")
    assert lines[0] == "server_loaded" and lines[-1] == "server_unloaded"
    assert f"session_destroyed {session_id_of(token)}" in lines


# FunctionHandler failure (Bokeh defect #3: the pending session never resolves)

FUNCTION_SERVER = '''
from gevent import monkey
monkey.patch_all()
import sys
from bokeh.models import Div
from flask import Flask
from gevent.pywsgi import WSGIServer
from flask_docsync import DocSync

docsync = DocSync(url_prefix="")

@docsync.app("/fails")
def fails(doc):
    raise RuntimeError("function app exploded on purpose")

@docsync.app("/works")
def works(doc):
    doc.add_root(Div(text="works", name="works"))

app = Flask(__name__, static_folder=None)
docsync.init_app(app)
WSGIServer(("127.0.0.1", int(sys.argv[1])), app).serve_forever()
'''


def test_failing_function_app_never_hangs_later_requests(tmp_path):
    script = tmp_path / "function_server.py"
    script.write_text(FUNCTION_SERVER)
    port = free_port()
    s = RunningServer([sys.executable, str(script), str(port)], port)
    try:
        session_id = "fails" + uuid.uuid4().hex
        for _ in range(2):  # the second request for the id must not hang
            status, _, _ = s.get(f"/fails?bokeh-session-id={session_id}")
            assert status == 500
        token = generate_jwt_token(session_id, secret_key=None, signed=False, expiration=300)
        with pytest.raises(Exception) as refused:
            WireClient(s.ws_url + "/fails/ws", token)
        assert getattr(refused.value, "status_code", None) == 500
        assert "function app exploded on purpose" in s.log()
        token = fetch_token(s.url + "/works")
        assert attr(pull_doc(s, "/works", token), "works") == "works"
    finally:
        s.stop()
