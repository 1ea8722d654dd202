"""Start echo_app under a real WSGI server in a subprocess.

Each server binds port 0 and reports the port it got (pywsgi prints it,
gunicorn logs it), so there is no race for a free port. All output goes to
a log file that tests read to check nothing was logged as an error.
"""

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

#: The servers every server-level test runs against. "pywsgi-gws"
#: (gevent-websocket's WebSocketHandler on plain pywsgi) also works but is
#: left out: it runs the same handler as "gunicorn-gws".
KINDS = (
    "pywsgi-patched",
    "pywsgi-plain",
    "gunicorn-gevent",
    "gunicorn-gws",
    "werkzeug-patched",
)

#: Kinds that need gevent-websocket installed.
GWS_KINDS = ("gunicorn-gws", "pywsgi-gws")

_PORT_PATTERNS = (
    re.compile(rb"^PORT (\d+)$", re.M),
    re.compile(rb"Listening at: http://127\.0\.0\.1:(\d+)"),
)


def command(kind):
    python = sys.executable
    serve = os.path.join(HERE, "serve_pywsgi.py")
    if kind == "pywsgi-patched":
        return [python, serve, "--patch"]
    if kind == "pywsgi-plain":
        return [python, serve]
    if kind == "pywsgi-gws":
        return [python, serve, "--patch", "--gws"]
    if kind == "werkzeug-patched":
        return [python, os.path.join(HERE, "serve_werkzeug.py")]

    worker = {
        "gunicorn-gevent": "gevent",
        "gunicorn-gws": "geventwebsocket.gunicorn.workers.GeventWebSocketWorker",
    }[kind]
    return [
        python, "-m", "gunicorn",
        *_no_control_socket(),
        "-k", worker,
        "-w", "1",
        "-b", "127.0.0.1:0",
        "--graceful-timeout", "1",
        *(["--log-level", "debug"] if os.environ.get("WS_TEST_DEBUG") else []),
        "--pythonpath", HERE,
        "echo_app:app",
    ]


def _no_control_socket():
    # gunicorn 27 opens a control socket at a fixed path by default; two
    # servers (or a developer's own gunicorn) would fight over it.
    try:
        from gunicorn.config import KNOWN_SETTINGS
    except ImportError:
        return []
    for setting in KNOWN_SETTINGS:
        if "--no-control-socket" in (getattr(setting, "cli", None) or ()):
            return ["--no-control-socket"]
    return []


class ServerProcess:
    def __init__(self, kind, env=None):
        self.kind = kind
        self.extra_env = env or {}
        self.proc = None
        self.port = None
        self._log = None

    def start(self, timeout=20.0):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (ROOT, HERE, env.get("PYTHONPATH")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        self._log = tempfile.NamedTemporaryFile(
            prefix=f"ws-{self.kind}-", suffix=".log", delete=False
        )
        self.proc = subprocess.Popen(
            command(self.kind),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Its own process group, so gunicorn's workers can be killed
            # with the master if it does not stop by itself.
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_bytes()
            for pattern in _PORT_PATTERNS:
                match = pattern.search(text)
                if match:
                    self.port = int(match.group(1))
                    return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)

        output = self.log_text()
        self.stop()
        raise RuntimeError(f"{self.kind} server did not start:\n{output}")

    def log_bytes(self):
        if self._log is None:
            return b""
        with open(self._log.name, "rb") as f:
            return f.read()

    def log_text(self):
        return self.log_bytes().decode(errors="replace")

    def stop(self):
        proc = self.proc
        if proc is not None and proc.poll() is None:
            # SIGINT is gunicorn's quick shutdown; pywsgi exits on it too.
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if proc is not None:
            try:
                # Also reaps workers left behind by a master that died.
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait(5)
        if self._log is not None:
            self._log.close()
            try:
                os.unlink(self._log.name)
            except OSError:
                pass
            self._log = None
