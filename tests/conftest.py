"""Shared fixtures: real servers on 127.0.0.1, and a session leak detector."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
APPS = HERE / "apps"
sys.path.insert(0, str(HERE))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """A `flask-docsync serve` (or other command) subprocess on 127.0.0.1."""

    def __init__(self, args: list[str], port: int, env: dict[str, str] | None = None, cwd: Path | None = None,
                 wait_path: str = "/", tls: ssl.SSLContext | None = None) -> None:
        """``tls``: the client context for a server that speaks TLS itself (https/wss URLs); ``None`` for plain HTTP."""
        self.port = port
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        self.ws_url = f"{'wss' if tls else 'ws'}://127.0.0.1:{port}"
        self._log = tempfile.NamedTemporaryFile("w+b", prefix="docsync-server-", suffix=".log", delete=False)
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
        if env:
            full_env.update(env)
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=str(cwd or ROOT),
            start_new_session=True,
        )
        self._wait_ready(wait_path)

    def _wait_ready(self, path: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"server did not start:\n{self.log()}")

    def child_pids(self) -> set[int]:
        """The live children of the server process (gunicorn's workers, under gunicorn)."""
        pids = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                    stat = f.read()
            except OSError:
                continue
            # pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
            fields = stat.rpartition(")")[2].split()
            if len(fields) > 1 and int(fields[1]) == self.proc.pid and fields[0] != "Z":
                pids.add(int(entry))
        return pids

    def wait_for_workers(self, count: int, path: str, timeout: float = 30) -> None:
        """Until gunicorn has booted ``count`` workers and ``path`` answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.child_pids()) == count and self.log().count("Booting worker") >= count:
                try:
                    status, _, _ = self.get(path)
                except OSError:
                    status = None
                if status == 200:
                    # The last worker to boot may still be importing the app;
                    # it accepts nothing until then, so this only skews the spread.
                    time.sleep(0.5)
                    return
            time.sleep(0.1)
        raise AssertionError(f"{count} workers did not start:\n{self.log()}")

    def log(self) -> str:
        """What the server printed, also after it stopped."""
        if not self._log.closed:
            self._log.flush()
        with open(self._log.name, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_for_log(self, text: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in server log:\n{self.log()}")

    def get(self, path: str, headers: dict[str, str] | None = None, method: str = "GET"):
        """(status, headers, body) of an HTTP request; errors are returned, not raised."""
        req = urllib.request.Request(self.url + path, headers=headers or {}, method=method)

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):
                return None

        handlers: list[urllib.request.BaseHandler] = [NoRedirect()]
        if self.tls is not None:
            handlers.append(urllib.request.HTTPSHandler(context=self.tls))
        opener = urllib.request.build_opener(*handlers)
        try:
            with opener.open(req, timeout=15) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def serve() -> Iterator:
    """Start `flask-docsync serve ARGS...`; every server is stopped after the test.

    ``serve("tests/apps/sliders.py", "--keep-alive", "0")`` returns a
    :class:`RunningServer`. Pass ``env={...}`` for environment variables.
    """
    servers: list[RunningServer] = []

    def start(*args: str, env: dict[str, str] | None = None, port: int | None = None) -> RunningServer:
        port = port or free_port()
        # Port and address first: a trailing --args takes everything after it.
        cmd = [sys.executable, "-m", "flask_docsync", "serve", "--port", str(port),
               "--address", "127.0.0.1", *map(str, args)]
        server = RunningServer(cmd, port, env=env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(autouse=True)
def session_leak_detector() -> Iterator[None]:
    """Fail a test that leaves in-process sessions alive (not destroyed)."""
    from flask_docsync.session import live_sessions

    before = {id(s) for s in live_sessions()}
    yield
    leaked = [s for s in live_sessions() if id(s) not in before]
    assert not leaked, f"test left {len(leaked)} live session(s): {leaked}"


@pytest.fixture
def contexts():
    """ApplicationContexts a unit test makes; every session of each is discarded afterwards."""
    made: list = []
    yield made
    for context in made:
        context.destroy_all(force=True)


def pytest_collection_finish(session: pytest.Session) -> None:
    # Importing Panel changes process-wide Bokeh state (its models join every
    # page's bundle); Panel tests run it in their own processes.
    if "panel" in sys.modules:
        raise pytest.UsageError("a test module imported panel while being collected; "
                                "use importlib.util.find_spec and run Panel in a subprocess")
