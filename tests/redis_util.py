"""A real redis-server (Debian's) on a free 127.0.0.1 port, without persistence."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time

import pytest

from conftest import free_port

REDIS_SERVER = shutil.which("redis-server") or ("/usr/bin/redis-server" if shutil.os.path.exists("/usr/bin/redis-server") else None)


class RedisServer:
    """``redis-server`` that can be stopped and started again on the same port."""

    def __init__(self) -> None:
        if REDIS_SERVER is None:
            pytest.skip("redis-server is not installed (scripts/test.sh installs Debian's)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="docsync-redis-")
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--protected-mode", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return
            except Exception:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, down_for: float) -> None:
        """Stop (losing everything: no persistence), wait, start again."""
        self.stop()
        time.sleep(down_for)
        self.start()

    def kill_clients(self, kind: str = "normal") -> int:
        """``CLIENT KILL TYPE <kind>``: every connection but this one's."""
        client = self.client()
        try:
            return int(client.execute_command("CLIENT", "KILL", "TYPE", kind, "SKIPME", "yes"))
        finally:
            client.close()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def redis_server():
    server = RedisServer()
    yield server
    server.close()
