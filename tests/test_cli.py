"""`flask-docsync serve` as a command: startup, options, shutdown, packaging."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import APPS, ROOT, RunningServer, free_port
from wire import WireClient, fetch_token


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("BOKEH_", "DOCSYNC_"))}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "flask_docsync", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=str(ROOT))


def test_startup_lines_name_every_app(serve):
    server = serve(APPS / "sliders.py", APPS / "shutdownapp", "--prefix", "/foo")
    log = server.wait_for_log("shutdownapp")
    assert f"Bokeh app running at: http://127.0.0.1:{server.port}/foo/sliders" in log
    assert f"Bokeh app running at: http://127.0.0.1:{server.port}/foo/shutdownapp" in log
    status, _, body = server.get("/foo/")
    assert status == 200 and b"/foo/sliders" in body and b"/foo/shutdownapp" in body
    assert server.get("/foo/sliders")[0] == 200
    assert server.get("/favicon.ico")[0] == 200  # not prefixed, as in Bokeh


def test_no_apps_serves_an_empty_document_at_root(serve):
    server = serve()
    status, _, body = server.get("/")
    assert status == 200 and b"data-root-id" not in body and b"bokeh.min.js" in body
    token = fetch_token(server.url + "/")
    with WireClient(server.ws_url + "/ws", token) as client:
        assert client.handshake().content["doc"]["roots"] == []


def test_sigterm_closes_websockets_with_1001_and_runs_every_hook(serve, tmp_path):
    record = tmp_path / "record.txt"
    server = serve(APPS / "shutdownapp", env={"DOCSYNC_TEST_RECORD": str(record)})
    token = fetch_token(server.url + "/shutdownapp")
    client = WireClient(server.ws_url + "/shutdownapp/ws", token)
    client.handshake()
    server.proc.send_signal(signal.SIGTERM)
    code, reason = client.expect_close()
    client.close()
    assert code == 1001, (code, reason)
    assert server.proc.wait(timeout=20) == 0
    lines = record.read_text().split("\n")
    session_lines = [line for line in lines if line.startswith("session_")]
    assert lines[0] == "server_loaded"
    assert session_lines[0].startswith("session_created ")
    assert session_lines[1] == "session_destroyed " + session_lines[0].split()[1]
    assert "server_unloaded" in lines
    assert "Traceback" not in server.log()


def test_signed_sessions_without_a_secret_is_a_startup_error():
    result = run_cli("serve", str(APPS / "sliders.py"), "--session-ids", "signed", "--port", str(free_port()))
    assert result.returncode == 1
    assert "DOCSYNC_SECRET_KEY" in result.stderr and "BOKEH_SECRET_KEY" in result.stderr


def test_missing_app_path_is_a_startup_error():
    result = run_cli("serve", "no/such/app.py", "--port", str(free_port()))
    assert result.returncode == 1
    assert "no/such/app.py" in result.stderr and "does not exist" in result.stderr


def test_args_reach_the_script(serve, tmp_path):
    script = tmp_path / "argv_app.py"
    script.write_text(
        "import sys\nfrom bokeh.io import curdoc\nfrom bokeh.models import Div\n"
        "curdoc().add_root(Div(text='|'.join(sys.argv[1:]), name='argv'))\n"
    )
    server = serve(script, "--args", "--alpha", "2")
    token = fetch_token(server.url + "/argv_app")
    with WireClient(server.ws_url + "/argv_app/ws", token) as client:
        doc = client.handshake().content["doc"]
    assert "--alpha|2" in str(doc)


def test_notebooks_bokeh_and_panel(serve, tmp_path):
    """A notebook is served as ``bokeh serve`` serves it unless it imports Panel, which ``panel serve``'s handler then
    runs (tests/test_panel_browser.py); Panel is not imported for the first."""
    from flask_docsync import panel

    assert not panel.is_panel_target(APPS / "bokeh_notebook.ipynb")
    assert panel.is_panel_target(APPS / "panel" / "notebook_cells.ipynb")
    broken = tmp_path / "broken.ipynb"
    broken.write_text("{not json")
    assert not panel.is_panel_target(broken)  # Bokeh's handler reports it
    server = serve(APPS / "bokeh_notebook.ipynb")
    token = fetch_token(server.url + "/bokeh_notebook")
    with WireClient(server.ws_url + "/bokeh_notebook/ws", token) as client:
        assert "from a notebook" in str(client.handshake().content["doc"])
    assert "panel" not in sys.modules


@pytest.mark.timeout(300)
def test_pip_install_gives_package_data_and_console_script(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    pip = venv / "bin" / "pip"
    # Build from a copy so the working tree's egg-info does not leak in.
    subprocess.run([str(pip), "install", "-q", "--no-deps", str(ROOT)],
                   check=True, cwd=str(tmp_path), capture_output=True, timeout=240)
    site = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import flask_docsync, os; print(os.path.dirname(flask_docsync.__file__))"],
                          check=True, capture_output=True, text=True, cwd=str(tmp_path)).stdout.strip()
    assert Path(site, "templates", "docsync", "index.html").is_file()
    assert not site.startswith(str(ROOT))
    port = free_port()
    env = {"PYTHONPATH": ""}
    server = RunningServer([str(venv / "bin" / "flask-docsync"), "serve", str(APPS / "sliders.py"),
                            str(APPS / "shutdownapp"), "--port", str(port), "--address", "127.0.0.1"],
                           port, env=env)
    try:
        status, _, body = server.get("/")
        assert status == 200 and b"/sliders" in body  # the index template shipped
        assert server.get("/sliders")[0] == 200
    finally:
        server.stop()


def test_warm_static_dirs_and_index_titles(serve, tmp_path):
    """panel serve's --warm runs each app once before the first visitor (no
    session made), --static-dirs serves folders and nothing outside them,
    --index-titles names apps on the index."""
    runs = tmp_path / "runs.log"
    app = tmp_path / "counted.py"
    app.write_text(
        "import os\nfrom bokeh.io import curdoc\nfrom bokeh.models import Div\n"
        "with open(os.environ['RUNS'], 'a') as f:\n    f.write('run\\n')\n"
        "curdoc().add_root(Div(text='counted'))\n"
    )
    files = tmp_path / "files"
    files.mkdir()
    (files / "hello.txt").write_text("hello from a static dir")
    (tmp_path / "secret.txt").write_text("not served")
    server = serve(app, APPS / "sliders.py", "--warm", "--static-dirs", f"files={files}",
                   "--index-titles", "counted=Counted runs", env={"RUNS": str(runs)})
    assert runs.read_text() == "run\n", "the app ran once at start-up"
    status, _, body = server.get("/")
    assert status == 200 and b"Counted runs" in body and b">/sliders<" in body
    assert server.get("/files/hello.txt")[2] == b"hello from a static dir"
    assert server.get("/files/../secret.txt")[0] == 404
    assert server.get("/files/%2e%2e/secret.txt")[0] == 404
    assert server.get("/counted")[0] == 200
    assert runs.read_text() == "run\nrun\n"
    assert "Traceback" not in server.log()


def test_panel_options_and_setup_errors_are_startup_errors(tmp_path):
    broken = tmp_path / "setup.py"
    broken.write_text("raise ValueError('no database')\n")
    done = run_cli("serve", "--port", "0", "--setup", str(broken), str(APPS / "sliders.py"))
    assert done.returncode == 1 and "--setup" in done.stderr and "no database" in done.stderr
    # Under gunicorn workers: the reason once per worker, no gunicorn
    # traceback, and the arbiter stops rather than respawning them.
    done = run_cli("serve", "--port", "0", "--num-procs", "2", "--setup", str(broken), str(APPS / "sliders.py"),
                   env={"DOCSYNC_SECRET_KEY": "cli-secret-" + "c" * 32})
    assert done.returncode == 3 and "Worker failed to boot" in done.stderr, done.stderr[-2000:]
    assert done.stderr.count("--setup " + str(broken) + " failed: no database") >= 1
    assert "load_wsgi" not in done.stderr and "HaltServer" not in done.stderr, done.stderr[-3000:]
    done = run_cli("serve", "--port", "0", "--setup", str(tmp_path / "missing.py"), str(APPS / "sliders.py"))
    assert done.returncode == 1 and "no such file" in done.stderr
    done = run_cli("serve", "--port", "0", "--static-dirs", "files", str(APPS / "sliders.py"))
    assert done.returncode == 1 and "NAME=VALUE" in done.stderr


def test_serve_with_redis_advertises_its_own_address_unless_told(tmp_path):
    from flask_docsync import cli
    from flask_docsync.cli import build_parser, create_app

    assert cli._reachable_name(None) is None or not cli._reachable_name(None).startswith("127.")
    script = tmp_path / "app.py"
    script.write_text("from bokeh.io import curdoc\nfrom bokeh.models import Div\ncurdoc().add_root(Div())\n")
    parse = build_parser().parse_args
    cases = (
        (["--redis-url", "redis://127.0.0.1:1/0", "--address", "10.0.0.5", "--port", "5006"], "http://10.0.0.5:5006"),
        (["--redis-url", "redis://127.0.0.1:1/0", "--port", "5006", "--advertise-url", "http://h:1"], "http://h:1"),
        (["--port", "5006"], None),
        # Bound to every interface: the address of the interface with the route out, never a loopback name.
        (["--redis-url", "redis://127.0.0.1:1/0", "--address", "0.0.0.0", "--port", "5006"],
         None if cli._reachable_name(None) is None else f"http://{cli._reachable_name(None)}:5006"),
    )
    for args, advertised in cases:
        app = create_app(parse(["serve", str(script), *args]))
        assert app.extensions["docsync"].settings.advertise_url == advertised

